"""Batch jobs: many images x a few phrases, run in one background thread with :func:`agents.batch.run_batch`.

A job lives in ``DATA_DIR/jobs/<job_id>/``: ``job.json`` (status, phrases, counts), ``inputs/<k>.<format>``
(the uploaded images, named by their position in the request: client file names are never used) and
``out/`` (run_batch's ``results.jsonl`` and ``masks/``). The worker runs one job at a time, one image at a
time (each under the grounding agent's lock, so requests and jobs share the model fairly), and updates
``job.json`` after each image. run_batch appends a line per (image, phrase) with fsync and skips what is
already in ``results.jsonl``, so a server stopped mid-job picks the job up again at start and finishes it
with every item exactly once.

A finished job (``done`` or ``failed``) expires like a result: ``ttl_s`` seconds after it finished, its folder
(uploaded images included) is deleted by a sweep at start and, at most every ``sweep_every_s``, on access.

Statuses: ``queued`` -> ``running`` -> ``done`` | ``failed`` (``error`` says why; an unreadable image is not a
job failure: its lines say ``"status": "error"``).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from queue import Empty, Queue
from typing import Any

from medvlm.app.server.errors import ApiError
from medvlm.app.server.results import check_id, new_id
from medvlm.outputs import write_json_atomic

__all__ = ["JobFolders", "JobManager"]

log = logging.getLogger(__name__)

_SUFFIX = {"png": "png", "jpeg": "jpg", "dicom": "dcm", "nifti": "nii", "gzip": "nii.gz"}


class JobFolders:
    """Jobs kept as ``root/<job_id>/job.json`` and run by one worker thread: what batch jobs
    (:class:`JobManager`) and PACS jobs (:class:`~medvlm.app.server.pacs_jobs.PacsJobs`) share.

    Subclasses implement :meth:`work` (the worker loop body, called until :meth:`stop`) and call
    :meth:`start_worker`. ``ttl_s``: seconds a finished job (``done`` / ``failed``) is kept after its last write
    (0 = for ever); :meth:`maybe_sweep` sweeps at most every ``sweep_every_s``.
    """

    thread_name = "medvlm-jobs"

    def __init__(self, root: Path, ttl_s: float = 0.0) -> None:
        self.root = Path(root)
        self.ttl_s = float(ttl_s)
        self.sweep_every_s = min(60.0, self.ttl_s / 10.0)
        self._last_sweep = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called (the worker finishes what it is doing and returns)."""
        return self._stop.is_set()

    def start_worker(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to stop after its current step and wait for it up to ``timeout_s``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.work()

    def work(self) -> None:
        """One step of the worker: wait briefly for a job and run it."""
        raise NotImplementedError

    def read_state(self, job_id: str) -> dict[str, Any] | None:
        """The ``job.json`` of ``job_id``, or None (absent or being replaced)."""
        with self._lock:
            try:
                return dict(json.loads((self.root / job_id / "job.json").read_text()))
            except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
                return None

    def write_state(self, job_id: str, state: dict[str, Any]) -> None:
        """Replace the ``job.json`` of ``job_id`` atomically."""
        with self._lock:
            write_json_atomic(state, self.root / job_id / "job.json")

    def sweep(self) -> int:
        """Delete the folders of jobs that finished more than ``ttl_s`` ago; returns how many."""
        self._last_sweep = time.monotonic()
        if self.ttl_s <= 0 or not self.root.is_dir():
            return 0
        now = time.time()
        removed = 0
        for folder in list(self.root.iterdir()):
            path = folder / "job.json"
            try:
                age = now - path.stat().st_mtime
            except (FileNotFoundError, NotADirectoryError):
                continue
            state = self.read_state(folder.name) if age > self.ttl_s else None
            if state and state.get("status") in ("done", "failed"):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    def maybe_sweep(self) -> None:
        if self.ttl_s > 0 and time.monotonic() - self._last_sweep >= self.sweep_every_s:
            self.sweep()


class JobManager(JobFolders):
    """Creates jobs, runs them in a worker thread and answers their status and results.

    ``services``: the :class:`~medvlm.app.server.services.Services` whose grounding agent runs the jobs;
    ``torch_threads``: torch intra-op threads of the worker thread.
    :meth:`start` re-queues every job found ``queued`` or ``running`` under ``root`` (a restart resumes them).
    ``ttl_s``: seconds a finished job is kept (0 = for ever).
    """

    def __init__(self, root: Path, services: Any, torch_threads: int = 1, ttl_s: float = 0.0) -> None:
        super().__init__(root, ttl_s)
        self.torch_threads = torch_threads
        self.root.mkdir(parents=True, exist_ok=True)
        self.services = services
        self._queue: Queue[str] = Queue()

    # ----------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the worker and queue the unfinished jobs of an earlier run, oldest first."""
        if self.running:
            return
        self.sweep()
        pending = []
        for folder in self.root.iterdir():
            state = self.read_state(folder.name) if (folder / "job.json").exists() else None
            if state and state["status"] in ("queued", "running"):
                pending.append((state.get("created", 0.0), folder.name))
        for _, job_id in sorted(pending):
            self._queue.put(job_id)
        self.start_worker()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to stop after the current image (an unfinished job resumes at the next start)."""
        super().stop(timeout_s)

    # ------------------------------------------------------------------------------------------------- public

    def create(self, images: Sequence[tuple[bytes, str]], phrases: Sequence[str]) -> dict[str, Any]:
        """Store a job (``images``: (bytes, format) in request order) and queue it; returns its status."""
        phrases = [p.strip() for p in phrases]
        if not phrases or not all(phrases):
            raise ApiError(422, "invalid_input", "phrases must be non-empty strings",
                           expected="a JSON list of phrases, e.g. [\"left lung\", \"heart\"]", fix="drop empty phrases")
        if not images:
            raise ApiError(422, "missing_image", "a job needs at least one image",
                           expected="one or more 'images' (file parts or base64)", fix="add the images")
        self.maybe_sweep()
        job_id = new_id()
        folder = self.root / job_id
        (folder / "inputs").mkdir(parents=True)
        for k, (data, fmt) in enumerate(images):
            (folder / "inputs" / f"{k:05d}.{_SUFFIX.get(fmt, 'bin')}").write_bytes(data)
        state = {"id": job_id, "status": "queued", "phrases": phrases, "images": len(images),
                 "progress": {"done": 0, "total": len(images) * len(phrases)}, "error": None,
                 "created": time.time()}
        self.write_state(job_id, state)
        self._queue.put(job_id)
        return state

    def status(self, job_id: str) -> dict[str, Any]:
        check_id(job_id, "job")
        self.maybe_sweep()
        state = self.read_state(job_id)
        if state is None:
            raise ApiError(404, "not_found", "no job with this id", expected="the id returned by POST /v1/jobs",
                           fix="check the id")
        return state

    def results_jsonl(self, job_id: str) -> bytes:
        """The job's result lines so far, with the server's file paths replaced by the image's position."""
        state = self.status(job_id)
        path = self.root / state["id"] / "out" / "results.jsonl"
        if not path.exists():
            return b""
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            rec.pop("key", None)
            rec["image_index"] = int(Path(str(rec.pop("image", "0"))).name.split(".")[0])
            lines.append(json.dumps(rec))
        return ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")

    def results_zip(self, job_id: str) -> bytes:
        """A zip with ``results.jsonl`` (as :meth:`results_jsonl`) and ``masks/`` (0/255 PNGs)."""
        body = self.results_jsonl(job_id)
        masks = self.root / job_id / "out" / "masks"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("results.jsonl", body)
            if masks.is_dir():
                for mask in sorted(masks.iterdir()):
                    if mask.name.startswith("."):
                        continue  # a mask being written (atomic_open's temporary file), renamed away any moment
                    try:
                        zf.write(mask, f"masks/{mask.name}")
                    except FileNotFoundError:
                        continue
        return buf.getvalue()

    # ------------------------------------------------------------------------------------------------ worker

    def work(self) -> None:
        try:
            job_id = self._queue.get(timeout=0.2)
        except Empty:
            return
        try:
            self._run(job_id)
        except Exception as exc:  # a job must never kill the worker; its status says what happened
            log.error("job %s failed: %s", job_id, type(exc).__name__)
            state = self.read_state(job_id) or {"id": job_id, "progress": {"done": 0, "total": 0}}
            state.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            self.write_state(job_id, state)

    def _run(self, job_id: str) -> None:
        from agents.batch import read_done, run_batch

        state = self.read_state(job_id)
        if state is None or state["status"] in ("done", "failed"):
            return
        folder = self.root / job_id
        out = folder / "out"
        inputs = sorted((folder / "inputs").iterdir())
        state["status"] = "running"
        self.write_state(job_id, state)
        log.info("job %s: running (%d images x %d phrases)", job_id, len(inputs), len(state["phrases"]))
        from medvlm.app.server.services import limit_torch_threads

        limit_torch_threads(self.torch_threads)
        agent = self.services.agent()
        for path in inputs:
            if self.stopping:
                return  # stays "running": the next start resumes it
            with self.services.lock("grounding_agent"):
                run_batch(agent, [path], state["phrases"], out, progress=False)
            state["progress"]["done"] = len(read_done(out / "results.jsonl"))
            self.write_state(job_id, state)
        state["status"] = "done"
        self.write_state(job_id, state)
        log.info("job %s: done", job_id)
