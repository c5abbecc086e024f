"""``medvlm batch --engine ray``: the batch of :mod:`agents.batch` on a Ray cluster (or a local Ray), same outputs.

Workers are Ray actors (Ray core; each loads the grounding agent once, with ``num_cpus`` / ``num_gpus`` of its
own) that take one image at a time: they read the image from its path (so the paths must be readable where the
workers run: one machine, or shared storage) and return an :class:`~agents.batch.ImageResult` (the result lines
and the masks as PNG bytes). The driver streams images to them (at most ``in_flight`` per worker: images are
never all in memory), and writes every result itself through :class:`~agents.batch.BatchOutput`: masks
atomically, then one fsync-ed line per item, skipping keys already written. So the JSONL and mask files are the
local engine's (line order aside), and:

- a worker that dies (killed, out of memory, its node lost) is restarted by Ray and its unfinished image is
  submitted again (``max_restarts=-1``, ``max_task_retries=-1``); a result that still arrives twice is written
  once;
- a driver that dies leaves every finished item complete; the same command again skips them (resumes).

Why actors and not Ray Data: the unit of work is one image with all its phrases (the image is encoded once), the
driver must be the only writer (exactly once, atomic files), and results are small; a plain actor pool does
exactly that with fewer moving parts. Progress (items/s, ETA) is a tqdm bar on the driver.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from agents.batch import BatchItems, BatchOutput, BatchSummary, ImageResult, batch_items, ground_image, tally
from medvlm.errors import input_error, missing_dependency

__all__ = ["RAY_INSTALL", "GroundingWorker", "RayBatch", "import_ray", "run_batch_ray"]

RAY_INSTALL = 'pip install -e ".[ray]"  (or: pip install "ray>=2.40")'


def import_ray() -> Any:
    """The ``ray`` module, or :class:`~medvlm.errors.MissingDependencyError` naming the install command."""
    try:
        import ray
    except ImportError as exc:
        raise missing_dependency("medvlm batch --engine ray", RAY_INSTALL) from exc
    return ray


class GroundingWorker:
    """The body of a worker actor: builds the agent once (``make_agent()``; torch with ``threads`` intra-op
    threads), then grounds one image per :meth:`ground` call."""

    def __init__(self, make_agent: Callable[[], Any], threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.agent = make_agent()
        self.pid = os.getpid()

    def ground(self, path: str, todo: Sequence[tuple[str, str]]) -> ImageResult:
        return ground_image(self.agent, path, todo)

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid}


class RayBatch:
    """One ``medvlm batch --engine ray`` run. Build it, then :meth:`run`; ``actors`` holds the worker handles
    while it runs (tests kill one). ``on_result(batch)``: called after each image's lines were written."""

    def __init__(self, make_agent: Callable[[], Any], *, address: str | None = None, num_workers: int | None = None,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, in_flight: int = 2,
                 on_result: Callable[[RayBatch], None] | None = None) -> None:
        if num_workers is not None and num_workers < 1:
            raise input_error("--num-workers", expected="1 or more workers", received=str(num_workers),
                              fix="pass e.g. --num-workers 2, or leave it out (one per cpus-per-worker CPUs)")
        if cpus_per_worker <= 0 or gpus_per_worker < 0:
            raise input_error("--cpus-per-worker / --gpus-per-worker", expected="cpus > 0 and gpus >= 0",
                              received=f"{cpus_per_worker} / {gpus_per_worker}", fix="e.g. 1 CPU, 0 or 0.5 GPU")
        self.make_agent = make_agent
        self.address = address
        self.num_workers = num_workers
        self.cpus_per_worker = float(cpus_per_worker)
        self.gpus_per_worker = float(gpus_per_worker)
        self.in_flight = max(1, int(in_flight))
        self.on_result = on_result
        self.actors: list[Any] = []

    def _connect(self, ray: Any) -> bool:
        """Connect (or start a local Ray); True when this run started it (and so stops it)."""
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": False}
        if self.address:
            kwargs["address"] = self.address
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise input_error("--address", expected="a running Ray cluster (auto, HOST:6379, or ray://HOST:10001)",
                              received=f"{self.address}: {exc}",
                              fix="start one with `ray start --head`, or leave --address out for a local Ray") from exc
        return True

    def _workers(self, ray: Any) -> int:
        if self.num_workers is not None:
            return self.num_workers
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        return max(1, int(cpus // self.cpus_per_worker))

    def run(self, inputs: Iterable[Path], phrases: Sequence[str], out_dir: str | os.PathLike[str], *,
            retry_errors: bool = False, progress: bool = True) -> BatchSummary:
        """Ground every phrase on every image of ``inputs`` into ``out_dir`` (the layout of :mod:`agents.batch`);
        returns the counts of this run."""
        return self.run_items(batch_items(inputs, phrases), out_dir, retry_errors=retry_errors, progress=progress)

    def run_items(self, items: BatchItems, out_dir: str | os.PathLike[str], *, retry_errors: bool = False,
                  progress: bool = True) -> BatchSummary:
        """Ground the phrases of each image of ``items`` (:func:`agents.batch.batch_inputs`) into ``out_dir``."""
        from tqdm import tqdm

        ray = import_ray()
        output = BatchOutput(out_dir, retry_errors=retry_errors)
        summary = BatchSummary(images=len(items), items=sum(len(phr) for _, phr in items))
        work: list[tuple[Path, list[tuple[str, str]]]] = []
        for path, phrases in items:
            todo = output.todo(path, phrases)
            summary.skipped_done += len(phrases) - len(todo)
            if todo:
                work.append((path, todo))
        t0 = time.perf_counter()
        bar = tqdm(total=summary.items, initial=summary.skipped_done, disable=not progress, unit="item",
                   desc="medvlm batch (ray)", smoothing=0.1)
        if not work:
            bar.close()
            return summary
        started = self._connect(ray)
        try:
            n = min(self._workers(ray), len(work))
            threads = max(1, int(self.cpus_per_worker))
            actor_cls = ray.remote(GroundingWorker).options(
                num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=-1, max_task_retries=-1)
            self.actors = [actor_cls.remote(self.make_agent, threads) for _ in range(n)]
            queue = iter(work)
            pending: dict[Any, tuple[int, Path, list[tuple[str, str]]]] = {}

            def submit(k: int) -> None:
                item = next(queue, None)
                if item is not None:
                    pending[self.actors[k].ground.remote(str(item[0]), item[1])] = (k, *item)

            for k in range(n):
                for _ in range(self.in_flight):
                    submit(k)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    k, _path, todo = pending.pop(ref)
                    result: ImageResult = ray.get(ref)
                    tally(summary, result, output.write(result))
                    bar.update(len(todo))
                    if self.on_result is not None:
                        self.on_result(self)
                    submit(k)
        finally:
            bar.close()
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
            if started:
                ray.shutdown()
        summary.seconds = time.perf_counter() - t0
        return summary


def run_batch_ray(make_agent: Callable[[], Any], items: BatchItems, out_dir: str | os.PathLike[str], *,
                  address: str | None = None, num_workers: int | None = None, cpus_per_worker: float = 1.0,
                  gpus_per_worker: float = 0.0, retry_errors: bool = False, progress: bool = True) -> BatchSummary:
    """:func:`agents.batch.run_batch_items` on Ray (module docstring). ``items``: each image with its phrases
    (:func:`agents.batch.batch_inputs`). ``make_agent``: a picklable zero-argument callable that builds the
    grounding agent in each worker. ``address``: a running cluster (``auto``,
    ``HOST:6379``, ``ray://HOST:10001``), or None for the one already initialised in this process, else a new
    local Ray with this machine's cores. ``num_workers``: default one per ``cpus_per_worker`` CPUs of the
    cluster; ``gpus_per_worker``: GPUs each worker reserves (fractions share a GPU)."""
    return RayBatch(make_agent, address=address, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                    gpus_per_worker=gpus_per_worker).run_items(items, out_dir, retry_errors=retry_errors,
                                                               progress=progress)
