"""Every model preset the project knows, where its weights come from and whether they are present here.

``medvlm models`` prints this table. Presets are registered by the packages that build them (today the
promptable segmenters of :mod:`segmentation.registry`); this module only collects them, so listing models
never imports torch or a backend.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

__all__ = ["ModelEntry", "list_models", "run_models"]


@dataclass(frozen=True)
class ModelEntry:
    """One row of ``medvlm models``: ``kind`` is what the model does (e.g. ``promptable-segmenter``)."""

    name: str
    kind: str
    description: str
    source: str
    present: bool
    how_to_get: str


def _segmenter_entries() -> list[ModelEntry]:
    from segmentation.registry import SEGMENTERS

    rows = []
    for preset in SEGMENTERS.values():
        present = preset.weights_present()
        rows.append(ModelEntry(
            name=preset.name, kind="promptable-segmenter", description=preset.description,
            source=preset.weights, present=present,
            how_to_get="installed by `make install` (pinned in requirements.lock)" if present else preset.weights,
        ))
    return rows


def list_models() -> list[ModelEntry]:
    """All presets, in a stable order (by kind, then as registered)."""
    return _segmenter_entries()


def run_models(args: argparse.Namespace) -> int:
    rows = list_models()
    if getattr(args, "json", False):
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(f"{'name':<14} {'kind':<22} {'present':<8} source / how to get")
    for r in rows:
        print(f"{r.name:<14} {r.kind:<22} {'yes' if r.present else 'no':<8} {r.source}")
        print(f"{'':<14} {'':<22} {'':<8} {r.description}")
    return 0
