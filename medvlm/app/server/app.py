"""The FastAPI application of ``medvlm serve``: :func:`create_app` builds it from a :class:`ServerConfig`.

Request flow: the body-limit middleware buffers the body (413 past ``max_upload_mb``, from Content-Length
before reading and by counting while reading), :func:`medvlm.app.server.uploads.read_form` parses and validates it
(415 / 400 / 422), then the model work runs in a worker thread (a bounded anyio limiter of
``worker_threads``; the event loop never runs a model) under ``request_timeout_s`` (504). Every error becomes
``{"error": {"type", "message", "expected", "fix"}}``.

Security: with an API key (``medvlm serve --api-key`` / ``MEDVLM_API_KEY``) every route but ``/healthz``, the
web page and the API documentation answers 401 unless the request carries ``Authorization: Bearer <key>`` (as
OpenAI clients send their ``api_key``), compared in constant time; the check runs before the body is read.
CORS is off unless ``--cors-origin`` names the origins allowed (Starlette's CORSMiddleware).

Logging: one line per request (method, route template, status, milliseconds, request id). Nothing the client
sent is logged: no file names (never read), no DICOM tags, no field values, no raw URL, no header (so never the
API key), and for an unexpected exception only its type and stack frames (not its message, which may quote the
input).
"""

from __future__ import annotations

import hmac
import importlib
import json
import logging
import re
import time
import traceback
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medvlm import __version__
from medvlm.app.server import schemas as S
from medvlm.app.server.config import ServerConfig
from medvlm.app.server.errors import ApiError, error_payload, from_input_error
from medvlm.app.server.jobs import JobManager
from medvlm.app.server.pacs_jobs import PacsJobs
from medvlm.app.server.results import ResultStore, check_id, new_id, strip_pixels
from medvlm.app.server.rle import rle_encode
from medvlm.app.server.services import Services, limit_torch_threads
from medvlm.app.server.uploads import Form, Upload, read_form
from medvlm.errors import InputError, MissingDependencyError

__all__ = ["CHAT_MODELS", "OPEN_PATHS", "create_app"]

log = logging.getLogger("medvlm.app.server")

T = TypeVar("T")

STATIC_DIR = Path(__file__).resolve().parent / "static"

#: the model ids POST /v1/chat/completions accepts (GET /v1/models lists them)
CHAT_MODELS: tuple[str, ...] = ("medvlm-grounding",)

#: routes that answer without the API key: liveness, the web page and the API documentation (no data in them)
OPEN_PATHS = frozenset({"/healthz", "/", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
_OPEN_PREFIXES = ("/static/",)

#: the request models documented as bodies (FastAPI does not see them: bodies are parsed by read_form)
REQUEST_MODELS: tuple[type[Any], ...] = (S.SegmentRequest, S.GroundRequest, S.LinkReportRequest,
                                         S.ReferenceSegmentRequest, S.ChatCompletionRequest, S.JobRequest,
                                         S.PacsSegmentRequest, S.PacsLinkReportRequest)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": S.ErrorResponse, "description": what} for code, what in (
        (400, "malformed body (JSON, multipart) or a chat request without image or text"),
        (401, "no or wrong API key (when the server was started with one)"),
        (413, "body over --max-upload-mb, image over --max-pixels, or too many images"),
        (415, "not multipart/JSON, or an upload that is not PNG/JPEG/DICOM/NIfTI"),
        (422, "invalid field or unreadable image (the loader's message)"),
        (504, "the model work took longer than the request timeout"),
    )
}


# ------------------------------------------------------------------------------------------------ middleware


class BodyLimitMiddleware:
    """Refuses bodies over ``limit`` bytes with 413: at once when Content-Length says so, else while reading
    (chunked uploads); a body within the limit is buffered and replayed to the app."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = int(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, 400, "malformed_request", "Content-Length is not a number",
                                  "a byte count", "let the HTTP client set Content-Length")
                return
            if declared > self.limit:
                await self._too_large(send, f"Content-Length {declared} bytes")
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._too_large(send, f"more than {self.limit} bytes streamed")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, received: str) -> None:
        mb = self.limit / (1024 * 1024)
        await _send_error(send, 413, "payload_too_large", f"request body too large: {received}",
                          f"at most {mb:g} MiB per request (--max-upload-mb)",
                          "send a smaller image (PNG of the image instead of a raw volume), fewer images per request, "
                          "or start the server with a larger --max-upload-mb")


async def _send_error(send: Send, status: int, kind: str, message: str, expected: str, fix: str) -> None:
    response = JSONResponse(error_payload(kind, message, expected, fix), status_code=status,
                            headers={"Connection": "close"})
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class BearerAuthMiddleware:
    """Answers 401 (the API's error shape, ``WWW-Authenticate: Bearer``) to a request without
    ``Authorization: Bearer <key>``, except on :data:`OPEN_PATHS`; runs before the body is read, so an
    unauthenticated client cannot make the server buffer an upload. The key is compared with
    :func:`hmac.compare_digest` and is never logged or echoed."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._key = key.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_open(str(scope.get("path", ""))):
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        if token is not None and hmac.compare_digest(token, self._key):
            await self.app(scope, receive, send)
            return
        if token is None:
            message, challenge = "this server needs an API key", 'Bearer realm="medvlm"'
        else:
            message, challenge = "the API key is not valid", 'Bearer realm="medvlm", error="invalid_token"'
        response = JSONResponse(error_payload(
            "unauthorized", message, "an 'Authorization: Bearer <key>' header with the server's API key",
            "send the key the server was started with (--api-key / MEDVLM_API_KEY); OpenAI clients: api_key=KEY"),
            status_code=401, headers={"WWW-Authenticate": challenge})
        await response(scope, _no_receive, send)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or (path.startswith(_OPEN_PREFIXES) and "/.." not in path)


def _bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's ``Authorization: Bearer`` header (scheme case-insensitive), or None."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return bytes(token.strip())
            return None
    return None


class RequestLogMiddleware:
    """Gives every request an id (``X-Request-ID``), logs one line (method, route template, status, milliseconds)
    and answers an unexpected exception with a JSON 500 itself: were it re-raised, uvicorn would log the
    exception's message, which may quote client input."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:12]
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # the type and the stack frames say where it broke; the message (which may quote input) is left out
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error("internal error %s [%s]\n%s", type(exc).__name__, rid, frames)
            if status[0] == 0:
                response = JSONResponse(error_payload(
                    "internal_error", f"internal server error ({type(exc).__name__})", "",
                    "retry; if it persists, report it with the X-Request-ID header"), status_code=500)
                await response(scope, _no_receive, send_with_id)
        finally:
            # the route template, not the raw path: a client can put anything in a URL
            route = getattr(scope.get("route"), "path", None) or "(no route)"
            log.info("%s %s %d %.0f ms [%s]", scope.get("method"), route, status[0],
                     (time.perf_counter() - t0) * 1000.0, rid)


# -------------------------------------------------------------------------------------------------- helpers


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, tuples and paths turned into JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def region_json(k: int, region: Any, spacing_mm: tuple[float, float] | None) -> dict[str, Any]:
    """The API's JSON of ``region`` (a :class:`medvlm.types.Region` in original pixels) with id ``k``."""
    out = _jsonable(region.to_json(spacing_mm=spacing_mm))
    out["id"] = k
    out.setdefault("points", [])
    out["mask"] = rle_encode(region.mask.data) if region.mask is not None else None
    out.setdefault("provenance", {})
    out.setdefault("checks", {})
    return dict(out)


def image_info(image: Any) -> dict[str, Any]:
    return {"width": image.width, "height": image.height,
            "spacing_mm": [float(v) for v in image.spacing_mm] if image.spacing_mm else None,
            "modality": image.modality, "format": str((image.meta or {}).get("format", ""))}


#: the command-line option names in the messages of the prompt builders shared with `medvlm segment` -> API fields
_CLI_WORDS = (("--negative-point", "'points.negative'"), ("--point", "'points.positive'"), ("--label", "'label'"),
              ("--box", "'box'"), ("--text", "'text'"), ("--phrase", "'phrases'"), ("one command", "one request"))


def _in_api_words(err: ApiError) -> ApiError:
    """``err`` with the CLI option names of a shared library message replaced by the API's field names."""
    for cli, field in _CLI_WORDS:
        err.message, err.expected, err.fix = (t.replace(cli, field) for t in (err.message, err.expected, err.fix))
    return err


def _downloads(result_id: str, dicom: bool) -> dict[str, str]:
    base = f"/v1/results/{result_id}"
    out = {"json": f"{base}.json", "png": f"{base}/masks.png", "zip": f"{base}/masks.zip",
           "nii": f"{base}/masks.nii.gz", "image": f"{base}/image.png"}
    if dicom:
        out["dcm"] = f"{base}/masks.dcm"
    return out


def _body_doc(model: type[Any], images: tuple[str, ...], json_fields: tuple[str, ...] = (),
              multipart: bool = True) -> dict[str, Any]:
    """OpenAPI requestBody of an endpoint whose body read_form parses: the JSON model and its multipart twin."""
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if multipart:
        props: dict[str, Any] = {}
        required = []
        for name, info in model.model_fields.items():
            desc = info.description or ""
            if name in images:
                props[name] = {"type": "array", "items": {"type": "string", "format": "binary"},
                               "description": f"file part(s); {desc}"}
            elif name in json_fields:
                props[name] = {"type": "string", "description": f"JSON text: {desc}"}
            else:
                props[name] = {"type": "string", "description": desc}
            if info.is_required():
                required.append(name)
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": props, "required": required}}
    return {"requestBody": {"required": True, "content": content}}


# ------------------------------------------------------------------------------------------------------ app


class _App:
    """What the route functions share: config, models, result store, jobs, and the worker-thread limiter."""

    def __init__(self, config: ServerConfig, services: Services) -> None:
        self.config = config
        self.services = services
        self.results = ResultStore(config.data_dir / "results", config.max_results, ttl_s=config.result_ttl_s)
        self.jobs = JobManager(config.data_dir / "jobs", services, config.intra_op_threads, ttl_s=config.result_ttl_s)
        self.pacs = PacsJobs(config.data_dir / "pacs", services, config.pacs_urls, cache_dir=config.pacs_cache_dir,
                             torch_threads=config.intra_op_threads, ttl_s=config.result_ttl_s)
        self.started = int(time.time())
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        # made on first use, inside the running event loop
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.config.worker_threads)
        return self._limiter

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread, bounded by the limiter and the request timeout (504)."""
        threads = self.config.intra_op_threads

        def call() -> T:
            limit_torch_threads(threads)
            return fn(*args)

        try:
            with anyio.fail_after(self.config.request_timeout_s):
                return await anyio.to_thread.run_sync(call, limiter=self.limiter, abandon_on_cancel=True)
        except TimeoutError:
            raise ApiError(504, "timeout", f"the request took longer than {self.config.request_timeout_s:g} s",
                           expected=f"model work within {self.config.request_timeout_s:g} s (--timeout)",
                           fix="retry (models load on the first request), send a smaller image, or start the "
                           "server with a larger --timeout") from None

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (file work: a delete, a stat) in a thread outside the model limiter, so that it never
        waits behind model requests."""
        return await anyio.to_thread.run_sync(lambda: fn(*args))

    async def form(self, request: Request, model: type[Any], images: tuple[str, ...],
                   json_fields: tuple[str, ...] = (), max_images: int | None = None) -> Form:
        return await read_form(request, model, images=images, json_fields=json_fields,
                               max_images=max_images or self.config.max_images,
                               max_part_bytes=self.config.max_upload_bytes)

    # ------------------------------------------------------------------------------------------ work (threads)

    def load(self, upload: Upload, slice_index: int | None = None) -> Any:
        try:
            return self.services.load_image(upload.data, slice_index)
        except InputError as exc:
            err = from_input_error(exc)
            err.message = f"field '{upload.field}': {err.message}"
            if "slice_index" in err.fix:  # the loader's word; the API field is 'slice'
                err.fix += " (in this API: the field 'slice')"
            if err.status == 413:
                err.fix = (f"downsample the image below {self.config.max_pixels} pixels, or start the server "
                           "with a larger --max-pixels")
            raise err from None

    def keep(self, payload: dict[str, Any], image: Any, upload: Upload) -> dict[str, Any]:
        """Store ``payload`` as a result (its ``result_id`` is set) and add the download links."""
        result_id = payload["result_id"]
        dicom = upload.format == "dicom"
        payload["downloads"] = _downloads(result_id, dicom)
        header = strip_pixels(upload.data) if dicom else None
        self.results.save(result_id, payload, image, header)
        return payload

    def segment(self, form: Form) -> dict[str, Any]:
        from segmentation.requests import build_prompts, segment_to_regions, text_prompts

        f: S.SegmentRequest = form.fields
        upload = form.image("image")
        t0 = time.perf_counter()
        image = self.load(upload, f.slice)
        if f.spacing_mm is not None:
            image.spacing_mm = (float(f.spacing_mm[0]), float(f.spacing_mm[1]))
        timings = {"load_image": time.perf_counter() - t0}
        boxes: list[list[float]] = []
        if f.box:
            boxes = [list(b) for b in f.box] if isinstance(f.box[0], list) else [list(f.box)]
        positive = f.points.positive if f.points else []
        negative = f.points.negative if f.points else []
        texts = [f.text] if isinstance(f.text, str) else list(f.text or [])
        labels = [f.label] if isinstance(f.label, str) else list(f.label or [])
        if not boxes and not positive and not negative and not texts:
            raise ApiError(422, "invalid_input", "no prompt: give a box, points or a text",
                           expected="box [x0, y0, x1, y1] (pixels), points {\"positive\": [[x, y]]} or text",
                           fix="add e.g. box=[395, 440, 765, 770] or text=heart")
        geometry = bool(boxes or positive or negative)
        regions: list[Any] = []
        try:
            if geometry:
                prompts, names = build_prompts(boxes, positive, negative, labels)
                t1 = time.perf_counter()
                with self.services.lock("litemedsam"):
                    regions += segment_to_regions(self.services.litemedsam(), image, prompts, names)
                timings["litemedsam"] = time.perf_counter() - t1
            if texts:
                prompts, names = text_prompts(texts, [] if geometry else labels)
                t1 = time.perf_counter()
                with self.services.lock("medvlm"):
                    regions += segment_to_regions(self.services.medvlm(), image, prompts, names)
                timings["medvlm"] = time.perf_counter() - t1
        except InputError as exc:
            raise _in_api_words(from_input_error(exc)) from None
        timings["total"] = time.perf_counter() - t0
        payload = {"result_id": new_id(), "image": image_info(image),
                   "regions": [region_json(k, r, image.spacing_mm) for k, r in enumerate(regions, start=1)],
                   "timings_s": {k: round(v, 4) for k, v in timings.items()}}
        return self.keep(payload, image, upload)

    def ground(self, form: Form) -> dict[str, Any]:
        f: S.GroundRequest = form.fields
        upload = form.image("image")
        t0 = time.perf_counter()
        image = self.load(upload, f.slice)
        try:
            with self.services.lock("grounding_agent"):
                answer = self.services.agent().ask(image, f.text)
        except InputError as exc:
            raise from_input_error(exc) from None
        payload = {"result_id": new_id(), "image": image_info(image), "answer": answer.text,
                   "question": answer.question, "phrase": answer.phrase, "note": answer.note,
                   "grounder": answer.grounder,
                   "regions": [region_json(k, r, image.spacing_mm) for k, r in enumerate(answer.regions, start=1)],
                   "parsed": _jsonable(answer.meta.get("parsed", {})),
                   "timings_s": {**{k: round(v, 4) for k, v in answer.timings_s.items()},
                                 "request": round(time.perf_counter() - t0, 4)}}
        return self.keep(payload, image, upload)

    def link_report(self, form: Form) -> dict[str, Any]:
        from agents.report import link_report

        f: S.LinkReportRequest = form.fields
        upload = form.image("image")
        t0 = time.perf_counter()
        image = self.load(upload, f.slice)
        try:
            with self.services.lock("grounding_agent"):
                links = link_report(_PhraseCap(self.services.agent(), S.MAX_PROMPTS), image, f.report,
                                    threshold=f.threshold)
        except InputError as exc:
            raise from_input_error(exc) from None
        regions: list[dict[str, Any]] = []
        sentences = []
        for link in links:
            ids = []
            for r in link.regions:
                regions.append(region_json(len(regions) + 1, r, image.spacing_mm))
                ids.append(len(regions))
            sentences.append({"index": link.number, "text": link.text, "status": link.status, "region_ids": ids,
                              "note": link.note, "mentions": _jsonable(link.mentions)})
        payload = {"result_id": new_id(), "image": image_info(image), "sentences": sentences, "regions": regions,
                   "threshold": f.threshold, "timings_s": {"total": round(time.perf_counter() - t0, 4)}}
        return self.keep(payload, image, upload)

    def reference_segment(self, form: Form) -> dict[str, Any]:
        from agents.refseg import add_reference, reference_mask_from_file, transfer_region
        from medvlm.types import Box
        from segmentation.refseg import ReferenceSegmenter, RefSegConfig

        f: S.ReferenceSegmentRequest = form.fields
        ref_upload = form.image("reference")
        mask_upload = form.optional_image("reference_mask")
        targets = form.images.get("target", [])
        if (mask_upload is None) == (f.reference_box is None):
            raise ApiError(422, "invalid_input", "give the structure on the reference as reference_mask OR "
                           "reference_box (exactly one)", expected="a PNG mask file, or [x0, y0, x1, y1] in pixels",
                           fix="send one of the two")
        if not targets:
            raise ApiError(422, "missing_image", "no target image", expected="one or more 'target' images",
                           fix="add target file parts (or a JSON list of base64 images)")
        name = f.label.strip() or "structure"
        t0 = time.perf_counter()
        reference = self.load(ref_upload)
        try:
            out = []
            with self.services.lock("litemedsam"):
                rs = ReferenceSegmenter(self.services.litemedsam(), RefSegConfig(mask_source=f.mask_source))
                ref_mask = add_reference(
                    rs, reference, name, box=None if f.reference_box is None else Box.from_list(f.reference_box),
                    mask=None if mask_upload is None else reference_mask_from_file(mask_upload.data, reference.shape))
                found = []
                for upload in targets:
                    target = self.load(upload)
                    region = transfer_region(rs, target, name, ref_mask)
                    if region is not None:
                        region.provenance = _jsonable(region.provenance)
                    found.append((upload, target, region))
        except InputError as exc:
            raise from_input_error(exc) from None
        for index, (upload, target, region) in enumerate(found):
            regions = [] if region is None else [region_json(1, region, target.spacing_mm)]
            payload = {"result_id": new_id(), "index": index, "image": image_info(target), "label": name,
                       "regions": regions}
            out.append(self.keep(payload, target, upload))
        return {"label": name, "targets": out, "timings_s": {"total": round(time.perf_counter() - t0, 4)}}

    def chat(self, body: S.ChatCompletionRequest, image_upload: Upload, question: str) -> dict[str, Any]:
        image = self.load(image_upload)
        try:
            with self.services.lock("grounding_agent"):
                answer = self.services.agent().ask(image, question)
        except InputError as exc:
            raise from_input_error(exc) from None
        regions = [region_json(k, r, image.spacing_mm) for k, r in enumerate(answer.regions, start=1)]
        result_id = new_id()
        stored = {"result_id": result_id, "image": image_info(image), "answer": answer.text,
                  "question": question, "phrase": answer.phrase, "regions": regions}
        self.keep(stored, image, image_upload)
        return {"id": f"chatcmpl-{result_id[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": None,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": answer.text, "regions": regions}}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                "regions": regions, "result_id": result_id, "phrase": answer.phrase,
                "downloads": stored["downloads"]}


class _PhraseCap:
    """A grounding agent that refuses (422) to ground more than ``limit`` phrases in one call: a 20,000-character
    report can hold hundreds of findings, each a model pass, which would hold the agent for minutes."""

    def __init__(self, agent: Any, limit: int) -> None:
        self.agent = agent
        self.limit = limit

    def ground_phrases(self, image: Any, phrases: list[str]) -> Any:
        if len(phrases) > self.limit:
            raise ApiError(422, "invalid_input", f"the report has {len(phrases)} findings to ground",
                           expected=f"at most {self.limit} findings per request",
                           fix="split the report and send the parts in separate requests")
        return self.agent.ground_phrases(image, phrases)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.agent, name)


def _chat_inputs(body: S.ChatCompletionRequest) -> tuple[Upload, str]:
    """The image (a data URL) and the question of the last user message that has them; 400 otherwise."""
    from medvlm.app.server.uploads import check_upload, decode_base64

    image_url: str | None = None
    texts: list[str] = []
    for message in reversed(body.messages):
        if message.role != "user":
            continue
        parts = message.content if isinstance(message.content, list) else (
            [{"type": "text", "text": message.content}] if isinstance(message.content, str) else [])
        for part in parts:
            kind = part.get("type")
            if kind == "image_url" and image_url is None:
                url = part.get("image_url")
                image_url = url.get("url") if isinstance(url, dict) else url if isinstance(url, str) else None
            elif kind == "text" and not texts and isinstance(part.get("text"), str) and part["text"].strip():
                texts.append(part["text"].strip())
        if image_url is not None and texts:
            break
    if image_url is None:
        raise ApiError(400, "missing_image", "the chat request has no image",
                       expected="a user message content part {\"type\": \"image_url\", \"image_url\": {\"url\": "
                       "\"data:image/png;base64,...\"}}", fix="attach the image as a data URL in the user message")
    if not texts:
        raise ApiError(400, "missing_text", "the chat request has no question",
                       expected="a user message content part {\"type\": \"text\", \"text\": \"where is the heart?\"}",
                       fix="add the question as a text part of the user message")
    try:
        texts[0].encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): the answer, which quotes it, could not be sent
        raise ApiError(422, "invalid_input", "the question is not valid Unicode text (it holds a lone surrogate)",
                       expected="UTF-8 encodable text", fix="send the question as plain text") from None
    if len(texts[0]) > S.MAX_QUESTION_CHARS:
        raise ApiError(422, "invalid_input", f"the question has {len(texts[0])} characters",
                       expected=f"at most {S.MAX_QUESTION_CHARS} characters (as the text of POST /v1/ground)",
                       fix="ask about one structure or finding at a time")
    if not isinstance(image_url, str) or not image_url.startswith("data:"):
        raise ApiError(400, "invalid_image_url", "only data URLs are accepted: the server fetches nothing",
                       expected="data:image/png;base64,...", fix="inline the image as a base64 data URL")
    data, declared = decode_base64(image_url, "image_url")
    return check_upload(data, declared, "image_url"), texts[0]


def _check_model(model: str) -> None:
    if model not in CHAT_MODELS:
        raise ApiError(404, "model_not_found",
                       f"no chat model {model[:100]!r} on this server (GET /v1/models lists them)",
                       expected=f"model one of {', '.join(CHAT_MODELS)} (GET /v1/models lists them)",
                       fix=f"pass model=\"{CHAT_MODELS[0]}\"")


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n\n"


def chat_stream_events(reply: dict[str, Any], include_usage: bool = False) -> list[bytes]:
    """The server-sent events of a streamed chat completion ``reply`` (the non-streamed JSON): a first
    ``chat.completion.chunk`` with the assistant role, one chunk per word of the answer (``delta.content``; their
    concatenation is the answer), a last chunk with ``finish_reason: "stop"`` that also carries ``regions``,
    ``result_id``, ``phrase`` and ``downloads`` as the non-streamed reply does, a usage chunk when
    ``stream_options.include_usage`` asked for one, then ``data: [DONE]``. Rendered whole before the response
    starts, so that any error is still an HTTP status rather than a cut stream."""
    base = {"id": reply["id"], "object": "chat.completion.chunk", "created": reply["created"], "model": reply["model"],
            "system_fingerprint": None}
    usage = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                     **usage, **extra})

    text = str(reply["choices"][0]["message"]["content"])
    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": piece}, None) for piece in re.findall(r"\S+\s*|\s+", text)]
    events.append(chunk({}, "stop", regions=reply["regions"], result_id=reply["result_id"], phrase=reply["phrase"],
                        downloads=reply["downloads"]))
    if include_usage:
        events.append(_sse({**base, "choices": [], "usage": reply["usage"]}))
    events.append(b"data: [DONE]\n\n")
    return events


def create_app(config: ServerConfig | None = None, services: Services | None = None) -> FastAPI:
    """The API app. ``config``: limits and data folder (default :class:`ServerConfig()`); ``services``: the
    models to share (default: a :class:`Services` that loads the real models on first use)."""
    config = config or ServerConfig()
    services = services or Services(cache_size=config.cache_size, max_pixels=config.max_pixels,
                                    medvlm_checkpoint=config.medvlm_checkpoint)
    if services.max_pixels is None:
        services.max_pixels = config.max_pixels
    core = _App(config, services)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        core.results.sweep()
        core.jobs.start()
        core.pacs.start()
        try:
            yield
        finally:
            core.jobs.stop()
            core.pacs.stop()

    app = FastAPI(title="medvlm", version=__version__, lifespan=lifespan,
                  description=(importlib.import_module("medvlm.app.server").__doc__ or "").strip())
    app.state.core = core
    # the last added runs first: request log -> CORS -> API key -> body limit -> routes
    app.add_middleware(BodyLimitMiddleware, limit=config.max_upload_bytes)
    if config.api_key:
        app.add_middleware(BearerAuthMiddleware, key=config.api_key)
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Request-ID"],
                           allow_credentials=False, max_age=600)
    app.add_middleware(RequestLogMiddleware)
    _add_error_handlers(app)
    _add_routes(app, core)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from pydantic.json_schema import models_json_schema

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        if config.api_key:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            for path in OPEN_PATHS & set(schema.get("paths", {})):
                for operation in schema["paths"][path].values():
                    operation["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _add_pacs_routes(app: FastAPI, core: _App) -> None:
    pacs_errors = {**_ERRORS, 403: {"model": S.ErrorResponse, "description": "a PACS URL the server was not "
                                    "started with (--pacs-url)"},
                   409: {"model": S.ErrorResponse, "description": "the server was started without --pacs-url"}}

    @app.post("/v1/pacs/segment", response_model=S.PacsJobStatus, status_code=202, responses=pacs_errors,
              tags=["pacs"], openapi_extra=_body_doc(S.PacsSegmentRequest, (), multipart=False))
    async def pacs_segment(request: Request) -> Any:
        """Queue ``medvlm pacs segment`` as a background job: retrieve the series (WADO-RS), segment it by text
        (CT/MR as a volume, CR/DX per image), write a DICOM SEG and, with ``store``, send it back (STOW-RS).
        Poll GET /v1/pacs/jobs/{id}."""
        form = await core.form(request, S.PacsSegmentRequest, (), ("texts", "labels", "window"))
        return core.pacs.create("segment", form.fields.model_dump())

    @app.post("/v1/pacs/link-report", response_model=S.PacsJobStatus, status_code=202, responses=pacs_errors,
              tags=["pacs"], openapi_extra=_body_doc(S.PacsLinkReportRequest, (), multipart=False))
    async def pacs_link_report(request: Request) -> Any:
        """Queue ``medvlm pacs link-report`` as a background job: ground every sentence of the report on the
        study's radiograph, write a DICOM SR (one item per sentence) and SEG and, with ``store``, send both back.
        Poll GET /v1/pacs/jobs/{id}."""
        form = await core.form(request, S.PacsLinkReportRequest, ())
        return core.pacs.create("link-report", form.fields.model_dump())

    @app.get("/v1/pacs/jobs/{job_id}", response_model=S.PacsJobStatus, tags=["pacs"],
             responses={404: {"model": S.ErrorResponse}})
    async def pacs_job(job_id: str) -> Any:
        """Status, progress (stage, done, total), messages, files and, when done, the summary of a PACS job
        (``result.stored``: what reached the PACS)."""
        return await core.io(core.pacs.status, job_id)

    @app.get("/v1/pacs/jobs/{job_id}/files/{name}", response_model=None, tags=["pacs"],
             responses={404: {"model": S.ErrorResponse}}, response_class=FileResponse)
    async def pacs_job_file(job_id: str, name: str) -> Any:
        """A file a PACS job wrote (listed in its ``files``): DICOM SEG/SR, JSON, overlay PNG, NIfTI labels."""
        path = await core.io(core.pacs.file, job_id, name)
        return FileResponse(path, filename=path.name)


def _add_error_handlers(app: FastAPI) -> None:
    def respond(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(payload, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return respond(exc.status, exc.payload(), exc.headers)

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        err = from_input_error(exc)
        return respond(err.status, err.payload())

    @app.exception_handler(MissingDependencyError)
    async def missing(request: Request, exc: MissingDependencyError) -> JSONResponse:
        return respond(503, error_payload("unavailable", str(exc), "the optional package this needs",
                                          "install it on the server"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else "request"
        msg = errors[0].get("msg", "invalid") if errors else "invalid request"
        return respond(422, error_payload("invalid_input", f"{where}: {msg}", "the documented fields",
                                          "see GET /openapi.json"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return respond(exc.status_code, error_payload(kinds.get(exc.status_code, "http_error"), str(exc.detail),
                                                      "a route listed in GET /openapi.json",
                                                      "check the URL and method"))


def _add_routes(app: FastAPI, core: _App) -> None:
    images = ("image",)

    @app.get("/healthz", response_model=S.Health, tags=["service"])
    async def healthz() -> dict[str, Any]:
        """Liveness and which models are loaded (they load on the first request that needs them)."""
        return {"status": "ok", "version": __version__, "models": core.services.loaded()}

    @app.post("/v1/segment", response_model=S.SegmentResponse, responses=_ERRORS, tags=["tasks"],
              openapi_extra=_body_doc(S.SegmentRequest, images, ("box", "points", "text", "label", "spacing_mm")))
    async def segment(request: Request) -> Any:
        """Box / point prompts (LiteMedSAM) and/or text prompts (Med-VLM) -> one region per prompt."""
        form = await core.form(request, S.SegmentRequest, images, ("box", "points", "text", "label", "spacing_mm"))
        return await core.run(core.segment, form)

    @app.post("/v1/ground", response_model=S.GroundResponse, responses=_ERRORS, tags=["tasks"],
              openapi_extra=_body_doc(S.GroundRequest, images))
    async def ground(request: Request) -> Any:
        """A phrase or a question -> the grounding agent's answer (rule-based phrase extraction, Med-VLM
        grounder, anatomy check) and its regions."""
        form = await core.form(request, S.GroundRequest, images)
        return await core.run(core.ground, form)

    @app.post("/v1/link-report", response_model=S.LinkReportResponse, responses=_ERRORS, tags=["tasks"],
              openapi_extra=_body_doc(S.LinkReportRequest, images))
    async def link_report(request: Request) -> Any:
        """Each report sentence -> grounded / negated / not_groundable, with the ids of its regions."""
        form = await core.form(request, S.LinkReportRequest, images)
        return await core.run(core.link_report, form)

    ref_images = ("reference", "reference_mask", "target")

    @app.post("/v1/reference-segment", response_model=S.ReferenceSegmentResponse, responses=_ERRORS,
              tags=["tasks"], openapi_extra=_body_doc(S.ReferenceSegmentRequest, ref_images, ("reference_box",)))
    async def reference_segment(request: Request) -> Any:
        """The structure a reference shows (mask or box) found in every target (training-free label transfer
        on LiteMedSAM features); one result per target."""
        form = await core.form(request, S.ReferenceSegmentRequest, ref_images, ("reference_box",))
        return await core.run(core.reference_segment, form)

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, responses=_ERRORS, tags=["openai"],
              openapi_extra=_body_doc(S.ChatCompletionRequest, (), multipart=False))
    async def chat_completions(request: Request) -> Any:
        """OpenAI-compatible chat completion: the last user message's image (data URL) and text are answered by
        the grounding agent; ``choices[0].message.regions`` and ``regions`` carry the regions. ``"stream": true``
        answers server-sent ``chat.completion.chunk`` events: the answer word by word, a last chunk with
        ``finish_reason: "stop"`` and the ``regions``, then ``data: [DONE]``."""
        form = await read_form(request, S.ChatCompletionRequest, images=(), max_images=1,
                               max_part_bytes=core.config.max_upload_bytes) \
            if request.headers.get("content-type", "").startswith("application/json") else None
        if form is None:
            raise ApiError(415, "unsupported_media_type", "chat completions take a JSON body",
                           expected="application/json (an OpenAI chat.completions request)",
                           fix="send the request as JSON with the image as a data URL")
        body: S.ChatCompletionRequest = form.fields
        _check_model(body.model)
        upload, question = _chat_inputs(body)
        if not body.stream:
            return await core.run(core.chat, body, upload, question)
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        events = await core.run(lambda: chat_stream_events(core.chat(body, upload, question), include_usage))
        return StreamingResponse(iter(events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models", response_model=S.ModelList, tags=["openai"])
    async def list_models() -> dict[str, Any]:
        """OpenAI-compatible model list: the model ids POST /v1/chat/completions accepts."""
        return {"object": "list", "data": [_model_card(m) for m in CHAT_MODELS]}

    @app.get("/v1/models/{model_id}", response_model=S.ModelCard, tags=["openai"],
             responses={404: {"model": S.ErrorResponse}})
    async def get_model(model_id: str) -> dict[str, Any]:
        """One model of GET /v1/models (OpenAI ``models.retrieve``); 404 for another id."""
        _check_model(model_id)
        return _model_card(model_id)

    def _model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": core.started, "owned_by": "medvlm"}

    @app.get("/v1/results/{result_id}.json", response_model=None, tags=["results"],
             responses={404: {"model": S.ErrorResponse}})
    async def result_json(result_id: str) -> Any:
        """A kept result: the JSON its request answered (masks as RLE)."""
        return core.results.payload(result_id)

    @app.delete("/v1/results/{result_id}", response_model=S.Deleted, tags=["results"],
                responses={404: {"model": S.ErrorResponse}})
    async def delete_result(result_id: str) -> dict[str, Any]:
        """Delete a kept result now: its JSON, image rendering, exports and DICOM header (results also expire
        after --ttl seconds)."""
        await core.io(core.results.delete, result_id)
        return {"result_id": result_id, "deleted": True}

    @app.get("/v1/results/{result_id}/masks.{kind}", response_model=None, tags=["results"],
             responses={404: {"model": S.ErrorResponse}, 409: {"model": S.ErrorResponse}},
             response_class=FileResponse)
    async def result_masks(result_id: str, kind: str) -> Any:
        """Masks of a result: ``png`` (8-bit label map, value = region id, higher id wins on overlap), ``zip`` (one
        0/255 PNG per region), ``nii.gz`` (label map with the source geometry), ``dcm`` (DICOM SEG, one segment per
        region; only for a DICOM source, else 409)."""
        check_id(result_id)
        path, media = await core.run(core.results.export, result_id, kind)
        return FileResponse(path, media_type=media, filename=f"{result_id}.{path.name}")

    @app.get("/v1/results/{result_id}/image.png", response_model=None, tags=["results"],
             responses={404: {"model": S.ErrorResponse}}, response_class=FileResponse)
    async def result_image(result_id: str) -> Any:
        """The image the result was computed on, windowed to 8-bit (DICOM and NIfTI included)."""
        path = await core.io(core.results.file, result_id, "image.png")
        return FileResponse(path, media_type="image/png")

    @app.post("/v1/jobs", response_model=S.JobStatus, status_code=202, responses=_ERRORS, tags=["jobs"],
              openapi_extra=_body_doc(S.JobRequest, ("images",), ("phrases",)))
    async def create_job(request: Request) -> Any:
        """Queue a batch job: every phrase grounded on every image in the background; poll GET /v1/jobs/{id}."""
        form = await core.form(request, S.JobRequest, ("images",), ("phrases",),
                               max_images=core.config.max_job_images)
        uploads = form.images.get("images", [])
        return core.jobs.create([(u.data, u.format) for u in uploads], form.fields.phrases)

    @app.get("/v1/jobs/{job_id}", response_model=S.JobStatus, tags=["jobs"],
             responses={404: {"model": S.ErrorResponse}})
    async def job_status(job_id: str) -> Any:
        """Status and progress (items = image x phrase) of a job."""
        return core.jobs.status(job_id)

    @app.get("/v1/jobs/{job_id}/results", response_model=None, tags=["jobs"],
             responses={404: {"model": S.ErrorResponse}})
    async def job_results(job_id: str) -> Response:
        """The job's results so far as JSONL: one line per (image, phrase) with ``image_index``, ``phrase``,
        ``status`` and ``regions`` (mask files named as in results.zip)."""
        return Response(core.jobs.results_jsonl(job_id), media_type="application/x-ndjson")

    @app.get("/v1/jobs/{job_id}/results.zip", response_model=None, tags=["jobs"],
             responses={404: {"model": S.ErrorResponse}})
    async def job_zip(job_id: str) -> Response:
        """``results.jsonl`` and the masks (0/255 PNGs) of a job, zipped."""
        body = await core.run(core.jobs.results_zip, job_id)
        return Response(body, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{check_id(job_id, "job")}.zip"'})

    _add_pacs_routes(app, core)

    if (STATIC_DIR / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
    else:
        @app.get("/", include_in_schema=False)
        async def docs_redirect() -> RedirectResponse:
            return RedirectResponse("/docs")

