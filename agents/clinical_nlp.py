"""Report understanding on medspaCy (a maintained clinical NLP library built on spaCy), behind one small interface.

- :func:`report_sentences`: the sentences of a report with their section ("findings", "impression", ...), split
  by PyRuSH (the rule-based clinical sentence segmenter, ``medspacy_pyrush``) and sectioned by medspaCy's
  sectionizer with the radiology headers below; headers, bullets and numbering are removed from the text.
- :func:`target_assertions`: for target phrases of one sentence, ConText (``medspacy_context``, Harkema et al.,
  J Biomed Inform 2009;42:839-851, with medspaCy's default English rules) says "negated", "uncertain" or
  "affirmed". Uncertain (possible existence, hypothetical) wins over negated, as in :mod:`agents.text`.

medspaCy's ConText rules are written for clinical notes; radiology hedges ("cannot be excluded", "may represent"),
"has resolved" and pseudo-triggers such as "no change in" are not among them. ``extra_rules`` adds such phrases
to its rules; :mod:`agents.report` combines the two that way (see it and ``medvlm eval negation`` for the
measurements).

No model is downloaded: the pipeline is a blank English tokenizer and rule components whose rule files ship in
the wheels. medspaCy is imported on first use; when it is missing, the error names :data:`INSTALL`.

>>> [(s.section, s.text) for s in report_sentences("FINDINGS: No effusion. IMPRESSION: 1. Normal.")]
[('findings', 'No effusion.'), ('impression', 'Normal.')]
>>> target_assertions("There is no pneumothorax or effusion.", ["pneumothorax", "effusion"])
['negated', 'negated']
"""

from __future__ import annotations

import importlib.util
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from medvlm.errors import input_error, missing_dependency

__all__ = ["INSTALL", "ClinicalAssertion", "ReportSentence", "available", "report_sentences", "target_assertion",
           "target_assertions"]

INSTALL = ("make install (requirements.lock pins medspacy==1.3.1 with spaCy 3.8 and installs it with pip install "
           "--no-deps -r requirements.lock); a bare pip install medspacy==1.3.1 pulls spaCy 3.7, whose thinc needs "
           "numpy < 2, and breaks this project's numpy 2")
"""How to install the library. spaCy 3.8 (numpy 2) is pinned although medspaCy 1.3.1 (and PyRuSH 1.0.13) ask for
spaCy < 3.8 on Python < 3.12: medspaCy 1.3.1 itself takes spaCy 3.8 on Python 3.12, and the tests here pass with
it."""

ClinicalAssertion = Literal["negated", "uncertain", "affirmed"]

# Radiology section headers (category, header words); matched case-insensitively, with the colon.
_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("findings", ("findings", "finding")),
    ("impression", ("impression", "impressions", "conclusion", "conclusions", "opinion")),
    ("comparison", ("comparison", "comparisons", "prior studies")),
    ("indication", ("indication", "indications", "clinical indication", "reason for exam",
                    "reason for examination", "reason for study")),
    ("history", ("history", "clinical history", "clinical information")),
    ("technique", ("technique", "examination", "exam", "procedure")),
    ("recommendation", ("recommendation", "recommendations")),
)
_LEAD_RE = re.compile(r"^(?:[-*•]+|\(?\d{1,2}[.)])(?:\s+|$)")
_LOCK = threading.Lock()


@contextmanager
def _quiet() -> Iterator[None]:
    """One caller at a time (the components keep per-call state), without spaCy's W036 warning: medspaCy's
    matchers hold a token-pattern matcher that stays empty when every rule is a literal phrase."""
    with _LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\[W036\]", category=UserWarning)
        yield


@dataclass(frozen=True)
class ReportSentence:
    """One report sentence: ``text`` (header, bullet and numbering removed), ``section`` (a category of
    :data:`_SECTIONS` such as "findings" or "impression"; ``None`` before any header) and the character span
    ``start``/``end`` of ``text`` in the report."""

    text: str
    section: str | None
    start: int
    end: int


def available() -> bool:
    """Whether medspaCy is installed (nothing is imported)."""
    return importlib.util.find_spec("medspacy") is not None


_CATEGORIES = {"negated": "NEGATED_EXISTENCE", "uncertain": "POSSIBLE_EXISTENCE", "pseudo": "PSEUDO"}
_DIRECTIONS = {"forward": "FORWARD", "backward": "BACKWARD", "both": "BIDIRECTIONAL"}


@cache
def _pipeline(extra_rules: tuple[tuple[str, str, str], ...] = ()) -> Any:
    """The medspaCy pipeline: blank English tokenizer + PyRuSH + ConText (its default rules, plus
    ``extra_rules``) + sectionizer (the radiology headers above). Built once per process and rule set."""
    try:
        import medspacy
        from loguru import logger
        from medspacy.context import ConTextRule
        from medspacy.section_detection import SectionRule
    except (ImportError, ValueError) as exc:  # ValueError: a spaCy built for numpy 1 ("numpy.dtype size changed")
        raise missing_dependency("report understanding on medspaCy (agents.clinical_nlp)", INSTALL) from exc
    logger.disable("PyRuSH")  # PyRuSH logs every token at DEBUG level through loguru
    nlp = medspacy.load(medspacy_enable=["medspacy_pyrush"])
    # a modifier inside the target ("no" of "no acute disease" as one target) does not modify that target
    context = nlp.add_pipe("medspacy_context", config={"prune_on_target_overlap": True})
    rules = []
    for phrase, kind, direction in extra_rules:
        if kind not in _CATEGORIES or direction not in _DIRECTIONS or not phrase.strip():
            raise input_error("ConText extra rule", expected=f"(phrase, kind in {sorted(_CATEGORIES)}, direction in "
                              f"{sorted(_DIRECTIONS)})", received=repr((phrase, kind, direction)),
                              fix="see agents.text.assertion_triggers() for the format")
        rules.append(ConTextRule(phrase, _CATEGORIES[kind], direction="PSEUDO" if kind == "pseudo"
                                 else _DIRECTIONS[direction]))
    if rules:
        context.add(rules)
    sectionizer = nlp.add_pipe("medspacy_sectionizer", config={"rules": None})
    sectionizer.add([SectionRule(f"{word}:", category) for category, words in _SECTIONS for word in words])
    return nlp


def _clean(text: str) -> tuple[int, str]:
    """Strip one sentence: leading bullets / numbering and surrounding whitespace; returns (offset, text)."""
    offset = len(text) - len(text.lstrip())
    text = text.strip()
    while match := _LEAD_RE.match(text):
        offset += match.end()
        text = text[match.end():]
    return offset, text


def report_sentences(report: str) -> list[ReportSentence]:
    """Split ``report`` into sentences with PyRuSH and give each its section (medspaCy's sectionizer). Section
    headers ("FINDINGS:"), bullets and numbering ("1.", "-") are removed; pieces without a letter are dropped."""
    if not isinstance(report, str):
        raise input_error("report_sentences", expected="report text (str)", received=type(report).__name__,
                          fix="pass the report as one string")
    nlp = _pipeline()
    with _quiet():
        doc = nlp.make_doc(report)
        doc = nlp.get_pipe("medspacy_sectionizer")(nlp.get_pipe("medspacy_pyrush")(doc))
    titles = [(doc[s.title_start].idx, doc[s.title_end - 1].idx + len(doc[s.title_end - 1]))
              for s in doc._.sections if s.title_end > s.title_start]
    out: list[ReportSentence] = []
    for sent in doc.sents:
        start, end = sent.start_char, sent.end_char
        pieces = [(start, end)]
        for t0, t1 in titles:  # cut the section headers out of the sentence
            pieces = [p for a, b in pieces for p in ((a, min(b, t0)), (max(a, t1), b)) if p[0] < p[1]]
        for a, b in pieces:
            offset, text = _clean(report[a:b])
            if not re.search(r"[A-Za-z]", text):
                continue
            token = doc.char_span(a + offset, a + offset + 1, alignment_mode="expand")
            section = token[0]._.section_category if token is not None and len(token) else None
            out.append(ReportSentence(text, section, a + offset, a + offset + len(text)))
    return out


def _span(sentence: str, target: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(target, str):
        words = target.split()
        found = re.search(r"\s+".join(map(re.escape, words)), sentence, re.IGNORECASE) if words else None
        if found:
            return found.span()
    elif (isinstance(target, tuple) and len(target) == 2 and all(isinstance(v, int) for v in target)
          and 0 <= target[0] < target[1] <= len(sentence)):
        return target
    raise input_error("target_assertions", expected="target phrases or (start, end) spans inside the sentence",
                      received=f"{target!r} in {sentence[:80]!r}", fix="pass phrases the sentence contains")


def target_assertions(sentence: str, targets: Sequence[str | tuple[int, int]], *,
                      extra_rules: Sequence[tuple[str, str, str]] = ()) -> list[ClinicalAssertion]:
    """ConText's verdict for each target of one ``sentence``: a phrase (its first case-insensitive occurrence) or
    a ``(start, end)`` character span. "uncertain" when a possible-existence or hypothetical modifier reaches
    it, else "negated" when a negation does, else "affirmed". The whole text is one sentence (the scope of every
    modifier); overlapping targets are each judged on their own. ``extra_rules``: ``(phrase, kind, direction)``
    modifiers added to ConText's default rules (kind "negated" / "uncertain" / "pseudo", direction "forward" /
    "backward" / "both"; e.g. :func:`agents.text.assertion_triggers`); where matches overlap, ConText keeps the
    longest ("no change" over "no")."""
    if not isinstance(sentence, str):
        raise input_error("target_assertions", expected="a sentence (str)", received=type(sentence).__name__,
                          fix="pass the sentence that holds the targets")
    spans = [_span(sentence, t) for t in targets]
    if not spans:
        return []
    nlp = _pipeline(tuple((str(p), str(k), str(d)) for p, k, d in extra_rules))
    context = nlp.get_pipe("medspacy_context")
    verdicts: dict[tuple[int, int], ClinicalAssertion] = {}
    pending = list(dict.fromkeys(spans))
    while pending:  # spaCy entities may not overlap: judge overlapping targets in separate passes
        with _quiet():
            doc = nlp.make_doc(sentence)
            for token in doc:
                token.is_sent_start = token.i == 0
            batch: list[tuple[tuple[int, int], Any]] = []
            for a, b in pending:
                ent = doc.char_span(a, b, label="TARGET", alignment_mode="expand")
                if ent is None or not len(ent):  # a span of white space only
                    verdicts[(a, b)] = "affirmed"
                elif all(ent.end <= other.start or ent.start >= other.end for _, other in batch):
                    batch.append(((a, b), ent))
            pending = [p for p in pending if p not in verdicts and all(p != q for q, _ in batch)]
            doc.ents = [ent for _, ent in batch]
            context(doc)
            for key, ent in batch:
                if ent._.is_uncertain or ent._.is_hypothetical:
                    verdicts[key] = "uncertain"
                else:
                    verdicts[key] = "negated" if ent._.is_negated else "affirmed"
    return [verdicts[s] for s in spans]


def target_assertion(sentence: str, target: str | tuple[int, int], *,
                     extra_rules: Sequence[tuple[str, str, str]] = ()) -> ClinicalAssertion:
    """ConText's verdict for one target of ``sentence`` (see :func:`target_assertions`)."""
    return target_assertions(sentence, [target], extra_rules=extra_rules)[0]
