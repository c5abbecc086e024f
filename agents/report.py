"""Report-to-region linking: every sentence of a radiology report -> grounded | negated | not_groundable.

A sentence is split into mentions (:func:`agents.text.find_mentions`: finding or anatomy, location words,
assertion present / absent / uncertain / normal). Mentions that are present, uncertain or normal statements
("the heart size is normal": the heart is outlined) are grounded on the image; a sentence whose every mention is
negated ("no pneumothorax or effusion") is ``negated`` and gets no region; a sentence with nothing to ground, or
whose regions all score below ``threshold``, is ``not_groundable`` (abstention) and says why.

How the text is read (``method``):

- ``"rules"``: the hand-written rules of :mod:`agents.text` (sentence splitter, NegEx triggers);
- ``"medspacy"``: medspaCy (:mod:`agents.clinical_nlp`): PyRuSH sentences with their section, and ConText's
  negated / uncertain / affirmed for each mention that the rules find;
- ``"combined"`` (:data:`DEFAULT_METHOD`): the library first, the rules for what it lacks. Sentences: PyRuSH's,
  re-joined where it cut after an abbreviation ("approx.", "e.g.") and re-split where the rules split (numbered
  items run together: "No effusion. 2. Small nodule."). Assertions: ConText with its own rules plus the rules'
  triggers (:func:`agents.text.assertion_triggers`: radiology hedges such as "cannot be excluded", negations such
  as "has resolved", pseudo-triggers such as "no change in"), and where it still affirms, the rules' verdict.

Why combined is the default (``medvlm eval negation``): on the NegEx test set it negates with precision 0.954,
recall 0.969, F1 0.962 (rules 0.953 / 0.784 / 0.860; medspaCy alone 0.953 / 0.957 / 0.955), and on the 1,000 IU
chest X-ray reports it keeps the rules' readings of radiology phrasing that ConText alone gets wrong ("no change
in the nodule", "cannot exclude edema", "effusion has resolved"), while PyRuSH splits sentences that start in
lower case, which the rules run together. Mentions, locations and regions always come from :mod:`agents.text`.

When medspaCy is not installed, the default falls back to ``"rules"`` and says so once (a warning naming the
install command); asking for ``"medspacy"`` or ``"combined"`` explicitly raises the missing-dependency error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from medvlm.types import Region

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "SentenceLink", "link_report", "resolve_method", "sentence_links",
           "target_assertions"]

Status = Literal["grounded", "negated", "not_groundable"]
Method = Literal["rules", "medspacy", "combined"]
METHODS: tuple[Method, ...] = ("rules", "medspacy", "combined")
DEFAULT_METHOD: Method = "combined"
"""The method :func:`link_report` uses unless told otherwise (see the module docstring for why)."""

_log = logging.getLogger(__name__)
_WARNED: list[bool] = []  # the fallback warning is given once per process
_NO_MENTION = "no finding or anatomical structure to ground in this sentence"


@dataclass
class SentenceLink:
    """One report sentence and its regions (original pixels). ``number`` is 1-based, as drawn on the overlay;
    ``section`` is the report section the sentence is in ("findings", "impression"; medspaCy methods only)."""

    number: int
    text: str
    status: Status
    regions: list[Region] = field(default_factory=list)
    mentions: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    section: str | None = None

    def to_json(self, region_ids: list[int] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"number": self.number, "text": self.text, "status": self.status,
                               "mentions": self.mentions}
        if self.section is not None:
            out["section"] = self.section
        if region_ids is not None:
            out["region_ids"] = region_ids
        if self.note:
            out["note"] = self.note
        return out


def resolve_method(method: str | None) -> Method:
    """The method to use: ``method`` when given (an unknown name raises
    :class:`~medvlm.errors.InputError`), else :data:`DEFAULT_METHOD`, or ``"rules"`` with a warning when that
    needs medspaCy and it is not installed."""
    from agents import clinical_nlp
    from medvlm.errors import input_error

    if method is None:
        if DEFAULT_METHOD != "rules" and not clinical_nlp.available():
            if not _WARNED:
                _log.warning("report linking: medspaCy is not installed, using the hand-written rules; install it "
                             "with: %s", clinical_nlp.INSTALL)
                _WARNED.append(True)
            return "rules"
        return DEFAULT_METHOD
    if method not in METHODS:
        raise input_error("report method", expected=f"one of {', '.join(METHODS)}", received=repr(method),
                          fix=f"use {DEFAULT_METHOD!r} (the default)")
    return method


def _sentences(report: str, method: Method) -> list[tuple[str, str | None]]:
    """(sentence text with whitespace normalized, section) of ``report`` under ``method``."""
    from agents.text import refine_sentences, split_sentences

    if method == "rules":
        return [(s, None) for s in split_sentences(report)]
    from agents.clinical_nlp import report_sentences

    found = [(" ".join(s.text.split()), s.section) for s in report_sentences(report)]
    if method == "medspacy":
        return found
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(found):  # the rules re-join pieces within a section, then re-split
        j = i + 1
        while j < len(found) and found[j][1] == found[i][1]:
            j += 1
        texts = refine_sentences([t for t, _ in found[i:j]])
        out += [(t, found[i][1]) for t in texts]
        i = j
    return out


def target_assertions(sentence: str, targets: Sequence[str | tuple[int, int]], *, method: str | None = None,
                      rules: Sequence[str] | None = None) -> list[str]:
    """The assertion of each target phrase (or ``(start, end)`` span) of ``sentence`` under ``method``, in the
    names of :mod:`agents.text`: "present", "absent" (negated) or "uncertain". ``rules``: the rules' assertions
    of the same targets when already known (:func:`~agents.text.find_mentions`; may hold "normal"), else they
    are computed with :func:`~agents.text.assert_target`.

    ``rules``: the rules' verdict. ``medspacy``: ConText's ("normal" of the rules kept where ConText affirms).
    ``combined``: ConText with its own rules plus the rules' triggers (:func:`~agents.text.assertion_triggers`:
    radiology hedges and pseudo-triggers such as "no change" that its clinical rule set lacks); where it still
    affirms, the rules' verdict (their scopes differ: clause ends, copulas)."""
    from agents.text import assert_target, assertion_triggers

    chosen = resolve_method(method)
    ours: list[str] = list(rules) if rules is not None else [assert_target(sentence, t) for t in targets]
    if chosen == "rules" or not targets:
        return ours
    from agents.clinical_nlp import target_assertions as context_assertions

    extra = assertion_triggers() if chosen == "combined" else ()
    out = []
    for mine, theirs in zip(ours, context_assertions(sentence, targets, extra_rules=extra)):
        if theirs == "affirmed":
            out.append(mine if chosen == "combined" or mine == "normal" else "present")
        else:
            out.append("uncertain" if theirs == "uncertain" else "absent")
    return out


def _assertions(sentence: str, mentions: list[Any], method: Method) -> list[str]:
    """The assertion of each mention under ``method`` (:func:`target_assertions`); a negated anatomy mention is a
    normal statement ("no abnormality of the right lung"), as in the rules."""
    if method == "rules" or not mentions:
        return [m.assertion for m in mentions]
    spans: list[tuple[int, int]] = []
    cursor = 0
    for m in mentions:  # mentions are in text order; each span is searched from the previous one on
        at = sentence.find(m.text, cursor)
        at = sentence.find(m.text) if at < 0 else at
        spans.append((at, at + len(m.text)) if at >= 0 else (0, len(sentence)))
        cursor = max(at, cursor)
    found = target_assertions(sentence, spans, method=method, rules=[m.assertion for m in mentions])
    return ["normal" if m.finding is None and a == "absent" else a for m, a in zip(mentions, found)]


def _grounding_phrase(mention: Any) -> str:
    """The phrase to ground for ``mention``: its text, or, when the sentence gave it a side its text lacks ("left
    pleural effusion with adjacent atelectasis"), the text with that side ("left atelectasis"), so that the
    grounder, which reads the phrase alone, outlines the same regions."""
    from agents.text import parse_phrase

    if not mention.text.strip() or parse_phrase(mention.text).regions == mention.regions:
        return mention.text
    if mention.side is not None:
        sided = f"{mention.side} {mention.text}"
        if parse_phrase(sided).regions == mention.regions:
            return sided
    return mention.text


def sentence_links(report: str, *, method: str | None = None) -> list[SentenceLink]:
    """The text-level reading of ``report``: one :class:`SentenceLink` per sentence with its mentions and the
    status the text alone decides (no image, no region): ``not_groundable`` when there is nothing to ground,
    ``negated`` when every mention is negated, else ``grounded`` (something to ground; on an image it stays
    grounded only if the grounder returns a region). ``method``: see the module docstring."""
    from agents.text import find_mentions
    from medvlm.errors import input_error

    if not isinstance(report, str) or not report.strip():
        raise input_error("report", expected="the report text (one or more sentences)", received=repr(report)[:80],
                          fix="pass the report file's text, e.g. medvlm link-report IMAGE REPORT.txt")
    chosen = resolve_method(method)
    links: list[SentenceLink] = []
    for number, (sentence, section) in enumerate(_sentences(report, chosen), start=1):
        mentions = find_mentions(sentence)
        assertions = _assertions(sentence, mentions, chosen)
        link = SentenceLink(number=number, text=sentence, status="grounded", section=section,
                            mentions=[{"text": m.text, "finding": m.finding, "structure": m.structure,
                                       "regions": list(m.regions), "assertion": a, "side": m.side}
                                      for m, a in zip(mentions, assertions)])
        for entry, m in zip(link.mentions, mentions):
            if (phrase := _grounding_phrase(m)) != m.text:
                entry["grounded_as"] = phrase
        links.append(link)
        if not mentions:
            link.status, link.note = "not_groundable", _NO_MENTION
        elif all(a == "absent" for a in assertions):
            link.status, link.note = "negated", "every finding in this sentence is negated"
    return links


def link_report(agent: Any, image: Any, report: str, *, threshold: float = 0.5,
                method: str | None = None) -> list[SentenceLink]:
    """Link each sentence of ``report`` to regions of ``image`` with ``agent`` (a
    :class:`~agents.pipeline.GroundingAgent`). Regions scoring below ``threshold`` (in [0, 1]) are dropped;
    regions without a score are kept. Each region's provenance names its sentence number and assertion.
    ``method``: how the text is read ("rules", "medspacy", "combined"; default :data:`DEFAULT_METHOD`)."""
    from medvlm.errors import input_error

    if not 0.0 <= threshold <= 1.0:
        raise input_error("--threshold", expected="a score in [0, 1]", received=str(threshold),
                          fix="use e.g. --threshold 0.5")
    links = sentence_links(report, method=method)
    todo = [(link, m) for link in links if link.status == "grounded" for m in link.mentions
            if m["assertion"] != "absent"]
    for link, _ in todo:
        link.status = "not_groundable"  # grounded again below when a region is kept
    if todo:
        grounded = agent.ground_phrases(image, [m.get("grounded_as", m["text"]) for _, m in todo])
        for (link, mention), (result, regions) in zip(todo, grounded):
            kept = [r for r in regions if r.score is None or r.score >= threshold]
            for r in kept:
                r.provenance = {**r.provenance, "sentence": link.number, "assertion": mention["assertion"]}
            link.regions.extend(kept)
            if not kept:
                why = result.note or (f"every region scored below the threshold {threshold}" if regions
                                      else "the grounder returned no region")
                link.note = (link.note + "; " if link.note else "") + f"{mention['text']!r}: {why}"
    for link in links:
        if link.regions:
            link.status = "grounded"
    return links
