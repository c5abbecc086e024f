"""The embedded, offline grounder: Med-VLM text-guided segmentation + chest anatomy regions.

A phrase is parsed by :func:`agents.text.parse_phrase` into the anatomy it names ("left clavicle"), the finding
("pneumothorax") and the chest regions where it lies (location words, else the finding's expected regions):

- an anatomical structure of the vocabulary (heart, clavicles, CT/MR organs) is segmented directly from text;
- a chest region (lung zones, apical zones, costophrenic angles, hila, mediastinum...) is derived from the
  lungs, heart and clavicles that Med-VLM segments on the same image (:mod:`agents.anatomy`);
- a finding is answered with the region(s) where the phrase places it, one region per side. Med-VLM was not
  trained to see findings, so such a region says WHERE the finding is said to be, not that it was detected;
  ``provenance["localisation"]`` says which of the two a region is.

The image is encoded once per call for every phrase and for the anatomy (about 1.2 s on 2 CPU cores; each
text costs tens of milliseconds more).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from agents.anatomy import ChestAnatomy, interior_point, segment_chest_anatomy
from agents.grounders.base import GroundingResult
from medvlm.errors import input_error
from medvlm.types import Mask, Points, Region

__all__ = ["MedVLMGrounder", "group_by_side", "placed_label"]

_NON_CHEST = frozenset({"ct", "mr", "mri", "pt", "nm", "us"})


def structure_in(phrase: str) -> str | None:
    """The anatomy structure a phrase names, as a whole ("left kidney") or inside it ("lesion in the liver" ->
    "liver"); the longest word run that the anatomy vocabulary resolves wins."""
    from prompts.anatomy import normalize_phrase, resolve_structure

    words = normalize_phrase(phrase).split()
    for n in range(len(words), 0, -1):
        for i in range(len(words) - n + 1):
            found = resolve_structure(" ".join(words[i:i + n]))
            if found is not None:
                return found
    return None


def group_by_side(keys: Sequence[str]) -> list[tuple[str | None, list[str]]]:
    """Chest region keys grouped by the patient side their name starts with, in first-seen order:
    ``["right lower lung zone", "left lower lung zone"] -> [("right", [...]), ("left", [...])]``."""
    groups: dict[str | None, list[str]] = {}
    for key in keys:
        side = key.split()[0] if key.split()[0] in ("left", "right") else None
        groups.setdefault(side, []).append(key)
    return list(groups.items())


def placed_label(regions: Sequence[str], finding: str) -> str:
    """The label of a region that places a finding without detecting it: the anatomy outlined, then why
    (``["right apical zone"], "pneumothorax"`` -> ``"right apical zone, where the phrase places the
    pneumothorax"``)."""
    return f"{' + '.join(regions)}, where the phrase places the {finding}"


class MedVLMGrounder:
    """Offline grounder over the shipped Med-VLM checkpoint (or ``checkpoint``).

    ``segmenter``: an existing :class:`~segmentation.textseg.predictor.MedVLMSegmenter` to share (tests, the
    server). After :meth:`ground_many`, :meth:`anatomy_for` returns the chest anatomy of the last image without
    encoding it again, so the anatomy check of the answer costs nothing more.
    """

    name = "medvlm"

    def __init__(self, checkpoint: str | Path | None = None, *, device: str = "cpu", segmenter: Any = None) -> None:
        if segmenter is None:
            from segmentation.textseg.predictor import MedVLMSegmenter

            segmenter = MedVLMSegmenter(checkpoint, device=device)
        self.segmenter = segmenter
        self.model = str(getattr(segmenter, "checkpoint", "medvlm"))
        self._last: tuple[Any, Any, ChestAnatomy | None] | None = None

    # --------------------------------------------------------------------------------------- encoding cache

    def _embedding(self, image: Any) -> Any:
        if self._last is not None and self._last[0] is image:
            return self._last[1]
        emb = self.segmenter.encode(image)
        self._last = (image, emb, None)
        return emb

    def anatomy_for(self, image: Any) -> ChestAnatomy:
        """Lungs, heart and clavicles of ``image`` (segmented once per image and cached with its encoding)."""
        emb = self._embedding(image)
        assert self._last is not None
        if self._last[2] is None:
            self._last = (image, emb, segment_chest_anatomy(self.segmenter, image, emb))
        anatomy = self._last[2]
        assert anatomy is not None
        return anatomy

    # --------------------------------------------------------------------------------------------- ground

    def ground_many(self, image: Any, phrases: Sequence[str]) -> list[GroundingResult]:
        """One result per phrase; regions in pixels of ``image``. See the module docstring for the rules."""
        from agents.text import parse_phrase
        from prompts.regions import REGION_KEYS, location_regions, region_side
        from segmentation.base import Prompt

        for p in phrases:
            if not isinstance(p, str) or not p.strip():
                raise input_error("phrase", expected="a non-empty phrase such as 'right apical pneumothorax'",
                                  received=repr(p), fix="say what to find in the image")
        modality = str(getattr(image, "modality", "") or "").lower()
        chest_ok = modality not in _NON_CHEST
        out: list[GroundingResult] = []
        direct: list[tuple[int, str, str, str | None]] = []  # (result index, text, structure, finding)
        for i, phrase in enumerate(phrases):
            mention = parse_phrase(phrase)
            organ = structure_in(phrase)
            chest_key = "cardiac silhouette" if organ == "heart" else organ
            if not mention.regions and chest_key in REGION_KEYS:
                # a chest structure named by a word the region vocabulary lacks ("pulmo dexter", "cor"): it is
                # still that region, so it gets the same geometry and the same anatomy check
                mention = replace(mention, structure=chest_key, regions=[chest_key],
                                  side=mention.side or region_side(str(chest_key)))
            res = GroundingResult(phrase=phrase, meta={"finding": mention.finding, "structure": mention.structure,
                                                        "regions": list(mention.regions),
                                                        "assertion": mention.assertion, "side": mention.side})
            out.append(res)
            # explicit location words or a chest-region name beat an organ named in the phrase; an organ beats a
            # finding's default regions ("lesion in the liver" is the liver, not both lungs)
            explicit = bool(location_regions(phrase)) or mention.structure is not None
            if mention.regions and chest_ok and (explicit or organ is None):
                res.regions = self._regions_from_anatomy(image, phrase, mention)
                if not res.regions:
                    res.note = ("the phrase names chest regions (" + ", ".join(mention.regions) + "), but no "
                                "frontal chest radiograph was recognised (both lungs large enough): pass a chest "
                                "X-ray, or name an organ for CT/MR")
            elif organ is not None:
                direct.append((i, organ if mention.finding else phrase, organ, mention.finding))
            elif mention.regions:
                res.note = (f"the phrase names chest regions ({', '.join(mention.regions)}), which are defined on a "
                            f"frontal chest radiograph, and this image is {modality.upper()}: name an organ instead")
            else:
                res.note = ("not groundable: no anatomical structure, chest region or finding that the medvlm "
                            "grounder knows was found in the phrase")
        if direct:
            emb = self._embedding(image)
            results = self.segmenter.predict_many(emb, [Prompt(text=t) for _, t, _, _ in direct])
            for (i, _text, structure, finding), r in zip(direct, results):
                if not r.mask.data.any():
                    out[i].note = f"Med-VLM found no {structure} in this image"
                    continue
                where = "segmented" if finding is None else "anatomical region of the finding (not detected)"
                extra: dict[str, Any] = {"localisation": where, "structure": structure, "finding": finding,
                                         "regions": [structure]}
                label = phrases[i]
                if finding is not None:  # say what was found: the organ, not the finding
                    label, extra["score_of"] = placed_label([structure], finding), "structure"
                out[i].regions = [self._region(label, r.mask.data, float(r.score), extra)]
        return out

    def _regions_from_anatomy(self, image: Any, phrase: str, mention: Any) -> list[Region]:
        anatomy = self.anatomy_for(image)
        if not anatomy.is_chest:
            return []
        groups = group_by_side(mention.regions)
        regions = []
        for side, keys in groups:
            union = anatomy.union(keys)
            if union is None or not union.any():
                continue
            union = union.copy()  # the anatomy caches its unions; the region owns its mask
            scores = [s for s in (anatomy.score_of(k) for k in keys) if s is not None]
            label = phrase if len(groups) == 1 else f"{phrase} ({side or 'midline'})"
            detected = mention.finding is None  # anatomy itself is segmented; a finding is only placed
            extra: dict[str, Any] = {
                "localisation": "segmented" if detected else "anatomical region of the finding (not detected)",
                "regions": keys, "finding": mention.finding}
            if not detected:
                # the label names the zone that was outlined; a finding name beside a score reads as a detection
                label, extra["score_of"] = placed_label(keys, mention.finding), "zone"
            regions.append(self._region(label, union, min(scores) if scores else None, extra,
                                        point=anatomy.interior(keys)))
        return regions

    def _region(self, label: str, mask: np.ndarray, score: float | None, extra: dict[str, Any],
                point: tuple[float, float] | None = None) -> Region:
        pt = point or interior_point(mask)
        box = Mask(mask).to_box()
        assert box is not None  # callers pass non-empty masks
        return Region(box=box, label=label, mask=Mask(mask),
                      points=Points.from_lists(positive=[pt]) if pt is not None else None, score=score,
                      provenance={"grounder": self.name, "model": self.model, **extra})
