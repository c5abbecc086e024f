"""The grounding pipeline behind ``medvlm ask``, ``medvlm link-report`` and ``medvlm batch``.

question -> target phrase (rule-based, or the LLM when one is configured) -> grounder (phrase -> regions in
original pixels) -> SAM refinement of regions that have no mask (box + points -> mask; LiteMedSAM by default)
-> anatomy consistency check (laterality and zone against the chest regions the phrase names; flag or repair)
-> a one-paragraph answer. Models load once per :class:`GroundingAgent` and each image is encoded once per
question by each model that reads it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.anatomy import CheckMode, ChestAnatomy, check_region
from agents.grounders.base import Grounder, GroundingResult, build_grounder
from medvlm.errors import input_error
from medvlm.types import Region

__all__ = ["Answer", "GroundingAgent", "compose_answer"]


@dataclass
class Answer:
    """The answer to one question: ``text`` (one paragraph), the regions (original pixels), and what was done."""

    question: str
    phrase: str
    text: str
    regions: list[Region]
    grounder: str
    note: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"question": self.question, "phrase": self.phrase, "answer": self.text, "grounder": self.grounder,
                "note": self.note, "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()}, **self.meta}


def _fmt_box(region: Region) -> str:
    b = region.box
    return f"x {b.x0:.0f}-{b.x1:.0f}, y {b.y0:.0f}-{b.y1:.0f} px"


def compose_answer(phrase: str, result: GroundingResult, regions: Sequence[Region],
                   spacing_mm: tuple[float, float] | None = None) -> str:
    """One paragraph a radiologist reads: where the phrase is, how sure, and what the checks did."""
    if not regions:
        why = result.note or "the grounder returned no region"
        return f"I could not locate \"{phrase}\" in this image: {why}."
    parts = []
    for k, r in enumerate(regions, start=1):
        where = ", ".join(r.provenance.get("regions") or []) or r.label
        size = ""
        if r.mask is not None:
            mm2 = r.mask.area_mm2(spacing_mm)
            size = f", {mm2 / 100.0:.1f} cm²" if mm2 is not None else f", {r.mask.area_px} px"
        of = r.provenance.get("score_of")
        score = "" if r.score is None else (f", {of} confidence {r.score:.2f}" if of else f", confidence {r.score:.2f}")
        parts.append(f"({k}) {where} [{_fmt_box(r)}{size}{score}]")
    text = f"\"{phrase}\" is in " + "; ".join(parts) + "."
    if any(str(r.provenance.get("localisation", "")).startswith("anatomical region") for r in regions):
        finding = result.meta.get("finding") or "the finding"
        grounder = regions[0].provenance.get("grounder", "")
        text += (f" The region is where the phrase places the {finding}; the {grounder} grounder outlines that"
                 f" anatomy and does not detect the {finding} itself.")
    for k, r in enumerate(regions, start=1):
        action = str(r.checks.get("action", "none"))
        lat = r.checks.get("laterality")
        if action.startswith("repaired"):
            text += f" Region {k} failed the anatomy check and was {action}."
        elif action.startswith("flagged"):
            text += f" Region {k} failed the anatomy check ({_failed(r.checks)}) and is flagged."
        elif lat is not None or "zone" in r.checks:
            text += f" Region {k} passed the anatomy check" + (f" (patient's {lat['expected']} side)." if lat else ".")
    return text


def _failed(checks: dict[str, Any]) -> str:
    out = []
    lat = checks.get("laterality")
    if lat is not None and not lat.get("ok"):
        out.append(f"expected the patient's {lat['expected']} side, found the {lat['observed']}")
    zone = checks.get("zone")
    if zone is not None and not zone.get("ok"):
        out.append(f"only {zone['fraction_inside']:.0%} inside {' + '.join(zone['expected'])}")
    return "; ".join(out) or "unknown"


class GroundingAgent:
    """Loads a grounder, a refiner and the anatomy source once; answers questions about images.

    ``grounder``: a preset name of :data:`agents.grounders.GROUNDERS` or a built grounder. ``grounder_options``:
    keyword options of the preset (``base_url``/``model`` for openai, ``model`` for transformers, ``checkpoint``
    for medvlm). ``refine``: "auto" (refine regions that have no mask with LiteMedSAM), "none", or a promptable
    segmenter preset that refines every region ("litemedsam", "sam2"). ``check``: "repair" (default), "flag" or
    "off". ``llm``: an :class:`agents.llm.OpenAIChatClient` used to extract the target phrase from a question;
    without it the rule-based extractor runs. ``refiner``: an already built promptable segmenter to refine with
    (the server shares its LiteMedSAM instead of loading a second copy); default: built on first use from
    ``refine``.
    """

    def __init__(self, grounder: str | Grounder = "medvlm", *, grounder_options: dict[str, Any] | None = None,
                 refine: str = "auto", check: CheckMode = "repair", llm: Any = None,
                 medvlm_checkpoint: str | None = None, refiner: Any = None) -> None:
        if check not in ("repair", "flag", "off"):
            raise input_error("--check", expected="repair, flag or off", received=repr(check),
                              fix="use --check repair (default) to fix regions that contradict the phrase")
        if isinstance(grounder, str):
            opts = dict(grounder_options or {})
            if grounder == "medvlm" and medvlm_checkpoint:
                opts.setdefault("checkpoint", medvlm_checkpoint)
            grounder = build_grounder(grounder, **opts)
        self.grounder = grounder
        self.refine = refine
        self.check: CheckMode = check
        self.llm = llm
        self._medvlm_checkpoint = medvlm_checkpoint
        self._anatomy_grounder: Any = None
        self._refiner: Any = refiner

    # ------------------------------------------------------------------------------------------ pieces

    def anatomy(self, image: Any) -> ChestAnatomy:
        """Lungs, heart and clavicles of ``image`` from Med-VLM (shared with the grounder when it is Med-VLM)."""
        if hasattr(self.grounder, "anatomy_for"):
            return self.grounder.anatomy_for(image)
        if self._anatomy_grounder is None:
            from agents.grounders.medvlm import MedVLMGrounder

            self._anatomy_grounder = MedVLMGrounder(self._medvlm_checkpoint)
        return self._anatomy_grounder.anatomy_for(image)

    def extract_phrase(self, question: str) -> str:
        """The phrase to ground: the LLM's answer when an LLM is configured (falling back to the rules when its
        reply is unusable), else :func:`agents.text.extract_target`."""
        from agents.text import extract_target

        if self.llm is None:
            return extract_target(question)
        import json

        from prompts.templates import load_templates

        messages = load_templates()["extract_target"].render(question=question)
        try:
            reply = self.llm.chat(messages, max_tokens=64)
            start, end = reply.find("{"), reply.rfind("}")
            phrase = str(json.loads(reply[start:end + 1])["phrase"]).strip()
        except (ValueError, KeyError, TypeError):
            phrase = ""
        return phrase or extract_target(question)

    def _refine(self, image: Any, regions: list[Region]) -> list[Region]:
        todo = [i for i, r in enumerate(regions) if self.refine not in ("auto", "none") or r.mask is None]
        if self.refine == "none" or not todo:
            return regions
        from segmentation.refine import refine_regions
        from segmentation.registry import build_segmenter

        if self._refiner is None:  # loaded once per agent, shared by every question
            self._refiner = build_segmenter("litemedsam" if self.refine == "auto" else self.refine)
        return refine_regions(self._refiner, image, regions, indices=todo, with_points=True)

    def check_regions(self, image: Any, result: GroundingResult, regions: list[Region],
                      mode: CheckMode | None = None) -> list[Region]:
        """Apply the anatomy consistency check (``mode``, default the agent's) to the regions of one phrase."""
        mode = mode or self.check
        expected = list(result.meta.get("regions") or [])
        if mode == "off" or not regions or not expected:
            return regions
        anatomy = self.anatomy(image)
        side = result.meta.get("side")
        out = []
        from agents.grounders.medvlm import group_by_side

        groups = group_by_side(expected)
        for k, r in enumerate(regions):
            # several regions for one phrase come one per side group (medvlm) or in any order (LLMs): check each
            # against its own side's regions when the counts match, else against all of them
            keys = groups[k][1] if len(groups) == len(regions) else expected
            r_side = groups[k][0] if len(groups) == len(regions) else (side if side in ("left", "right") else None)
            out.append(check_region(r, keys, anatomy, side=r_side, mode=mode))
        return out

    # ------------------------------------------------------------------------------------------ public

    def ground_phrases(self, image: Any, phrases: Sequence[str]) -> list[tuple[GroundingResult, list[Region]]]:
        """Ground, refine and check each phrase on ``image``: ``[(raw result, final regions)]`` in order."""
        results = self.grounder.ground_many(image, phrases)
        return [(res, self.check_regions(image, res, self._refine(image, list(res.regions)))) for res in results]

    def ask(self, image: Any, question: str) -> Answer:
        """Answer "where is ...?" on ``image`` (a :class:`medvlm.io.MedicalImage`)."""
        t0 = time.perf_counter()
        phrase = self.extract_phrase(question)
        t1 = time.perf_counter()
        [(result, regions)] = self.ground_phrases(image, [phrase])
        t2 = time.perf_counter()
        text = compose_answer(phrase, result, regions, getattr(image, "spacing_mm", None))
        return Answer(question=question, phrase=phrase, text=text, regions=regions, grounder=self.grounder.name,
                      note=result.note, timings_s={"extract": t1 - t0, "ground": t2 - t1, "total": t2 - t0},
                      meta={"parsed": result.meta})
