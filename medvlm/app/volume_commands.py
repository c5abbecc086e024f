"""``medvlm segment VOLUME --text ...``: whole-volume text-guided segmentation (a 3D NIfTI or a DICOM series folder).

``run_segment`` (medvlm/app/commands.py) hands a volume input here when ``--text`` is given and ``--slice`` is
not. Reading lives in :mod:`medvlm.volume`, segmenting in :mod:`segmentation.volume`, writing in
:mod:`medvlm.volume_outputs`; this handler checks the arguments, wires them and prints one row per text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medvlm.errors import input_error


def volume_stem(path: str | Path) -> str:
    """Output file stem of a volume input: the file name without its extensions, or the folder's name."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p.resolve().name or "volume"
    return p.name.split(".")[0] or "volume"


def run_segment_volume(args: argparse.Namespace) -> int:
    from medvlm.volume import read_volume
    from medvlm.volume_outputs import write_volume_outputs
    from segmentation.registry import build_segmenter
    from segmentation.volume import segment_volume

    if args.box or args.point or args.negative_point:
        raise input_error("segment prompts", expected="--text prompts for a volume", received="--box/--point prompts",
                          fix="volumes are segmented with --text; for box prompts pick one slice with --slice")
    if args.refine:
        raise input_error("--refine", expected="no --refine for a whole volume", received=f"--refine {args.refine}",
                          fix="drop --refine, or segment one slice with --slice and refine that")
    volume = read_volume(args.image)
    window = (float(args.window[0]), float(args.window[1])) if args.window else None
    kwargs = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    segmenter = build_segmenter(args.segmenter or "medvlm", **kwargs)
    result = segment_volume(segmenter, volume, args.text, args.label or None, window=window,
                            slice_postprocess=getattr(args, "postprocess", None) or "off",
                            progress=sys.stderr.isatty())
    stem = volume_stem(args.image)
    per_text = [{"text": r.text, "structure": r.structure, "text_read": r.text_read,
                 "existence_source": r.existence_source, "slices_found_before_3d": int(sum(r.slice_found)),
                 "voxels_before_3d": r.raw_voxels} for r in result.results]
    t = result.timings
    extra = {"model": result.model, "encode": result.encode_mode, "postprocess": result.settings,
             "timings_s": {k: round(v, 4) for k, v in t.items()}}
    written = write_volume_outputs(args.out, stem, volume, result.masks(), [r.label for r in result.results],
                                   existence=[r.existence for r in result.results], per_text=per_text, extra=extra,
                                   window=result.window)
    z, h, w = volume.shape
    print(f"{volume.format} volume {volume.stored_shape} ({z} axial slices of {h}x{w}, "
          f"{' x '.join(f'{s:g}' for s in volume.spacing)} mm), {volume.modality}, window {result.window}")
    print(f"{'#':>2}  {'label':<20} {'found':>5} {'volume':>12} {'slices':>11}")
    for entry in written.payload["texts"]:
        rng = entry["slice_range"]
        slices = f"{rng[0]}-{rng[1]}" if rng else "-"
        print(f"{entry['id']:>2}  {entry['label']:<20} {'yes' if entry['found'] else 'no':>5} "
              f"{entry['volume_ml']:>9.1f} mL {slices:>11}")
    print(f"{z} slices in {t['total_s']:.1f} s ({t['ms_per_slice']:.0f} ms/slice, encoder "
          f"{t['encode_ms_per_slice']:.0f} ms/slice, {result.encode_mode})")
    files = [written.label_path, written.json_path, written.overlay_path, written.montage_path]
    if written.dicom_seg_path is not None:
        files.insert(1, written.dicom_seg_path)
    print("wrote " + ", ".join(str(p) for p in files))
    return 0


#: the volume of ``medvlm bench volume`` when none is given (a small CT of ../shared/data: 30 axial slices)
BENCH_VOLUME = ("ct_totalsegmentator_example", "example_ct_sm.nii.gz")


def run_bench_volume(args: argparse.Namespace) -> int:
    """``medvlm bench volume``: seconds per slice and per volume of the 3D text-guided path, torch fp32 beside
    the chosen precision (``--precision`` / auto) in the same run (each path run ``--repeats`` times, alternating;
    medians), and how far their 3D masks agree (Dice per text)."""
    import statistics
    import time

    import numpy as np

    from medvlm.datasets import default_data_root
    from medvlm.outputs import write_json_atomic
    from medvlm.volume import read_volume
    from segmentation.registry import build_segmenter
    from segmentation.volume import segment_volume

    path = Path(args.volume) if args.volume else default_data_root().joinpath(*BENCH_VOLUME)
    if not path.exists():
        raise input_error("bench volume", expected="a NIfTI volume or a DICOM series folder", received=f"{path} "
                          "(absent)", fix="pass --volume PATH, or set MEDVLM_DATA to the folder holding the data")
    volume = read_volume(path)
    texts = args.text or ["liver", "spleen"]
    segmenters = {"fp32": build_segmenter("medvlm", precision="fp32"), "chosen": build_segmenter("medvlm")}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in segmenters}
    masks: dict[str, list[np.ndarray]] = {}
    for seg in segmenters.values():  # warm-up: compiles (or loads) the encoders, not timed
        segment_volume(seg, volume, texts[:1])
    for _ in range(args.repeats):
        for name, seg in segmenters.items():
            t0 = time.perf_counter()
            result = segment_volume(seg, volume, texts)
            wall = time.perf_counter() - t0
            runs[name].append({"volume_s": wall, **result.timings})
            masks[name] = result.masks()
        print(f"measured: repeat {len(runs['fp32'])}/{args.repeats}", file=sys.stderr)
    z = volume.shape[0]

    def med(name: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[name]))

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        total = int(a.sum()) + int(b.sum())
        return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total

    plan = getattr(segmenters["chosen"], "plan", None)
    chosen = f"{plan.engine} {plan.precision}" if plan is not None else "?"
    print(f"medvlm bench volume: {path.name}, {z} slices of {volume.shape[1]}x{volume.shape[2]}, texts "
          f"{', '.join(texts)}; fp32 = torch fp32, chosen = {chosen}; medians of {args.repeats}")
    print(f"{'':<28} {'fp32':>10} {'chosen':>10} {'ratio':>7}")
    for label, key, scale in (("seconds per volume", "volume_s", 1.0), ("ms per slice (all)", "volume_s", 1000 / z),
                              ("encode ms per slice", "encode_s", 1000 / z),
                              ("decode ms per slice", "decode_s", 1000 / z)):
        a, b = med("fp32", key) * scale, med("chosen", key) * scale
        print(f"{label:<28} {a:>10.1f} {b:>10.1f} {a / max(b, 1e-9):>7.2f}")
    agreement = {t: dice(a, b) for t, a, b in zip(texts, masks["fp32"], masks["chosen"])}
    print("3D Dice of the chosen path against fp32: " + ", ".join(f"{t} {d:.4f}" for t, d in agreement.items()))
    if args.json_out:
        write_json_atomic({"suite": "bench-volume", "volume": str(path), "slices": z, "texts": texts,
                           "chosen": chosen, "runs": runs, "dice_vs_fp32": agreement}, Path(args.json_out))
    return 0
