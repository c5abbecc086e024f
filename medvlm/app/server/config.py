"""Settings of ``medvlm serve`` (one frozen object shared by the app, its services and its job worker)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medvlm.errors import input_error
from medvlm.io import MAX_PIXELS_DEFAULT

__all__ = ["ServerConfig"]

#: an API key: printable ASCII without spaces (an HTTP header value), 8 to 4096 characters
_KEY = re.compile(r"^[\x21-\x7e]{8,4096}$")
#: a CORS origin as browsers send it: scheme://host[:port], no path
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


@dataclass(frozen=True)
class ServerConfig:
    """What the server accepts and where it keeps its files.

    ``max_upload_mb``: largest request body in MiB (multipart or JSON, base64 included), checked from
    Content-Length and again while the body streams in. ``max_pixels``: largest image (rows x columns, per
    slice/frame), checked from the file header before decoding. ``worker_threads``: CPU-bound requests run in
    at most this many threads at once (the others wait). ``request_timeout_s``: a request whose model work takes
    longer gets 504 (the thread finishes in the background; its result is dropped). ``data_dir``: results,
    exports and batch jobs (made absolute, so a restarted server finds its jobs). ``max_results``: results kept
    for download, the oldest evicted first. ``cache_size``: image encodings kept per model (LRU by content hash).
    ``max_images``: images in one request (reference-segment targets); ``max_job_images``: images in one job.
    ``torch_threads``: torch intra-op threads per worker thread; 0 = the CPU count divided by ``worker_threads``
    (at least 1), so that concurrent requests do not oversubscribe the cores.

    Security: ``api_key``: when set, every route except ``/healthz``, the web page (``/``, ``/static/``) and the
    API documentation (``/docs``, ``/redoc``, ``/openapi.json``) needs ``Authorization: Bearer <api_key>``
    (401 otherwise); it is left out of the dataclass repr and never logged. ``cors_origins``: browser origins
    allowed to call the API from another site (CORS is off when empty, the default). ``result_ttl_s``: results,
    and finished batch jobs with their uploaded images, are deleted this many seconds after they were written
    (0 = kept until evicted by ``max_results``).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    max_upload_mb: float = 32.0
    max_pixels: int = MAX_PIXELS_DEFAULT
    worker_threads: int = 2
    request_timeout_s: float = 120.0
    data_dir: Path = field(default_factory=lambda: Path("runs/serve"))
    max_results: int = 256
    cache_size: int = 8
    max_images: int = 16
    max_job_images: int = 500
    medvlm_checkpoint: str | None = None
    torch_threads: int = 0
    api_key: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()
    result_ttl_s: float = 24 * 3600.0
    pacs_urls: tuple[str, ...] = ()
    pacs_cache_dir: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        positive = {"max_upload_mb": self.max_upload_mb, "max_pixels": self.max_pixels,
                    "worker_threads": self.worker_threads, "request_timeout_s": self.request_timeout_s,
                    "max_results": self.max_results, "cache_size": self.cache_size, "max_images": self.max_images,
                    "max_job_images": self.max_job_images}
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or value <= 0:
                raise input_error(f"serve --{name.replace('_', '-')}", expected="a positive number",
                                  received=repr(value), fix="pass a value above 0")
        if not isinstance(self.torch_threads, int) or self.torch_threads < 0:
            raise input_error("serve --torch-threads", expected="0 (auto) or a positive thread count",
                              received=repr(self.torch_threads), fix="pass e.g. --torch-threads 1")
        if not 0 <= int(self.port) <= 65535:
            raise input_error("serve --port", expected="a port 0-65535 (0 = any free port)", received=repr(self.port),
                              fix="pass e.g. --port 8080")
        if not isinstance(self.result_ttl_s, (int, float)) or not 0 <= self.result_ttl_s < float("inf"):
            raise input_error("serve --ttl", expected="seconds a result is kept (0 = until evicted)",
                              received=repr(self.result_ttl_s), fix="pass e.g. --ttl 86400")
        if self.api_key is not None:
            key = self.api_key
            if not isinstance(key, str) or not _KEY.match(key):
                # the key itself is never echoed: the message may reach a terminal or a log
                length = len(key) if isinstance(key, str) else 0
                raise input_error("serve --api-key / MEDVLM_API_KEY", expected="8 to 4096 printable ASCII characters "
                                  "without spaces (it travels in an HTTP header)",
                                  received=f"a key of {length} characters that is not", fix="generate one with "
                                  "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        origins = tuple(self.cors_origins)
        for origin in origins:
            if not isinstance(origin, str) or not (origin == "*" or _ORIGIN.match(origin)):
                raise input_error("serve --cors-origin", expected="an origin scheme://host[:port] without a path "
                                  "(e.g. https://viewer.example.org), or *", received=repr(origin),
                                  fix="pass the origin exactly as the browser sends it in its Origin header")
        object.__setattr__(self, "cors_origins", origins)
        from medvlm.pacs import check_url

        object.__setattr__(self, "pacs_urls", tuple(check_url(u) for u in self.pacs_urls))

    @property
    def intra_op_threads(self) -> int:
        """Torch intra-op threads each worker thread uses (``torch_threads``, or the automatic share)."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // self.worker_threads)

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)
