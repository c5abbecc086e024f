"""``medvlm serve``: run the API (:func:`medvlm.app.server.app.create_app`) with uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import warnings

from medvlm.app.server.config import ServerConfig
from medvlm.errors import missing_dependency

__all__ = ["API_KEY_ENV", "config_from_args", "run_serve"]


#: the environment variable holding the API key (preferred to --api-key: a command line is visible in ps)
API_KEY_ENV = "MEDVLM_API_KEY"


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerConfig:
    """The :class:`ServerConfig` of ``medvlm serve``'s options; the API key is ``--api-key``, else
    ``$MEDVLM_API_KEY`` (empty = none)."""
    env = os.environ if environ is None else environ
    key = getattr(args, "api_key", None) or env.get(API_KEY_ENV, "").strip() or None
    return ServerConfig(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                        worker_threads=args.worker_threads, request_timeout_s=args.timeout, data_dir=args.data_dir,
                        max_results=args.max_results, cache_size=args.cache_size,
                        medvlm_checkpoint=args.checkpoint, torch_threads=args.torch_threads, api_key=key,
                        cors_origins=tuple(getattr(args, "cors_origin", None) or ()),
                        result_ttl_s=float(getattr(args, "ttl", 24 * 3600.0)),
                        pacs_urls=tuple(getattr(args, "pacs_url", None) or ()))


def run_serve(args: argparse.Namespace) -> int:
    """Bind the socket first (``--port 0`` picks a free port), print where the API listens, then serve."""
    try:
        import uvicorn

        from medvlm.app.server.app import create_app
    except ImportError as exc:
        raise missing_dependency(f"medvlm serve ({exc.name or exc})", "pip install -e '.[serve]'") from exc
    from medvlm.app.server.services import MODEL_NAMES, Services
    from medvlm.pacs import redact_url

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
    # whether a key is required, never the key
    print(f"medvlm serve: API key {'required (Authorization: Bearer)' if config.api_key else 'off'}; CORS "
          f"{'for ' + ', '.join(config.cors_origins) if config.cors_origins else 'off'}; results kept "
          f"{f'{config.result_ttl_s:g} s' if config.result_ttl_s else 'until evicted'}; PACS "
          f"{', '.join(redact_url(u) for u in config.pacs_urls) if config.pacs_urls else 'off'}", flush=True)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print("medvlm serve: warning: bound to a non-local address; "
              + ("serve it over TLS (a reverse proxy): the API key travels in every request" if config.api_key else
                 "the API has no authentication: set MEDVLM_API_KEY (or --api-key), or put it behind an "
                 "authenticating proxy"), file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info" if args.verbose else "warning",
                                           access_log=False, timeout_graceful_shutdown=10))
    server.run(sockets=[sock])
    return 0
