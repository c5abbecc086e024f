"""``medvlm serve``: run the API (:func:`medvlm.server.app.create_app`) with uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import warnings

from medvlm.errors import missing_dependency
from medvlm.server.config import ServerConfig

__all__ = ["config_from_args", "run_serve"]


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` of ``medvlm serve``'s options."""
    return ServerConfig(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                        worker_threads=args.worker_threads, request_timeout_s=args.timeout, data_dir=args.data_dir,
                        max_results=args.max_results, cache_size=args.cache_size,
                        medvlm_checkpoint=args.checkpoint, torch_threads=args.torch_threads)


def run_serve(args: argparse.Namespace) -> int:
    """Bind the socket first (``--port 0`` picks a free port), print where the API listens, then serve."""
    try:
        import uvicorn

        from medvlm.server.app import create_app
    except ImportError as exc:
        raise missing_dependency(f"medvlm serve ({exc.name or exc})", "pip install -e '.[serve]'") from exc
    from medvlm.server.services import MODEL_NAMES, Services

    # pydicom warns and logs about odd values by quoting them (names, dates): keep tag values out of the
    # server's stderr and logs; unreadable files still fail with the loader's own error
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    config = config_from_args(args)
    services = Services(cache_size=config.cache_size, max_pixels=config.max_pixels,
                        medvlm_checkpoint=config.medvlm_checkpoint)
    if args.preload:
        services.preload(MODEL_NAMES)
    app = create_app(config, services)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    port = sock.getsockname()[1]
    host = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    # the bench and scripts read this line to find an ephemeral port
    print(f"medvlm serve: listening on http://{host}:{port} (data dir {config.data_dir}); "
          f"API docs at /docs; Ctrl-C stops it", flush=True)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print("medvlm serve: warning: bound to a non-local address; the API has no authentication, put it behind "
              "an authenticating proxy", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info" if args.verbose else "warning",
                                           access_log=False, timeout_graceful_shutdown=10))
    server.run(sockets=[sock])
    return 0
