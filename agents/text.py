"""Rule-based language processing for the grounding agent: the target of a question, report sentences, and the
groundable mentions of a sentence (finding, anatomy, chest regions, assertion, side). Pure Python + :mod:`re`: no
model, no network.

Mentions are found with the versioned vocabularies of :mod:`prompts` (findings, chest regions, side words).
Assertions follow NegEx (Chapman et al., J Biomed Inform 2001;34:301-310): a trigger phrase negates or hedges the
findings in its scope, which runs forward from a pre-trigger ("no", "possible") or back from a post-trigger ("has
resolved", "cannot be excluded") and ends at a clause boundary ("but", "however", "which", ";"); pseudo-triggers
("no change") negate nothing. Uncertainty wins over negation, as in the CheXpert labeler (Irvin et al., AAAI 2019).
Statements that an anatomy is normal ("Lungs are clear.") give mentions with assertion "normal".

Left and right are always the PATIENT's.

>>> [(m.text, m.assertion, m.regions) for m in find_mentions("No left pneumothorax.")]
[('left pneumothorax', 'absent', ['left apical zone', 'left upper lung zone'])]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from medvlm.errors import input_error
from prompts.anatomy import SIDE_WORDS
from prompts.findings import load_findings
from prompts.regions import BILATERAL_WORDS, load_regions, match_spans

__all__ = ["Assertion", "Mention", "assert_target", "assertion_triggers", "extract_target", "find_mentions",
           "parse_phrase", "refine_sentences", "split_sentences"]

Assertion = Literal["present", "absent", "uncertain", "normal"]
Side = Literal["left", "right", "bilateral"]


@dataclass
class Mention:
    """One groundable mention.

    ``text``: the phrase span as written ("right apical pneumothorax"); ``finding``: canonical finding of
    :mod:`prompts.findings`, or ``None`` for an anatomy mention; ``structure``: the region key an anatomy mention
    names ("cardiac silhouette" for "the heart"; ``None`` for findings and for anatomy spanning several regions);
    ``regions``: region keys to ground (location words first, else the finding's default regions on the stated
    side, else the anatomy's); ``assertion``; ``side``: the patient side stated ("bilateral" for both), else the
    side of its location regions when they all lie on one ("retrocardiac" -> "left").
    """

    text: str
    finding: str | None = None
    structure: str | None = None
    regions: list[str] = field(default_factory=list)
    assertion: Assertion = "present"
    side: Side | None = None


# ------------------------------------------------------------------------------------------------ extract_target

_LEAD_RE = re.compile(
    r"^(?:please|kindly|(?:can|could)\s+you\s+see|do\s+you\s+see|(?:can|could|would|will)\s+(?:you|u)"
    r"|i\s+(?:want|need|would\s+like)\s+(?:you\s+)?to|help\s+me|where(?:['’]s|\s+is|\s+are|\s+was|\s+were)?"
    r"|show(?:\s+me)?|find|locate|segment|highlight|point\s+(?:to|out)|outline|mark|detect|identify|ground"
    r"|delineate|circle|indicate|display|draw\s+(?:a\s+)?(?:box|mask|outline|contour)\s+(?:around|over|on)|box"
    r"|what\s+is\s+the\s+location\s+of|is\s+there|are\s+there"
    r"|does\s+(?:this|the)\s+(?:image|x-?ray|radiograph|film|scan|study)\s+show)\b[\s,]*", re.IGNORECASE)
_ARTICLE_RE = re.compile(r"^(?:the|a|an|any|some)\s+", re.IGNORECASE)
_TAIL_RES = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"\s+(?:located|situated|seen|visible|present|shown|found)$",
    r"\s+(?:on|in|within|from)\s+(?:this|the|that|my)\s+(?:chest\s+)?"
    r"(?:image|picture|x-?ray|radiograph|film|scan|study|cxr)$",
    r"\s+(?:please|for\s+me|here|if\s+any|if\s+present)$",
))
_EDGE_PUNCT = " \t?.!,;:"


def extract_target(question: str) -> str:
    """Return the phrase to ground from a question or command ("Where's the heart?" -> "heart", "segment the left
    clavicle" -> "left clavicle", "Is there a nodule in the right upper lobe?" -> "nodule in the right upper
    lobe"). A bare phrase passes through with whitespace normalized and trailing punctuation removed; case is
    kept. Empty input, or a question naming nothing, raises :class:`~medvlm.errors.InputError`."""
    if not isinstance(question, str) or not question.strip():
        raise input_error("extract_target", expected="a question or phrase naming what to find",
                          received=repr(question), fix="ask e.g. 'where is the right apical pneumothorax?'")
    text = " ".join(question.split()).strip(_EDGE_PUNCT)
    stripped = False
    while (match := _LEAD_RE.match(text)) and match.end():
        text, stripped = text[match.end():], True
    while stripped and (match := _ARTICLE_RE.match(text)):
        text = text[match.end():]
    changed = True
    while changed:  # tails can stack: "... located in this image, please"
        changed = False
        for pattern in _TAIL_RES:
            shorter = pattern.sub("", text).strip(_EDGE_PUNCT)
            changed, text = changed or shorter != text, shorter
    text = text.strip(_EDGE_PUNCT)
    if not text:
        raise input_error("extract_target", expected="a question that names a finding or structure",
                          received=repr(question), fix="name the target, e.g. 'where is the heart?'")
    return text


# ------------------------------------------------------------------------------------------------ split_sentences

_HEADER_RE = re.compile(
    r"(?:\b[A-Z][A-Z&/]+(?:[ \t]+[A-Z][A-Z&/]+)*|(?i:\b(?:findings|impression|comparison|indication|history"
    r"|clinical\s+history|technique|examination|exam|conclusions?|recommendations?|procedure|notification"
    r"|reason\s+for\s+(?:exam|examination|study))))[ \t]*:")
_BULLET_RE = re.compile(r"^(?:[-*•]+|\(?\d{1,2}[.)])\s+")
_END_RE = re.compile(r"[.!?]+(?=\s|$)")
_ABBREVIATIONS = frozenset({"dr", "e.g", "i.e", "eg", "ie", "approx", "vs", "cf", "mr", "mrs", "ms", "st", "fig",
                            "a.m", "p.m", "al", "incl", "resp", "prof"})


def split_sentences(report: str) -> list[str]:
    """Split a radiology report into sentences: section headers ("FINDINGS:", "Impression:") are dropped (their
    text kept), newlines end a sentence unless the next line continues it in lower case, bullets and numbering
    ("1.", "-", "*") are removed, abbreviations and decimals ("Dr.", "e.g.", "approx.", "2.5 cm") never split, and
    semicolons are not breaks. Returns the non-empty stripped sentences."""
    if not isinstance(report, str):
        raise input_error("split_sentences", expected="report text (str)", received=type(report).__name__,
                          fix="pass the report as one string")
    chunks: list[str] = []
    for line in _HEADER_RE.sub("\n", report).splitlines():
        line = line.strip()
        bullet = _BULLET_RE.match(line)
        line = line[bullet.end():] if bullet else line
        # A wrapped line (lower-case or digit start, previous line not ended) continues the sentence.
        if chunks and line and not bullet and chunks[-1] and chunks[-1][-1] not in ".!?" and line[0].islower():
            chunks[-1] += " " + line
        else:
            chunks.append(line)
    sentences: list[str] = []
    for chunk in chunks:
        start = 0
        for match in _END_RE.finditer(chunk):
            before = chunk[start:match.start()].split()
            word = before[-1].lower() if before else ""
            rest = chunk[match.end():].lstrip()
            if (rest and not (rest[0].isupper() or rest[0].isdigit() or rest[0] in "(\"'")) or word in _ABBREVIATIONS \
                    or (len(before) == 1 and word.isdigit() and len(word) <= 2):  # "1." enumerates, not ends
                continue
            sentences.append(chunk[start:match.end()])
            start = match.end()
        sentences.append(chunk[start:])
    cleaned = (_BULLET_RE.sub("", s.strip()).strip() for s in sentences)
    return [s for s in cleaned if re.search(r"[A-Za-z0-9]", s)]


def refine_sentences(sentences: Sequence[str]) -> list[str]:
    """Correct the sentences of another splitter with these rules: a piece that ends in an abbreviation
    ("approx.", "e.g.", "Dr.") is joined with the next one, then each piece is split as :func:`split_sentences`
    splits (numbered items run together: "No effusion. 2. Small nodule." -> two sentences; bullets and numbering
    removed; a piece without a letter, such as a lone "2.", is dropped). Pieces are never joined otherwise, so a
    sentence that starts in lower case stays on its own."""
    joined: list[str] = []
    for piece in sentences:
        before = joined[-1].rstrip() if joined else ""
        words = before[:-1].split() if before.endswith(".") else []
        if words and words[-1].lower() in _ABBREVIATIONS:
            joined[-1] = before + " " + piece.strip()
        else:
            joined.append(piece)
    return [s for piece in joined for s in split_sentences(piece) if re.search(r"[A-Za-z]", s)]


# ------------------------------------------------------------------------------------------------ mentions


class _Tok(NamedTuple):
    norm: str
    start: int
    end: int


_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:['’][sS]\b)?|[;,]|\.(?=\s|$)")
# Clause boundaries: NegEx scope terminators and sentence punctuation.
_TERMINATORS = frozenset({";", ".", "but", "however", "although", "though", "whereas", "except", "which", "yet"})
_PRE, _POST, _BOTH = "pre", "post", "both"
_TRIGGERS: dict[str, tuple[str, str]] = {
    **{p: ("absent", _PRE) for p in (
        "no", "not", "without", "negative for", "free of", "no evidence of", "no evidence for", "no signs of",
        "no sign of", "absence of", "resolution of", "no longer", "ruled out", "no radiographic evidence of")},
    **{p: ("absent", _POST) for p in (
        "not seen", "not identified", "not visualized", "not present", "not appreciated", "not demonstrated",
        "absent", "has resolved", "have resolved", "no longer seen", "has cleared", "have cleared")},
    "resolved": ("absent", _BOTH),
    **{p: ("uncertain", _PRE) for p in (
        "possible", "possibly", "may represent", "may reflect", "may be", "might be", "could represent",
        "could reflect", "could be", "questionable", "question of", "suspicious for", "suspected", "likely",
        "probable", "probably", "concerning for", "worrisome for", "suggestive of", "cannot exclude",
        "can not exclude", "cannot rule out", "rule out", "evaluate for", "equivocal")},
    **{p: ("uncertain", _POST) for p in (
        "cannot be excluded", "can not be excluded", "not excluded", "cannot be ruled out", "not ruled out",
        "is suspected", "is possible", "is likely", "are suspected", "are possible", "are likely")},
    "versus": ("uncertain", _BOTH), "vs": ("uncertain", _BOTH),
    **{p: ("pseudo", _PRE) for p in (
        "no change", "no interval change", "no significant change", "no significant interval change",
        "without change", "without interval change", "no increase", "no decrease", "not only")},
    **{p: ("normal", _BOTH) for p in (
        "normal", "within normal limits", "clear", "unremarkable", "intact", "well expanded", "well aerated",
        "well inflated", "not enlarged", "top normal", "normal size", "normal in size")},
}
_TRIGGER_LEN = max(len(p.split()) for p in _TRIGGERS)
_SIDE_TOKENS = SIDE_WORDS["left"] | SIDE_WORDS["right"] | BILATERAL_WORDS | {"sided"}
_CONNECT = frozenset({"of", "the"})
_PREPS = frozenset({"in", "at", "on", "of", "the", "within", "involving", "over", "along", "overlying", "projecting",
                    "near", "throughout", "is", "are", "seen", "noted", "present", "identified",
                    # verbs reports use to place a finding: "projects over", "overlies", "located in"
                    "projects", "project", "projected", "overlies", "overlie", "located", "situated", "lies", "lie",
                    "abutting", "abuts", "adjacent", "to", "into", "extending", "extends"})
_MODIFIERS = frozenset({
    "a", "an", "small", "large", "moderate", "mild", "minimal", "trace", "tiny", "new", "patchy", "focal", "diffuse",
    "streaky", "linear", "subsegmental", "segmental", "lobar", "plate", "platelike", "like", "hazy", "faint", "dense",
    "increased", "decreased", "increasing", "decreasing", "persistent", "residual", "loculated", "layering", "mildly",
    "moderately", "minimally", "slightly", "severe", "significant", "definite", "acute", "chronic", "sized", "size",
    "ill", "defined", "well", "apparent", "worsening", "improving", "improved", "stable", "unchanged", "calcified",
    "rounded", "round", "irregular", "spiculated", "interstitial", "airspace", "vague",
})
_COORDINATION = frozenset({"and", "or", "than", "greater", "more", "larger", "worse", "to"})
_COPULAS = frozenset({"is", "are", "was", "were", "be", "been", "has", "have", "had", "appears", "appear", "remains",
                      "remain", "seems", "seem", "shows", "show", "demonstrates", "demonstrate"})
_ADVERBS = frozenset({"otherwise", "grossly", "essentially", "overall", "again", "now", "still", "also"})
_FILLER = _COPULAS | _CONNECT | _ADVERBS | {"size", "sizes", "and", "stable", "unchanged", "in", "within", "contour",
                                            "contours", "volume", "volumes", "configuration", "both", "at", "limits",
                                            "a", "an"}
# Location words too vague to be an anatomy mention on their own ("upper SVC", "cardiac monitor").
_VAGUE = frozenset({"upper", "lower", "mid", "middle", "cardiac", "sided", "lateral", "inferior", "superior",
                    "pulmonary", "above", "side", "region", "regions", "border", "field", "fields"})


def _tokenize(text: str) -> list[_Tok]:
    return [_Tok(re.sub(r"['’]s$", "", m.group(0).lower()), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]


# Heart chambers, named in device and cardiac sentences ("pacemaker leads terminate in the right atrium"). The chest
# region vocabulary has no chamber, so they are outlined as the cardiac silhouette; their side word names the
# chamber, not a side of the chest.
_HEART_PARTS: dict[str, str] = dict.fromkeys(
    ("right atrium", "left atrium", "right ventricle", "left ventricle", "atrium", "atria", "ventricle", "ventricles",
     "myocardium"), "cardiac silhouette")
_HEART_PART_WORDS = frozenset(w for p in _HEART_PARTS for w in p.split()) - _SIDE_TOKENS


def _loc_words() -> frozenset[str]:
    return (load_regions().words - _CONNECT) | _SIDE_TOKENS | _HEART_PART_WORDS


def _span_text(text: str, toks: Sequence[_Tok], start: int, end: int) -> str:
    out = text[toks[start].start:toks[end - 1].end]
    # Keep a closing parenthesis of a suffix such as "lobe(S5)".
    if out.count("(") > out.count(")") and text[toks[end - 1].end:toks[end - 1].end + 1] == ")":
        out += ")"
    return out


def _describe(words: Sequence[str], finding: str | None) -> tuple[list[str], str | None, Side | None]:
    """Regions, structure and side of a mention whose span has normalized tokens ``words``."""
    regions_vocab = load_regions()
    parts = match_spans(words, _HEART_PARTS, 2)
    if parts:  # "(upper) right atrium": the cardiac silhouette; side and level words are the chamber's
        inside = {i for s, e, _ in parts for i in range(s, e)}
        words = [w for i, w in enumerate(words) if i not in inside and not (w in _VAGUE and i + 1 in inside)]
    explicit = regions_vocab.locate(words)
    explicit += [k for k in dict.fromkeys(key for _, _, key in parts) if k not in explicit]
    side = regions_vocab.laterality(words)
    if side is None and explicit:
        sides = {regions_vocab.get(k).side for k in explicit}
        side = sides.pop() if len(sides) == 1 else None
    if explicit:
        regions = explicit
    elif finding is not None:
        defaults = list(load_findings().get(finding).default_regions)
        on_side = [k for k in defaults if regions_vocab.get(k).side in (None, side)]
        regions = on_side if side in ("left", "right") and on_side else defaults
    else:
        regions = []
    structure = None
    if finding is None:
        structure = regions_vocab.resolve(" ".join(words)) or (regions[0] if len(regions) == 1 else None)
    return regions, structure, side


def _assertion(kinds: tuple[str | None, str | None]) -> Assertion:
    if "uncertain" in kinds:
        return "uncertain"
    return "absent" if "absent" in kinds else "present"


_Trigger = tuple[int, int, str, str]  # (start, end, kind, direction) over a clause's tokens


def assertion_triggers() -> list[tuple[str, str, str]]:
    """The negation, uncertainty and pseudo-trigger phrases of these rules as ``(phrase, kind, direction)``:
    kind "negated", "uncertain" or "pseudo" (negates nothing: "no change"); direction "forward" (scope runs on
    from the trigger), "backward" or "both". Normal-statement triggers are left out. For other assertion engines
    (:mod:`agents.clinical_nlp` adds them to ConText's own rules)."""
    kinds = {"absent": "negated", "uncertain": "uncertain", "pseudo": "pseudo"}
    ways = {_PRE: "forward", _POST: "backward", _BOTH: "both"}
    return [(phrase, kinds[kind], ways[way]) for phrase, (kind, way) in _TRIGGERS.items() if kind in kinds]


def _triggers(words: Sequence[str], taken: set[int]) -> list[_Trigger]:
    """Assertion triggers of a clause, less those overlapping a finding (``taken`` token indices)."""
    return [(s, e, kind, way) for s, e, (kind, way) in match_spans(words, _TRIGGERS, _TRIGGER_LEN)
            if not taken & set(range(s, e))]


def _pre_kind(triggers: Sequence[_Trigger], start: int) -> str | None:
    """Kind of the nearest pre-trigger before token ``start`` (its forward scope runs to the clause end)."""
    before = [t for t in triggers if t[1] <= start and t[3] in (_PRE, _BOTH) and t[2] != "normal"]
    return max(before, key=lambda t: t[1])[2] if before else None


def _post_kind(words: Sequence[str], triggers: Sequence[_Trigger], end: int) -> str | None:
    """Kind of the first post-trigger after token ``end`` whose backward scope reaches it."""
    for s, _, kind, way in sorted(triggers):
        if s < end or way == _PRE or kind == "normal":
            continue
        between = list(words[end:s])
        while between and between[-1] in _COPULAS:  # "pneumothorax is not seen": "is" belongs to the trigger
            between.pop()
        # A copula of its own ends the backward scope ("A is unchanged and B has resolved": only B).
        return None if _COPULAS & set(between) else kind
    return None


def _clause_mentions(text: str, toks: list[_Tok]) -> list[Mention]:
    """Mentions of one clause (tokens between terminators): each finding with the location words around it, then
    the anatomy runs left over that are normal, negated or hedged, or that stand alone in a finding-free clause."""
    words = [t.norm for t in toks]
    loc = _loc_words()
    findings = load_findings().spans(words)
    taken = {i for s, e, _ in findings for i in range(s, e)}
    triggers = _triggers(words, taken)
    starts = {s for s, _, _ in findings}

    def pre_kind(start: int) -> str | None:
        return _pre_kind(triggers, start)

    def post_kind(end: int) -> str | None:
        return _post_kind(words, triggers, end)

    def attributive(s: int) -> bool:
        """A normal trigger before a run qualifies it ("normal heart size") unless it is the predicate of an
        earlier subject ("heart is normal and lungs show ...")."""
        while s > 0 and words[s - 1] in _ADVERBS:
            s -= 1
        return s == 0 or words[s - 1] not in _COPULAS

    def coordinated(j: int) -> bool:
        """Coordination words between locations ("right greater than left", "right apex and left base")."""
        if words[j] not in _COORDINATION:
            return False
        while j >= 0 and words[j] in _COORDINATION:
            j -= 1
        return j >= 0 and j not in taken and words[j] in loc

    mentions: list[tuple[int, int, Mention]] = []
    for fs, fe, name in findings:
        start, j = fs, fs - 1
        while j >= 0 and j not in taken and (words[j] in loc | _CONNECT | _MODIFIERS or coordinated(j)):
            start = j if words[j] in loc else start
            j -= 1
        end, j = fe, fe
        while j < len(words) and j not in starts and words[j] in loc | _PREPS:
            end = j + 1 if words[j] in loc else end
            j += 1
        k = end
        while k < len(words) and words[k] in _MODIFIERS:
            k += 1
        if k in starts and end > fe:  # the location run is the next finding's ("effusion, right basilar atelectasis")
            end = fe
        if start == fs and end == fe:  # subject + copula: "The left lower lobe is collapsed"
            j = fs - 1
            while j >= 0 and words[j] in _COPULAS | _MODIFIERS:
                j -= 1
            if j < fs - 1 and j >= 0 and j not in taken and words[j] in loc and _COPULAS & set(words[j + 1:fs]):
                start = j
                while start > 0 and start - 1 not in taken and words[start - 1] in loc | _CONNECT:
                    start -= 1
                while words[start] in _CONNECT:
                    start += 1
        while words[end - 1] in _CONNECT:
            end -= 1
        regions, _, side = _describe(words[start:end], name)
        assertion = _assertion((pre_kind(start), post_kind(end)))
        mention = Mention(_span_text(text, toks, start, end), name, None, regions, assertion, side)
        mentions.append((start, end, mention))
        taken |= set(range(start, end))

    normal = [t for t in triggers if t[2] == "normal"]
    i = 0
    while i < len(words):
        if i in taken or words[i] not in loc:
            i += 1
            continue
        start = end = i
        while end < len(words) and end not in taken and words[end] in loc | _CONNECT:
            end += 1
        while words[end - 1] in _CONNECT:
            end -= 1
        i = end
        run = words[start:end]
        regions, structure, side = _describe(run, None)
        if not regions or not set(run) - _VAGUE - _SIDE_TOKENS:
            continue
        is_normal = any((e <= start and attributive(s) and set(words[e:start]) <= _FILLER | _MODIFIERS | loc)
                        or (s >= end and set(words[end:s]) <= _FILLER | loc) for s, e, _, _ in normal)
        kinds = (pre_kind(start), post_kind(end))
        if is_normal or "absent" in kinds:  # "heart is not enlarged", "no abnormality of the right lung"
            assertion = "normal"
        else:
            assertion = _assertion(kinds)
            if assertion == "present" and findings:
                continue  # context of a finding in the same clause, not a mention of its own
        mentions.append((start, end, Mention(_span_text(text, toks, start, end), None, structure, regions,
                                             assertion, side)))
    return [m for _, _, m in sorted(mentions, key=lambda x: x[0])]


def _carry_side(mentions: list[Mention]) -> list[Mention]:
    """A finding that states no location of its own takes the side of the nearest finding before it in the
    sentence that states one ("a small left pleural effusion with adjacent atelectasis": the atelectasis is on the
    left; "right lower lobe opacity, likely atelectasis": on the right). Negated findings neither give nor take a
    side; findings of a midline structure (cardiomegaly) keep their regions."""
    findings = load_findings()
    regions_vocab = load_regions()
    side: Side | None = None
    out = []
    for m in mentions:
        if m.finding is not None and m.assertion != "absent":
            words = [t.norm for t in _tokenize(m.text)]
            own = regions_vocab.laterality(words) is not None or bool(regions_vocab.locate(words))
            if own:
                side = m.side if m.side in ("left", "right", "bilateral") else side
            elif side is not None and m.side is None:
                defaults = list(findings.get(m.finding).default_regions)
                sided = [k for k in defaults if regions_vocab.get(k).side is not None]
                if sided:  # a lateral finding: its default regions on the carried side
                    on_side = [k for k in defaults if regions_vocab.get(k).side in (None, side)]
                    regions = on_side if side in ("left", "right") and on_side else defaults
                    m = Mention(m.text, m.finding, m.structure, regions, m.assertion, side)
        out.append(m)
    return out


def find_mentions(sentence: str) -> list[Mention]:
    """Return the groundable mentions of one report sentence, in text order: findings (with their location,
    assertion and side) and anatomy statements ("The heart size is normal." -> "heart", assertion "normal").
    "Small left pleural effusion and right basilar atelectasis." gives two mentions, each with its own regions;
    "No pneumothorax or pleural effusion." two absent ones; a sentence with nothing groundable gives ``[]``. A
    finding without a location of its own takes the side stated for an earlier finding of the sentence ("left
    pleural effusion with adjacent atelectasis": left atelectasis)."""
    if not isinstance(sentence, str):
        raise input_error("find_mentions", expected="a sentence (str)", received=type(sentence).__name__,
                          fix="split a report with split_sentences() and pass each sentence")
    toks = _tokenize(sentence)
    mentions: list[Mention] = []
    clause: list[_Tok] = []
    for tok in [*toks, _Tok(".", len(sentence), len(sentence))]:
        if tok.norm in _TERMINATORS:
            mentions += _clause_mentions(sentence, clause) if clause else []
            clause = []
        else:
            clause.append(tok)
    return _carry_side(mentions)


def assert_target(sentence: str, target: str | tuple[int, int]) -> Assertion:
    """Assertion of one target phrase in ``sentence`` under the NegEx rules of this module: "absent" (negated),
    "uncertain" (hedged) or "present". ``target``: the phrase (its first case-insensitive occurrence) or its
    ``(start, end)`` character span. The scope is the target's clause; triggers inside the target are ignored.
    A target that is not in the sentence raises :class:`~medvlm.errors.InputError`."""
    if not isinstance(sentence, str):
        raise input_error("assert_target", expected="a sentence (str)", received=type(sentence).__name__,
                          fix="pass the sentence that holds the target phrase")
    span = _char_span(sentence, target)
    if span is None:
        raise input_error("assert_target", expected="a target phrase or (start, end) span inside the sentence",
                          received=f"{target!r} in {sentence[:80]!r}", fix="pass a phrase the sentence contains")
    start, end = span
    clause: list[_Tok] = []
    for tok in [*_tokenize(sentence), _Tok(".", len(sentence), len(sentence))]:
        if tok.norm not in _TERMINATORS:
            clause.append(tok)
            continue
        inside = [i for i, t in enumerate(clause) if t.start < end and t.end > start]
        if inside:
            words = [t.norm for t in clause]
            triggers = _triggers(words, set(range(inside[0], inside[-1] + 1)))
            return _assertion((_pre_kind(triggers, inside[0]), _post_kind(words, triggers, inside[-1] + 1)))
        if tok.start >= end:
            break
        clause = []
    return "present"


def _char_span(sentence: str, target: str | tuple[int, int]) -> tuple[int, int] | None:
    """The ``(start, end)`` of ``target`` in ``sentence`` (a phrase found case-insensitively, or a span checked)."""
    if isinstance(target, str):
        words = target.split()
        found = re.search(r"\s+".join(map(re.escape, words)), sentence, re.IGNORECASE) if words else None
        return found.span() if found else None
    if (isinstance(target, tuple) and len(target) == 2 and all(isinstance(v, int) for v in target)
            and 0 <= target[0] < target[1] <= len(sentence)):
        return target[0], target[1]
    return None


def parse_phrase(phrase: str) -> Mention:
    """Return the one :class:`Mention` of a grounding phrase ("right apical pneumothorax", "heart", "left lower
    lobe"): the whole phrase is the span, its finding is the longest one it names (or ``None``), its regions
    follow the location words, else the finding's default regions on the stated side, else the anatomy; the
    assertion is "present" unless a trigger negates ("absent"), hedges ("uncertain") or calls it normal."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise input_error("parse_phrase", expected="a non-empty phrase", received=repr(phrase),
                          fix="pass e.g. 'right apical pneumothorax'")
    text = " ".join(phrase.split()).rstrip(_EDGE_PUNCT)
    words = [t.norm for t in _tokenize(text) if t.norm not in {",", ";", "."}]
    finding = load_findings().resolve(text)
    regions, structure, side = _describe(words, finding)
    kinds = {kind for _, _, (kind, _) in match_spans(words, _TRIGGERS, _TRIGGER_LEN)}
    assertion = _assertion(("uncertain" if "uncertain" in kinds else None, "absent" if "absent" in kinds else None))
    if assertion == "present" and "normal" in kinds and finding is None:
        assertion = "normal"
    return Mention(text, finding, structure, regions, assertion, side)
