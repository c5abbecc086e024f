"""Report-to-region linking: every sentence of a radiology report -> grounded | negated | not_groundable.

A sentence is split into mentions (:func:`agents.text.find_mentions`: finding or anatomy, location words,
assertion present / absent / uncertain / normal). Mentions that are present, uncertain or normal statements
("the heart size is normal": the heart is outlined) are grounded on the image; a sentence whose every mention is
negated ("no pneumothorax or effusion") is ``negated`` and gets no region; a sentence with nothing to ground, or
whose regions all score below ``threshold``, is ``not_groundable`` (abstention) and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from medvlm.types import Region

__all__ = ["SentenceLink", "link_report"]

Status = Literal["grounded", "negated", "not_groundable"]


@dataclass
class SentenceLink:
    """One report sentence and its regions (original pixels). ``number`` is 1-based, as drawn on the overlay."""

    number: int
    text: str
    status: Status
    regions: list[Region] = field(default_factory=list)
    mentions: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def to_json(self, region_ids: list[int] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"number": self.number, "text": self.text, "status": self.status,
                               "mentions": self.mentions}
        if region_ids is not None:
            out["region_ids"] = region_ids
        if self.note:
            out["note"] = self.note
        return out


def link_report(agent: Any, image: Any, report: str, *, threshold: float = 0.5) -> list[SentenceLink]:
    """Link each sentence of ``report`` to regions of ``image`` with ``agent`` (a
    :class:`~agents.pipeline.GroundingAgent`). Regions scoring below ``threshold`` (in [0, 1]) are dropped;
    regions without a score are kept. Each region's provenance names its sentence number and assertion."""
    from agents.text import find_mentions, split_sentences
    from medvlm.errors import input_error

    if not isinstance(report, str) or not report.strip():
        raise input_error("report", expected="the report text (one or more sentences)", received=repr(report)[:80],
                          fix="pass the report file's text, e.g. medvlm link-report IMAGE REPORT.txt")
    if not 0.0 <= threshold <= 1.0:
        raise input_error("--threshold", expected="a score in [0, 1]", received=str(threshold),
                          fix="use e.g. --threshold 0.5")
    links: list[SentenceLink] = []
    todo: list[tuple[int, Any]] = []  # (link index, mention) to ground
    for number, sentence in enumerate(split_sentences(report), start=1):
        mentions = find_mentions(sentence)
        link = SentenceLink(number=number, text=sentence, status="not_groundable",
                            mentions=[{"text": m.text, "finding": m.finding, "structure": m.structure,
                                       "regions": list(m.regions), "assertion": m.assertion, "side": m.side}
                                      for m in mentions])
        links.append(link)
        if not mentions:
            link.note = "no finding or anatomical structure to ground in this sentence"
            continue
        wanted = [m for m in mentions if m.assertion != "absent"]
        if not wanted:
            link.status = "negated"
            link.note = "every finding in this sentence is negated"
            continue
        todo.extend((len(links) - 1, m) for m in wanted)
    if todo:
        grounded = agent.ground_phrases(image, [m.text for _, m in todo])
        for (li, mention), (result, regions) in zip(todo, grounded):
            link = links[li]
            kept = [r for r in regions if r.score is None or r.score >= threshold]
            for r in kept:
                r.provenance = {**r.provenance, "sentence": link.number, "assertion": mention.assertion}
            link.regions.extend(kept)
            if not kept:
                why = result.note or (f"every region scored below the threshold {threshold}" if regions
                                      else "the grounder returned no region")
                link.note = (link.note + "; " if link.note else "") + f"{mention.text!r}: {why}"
    for link in links:
        if link.regions:
            link.status = "grounded"
    return links
