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
    result = segment_volume(segmenter, volume, args.text, args.label or None,
                            window=window, progress=sys.stderr.isatty())
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
