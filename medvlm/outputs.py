"""Writing results to disk: masks, overlay and JSON for one image, the same for every command.

Files for an image ``<stem>`` in ``out_dir``:

- ``<stem>.mask.png`` (one region) or ``<stem>.mask.<k>.png`` (k = 1..N, several regions): 0/255 PNG masks
  on the original pixel grid;
- ``<stem>.overlay.png``: the image with boxes, points and mask contours, numbered as in the JSON;
- ``<stem>.json``: ``{"image", "size": [H, W], "spacing_mm", "regions": [...], ...extra}``.

Every file is written atomically (temporary file + rename), so an interrupted run never leaves a
half-written result that a resumed run would trust.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlm.io import MedicalImage, atomic_open, save_mask_png, save_png
from medvlm.types import Region
from medvlm.viz import draw_overlay

__all__ = ["WrittenResult", "write_json_atomic", "write_regions"]


@dataclass
class WrittenResult:
    json_path: Path
    overlay_path: Path
    mask_paths: list[Path | None]
    payload: dict[str, Any]


def write_json_atomic(payload: Any, path: Path) -> None:
    """Write ``payload`` as indented JSON to ``path`` via a temporary file in the same folder."""
    with atomic_open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")


def write_regions(out_dir: str | Path, stem: str, image: MedicalImage, regions: Sequence[Region],
                  *, extra: dict[str, Any] | None = None, title: str | None = None,
                  numbers: Sequence[int] | None = None) -> WrittenResult:
    """Write masks, overlay and JSON for ``regions`` found in ``image``; returns the paths and the JSON payload.

    Region geometry must be in the original pixel frame of ``image``. ``extra`` is merged into the top level
    of the JSON (e.g. the answer text of ``medvlm ask``). ``numbers``: the number drawn next to each region on
    the overlay (default 1..N, the JSON ids); ``link-report`` draws the sentence number instead.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mask_paths: list[Path | None] = []
    entries = []
    for k, region in enumerate(regions, start=1):
        mask_path: Path | None = None
        if region.mask is not None:
            name = f"{stem}.mask.png" if len(regions) == 1 else f"{stem}.mask.{k}.png"
            mask_path = out / name
            save_mask_png(region.mask.data, mask_path)
        mask_paths.append(mask_path)
        entry = {"id": k, **region.to_json(mask_path=mask_path.name if mask_path else None,
                                            spacing_mm=image.spacing_mm)}
        # The prompt and model are what a user looks for first; keep them at the top of each entry too.
        for key in ("model", "prompt", "refined_by", "refine_prompt"):
            if key in region.provenance:
                entry[key] = region.provenance[key]
        entries.append(entry)
    overlay_path = out / f"{stem}.overlay.png"
    save_png(draw_overlay(image.to_rgb_uint8(), regions, title=title, numbers=numbers), overlay_path)
    payload: dict[str, Any] = {
        "image": str(image.source),
        "size": [image.height, image.width],
        "spacing_mm": list(image.spacing_mm) if image.spacing_mm else None,
        "modality": image.modality,
        "overlay": overlay_path.name,
        "regions": entries,
    }
    if extra:
        payload.update(extra)
    json_path = out / f"{stem}.json"
    write_json_atomic(payload, json_path)
    return WrittenResult(json_path=json_path, overlay_path=overlay_path, mask_paths=mask_paths, payload=payload)
