"""A tiny HTTP upstream that echoes each request back as JSON.

Every request, whatever its method or path, gets ``200`` and
``{"method": ..., "path": ..., "headers": {...}}`` so the demo and the e2e tests can see which
identity headers (``x-auth-subject``...) Envoy forwarded after extauthz allowed the request.
Header names are lower-cased; a repeated header is joined with ``", "``.

    python examples/upstream.py [PORT]        # or UPSTREAM_PORT=8081; default 8081
"""

from __future__ import annotations

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_PORT = 8081


class EchoHandler(BaseHTTPRequestHandler):
    """Answers every request with a JSON description of that request."""

    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream connections expect

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)  # drain the body so the connection can be reused
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body = json.dumps({"method": self.command, "path": self.path, "headers": headers}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        # One plain line per request on stderr; the launcher sends it to the upstream's log file.
        sys.stderr.write(
            f"upstream {self.command} {self.path} {args[1] if len(args) > 1 else ''}\n"
        )


def _stop_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM ends serve_forever() the same way Ctrl-C does.
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    port = int(argv[1] if len(argv) > 1 else os.environ.get("UPSTREAM_PORT", DEFAULT_PORT))
    host = os.environ.get("UPSTREAM_HOST", "127.0.0.1")
    server = ThreadingHTTPServer((host, port), EchoHandler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    print(f"upstream listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
