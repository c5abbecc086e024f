"""Implementations of the ``segment``, ``demo`` and ``bench`` subcommands (imported lazily by the CLI)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from medvlm.errors import input_error
from medvlm.types import Box, Points, Region

DEMO_IMAGE = "nih_cxr14_00009745_000.png"


def asset_path(name: str) -> Path:
    """Path of a file bundled in ``medvlm/assets``."""
    return Path(str(resources.files("medvlm.assets").joinpath(name)))


def build_prompts(boxes: Sequence[Sequence[float]], positive: Sequence[Sequence[float]],
                  negative: Sequence[Sequence[float]], labels: Sequence[str]) -> tuple[list[Any], list[str]]:
    """CLI prompt arguments -> (list of segmentation.base.Prompt, one label per prompt).

    Each box is one prompt. Points join the box when there is exactly one box, or form one prompt of their
    own when there is none; with several boxes, which box a point belongs to would be a guess, so it is an error.
    """
    from segmentation.base import Prompt

    points = Points.from_lists(positive, negative) if (positive or negative) else None
    if not boxes and points is None:
        raise input_error("segment prompts", expected="at least one --box, --point or --negative-point",
                          received="no prompt", fix="add e.g. --box 120 80 480 620 (pixels: left top right bottom)")
    if len(boxes) > 1 and points is not None:
        raise input_error("segment prompts", expected="points together with at most one --box",
                          received=f"{len(boxes)} boxes and {len(points)} points",
                          fix="run one command per box when you add points to a box")
    if labels and len(labels) != max(1, len(boxes)):
        raise input_error("--label", expected=f"one label per box ({len(boxes)})", received=f"{len(labels)} labels",
                          fix="give one --label per --box, in the same order")
    prompts = [Prompt(box=Box.from_list(b), points=points) for b in boxes] if boxes else [Prompt(points=points)]
    names = list(labels) if labels else [f"region {k}" for k in range(1, len(prompts) + 1)]
    return prompts, names


def segment_to_regions(segmenter: Any, image: Any, prompts: Sequence[Any], labels: Sequence[str]) -> list[Region]:
    """Encode ``image`` once, decode every prompt, and wrap the masks as Regions with provenance."""
    results = segmenter.segment(image, prompts)
    regions = []
    for result, label, prompt in zip(results, labels, prompts):
        box = result.mask.to_box()
        prompt_json: dict[str, Any] = {}
        if prompt.box is not None:
            prompt_json["box"] = prompt.box.to_list()
        if prompt.points is not None:
            prompt_json["points"] = prompt.points.to_json()
        if prompt.text is not None:
            prompt_json["text"] = prompt.text
            if result.meta.get("structure"):
                prompt_json["structure"] = result.meta["structure"]
        regions.append(Region(
            box=box if box is not None else prompt.box or Box(0, 0, 0, 0),
            label=label, mask=result.mask, points=prompt.points, score=float(result.score),
            provenance={"model": segmenter.name, "prompt": prompt_json},
        ))
    return regions


def _print_regions(regions: Sequence[Region], spacing: tuple[float, float] | None) -> None:
    print(f"{'#':>2}  {'label':<16} {'box (x0 y0 x1 y1, px)':<28} {'score':>6} {'area':>14}")
    for k, r in enumerate(regions, start=1):
        box = " ".join(f"{v:.0f}" for v in r.box.to_list())
        if r.mask is None:
            area = "-"
        elif spacing:
            area = f"{r.mask.area_mm2(spacing):.0f} mm2"
        else:
            area = f"{r.mask.area_px} px"
        score = f"{r.score:.3f}" if r.score is not None else "-"
        print(f"{k:>2}  {r.label:<16} {box:<28} {score:>6} {area:>14}")


def text_prompts(texts: Sequence[str], labels: Sequence[str]) -> tuple[list[Any], list[str]]:
    """``--text`` arguments -> (text Prompts, one label per text: the --label or the text itself)."""
    from segmentation.base import Prompt

    if labels and len(labels) != len(texts):
        raise input_error("--label", expected=f"one label per --text ({len(texts)})", received=f"{len(labels)} labels",
                          fix="give one --label per --text, in the same order, or none")
    return [Prompt(text=t) for t in texts], list(labels) if labels else [t.strip() for t in texts]


def run_segment(args: argparse.Namespace) -> int:
    from medvlm.io import load_image
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
    image = load_image(args.image, slice_index=args.slice_index, axis=args.axis,
                       window=tuple(args.window) if args.window else None)
    if args.text:
        prompts, labels = text_prompts(args.text, args.label)
        name = args.segmenter or "medvlm"
    else:
        prompts, labels = build_prompts(args.box, args.point, args.negative_point, args.label)
        name = args.segmenter or "litemedsam"
    kwargs = {"checkpoint": args.checkpoint} if args.checkpoint else {}
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


def run_demo(args: argparse.Namespace) -> int:
    from medvlm.io import load_image
    from medvlm.outputs import write_regions
    from segmentation.registry import build_segmenter

    spec = json.loads(asset_path("demo.json").read_text())
    image = load_image(asset_path(spec["image"]))
    prompts, labels = build_prompts([r["box"] for r in spec["regions"]], [], [],
                                    [r["label"] for r in spec["regions"]])
    segmenter = build_segmenter("litemedsam")
    print(f"medvlm demo: {spec['description']}")
    print(f"image: {spec['image']} ({image.width}x{image.height}), segmenter: {segmenter.name} (bundled weights)")
    regions = segment_to_regions(segmenter, image, prompts, labels)
    written = write_regions(args.out, Path(spec["image"]).stem, image, regions,
                            extra={"model": segmenter.name, "attribution": spec["attribution"]},
                            title="medvlm demo: LiteMedSAM from box prompts")
    _print_regions(regions, image.spacing_mm)
    print(f"overlay: {written.overlay_path}")
    print(f"json:    {written.json_path}")
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


def _format_bench_table(rows: Sequence[dict[str, Any]]) -> str:
    w = max([34, *(len(str(r["backend"])) for r in rows)])
    head = (f"{'backend':<{w}} {'encode s':>9} {'prompt ms p50':>14} {'prompt ms p90':>14} "
            f"{'N':>3} {'cached s':>9} {'re-encode s':>12} {'speed-up':>9} {'peak MiB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['backend']:<{w}} skipped: {r['error']}")
            continue
        lines.append(
            f"{r['backend']:<{w}} {r['encode_s_median']:>9.3f} {1000 * r['decode_s_median']:>14.1f} "
            f"{1000 * r['decode_s_p90']:>14.1f} {r['n_prompts']:>3} {r['cached_total_s']:>9.3f} "
            f"{r['reencode_total_s']:>12.3f} {r['speedup']:>8.1f}x {r['peak_rss_mib']:>8.0f}")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    if args.bench == "llm":
        from eval.bench_llm import run_bench_llm

        return run_bench_llm(args)
    if args.bench == "ask":
        from agents.commands import run_bench_ask

        return run_bench_ask(args)
    if args.bench == "serve":
        from medvlm.server.bench import run_bench_serve

        return run_bench_serve(args)
    from medvlm.io import load_image
    from medvlm.outputs import write_json_atomic
    from segmentation.base import Prompt
    from segmentation.bench import bench_segmenter
    from segmentation.registry import build_segmenter

    image = load_image(args.image or asset_path(DEMO_IMAGE))
    if getattr(args, "text", False):
        texts = [BENCH_TEXTS[k % len(BENCH_TEXTS)] for k in range(args.prompts)]
        prompts = [Prompt(text=t) for t in texts]
        names = args.segmenter or ["medvlm"]
        kind = "text"
    else:
        prompts = [Prompt(box=b) for b in bench_boxes(image.height, image.width, args.prompts)]
        names = args.segmenter or ["litemedsam", "sam2-random"]
        kind = "box"
    rows: list[dict[str, Any]] = []
    for name in names:
        label = name
        try:
            if name == "sam2-random":
                segmenter = build_segmenter("sam2", random_init=True)
                label = "sam2 hiera-t (random weights, timing)"
            else:
                segmenter = build_segmenter(name)
            row = bench_segmenter(segmenter, image, prompts, repeats=args.repeats)
            row["backend"] = label
        except Exception as exc:  # a missing optional backend is a row, not a crash of the whole table
            row = {"backend": label, "error": f"{type(exc).__name__}: {exc}"[:200]}
        rows.append(row)
        print(f"measured {label}", file=sys.stderr)
    print(f"medvlm bench segment: {image.width}x{image.height} image, {args.prompts} {kind} prompts, "
          f"{args.repeats} repeats; cached = 1 encode + N prompts, re-encode = N x (encode + prompt)")
    print(_format_bench_table(rows))
    if args.json_out:
        write_json_atomic({"suite": "bench-segment", "rows": rows}, Path(args.json_out))
    return 0
