"""httpx's client API over aiohttp's connection pool: the identity-provider calls' transport.

httpx stays the API every IdP call is written against (requests built whole, ``MockTransport``
in tests, the OpenTelemetry httpx instrumentation, one timeout object); its default transport,
httpcore with anyio, costs about five times aiohttp's HTTP/1.1 client per call, which dominated
the CPU of a check that introspects a new token. This transport sends the httpx request with
aiohttp and translates back, with the errors httpx would have raised, so that
``extauthz.idp.http`` names failures exactly as before:

- a connect that did not complete in time is ``ConnectTimeout``; a connected request whose answer
  did not come in time is ``ReadTimeout``; waiting for a pooled connection is ``PoolTimeout``;
- refused, DNS and TLS failures are ``ConnectError`` raised *from* aiohttp's error, whose own
  cause is the ``OSError``/``socket.gaierror``/``ssl.SSLError``, as ``_unreachable_kind`` reads;
- a peer that closed or spoke something else after connecting is ``RemoteProtocolError`` (or
  ``ReadError``), a transport error;
- httpcore's ``trace`` extension is told when the request starts going out
  (``http11.send_request_headers.started``), so a timeout is still placed before or after it.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import httpx

__all__ = ["AiohttpTransport"]

# What httpcore calls the moment a request starts going out on a connection (new or pooled).
SENDING_EVENT = "http11.send_request_headers.started"
_CHUNK = 16 * 1024
_FRAMING = frozenset({"content-length", "transfer-encoding"})


class _Body(httpx.AsyncByteStream):
    """An aiohttp response's body as httpx reads it; closing it releases the connection."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(_CHUNK):
                yield chunk
        except aiohttp.SocketTimeoutError as exc:  # sock_read ran out mid-body
            raise httpx.ReadTimeout(str(exc)) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise httpx.RemoteProtocolError(type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(type(exc).__name__) from exc

    async def aclose(self) -> None:
        self._response.release()


async def _on_headers_sent(
    _session: aiohttp.ClientSession, context: SimpleNamespace, _params: Any
) -> None:
    tell: Callable[[str, dict[str, Any]], Awaitable[None]] | None = context.trace_request_ctx
    if tell is not None:
        await tell(SENDING_EVENT, {})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (its pool: ``max_connections``, kept alive) with ``ssl_context``; no
    proxies from the environment, no redirects followed, bodies not decompressed here (httpx
    decodes them as its own transport would have)."""

    def __init__(self, ssl_context: ssl.SSLContext, max_connections: int) -> None:
        self._ssl = ssl_context
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running event loop that will use it.
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_on_headers_sent)
        connector = aiohttp.TCPConnector(
            ssl=self._ssl, limit=self._max_connections, limit_per_host=0, enable_cleanup_closed=True
        )
        return aiohttp.ClientSession(
            connector=connector,
            # An IdP's cookies are never sent back: no call may depend on another's (and
            # keeping none costs nothing per call).
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            trace_configs=[trace],
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session
        if session is None or session.closed:
            session = self._session = self._open()
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.get("pool"),  # waiting for a pooled connection, and connecting
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        body = request.content or None
        try:
            response = await session.request(
                request.method,
                str(request.url),
                # aiohttp frames the body itself: httpx's framing headers are not passed on.
                headers=[(k, v) for k, v in request.headers.multi_items() if k not in _FRAMING],
                data=body,
                allow_redirects=False,
                timeout=timeout,
                trace_request_ctx=request.extensions.get("trace"),
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc)) from exc
        except aiohttp.SocketTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc)) from exc
        except aiohttp.ServerTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc)) from exc
        except TimeoutError as exc:  # the pool: no connection came free in time
            raise httpx.PoolTimeout(str(exc)) from exc
        except aiohttp.ClientConnectorError as exc:  # DNS, refused, TLS: nothing was sent
            raise httpx.ConnectError(str(exc)) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError) as exc:
            raise httpx.RemoteProtocolError(type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(type(exc).__name__) from exc
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_Body(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
