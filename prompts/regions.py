"""Anatomical regions of a frontal chest radiograph (after Chest ImaGenome) and the location words that point to them.

The vocabulary is versioned package data (``prompts/data/chest_regions_v<version>.json``, read with
:mod:`importlib.resources`). Its keys are exactly :data:`REGION_KEYS`: another module derives each region's
geometry from the lung, heart and clavicle masks under these names, following the region's ``rule`` sentence
(zones = thirds of each lung's vertical extent, apical zone = lung above the clavicle's lower edge, ...). Each
region names the :mod:`prompts.anatomy` structure it derives from.

Location words ("apical", "bibasilar", "left upper lobe", "retrocardiac", ...) map free text to regions. A word
whose region depends on the side ("base") takes the side stated nearest to it ("left base"); when the phrase
states none, both sides are returned (right first). Lobes are projected onto the zones they cover on a PA
radiograph (see the data file's ``notes``). Left and right are always the PATIENT's; on a frontal radiograph the
patient's right is on the image left.

Provenance: region set after the Chest ImaGenome dataset (Wu et al. 2021); zones, silhouettes and lobe projections
paraphrased after Felson's Principles of Chest Roentgenology; location terms after the Fleischner Society glossary;
masks after the SCR paper. Full citations are in the data file's ``"sources"``. Nothing is quoted.

>>> location_regions("right apical pneumothorax")
['right apical zone']
>>> location_regions("bibasilar atelectasis")
['right lower lung zone', 'left lower lung zone']
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from medvlm.errors import input_error
from prompts.anatomy import SIDE_WORDS, load_vocabulary, normalize_phrase, side_of

__all__ = [
    "BILATERAL_WORDS",
    "REGION_KEYS",
    "ChestRegion",
    "LocationRule",
    "RegionVocabulary",
    "laterality",
    "load_regions",
    "location_regions",
    "match_spans",
    "region_side",
    "resolve_region",
]

Side = Literal["left", "right"]
Laterality = Literal["left", "right", "bilateral"]

REGION_KEYS: tuple[str, ...] = (
    "right lung", "left lung",
    "right upper lung zone", "right mid lung zone", "right lower lung zone",
    "left upper lung zone", "left mid lung zone", "left lower lung zone",
    "right apical zone", "left apical zone",
    "right costophrenic angle", "left costophrenic angle",
    "right hilar structures", "left hilar structures",
    "right hemidiaphragm", "left hemidiaphragm",
    "cardiac silhouette", "mediastinum", "upper mediastinum",
    "right clavicle", "left clavicle",
)
"""The canonical region keys (a fixed contract with the geometry code: every data version has exactly these)."""

BILATERAL_WORDS: frozenset[str] = frozenset({"bilateral", "bilaterally", "both", "bilat"})
"""Words that state both sides ("bibasilar"-like location words say it too, through their rule)."""

_T = TypeVar("_T")
_SIDE_TOKEN: dict[str, Side] = {**dict.fromkeys(SIDE_WORDS["left"], "left"),
                                 **dict.fromkeys(SIDE_WORDS["right"], "right")}


# ------------------------------------------------------------------------------------------------ data classes


@dataclass(frozen=True)
class ChestRegion:
    """One region: ``key`` (a :data:`REGION_KEYS` entry), patient ``side`` (``None`` for midline regions),
    ``structure`` (the :mod:`prompts.anatomy` structure it is derived from), ``rule`` (its geometry in words),
    ``synonyms`` (side word kept) and ``sources`` (ids of :attr:`RegionVocabulary.sources`)."""

    key: str
    side: Side | None
    structure: str
    rule: str
    synonyms: tuple[str, ...]
    sources: tuple[str, ...] = ()

    @property
    def phrases(self) -> tuple[str, ...]:
        """The key followed by the synonyms."""
        return (self.key, *self.synonyms)


@dataclass(frozen=True)
class LocationRule:
    """What one group of location words points to.

    ``fixed``: regions whatever the side; ``right``/``left``: regions when the phrase states that side (both
    lists when it states both sides or none); ``side``: ``"both"`` for words that state both sides themselves
    ("bibasilar"); ``anchor``: the side a matched phrase itself states (sided region names), which neighbouring
    side-dependent words then take."""

    words: tuple[str, ...]
    fixed: tuple[str, ...] = ()
    right: tuple[str, ...] = ()
    left: tuple[str, ...] = ()
    side: Literal["both"] | None = None
    anchor: Side | None = None

    def regions(self, side: Side | Literal["both"]) -> list[str]:
        """The region keys for a phrase stating ``side`` (fixed ones first, then right, then left)."""
        found = list(self.fixed)
        if side in ("right", "both"):
            found += self.right
        if side in ("left", "both"):
            found += self.left
        return found


def match_spans(tokens: Sequence[str], index: Mapping[str, _T], max_len: int) -> list[tuple[int, int, _T]]:
    """Return ``(start, end, value)`` for the phrases of ``index`` (keys: space-joined lower-case tokens) found in
    ``tokens``, scanning left to right and taking the longest phrase at each position; matches never overlap."""
    spans: list[tuple[int, int, _T]] = []
    i = 0
    while i < len(tokens):
        for j in range(min(len(tokens), i + max_len), i, -1):
            value = index.get(" ".join(tokens[i:j]))
            if value is not None:
                spans.append((i, j, value))
                i = j
                break
        else:
            i += 1
    return spans


# ------------------------------------------------------------------------------------------------ vocabulary


class RegionVocabulary:
    """A loaded region vocabulary: region key -> :class:`ChestRegion`, location rules and phrase indexes.

    Build it with :func:`load_regions` or :meth:`from_mapping`; both check the data (exact key set, sides kept in
    synonyms, structures known to :mod:`prompts.anatomy`, region templates valid, no phrase used twice) and raise
    :class:`~medvlm.errors.InputError` on a violation.
    """

    def __init__(self, version: str, regions: Mapping[str, ChestRegion], locations: Sequence[LocationRule],
                 sources: Mapping[str, str], notes: str = "") -> None:
        what = f"chest region vocabulary v{version}"
        if tuple(regions) != REGION_KEYS:
            raise input_error(what, expected=f"exactly the region keys, in order: {', '.join(REGION_KEYS)}",
                              received=", ".join(regions), fix="keep the canonical keys of REGION_KEYS")
        self.version = version
        self.notes = notes
        self.regions: Mapping[str, ChestRegion] = MappingProxyType(dict(regions))
        self.sources: Mapping[str, str] = MappingProxyType(dict(sources))
        locations_index: dict[str, LocationRule] = {}
        rules = [LocationRule(words=r.phrases, fixed=(r.key,), anchor=r.side) for r in regions.values()]
        for rule in (*rules, *locations):
            for word in rule.words:
                key = normalize_phrase(word)
                if not key or locations_index.setdefault(key, rule) is not rule:
                    raise input_error(what, expected="each region phrase and location word (normalized) used once",
                                      received=repr(word), fix="remove or reword the repeated phrase")
        self._index = {normalize_phrase(p): r.key for r in regions.values() for p in r.phrases}
        self._locations: Mapping[str, LocationRule] = MappingProxyType(locations_index)
        self._max_len = max(len(phrase.split()) for phrase in locations_index)
        self.words: frozenset[str] = frozenset(t for phrase in locations_index for t in phrase.split())
        """Every token of a region phrase or location word (for finding location runs in text)."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], origin: str = "<mapping>") -> RegionVocabulary:
        """Return the vocabulary described by a parsed ``chest_regions_v*.json`` object (``origin`` names it in
        errors)."""
        what = f"chest region vocabulary {origin}"
        fix = "follow the layout of prompts/data/chest_regions_v1.json"
        if not (isinstance(data, Mapping) and isinstance(data.get("version"), str)
                and isinstance(data.get("regions"), Mapping) and isinstance(data.get("locations"), list)):
            raise input_error(what, expected='an object with "version" (str), "regions" (object), "locations" (list)',
                              received=repr(data)[:120], fix=fix)
        sources = parse_sources(data.get("sources"), what)
        structures = load_vocabulary()
        regions = {}
        for key, raw in data["regions"].items():
            where = f"{what} region {key!r}"
            if not isinstance(raw, Mapping):
                raise input_error(where, expected="an object", received=type(raw).__name__, fix=fix)
            synonyms = string_list(raw.get("synonyms"), f"{where} synonyms")
            if raw.get("side") != side_of(key) or any(side_of(s) != side_of(key) for s in synonyms):
                raise input_error(where, expected=f'"side": {side_of(key)!r} and synonyms stating that side',
                                  received=f"side={raw.get('side')!r}, synonyms={synonyms}",
                                  fix="keep the side word of a sided region in every synonym")
            if raw.get("structure") not in structures:
                raise input_error(where, expected='"structure": a structure name of prompts/data/anatomy_v1.json',
                                  received=repr(raw.get("structure")), fix=fix)
            rule = raw.get("rule")
            if not isinstance(rule, str) or not rule.strip():
                raise input_error(where, expected='"rule": a sentence', received=repr(rule), fix=fix)
            used = string_list(raw.get("sources"), f"{where} sources")
            if not set(used) <= set(sources):
                raise input_error(where, expected=f"source ids among {sorted(sources)}", received=repr(used),
                                  fix='add the source to the top-level "sources" list')
            regions[str(key)] = ChestRegion(str(key), side_of(key), raw["structure"], rule.strip(), synonyms, used)
        locations = [_parse_location(raw, f"{what} locations[{i}]") for i, raw in enumerate(data["locations"])]
        notes = data.get("notes", "")
        return cls(data["version"], regions, locations, sources, notes if isinstance(notes, str) else "")

    def get(self, key: str) -> ChestRegion:
        """Return region ``key``; an unknown key raises :class:`~medvlm.errors.InputError` listing the keys."""
        if isinstance(key, str) and key in self.regions:
            return self.regions[key]
        guess = self.resolve(key) if isinstance(key, str) else None
        raise input_error(f"chest region vocabulary v{self.version}", expected=f"a region key, one of: "
                          f"{', '.join(REGION_KEYS)}", received=repr(key),
                          fix=f"use the key {guess!r}" if guess else "map a free phrase with resolve_region()")

    def resolve(self, phrase: str) -> str | None:
        """Return the key whose key or synonym equals ``phrase`` after :func:`~prompts.anatomy.normalize_phrase`."""
        return self._index.get(normalize_phrase(phrase))

    def spans(self, tokens: Sequence[str]) -> list[tuple[int, int, LocationRule]]:
        """Return the location phrases (region names included) found in normalized ``tokens``
        (see :func:`match_spans`)."""
        return match_spans(tokens, self._locations, self._max_len)

    def locate(self, tokens: Sequence[str]) -> list[str]:
        """Return the region keys that the location words of normalized ``tokens`` point to, in text order,
        without repeats; a whole lung is dropped when a smaller region of that lung is named too ("left lung
        base" is the base, not the whole lung)."""
        spans = self.spans(tokens)
        inside = {i for start, end, _ in spans for i in range(start, end)}
        # Side anchors: free side words, plus sided region names ("right apex and left base": base -> left).
        anchors: list[tuple[int, int, Side | Literal["both"]]] = [
            (i, i + 1, _SIDE_TOKEN.get(t) or "both") for i, t in enumerate(tokens)
            if i not in inside and (t in _SIDE_TOKEN or t in BILATERAL_WORDS)]
        anchors += [(start, end, rule.anchor) for start, end, rule in spans if rule.anchor]
        found: list[str] = []
        for start, end, rule in spans:
            side: Side | Literal["both"] = rule.side or "both"
            if rule.side is None and anchors:
                # Nearest anchor; on a tie the one before the word wins ("left base, right apex").
                side = min(anchors, key=lambda a: (start - a[1], 0) if a[1] <= start else (a[0] - end, 1))[2]
            found += [key for key in rule.regions(side) if key not in found]
        return [key for key in found
                if not (key in ("right lung", "left lung")
                        and any(k != key and self.regions[k].structure == key for k in found))]

    def laterality(self, tokens: Sequence[str]) -> Laterality | None:
        """Return the side that normalized ``tokens`` state: "bilateral" for both sides (two side words, a
        :data:`BILATERAL_WORDS` word, or a both-sides location word such as "bibasilar"), else "left"/"right",
        else ``None``."""
        sides = {_SIDE_TOKEN[t] for t in tokens if t in _SIDE_TOKEN}
        if len(sides) == 2 or any(t in BILATERAL_WORDS for t in tokens) \
                or any(rule.side == "both" for _, _, rule in self.spans(tokens)):
            return "bilateral"
        return sides.pop() if sides else None

    def __repr__(self) -> str:
        return f"RegionVocabulary(version={self.version!r}, regions={len(self.regions)})"


def string_list(value: Any, where: str) -> tuple[str, ...]:
    if not (isinstance(value, list) and all(isinstance(s, str) and s.strip() for s in value)):
        raise input_error(where, expected="a list of non-empty strings", received=repr(value)[:120],
                          fix="follow the layout of the packaged data file")
    return tuple(value)


def parse_sources(raw: Any, what: str) -> dict[str, str]:
    sources: dict[str, str] = {}
    for item in raw if isinstance(raw, list) else [raw]:
        if not (isinstance(item, Mapping) and isinstance(item.get("id"), str)
                and isinstance(item.get("citation"), str)):
            raise input_error(f"{what} sources", expected='a list of {"id": str, "citation": str, ...}',
                              received=repr(item)[:120], fix="give every source an id and a citation")
        sources[item["id"]] = item["citation"]
    return sources


def _parse_location(raw: Any, where: str) -> LocationRule:
    if not isinstance(raw, Mapping) or raw.get("side") not in (None, "both"):
        raise input_error(where, expected='an object with "words", "regions" or "right"+"left", optional '
                          '"side": "both"', received=repr(raw)[:120], fix="follow prompts/data/chest_regions_v1.json")
    words = string_list(raw.get("words"), f"{where} words")
    templates = string_list(raw.get("regions", []), f"{where} regions") if "regions" in raw else ()
    fixed = tuple(t for t in templates if "{side}" not in t)
    right = tuple(t.replace("{side}", "right") for t in templates if "{side}" in t)
    left = tuple(t.replace("{side}", "left") for t in templates if "{side}" in t)
    if "right" in raw or "left" in raw:
        right += string_list(raw.get("right"), f"{where} right")
        left += string_list(raw.get("left"), f"{where} left")
    unknown = [k for k in (*fixed, *right, *left) if k not in REGION_KEYS]
    if unknown or not (fixed or right or left):
        raise input_error(where, expected="region keys of REGION_KEYS ('{side} ...' templates allowed)",
                          received=repr(unknown or raw)[:120], fix="name regions by their canonical keys")
    return LocationRule(words, fixed, right, left, raw.get("side"))


# ------------------------------------------------------------------------------------------------ loading


def _read_data(stem: str, version: str, caller: str) -> tuple[Any, str]:
    """Return the parsed package data file ``prompts/data/<stem>_v<version>.json`` and its display path."""
    if not isinstance(version, str) or not version.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise input_error(caller, expected="a version string such as '1'", received=repr(version),
                          fix="pass e.g. version='1'")
    origin = f"prompts/data/{stem}_v{version}.json"
    resource = resources.files("prompts") / "data" / f"{stem}_v{version}.json"
    if not resource.is_file():
        raise input_error(caller, expected=f"a shipped version ({origin} is absent)", received=repr(version),
                          fix="pass version='1' (the default)")
    try:
        return json.loads(resource.read_text(encoding="utf-8")), origin
    except json.JSONDecodeError as exc:
        raise input_error(origin, expected="valid JSON", received=str(exc),
                          fix="repair the data file (or reinstall the package)") from exc


def load_regions(version: str = "1") -> RegionVocabulary:
    """Return the packaged region vocabulary of ``version`` (read once, then cached: the same object every call)."""
    return _load_cached(version)


def load_versioned(stem: str, version: str, caller: str, build: Callable[[Any, str], _T]) -> _T:
    """Read ``prompts/data/<stem>_v<version>.json``, build it with ``build(data, origin)`` and check that the
    result's ``version`` matches the file name (shared by the region and finding vocabularies)."""
    data, origin = _read_data(stem, version, caller)
    vocabulary = build(data, origin)
    found = getattr(vocabulary, "version", None)
    if found != version:
        raise input_error(origin, expected=f'"version": "{version}"', received=repr(found),
                          fix="make the file's version match its file name")
    return vocabulary


@cache
def _load_cached(version: str) -> RegionVocabulary:
    return load_versioned("chest_regions", version, "load_regions", RegionVocabulary.from_mapping)


def _tokens(phrase: str, caller: str) -> list[str]:
    if not isinstance(phrase, str):
        raise input_error(caller, expected="a phrase (str)", received=type(phrase).__name__,
                          fix="pass text such as 'right apical pneumothorax'")
    return normalize_phrase(phrase).split()


# ------------------------------------------------------------------------------------------------ public API


def resolve_region(phrase: str) -> str | None:
    """Return the region key that ``phrase`` names exactly, by key or synonym ("the heart" -> "cardiac
    silhouette", "Right apex" -> "right apical zone"), or ``None``."""
    _tokens(phrase, "resolve_region")
    return load_regions().resolve(phrase)


def location_regions(phrase: str) -> list[str]:
    """Return every region key the location words of free ``phrase`` point to ("nodule in the left upper
    lobe(S5)" -> ["left upper lung zone", "left mid lung zone"]); ``[]`` when it has none ("cardiomegaly")."""
    return load_regions().locate(_tokens(phrase, "location_regions"))


def laterality(phrase: str) -> Laterality | None:
    """Return the side ``phrase`` states: "left", "right", "bilateral" ("bibasilar", "both lungs",
    "right and left") or ``None``. English and Latin side words count (see :func:`prompts.anatomy.side_of`)."""
    return load_regions().laterality(_tokens(phrase, "laterality"))


def region_side(key: str) -> Side | None:
    """Return the patient side of region ``key`` ("left"/"right"), or ``None`` for a midline region."""
    return load_regions().get(key).side
