"""The ``extauthz`` command line (CONTRACT.md §1): a thin shell over the public API."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from .config import ConfigError, load_config
from .logs import JsonLogger

__all__ = ["main"]

EXIT_OK, EXIT_DENY, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="extauthz", description="Envoy ext_authz token validation")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC ext_authz server")
    serve.add_argument("--config", required=True, help="policy file (YAML)")
    serve.add_argument("--listen", default="0.0.0.0:9001", help="gRPC HOST:PORT")
    serve.add_argument("--admin-listen", default="0.0.0.0:9090", help="admin HTTP HOST:PORT")
    serve.add_argument("--workers", type=int, default=1, help="server processes")
    serve.add_argument(
        "--grace-seconds", type=float, default=10.0, help="drain time on SIGTERM"
    )

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    return p


def _check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
        return EXIT_USAGE
    print(config.summary())
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from .server import run_server  # grpc is only needed to serve

    logger = JsonLogger()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        logger.error("server.configInvalid", message="Refusing to start: the config is invalid.",
                     errors=exc.errors)
        return EXIT_USAGE
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    logger.set_level(config.server.log_level)
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
            )
        )
    try:
        return asyncio.run(
            run_server(
                config,
                listen=args.listen,
                admin_listen=args.admin_listen,
                logger=logger,
                grace_seconds=args.grace_seconds,
            )
        )
    except ConfigError as exc:  # e.g. a client secret file that cannot be read
        for line in exc.errors:
            print(line, file=sys.stderr)
        logger.error("server.configInvalid", message="Refusing to start: the config is invalid.",
                     errors=exc.errors)
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "serve":
        return _serve(args)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
