"""Implementations of the ``segment``, ``demo`` and ``bench`` subcommands (imported lazily by the CLI)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medvlm.assets import DEMO_IMAGE, asset_path
from medvlm.errors import input_error
from medvlm.types import Box, Region
from segmentation.requests import build_prompts, segment_to_regions, text_prompts


def _print_regions(regions: Sequence[Region], spacing: tuple[float, float] | None) -> None:
    print(f"{'#':>2}  {'label':<16} {'box (x0 y0 x1 y1, px)':<28} {'score':>6} {'area':>14}")
    for k, r in enumerate(regions, start=1):
        if r.provenance.get("found") is False:  # an existence head's answer: no box, no area
            exist = r.provenance.get("existence")
            why = f" (existence {exist:.3f})" if exist is not None else ""
            if r.provenance.get("ruled_out_by_kind"):
                kind = r.provenance.get("image_kind", {})
                why = (f" (a {kind.get('kind', '?').replace('_', ' ')} image, p {kind.get('probability', 0):.2f}, "
                       "does not show it)")
            print(f"{k:>2}  {r.label:<16} not found in this image{why}")
            continue
        box = " ".join(f"{v:.0f}" for v in r.box.to_list())
        if r.mask is None:
            area = "-"
        elif spacing:
            area = f"{r.mask.area_mm2(spacing):.0f} mm2"
        else:
            area = f"{r.mask.area_px} px"
        score = f"{r.score:.3f}" if r.score is not None else "-"
        print(f"{k:>2}  {r.label:<16} {box:<28} {score:>6} {area:>14}")
        measured = r.measurements(spacing)
        if measured:
            print("    " + ", ".join(f"{name.replace('_', ' ')[:-3]} {value:.1f} {name[-2:]}"
                                    for name, value in measured.items()))


def run_segment(args: argparse.Namespace) -> int:
    from medvlm.io import check_spacing, load_image
    from medvlm.outputs import write_regions
    from segmentation.registry import build_segmenter

    geometry = bool(args.box or args.point or args.negative_point)
    if args.text and geometry:
        raise input_error("segment prompts", expected="either --text prompts or --box/--point prompts",
                          received="both", fix="run one command per kind (text-guided and promptable segmenters "
                          "differ); --refine litemedsam turns text masks into box prompts for you")
    if args.refine and not args.text:
        raise input_error("--refine", expected="--text prompts to refine", received="no --text",
                          fix="add --text, or drop --refine")
    from medvlm.volume import is_volume_input

    if args.slice_index is None and is_volume_input(args.image):
        if not args.text and Path(args.image).is_dir():
            raise input_error("segment prompts", expected="--text prompts for a DICOM series folder",
                              received="no --text", fix="add e.g. --text liver (the whole series is segmented)")
        if getattr(args, "spacing", None):
            raise input_error("--spacing", expected="a 2D PNG/JPEG/DICOM image (a volume keeps its voxel size)",
                              received=f"the volume {args.image}",
                              fix="drop --spacing (the NIfTI header or the DICOM series gives the voxel size)")
        if args.text:  # a 3D NIfTI or a DICOM series folder: the whole volume, slice by slice
            from medvlm.app.volume_commands import run_segment_volume

            return run_segment_volume(args)
    image = load_image(args.image, slice_index=args.slice_index, axis=args.axis,
                       window=tuple(args.window) if args.window else None)
    if getattr(args, "spacing", None):
        image.spacing_mm = check_spacing(args.spacing)
    if args.text:
        prompts, labels = text_prompts(args.text, args.label)
        name = args.segmenter or "medvlm"
    else:
        prompts, labels = build_prompts(args.box, args.point, args.negative_point, args.label)
        name = args.segmenter or "litemedsam"
    kwargs: dict[str, Any] = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    if name == "medvlm" and getattr(args, "postprocess", None):
        kwargs["postprocess"] = args.postprocess
    segmenter = build_segmenter(name, **kwargs)
    regions = segment_to_regions(segmenter, image, prompts, labels)
    model = segmenter.name
    if args.refine:
        refiner = build_segmenter(args.refine)
        from segmentation.refine import refine_regions

        # a region with an empty mask has no box to refine from; the others' boxes are their masks' tight boxes
        found = [k for k, r in enumerate(regions) if r.mask is not None and not r.mask.is_empty()]
        regions = refine_regions(refiner, image, regions, indices=found)
        model = f"{segmenter.name}+{refiner.name}"
    stem = Path(args.image).name.split(".")[0]
    written = write_regions(args.out, stem, image, regions, extra={"model": model})
    _print_regions(regions, image.spacing_mm)
    print(f"wrote {written.json_path}, {written.overlay_path} and {sum(p is not None for p in written.mask_paths)}"
          " mask(s)")
    return 0


#: text prompts of ``bench segment --text`` (cycled): the chest X-ray structures of the default checkpoint
BENCH_TEXTS = ("heart", "right lung", "left lung", "right clavicle", "left clavicle")


def bench_boxes(height: int, width: int, n: int) -> list[Box]:
    """``n`` distinct boxes of 20-60 % of the image side, spread over the image (pixel xyxy)."""
    boxes = []
    for k in range(n):
        f = 0.2 + 0.4 * ((k * 0.37) % 1.0)
        cx, cy = width * (0.3 + 0.4 * ((k * 0.61) % 1.0)), height * (0.3 + 0.4 * ((k * 0.29) % 1.0))
        bw, bh = width * f, height * f
        boxes.append(Box(max(0.0, cx - bw / 2), max(0.0, cy - bh / 2),
                         min(width, cx + bw / 2), min(height, cy + bh / 2)))
    return boxes


def run_bench(args: argparse.Namespace) -> int:
    if args.bench == "llm":
        from medvlm.app.bench_llm import run_bench_llm

        return run_bench_llm(args)
    if args.bench == "ask":
        from medvlm.app.agent_commands import run_bench_ask

        return run_bench_ask(args)
    if args.bench == "serve":
        from medvlm.app.server.bench import run_bench_serve

        return run_bench_serve(args)
    if args.bench == "volume":
        from medvlm.app.volume_commands import run_bench_volume

        return run_bench_volume(args)
    if args.bench == "batch":
        from medvlm.app.agent_commands import run_bench_batch

        return run_bench_batch(args)
    return _run_bench_segment(args)


#: images of the accuracy check of ``bench segment``: the first N val ids of the shipped Med-VLM checkpoint
BENCH_ACCURACY_IMAGES = 20
#: images encoded through ``encode_batch`` (mini-batches of the segmenter's ``encode_batch_size``) for images/s
BENCH_BATCH_IMAGES = 16
BENCH_ACCURACY_DATA = "cxr_jsrt_scr"


def _bench_cases(dataset: Any, ids: Sequence[str], kind: str) -> Any:
    """``(id, image, prompts, gt masks)`` per image, one at a time: oracle boxes (``box``) or structure names
    (``text``) for every non-empty ground-truth structure."""
    from medvlm.types import Mask
    from segmentation.base import Prompt

    for sample_id in ids:
        sample = dataset.load(sample_id)
        names = [n for n, m in sample.masks.items() if m.any()]
        if kind == "box":
            prompts = [Prompt(box=Mask(sample.masks[n]).to_box()) for n in names]
        else:
            prompts = [Prompt(text=n) for n in names]
        yield sample_id, sample.image, prompts, [sample.masks[n] for n in names]


def _path_label(info: dict[str, Any]) -> str:
    if info.get("engine") == "torch" and info.get("precision") == "fp32":
        return "fp32 (torch)" if info.get("requested") == "fp32" else f"{info.get('requested')} -> fp32 (torch)"
    actual = info.get("inference_precision") or info.get("precision")
    return f"{info.get('requested')} -> {info.get('engine')} {actual}"


def _format_precision_table(rows: Sequence[dict[str, Any]]) -> str:
    w = max([28, *(len(str(r.get("path", ""))) for r in rows)])
    n = max([0, *(int(r.get("batch_images", 0)) for r in rows)])
    head = (f"{'backend':<11} {'path':<{w}} {'encode s':>9} {'prompt ms p50':>14} {'p90':>7} {'cached-text p50':>15} "
            f"{f'img/s ({n})':>10} {'peak MiB':>9} {'prepare s':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['backend']:<11} {r.get('path', ''):<{w}} skipped: {r['error']}")
            continue
        cached = f"{r['cached_decode_ms_p50']:.1f}" if r.get("cached_decode_ms_p50") is not None else "-"
        enc = r.get("encoder", {})
        how = "" if enc.get("converted") is None else (" conv" if enc["converted"] else " IR")
        lines.append(
            f"{r['backend']:<11} {r['path']:<{w}} {r['encode_s_median']:>9.3f} {r['decode_ms_p50']:>14.1f} "
            f"{r['decode_ms_p90']:>7.1f} {cached:>15} {r['images_per_s']:>10.2f} {r['peak_rss_mib']:>9.0f} "
            f"{r['prepare_s']:>7.1f}{how}")
    return "\n".join(lines)


def _format_accuracy_table(acc: dict[str, dict[str, Any]]) -> str:
    head = (f"{'backend':<11} {'prompts':<11} {'masks':>5} {'identical':>9} {'Dice(chosen,fp32) mean/min':>27} "
            f"{'|dDice| mean/max':>17} {'Dice GT fp32':>12} {'Dice GT chosen':>14}")
    lines = [head, "-" * len(head)]
    for name, a in acc.items():
        if "error" in a:
            lines.append(f"{name:<11} skipped: {a['error']}")
            continue
        lines.append(
            f"{name:<11} {a['prompts']:<11} {a['n_masks']:>5} {a['identical']:>9} "
            f"{a['agreement_dice_mean']:>18.4f} / {a['agreement_dice_min']:.4f} "
            f"{a['abs_dice_diff_mean']:>8.4f} / {a['abs_dice_diff_max']:.4f} {a['dice_gt_reference']:>12.4f} "
            f"{a['dice_gt_candidate']:>14.4f}")
    return "\n".join(lines)


def _run_bench_segment(args: argparse.Namespace) -> int:
    """``bench segment``: the torch fp32 reference and the chosen precision path side by side (speed, memory),
    then the chosen path's masks against the reference's and the ground truth on JSRT val images."""
    import platform

    import torch

    from medvlm.io import load_image
    from medvlm.outputs import write_json_atomic
    from segmentation.base import Prompt
    from segmentation.bench import bench_paths, compare_paths
    from segmentation.registry import SEGMENTERS, build_segmenter
    from segmentation.runtime import cpu_has_bf16, encoder_plan, openvino_available

    image = load_image(args.image or asset_path(DEMO_IMAGE))
    chosen = getattr(args, "precision", None)  # None: $MEDVLM_PRECISION, else auto
    plan = encoder_plan(chosen)  # validates before any model loads
    if args.segmenter:
        names = list(args.segmenter)
    else:
        names = ["medvlm"] if getattr(args, "text", False) else ["litemedsam", "medvlm"]
    boxes = [Prompt(box=b) for b in bench_boxes(image.height, image.width, args.prompts)]
    texts = [Prompt(text=BENCH_TEXTS[k % len(BENCH_TEXTS)]) for k in range(args.prompts)]
    rows: list[dict[str, Any]] = []
    pairs: dict[str, tuple[Any, Any]] = {}
    for name in names:
        prompts = texts if name == "medvlm" else boxes
        preset = SEGMENTERS.get("sam2" if name == "sam2-random" else name)
        paths: list[str | None] = ["fp32"]
        if preset is not None and preset.supports_precision and plan.compiled:
            paths.append(chosen or plan.requested)
        try:
            if name == "sam2-random":
                built = [build_segmenter("sam2", random_init=True)]
            else:
                built = [build_segmenter(name, precision=path) for path in paths]
            measured = bench_paths(built, image, prompts, repeats=args.repeats, batch_images=BENCH_BATCH_IMAGES)
        except Exception as exc:  # a missing optional backend is a row, not a crash of the whole table
            rows.append({"backend": name, "path": "/".join(map(str, paths)),
                         "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(f"skipped {name}: {exc}", file=sys.stderr)
            continue
        for row in measured:
            row["backend"] = name
            row["path"] = _path_label(row["encoder"]) if row["encoder"] else "fp32 (torch)"
            rows.append(row)
        print(f"measured {name}: {', '.join(r['path'] for r in measured)}", file=sys.stderr)
        if len(built) == 2 and name in ("litemedsam", "medvlm"):
            pairs[name] = (built[0], built[1])

    accuracy: dict[str, dict[str, Any]] = {}
    if pairs:
        try:
            from medvlm.datasets import open_dataset
            from segmentation.textseg.checkpoint import read_checkpoint_config
            from segmentation.textseg.predictor import default_checkpoint_dir

            dataset = open_dataset(getattr(args, "data", None) or BENCH_ACCURACY_DATA)
            _, meta = read_checkpoint_config(default_checkpoint_dir())
            present = set(dataset.ids())
            ids = [i for i in meta.get("val_ids", []) if i in present][:BENCH_ACCURACY_IMAGES]
            if not ids:
                raise FileNotFoundError(f"none of the checkpoint's val ids is in {dataset.root}")
        except Exception as exc:
            accuracy = {name: {"error": f"no JSRT data ({type(exc).__name__}: {exc})"[:200]} for name in pairs}
        else:
            for name, (reference, candidate) in pairs.items():
                kind = "text" if name == "medvlm" else "box"
                result = compare_paths(reference, candidate, _bench_cases(dataset, ids, kind))
                accuracy[name] = {"prompts": "text" if kind == "text" else "oracle box", **result}
                print(f"compared {name} on {len(ids)} images", file=sys.stderr)

    print(f"medvlm bench segment: {image.width}x{image.height} image, {args.prompts} prompts (boxes for litemedsam, "
          f"texts for medvlm), {args.repeats} repeats, {BENCH_BATCH_IMAGES} images for img/s, paths interleaved; "
          f"peak MiB: whole process while the path encodes its batch; torch threads "
          f"{torch.get_num_threads()}; CPU {platform.machine()} bf16 units: {'yes' if cpu_has_bf16() else 'no'}; "
          f"OpenVINO: {'yes' if openvino_available() else 'not installed'}; chosen: {plan.requested} "
          f"({plan.reason})")
    print(_format_precision_table(rows))
    if getattr(args, "profile", False) and "medvlm" in pairs:
        from segmentation.bench import profile_medvlm

        print("\nwhere the chosen Med-VLM path spends its time (OpenVINO per-node times, one call each):")
        try:
            print(profile_medvlm(pairs["medvlm"][1], image, [str(p.text) for p in texts]))
        except ValueError as exc:
            print(f"  no profile: {exc}")
    for name in pairs:
        ref, cand = (r for r in rows if r.get("backend") == name and "error" not in r)
        print(f"{name}: encode {ref['encode_s_median'] / cand['encode_s_median']:.2f}x, img/s "
              f"{cand['images_per_s'] / ref['images_per_s']:.2f}x of fp32 (torch)")
    if accuracy:
        n = max((a.get("n_images", 0) for a in accuracy.values()), default=0)
        print(f"\naccuracy on {n} JSRT val images (the Med-VLM checkpoint's val ids): chosen path vs fp32 (torch)")
        print(_format_accuracy_table(accuracy))
    if args.json_out:
        write_json_atomic({"suite": "bench-segment", "plan": plan.to_json(), "rows": rows, "accuracy": accuracy},
                          Path(args.json_out))
    return 0
