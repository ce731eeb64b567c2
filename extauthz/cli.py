"""The ``extauthz`` command line (docs/cli.md): a thin shell over the public API."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence

from .config import ConfigError, load_config
from .logs import JsonLogger

__all__ = ["main"]

EXIT_OK, EXIT_DENY, EXIT_USAGE = 0, 1, 2
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The server's event loop: uvloop's when asked for or (``auto``) installed, else None for
    asyncio's own. uvloop makes a ``grpc.aio`` call itself a fifth (CPU time) to a third
    (instructions) cheaper (README, Performance). Raises ImportError when ``uvloop`` is asked
    for and not installed."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="extauthz", description="Envoy ext_authz token validation")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC ext_authz server")
    serve.add_argument("--config", required=True, help="policy file (YAML)")
    serve.add_argument("--listen", default="0.0.0.0:9001", help="gRPC HOST:PORT")
    serve.add_argument(
        "--http-listen", help="also answer Envoy's HTTP ext_authz protocol on HOST:PORT"
    )
    serve.add_argument("--admin-listen", default="0.0.0.0:9090", help="admin HTTP HOST:PORT")
    serve.add_argument("--workers", type=int, default=1, help="server processes")
    serve.add_argument("--grace-seconds", type=float, default=10.0, help="drain time on SIGTERM")
    serve.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="auto (default): uvloop where it is installed, else asyncio's own",
    )

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")

    explain = sub.add_parser(
        "explain", help="diagnose one request against the policy the server would apply"
    )
    explain.add_argument("--config", required=True, help="policy file (YAML)")
    # The token, or the request as sent (or both: the token goes where the policy reads it).
    token = explain.add_mutually_exclusive_group()
    token.add_argument("--token", help="the token (prefer --token-file: argv is visible to ps)")
    token.add_argument("--token-file", help="file holding the token; '-' reads standard input")
    sent = explain.add_mutually_exclusive_group()
    sent.add_argument(
        "--header",
        action="append",
        metavar="'NAME: VALUE'",
        help="a header as the client sent it (repeatable); no token is added to the request",
    )
    sent.add_argument(
        "--request",
        metavar="FILE",
        help="the request as sent: an HTTP/1.1 request head or a CheckRequest in JSON; '-': stdin",
    )
    explain.add_argument("--deployment", help="as Envoy's context_extensions `deployment`")
    explain.add_argument("--path", help="request path (default: the deployment's pathPrefix)")
    explain.add_argument("--method", help="request method (default GET)")
    explain.add_argument("--host", help="request :authority")
    explain.add_argument(
        "--offline", action="store_true", help="no network: remote keys and introspection skipped"
    )
    explain.add_argument("--json", action="store_true", help="machine-readable output")

    probe = sub.add_parser("probe", help="check every identity-provider endpoint of a config")
    probe.add_argument("--config", required=True, help="policy file (YAML)")
    probe.add_argument("--json", action="store_true", help="machine-readable output")

    evict = sub.add_parser(
        "evict", help="evict a token from the shared cache and every replica's caches"
    )
    evict.add_argument("--config", required=True, help="policy file (YAML) with server.sharedCache")
    named = evict.add_mutually_exclusive_group(required=True)
    named.add_argument("--token-file", help="file holding the token; '-' reads standard input")
    named.add_argument("--token-sha256", metavar="HEX", help="the token's SHA-256, 64 hex")
    evict.set_defaults(token=None)  # _read_token's: a token on the command line is not offered
    return p


def _check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
        return EXIT_USAGE
    if config.server.shared_cache is not None:
        from .shared_cache import check_secrets

        errors = check_secrets(config.server.shared_cache)
        if errors:
            for line in errors:
                print(line, file=sys.stderr)
            print(f"{path}: {len(errors)} error(s)", file=sys.stderr)
            return EXIT_USAGE
    print(config.summary())
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from .lifecycle import run_server  # grpc is only needed to serve

    logger = JsonLogger()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _refuse_to_start(logger, exc)
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    logger.set_level(config.server.log_level)
    if config.server.shared_cache is not None:
        # Here too, before any worker: the shared cache's secrets are read at its start.
        from .shared_cache import check_secrets

        errors = check_secrets(config.server.shared_cache)
        if errors:
            return _refuse_to_start(logger, ConfigError(errors))
    if config.server.tls is not None:
        # Unusable TLS files refuse the start here, before any worker (each would exit 2 and
        # be restarted, forever); the listener reads them again when it binds.
        from .tls import load_material

        try:
            load_material(config.server.tls)
        except ConfigError as exc:
            return _refuse_to_start(logger, exc)
    if args.workers > 1:
        from .workers import supervise

        return asyncio.run(
            supervise(
                config,
                workers=args.workers,
                listen=args.listen,
                admin_listen=args.admin_listen,
                logger=logger,
                grace_seconds=args.grace_seconds,
                event_loop=args.event_loop,
                http_listen=args.http_listen,
            )
        )
    try:
        factory = loop_factory(args.event_loop)
    except ImportError:
        print("--event-loop uvloop: uvloop is not installed", file=sys.stderr)
        return EXIT_USAGE
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(
                run_server(
                    config,
                    listen=args.listen,
                    admin_listen=args.admin_listen,
                    logger=logger,
                    grace_seconds=args.grace_seconds,
                    http_listen=args.http_listen,
                )
            )
    except ConfigError as exc:  # e.g. a client secret file that cannot be read
        return _refuse_to_start(logger, exc)


def _refuse_to_start(logger: JsonLogger, exc: ConfigError) -> int:
    """Every error on stderr (as check-config prints them) and one log line."""
    for line in exc.errors:
        print(line, file=sys.stderr)
    logger.error(
        "server.configInvalid",
        message="Refusing to start: the config is invalid.",
        errors=exc.errors,
    )
    return EXIT_USAGE


def _read_token(args: argparse.Namespace) -> str:
    if args.token is not None:
        return str(args.token)
    if args.token_file == "-":
        return sys.stdin.read()
    with open(args.token_file, encoding="utf-8") as f:
        return f.read()


def _explain(args: argparse.Namespace) -> int:
    from .explain import (
        ExplainRequest,
        RequestError,
        SentRequest,
        UsageError,
        clean_token,
        explain,
        read_request,
        render_text,
        replaying,
        sent_headers,
        to_json,
    )

    given_token = args.token is not None or args.token_file is not None
    if not given_token and args.header is None and args.request is None:
        print("give --token, --token-file, --header or --request", file=sys.stderr)
        return EXIT_USAGE
    if args.token_file == "-" and args.request == "-":
        print("--token-file - and --request -: only one can read standard input", file=sys.stderr)
        return EXIT_USAGE
    sent: SentRequest | None = None
    try:
        config = load_config(args.config)
        if args.request is not None:
            sent = read_request(args.request)
        elif args.header is not None:
            sent = sent_headers(args.header)
        text = _read_token(args) if given_token else None
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return EXIT_USAGE
    except RequestError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"--token-file {args.token_file}: cannot read: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    token: str | None = None
    if text is not None:
        token, note = clean_token(text)
        if not token:
            print("the token is empty", file=sys.stderr)
            return EXIT_USAGE
        if note:
            print(note, file=sys.stderr)
    where = (args.deployment, args.path, args.method, args.host)
    if sent is None:
        request = ExplainRequest(token, *where, offline=args.offline)
    else:
        request = replaying(
            sent,
            token=token,
            deployment=args.deployment,
            path=args.path,
            method=args.method,
            host=args.host,
            offline=args.offline,
        )
    try:
        result = asyncio.run(explain(config, request))
    except (UsageError, ConfigError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(to_json(result), indent=2, ensure_ascii=False))
    else:
        print(render_text(result), end="")
    return result.exit_code


def _probe(args: argparse.Namespace) -> int:
    from .probe import probe, render_text, to_json

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return EXIT_USAGE
    report = asyncio.run(probe(config))
    if args.json:
        print(json.dumps(to_json(report), indent=2, ensure_ascii=False))
    else:
        print(render_text(report), end="")
    return report.exit_code


def _evict(args: argparse.Namespace) -> int:
    """Delete the token's shared entries and publish its eviction: 0 done, 1 the shared cache
    could not be reached, 2 a usage error (no sharedCache, an unreadable token or secret)."""
    from .shared_cache import (
        Evictor,
        EvictRefused,
        open_shared_cache,
        parse_sha256,
        token_scopes,
    )
    from .verified import token_digest

    try:
        config = load_config(args.config)
        if config.server.shared_cache is None:
            raise ConfigError([f"{args.config}: server.sharedCache: not configured"])
        if args.token_sha256 is not None:
            digest = parse_sha256(args.token_sha256.strip().lower())
        else:
            token = _read_token(args).strip()
            if not token:
                print("the token is empty", file=sys.stderr)
                return EXIT_USAGE
            digest = token_digest(token)
        logger = JsonLogger(sys.stderr)  # standard output holds the answer alone
        shared = open_shared_cache(
            config.server.shared_cache,
            lambda level, event, fields: logger.log(level, event, **fields),
            lambda _cache, _result: None,
            subscribe=False,
        )
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return EXIT_USAGE
    except EvictRefused as exc:
        print(f"--token-sha256: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"--token-file {args.token_file}: cannot read: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> tuple[int, dict[str, object]]:
        evictor = Evictor(lambda _digest: 0, shared, lambda: token_scopes(config), logger)
        try:
            return await evictor.evict(digest, "cli")
        finally:
            await shared.aclose()

    status, body = asyncio.run(run())
    body.pop("message", None)
    print(json.dumps(body))
    return EXIT_OK if status == 200 else EXIT_DENY


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "serve":
        return _serve(args)
    if args.command == "explain":
        return _explain(args)
    if args.command == "probe":
        return _probe(args)
    if args.command == "evict":
        return _evict(args)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
