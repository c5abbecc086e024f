"""PACS jobs of ``medvlm serve``: ``POST /v1/pacs/segment`` and ``POST /v1/pacs/link-report`` run
:func:`medvlm.app.pacs_commands.pacs_segment` / :func:`~medvlm.app.pacs_commands.pacs_link_report` (what
``medvlm pacs segment | link-report`` run) in a background thread; ``GET /v1/pacs/jobs/{id}`` answers status,
progress and the summary; ``GET /v1/pacs/jobs/{id}/files/{name}`` the files written.

A job lives in ``DATA_DIR/pacs/<job_id>/``: ``job.json`` (kind, status, the request without credentials,
progress, the last messages, the summary or the error) and ``out/`` (the files the CLI writes to ``--out``).
Statuses: ``queued`` -> ``running`` -> ``done`` | ``failed``.

Which PACS: only the DICOMweb URLs the server was started with (``--pacs-url``, repeatable; the first is the
default). A request naming another URL is refused (403): a server that fetched whatever URL a caller names
would let every caller reach every host the server can reach.

Credentials: the server's own (``$MEDVLM_PACS_USER`` / ``$MEDVLM_PACS_PASSWORD`` or ``$MEDVLM_PACS_TOKEN``), or
per request (``user`` + ``password``, or ``token``). Per-request credentials live in memory for the job only:
they are never written to ``job.json`` or logged.

A restart does not resume a PACS job (its credentials may have lived in memory only): a job found ``queued`` or
``running`` at start is marked ``failed`` saying so. Nothing reaches the PACS before the job's one STOW-RS
request, and ``result.stored`` lists what it stored, so a failed job has stored nothing.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from queue import Empty, Queue
from typing import Any

from medvlm.app.server.errors import ApiError
from medvlm.app.server.jobs import JobFolders
from medvlm.app.server.results import check_id, new_id
from medvlm.errors import InputError, MedvlmError

__all__ = ["MAX_MESSAGES", "PacsJobs", "allowed_pacs_url"]

log = logging.getLogger(__name__)

#: messages kept per job (the newest)
MAX_MESSAGES = 200
_SECRETS = ("user", "password", "token")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def allowed_pacs_url(requested: str | None, allowed: Sequence[str]) -> str:
    """The DICOMweb URL a job may use: ``requested`` when it is one of ``allowed`` (compared without a trailing
    slash), the first of ``allowed`` when ``requested`` is None. Raises :class:`ApiError` 409 when the server has
    no PACS and 403 for another URL."""
    if not allowed:
        raise ApiError(409, "no_pacs", "this server was started without a PACS",
                       expected="medvlm serve --pacs-url URL (the DICOMweb base URL; repeatable)",
                       fix="restart the server with --pacs-url, e.g. --pacs-url http://127.0.0.1:8042/dicom-web")
    if requested is None:
        return allowed[0]
    wanted = requested.strip().rstrip("/")
    for url in allowed:
        if url.rstrip("/") == wanted:
            return url
    raise ApiError(403, "pacs_not_allowed", "the server may not talk to this PACS URL",
                   expected=f"one of the URLs the server was started with ({len(allowed)} configured)",
                   fix="leave 'url' out to use the server's PACS, or restart the server with another --pacs-url")


class PacsJobs(JobFolders):
    """Queues PACS jobs, runs them one at a time in a worker thread, answers their status and files.

    ``root``: the jobs' folder. ``services``: the :class:`~medvlm.app.server.services.Services` whose Med-VLM
    segmenter (``segment``) and grounding agent (``link-report``) the jobs share with requests, under their
    locks. ``urls``: the DICOMweb URLs allowed (see :func:`allowed_pacs_url`). ``cache_dir``: the retrieved
    instances' cache (default: the PACS client's). ``timeout_s`` / ``retries``: per HTTP request to the PACS.
    ``torch_threads``: torch intra-op threads of the worker. ``ttl_s``: seconds a finished job is kept
    (0 = for ever).
    """

    thread_name = "medvlm-pacs-jobs"

    def __init__(self, root: Path, services: Any, urls: Sequence[str] = (), *, cache_dir: Path | None = None,
                 timeout_s: float = 30.0, retries: int = 3, torch_threads: int = 1, ttl_s: float = 0.0) -> None:
        super().__init__(root, ttl_s)
        self.services = services
        self.urls = tuple(urls)
        self.cache_dir = cache_dir
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.torch_threads = torch_threads
        self._queue: Queue[tuple[str, dict[str, Any]]] = Queue()

    # ----------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Mark jobs left unfinished by an earlier run as failed, sweep expired ones and start the worker."""
        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(self.root.iterdir()):
            state = self.read_state(folder.name)
            if state and state["status"] in ("queued", "running"):
                state.update(status="failed", error={
                    "type": "interrupted", "message": "the server stopped during this job",
                    "expected": "a job to finish in one server run",
                    "fix": "submit it again; nothing was stored in the PACS unless result.stored lists it"})
                self.write_state(folder.name, state)
        self.sweep()
        self.start_worker()

    # ------------------------------------------------------------------------------------------------- public

    def create(self, kind: str, request: dict[str, Any]) -> dict[str, Any]:
        """Queue a job of ``kind`` (``segment`` | ``link-report``) for the validated ``request`` (a dict of the
        request model); answers its status. The URL is checked here, so a refused one is a 403 at once."""
        url = allowed_pacs_url(request.get("url"), self.urls)
        job_id = new_id()
        (self.root / job_id / "out").mkdir(parents=True)
        public = {k: v for k, v in request.items() if k not in _SECRETS}
        public["url"] = url
        public["auth"] = "request" if any(request.get(k) for k in _SECRETS) else "server"
        state: dict[str, Any] = {"id": job_id, "kind": kind, "status": "queued", "request": public,
                 "progress": {"stage": "queued", "done": 0, "total": 0}, "messages": [], "result": None,
                 "files": [], "error": None, "created": time.time()}
        self.write_state(job_id, state)
        self._queue.put((job_id, {**request, "url": url}))
        return state

    def status(self, job_id: str) -> dict[str, Any]:
        check_id(job_id, "job")
        state = self.read_state(job_id)
        if state is None:
            raise ApiError(404, "not_found", "no PACS job with this id",
                           expected="the id returned by POST /v1/pacs/segment or /v1/pacs/link-report",
                           fix="check the id (finished jobs expire after the server's --ttl)")
        return state

    def file(self, job_id: str, name: str) -> Path:
        """The output file ``name`` of a job (404 when absent; only plain names of ``out/``)."""
        self.status(job_id)
        if not _FILE_NAME.match(name):
            raise ApiError(404, "not_found", "no such file", expected="a name listed in the job's 'files'",
                           fix="GET /v1/pacs/jobs/{id} lists them")
        path = self.root / job_id / "out" / name
        if not path.is_file():
            raise ApiError(404, "not_found", f"job {job_id} has no file {name!r}",
                           expected="a name listed in the job's 'files'", fix="GET /v1/pacs/jobs/{id} lists them")
        return path

    # ------------------------------------------------------------------------------------------------ worker

    def work(self) -> None:
        try:
            job_id, request = self._queue.get(timeout=0.2)
        except Empty:
            return
        self._run(job_id, request)

    def _run(self, job_id: str, request: dict[str, Any]) -> None:
        state = self.read_state(job_id)
        if state is None or state["status"] != "queued":
            return
        out = self.root / job_id / "out"
        last_write = [0.0]

        def save(force: bool = False) -> None:
            # progress is written at most 4 times a second: a 300-slice volume would otherwise write 300 files
            now = time.monotonic()
            if force or now - last_write[0] >= 0.25:
                state["files"] = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
                self.write_state(job_id, state)
                last_write[0] = now

        def say(message: str) -> None:
            state["messages"] = (state["messages"] + [str(message)])[-MAX_MESSAGES:]
            save()

        def progress(stage: str, done: int, total: int) -> None:
            state["progress"] = {"stage": stage, "done": int(done), "total": int(total)}
            save()

        state["status"] = "running"
        save(force=True)
        log.info("pacs job %s (%s): running", job_id, state["kind"])
        try:
            from medvlm.app.server.services import limit_torch_threads

            limit_torch_threads(self.torch_threads)
            state["result"] = self._execute(state["kind"], request, out, say, progress)
            state["status"] = "done"
            state["progress"] = {"stage": "done", "done": 1, "total": 1}
        except Exception as exc:  # a job must never kill the worker; its status says what happened
            state["status"] = "failed"
            state["error"] = _error_json(exc)
            log.error("pacs job %s failed: %s", job_id, type(exc).__name__)
        state["finished"] = time.time()
        save(force=True)

    def _execute(self, kind: str, request: dict[str, Any], out: Path, say: Any, progress: Any) -> dict[str, Any]:
        from medvlm.app.pacs_commands import pacs_client, pacs_link_report, pacs_segment

        client = pacs_client(request["url"], request.get("user"), request.get("password"), request.get("token"),
                             timeout_s=self.timeout_s, retries=self.retries, cache_dir=self.cache_dir)
        if kind == "segment":
            window = request.get("window")
            return pacs_segment(client, request["study"], request.get("series"), request["texts"],
                                request.get("labels"), out, segmenter=self._segmenter,
                                window=(float(window[0]), float(window[1])) if window else None,
                                store=bool(request.get("store")), say=say, progress=progress)
        return pacs_link_report(client, request["study"], request.get("series"), request.get("instance"),
                                request["report"], "request", out, agent=self._agent,
                                threshold=float(request.get("threshold", 0.5)), store=bool(request.get("store")),
                                say=say, progress=progress)

    def _segmenter(self) -> Any:
        return _Locked(self.services.medvlm(), self.services.lock("medvlm"))

    def _agent(self) -> Any:
        return _Locked(self.services.agent(), self.services.lock("grounding_agent"))


class _Locked:
    """Calls of ``inner``'s methods under ``lock``, one call at a time: a volume job holds the model for one
    slice batch, not for the whole volume, so requests keep being answered between its calls."""

    def __init__(self, inner: Any, lock: threading.Lock) -> None:
        self._inner = inner
        self._model_lock = lock

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._model_lock:
                return value(*args, **kwargs)

        return call


def _error_json(exc: Exception) -> dict[str, Any]:
    """The job's error in the API's error shape; an unexpected exception says only its type (no internals)."""
    if isinstance(exc, InputError):
        return {"type": "invalid_input", "message": str(exc), "expected": exc.expected, "fix": exc.fix}
    if isinstance(exc, MedvlmError):
        return {"type": type(exc).__name__, "message": str(exc), "expected": "", "fix": ""}
    return {"type": "internal_error", "message": f"the job failed ({type(exc).__name__})", "expected": "",
            "fix": "see the server log"}
