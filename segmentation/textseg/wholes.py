"""Wholes of paired or multi-part structures ("lung" = left + right lung, "kidney", "hippocampus", "clavicles"):
the masks a phrase naming the whole is trained and scored against. Which structure is a whole of which parts is
anatomy knowledge (``prompts.anatomy.parts_of`` / ``wholes_of``); this module applies it to masks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["add_wholes", "annotated_with_wholes"]


def add_wholes(masks: Mapping[str, npt.NDArray[np.bool_]]) -> dict[str, npt.NDArray[np.bool_]]:
    """``masks`` plus every whole of the anatomy vocabulary (``prompts.anatomy.wholes_of``: "lung" of "left lung"
    and "right lung", "kidney", "hippocampus", ...) that has a part here and no mask of its own: the union of its
    parts present (bool arrays of one shape, any dimensionality). A phrase naming a pair or a whole is trained
    and scored against the union."""
    from prompts.anatomy import parts_of, wholes_of

    out = dict(masks)
    for whole in sorted({w for name in masks for w in wholes_of(name)}):
        if whole not in out:
            present = [masks[p] for p in parts_of(whole) if p in masks]
            if present:
                out[whole] = np.logical_or.reduce(present)
    return out


def annotated_with_wholes(structures: Sequence[str]) -> tuple[str, ...]:
    """A dataset's annotated structures plus the wholes they are parts of (what :func:`add_wholes` can add)."""
    from prompts.anatomy import wholes_of

    return tuple(sorted(set(structures).union(*(wholes_of(s) for s in structures))))
