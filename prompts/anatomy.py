"""Anatomy text vocabulary: names, synonyms and descriptions of the structures annotated in ``../shared/data``.

The vocabulary is versioned package data (``prompts/data/anatomy_v<version>.json``, read with
:mod:`importlib.resources` so that it works from an installed wheel). Keys are the canonical structure names of
:mod:`medvlm.datasets` (``STRUCTURE_VOCABULARY``), so a mask name from a reader is a key here. It holds every
structure whose mask occurs in the readers' samples, plus ``"lung"`` (unsided lung masks), ``"lesion"`` (CT lesion
masks) and ``"lung nodule"``.

Each structure has three description levels, as in the Med-VLM paper's text-prompt ablation:

- ``"none"``: the empty string;
- ``"simple"``: the name (or one of its synonyms);
- ``"complex"``: an authoritative 1-3 sentence description of its position and its relations to its
  neighbours, followed, when the image modality is known, by a sentence on where it appears in that kind of
  image (``views["xray"]`` for radiographs, ``views["ct_mr_axial"]`` for axial CT/MR).

Left and right are always the PATIENT's. Images are in standard radiological display: on frontal radiographs and
on axial CT/MR the patient's right is on the IMAGE left, and axial slices have anterior at the top. Synonyms of a
sided structure always keep its side (English left/right or Latin sinister/dexter forms).

Provenance: the descriptions, view sentences and synonym lists were written for this project. Names follow
Terminologia Anatomica, 2nd ed. (FIPAT, 2019); positions and relations are paraphrased after Gray's Anatomy (42nd
ed.); radiograph appearance after Felson's Principles of Chest Roentgenology; axial appearance after Moeller and
Reif's Pocket Atlas of Sectional Anatomy; what each mask covers after the TotalSegmentator, SCR, JSRT and
DeepLesion papers; nodule and lesion terms after the Fleischner Society glossary and RECIST 1.1. Full citations
are in the data file's ``"sources"`` and in :attr:`Vocabulary.sources`; each structure names the ones it used.
No passage is quoted and no ontology identifiers (RadLex, FMA) are given.

>>> describe("heart", "simple")
'heart'
>>> resolve_structure("the Cardiac Silhouette")
'heart'
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any, Literal, cast

from medvlm.errors import input_error

__all__ = [
    "LEVELS",
    "MODALITY_VIEWS",
    "REGIONS",
    "SIDE_WORDS",
    "VIEW_KEYS",
    "DescriptionLevel",
    "StructureText",
    "Vocabulary",
    "all_phrases",
    "available_versions",
    "describe",
    "load_vocabulary",
    "normalize_phrase",
    "resolve_structure",
    "sample_text",
    "side_of",
    "view_key",
]

DescriptionLevel = Literal["none", "simple", "complex"]
"""Text-prompt levels of the Med-VLM ablation: empty, name only, name + anatomical description."""

LEVELS: tuple[DescriptionLevel, ...] = ("none", "simple", "complex")
"""All description levels, in increasing amount of text."""

VIEW_KEYS: tuple[str, ...] = ("xray", "ct_mr_axial")
"""Keys of :attr:`StructureText.views`: frontal radiograph, axial CT/MR slice (radiological convention)."""

REGIONS: tuple[str, ...] = ("chest", "abdomen", "pelvis", "head_neck", "musculoskeletal", "lesion")
"""Allowed values of :attr:`StructureText.region` (a coarse grouping, not an anatomical claim)."""

MODALITY_VIEWS: Mapping[str, str] = MappingProxyType({
    "cr": "xray", "dx": "xray", "xray": "xray", "x-ray": "xray", "cxr": "xray",
    "ct": "ct_mr_axial", "mr": "ct_mr_axial", "mri": "ct_mr_axial",
})
"""Modality string (DICOM code or common name, lower case) -> view key; other modalities get no view sentence."""

SIDE_WORDS: Mapping[str, frozenset[str]] = MappingProxyType({
    "left": frozenset({"left", "sinister", "sinistra", "sinistrum", "sinistri", "sinistrae"}),
    "right": frozenset({"right", "dexter", "dextra", "dextrum", "dextri", "dextrae"}),
})
"""Words (English and the Latin forms used by Terminologia Anatomica) that state the patient's side."""

_DATA_PACKAGE = "prompts"
_DATA_DIR = "data"
_FILE_RE = re.compile(r"anatomy_v([0-9A-Za-z_.-]+)\.json")
_LEADING_FILLERS = frozenset({"the", "a", "an", "patient", "patients"})


# ------------------------------------------------------------------------------------------------ text helpers


def normalize_phrase(text: str) -> str:
    """Return ``text`` reduced to its matching key: lower case, possessive ``'s`` dropped, every character other
    than a letter or digit replaced by a space, whitespace collapsed, and leading articles (and a leading
    "patient's") removed. ``"The patient's Left-Lung."`` -> ``"left lung"``."""
    lowered = text.lower().replace("\u2019", "'")
    lowered = re.sub(r"'s\b", "", lowered)
    tokens = re.sub(r"[^0-9a-z]+", " ", lowered).split()
    while tokens and tokens[0] in _LEADING_FILLERS:
        tokens.pop(0)
    return " ".join(tokens)


def side_of(text: str) -> Literal["left", "right"] | None:
    """Return the patient side stated in ``text`` ("left" or "right", English or Latin words of
    :data:`SIDE_WORDS`), or ``None`` when it states no side or both sides."""
    tokens = set(normalize_phrase(text).split())
    left = bool(tokens & SIDE_WORDS["left"])
    right = bool(tokens & SIDE_WORDS["right"])
    if left == right:
        return None
    return "left" if left else "right"


def view_key(modality: str | None) -> str | None:
    """Return the :data:`VIEW_KEYS` entry for a modality string (case-insensitive: "CR", "DX", "xray", "cxr" ->
    "xray"; "CT", "MR", "MRI" -> "ct_mr_axial"), or ``None`` for ``None`` and any other modality."""
    if modality is None:
        return None
    return MODALITY_VIEWS.get(modality.strip().lower())


# ------------------------------------------------------------------------------------------------ data classes


@dataclass(frozen=True)
class StructureText:
    """The text of one structure.

    Attributes:
        name: canonical structure name (a :data:`medvlm.datasets.STRUCTURE_VOCABULARY` name or "lung nodule").
        synonyms: accepted alternate names (never the name itself), in file order.
        complex: 1-3 sentences on its position and its relations to neighbours (patient's left/right).
        views: view key (:data:`VIEW_KEYS`) -> sentence on where it appears in that kind of image; may be empty.
        sources: ids of the entries of :attr:`Vocabulary.sources` this text follows.
        region: coarse body region, one of :data:`REGIONS`.
    """

    name: str
    synonyms: tuple[str, ...]
    complex: str
    views: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    sources: tuple[str, ...] = ()
    region: str = "chest"

    @property
    def phrases(self) -> tuple[str, ...]:
        """The name followed by the synonyms."""
        return (self.name, *self.synonyms)

    @property
    def side(self) -> Literal["left", "right"] | None:
        """The patient side in the name ("left"/"right"), or ``None`` for an unsided structure."""
        return side_of(self.name)

    def view_sentence(self, modality: str | None) -> str:
        """Return the view sentence for ``modality`` (see :func:`view_key`), or "" when there is none."""
        key = view_key(modality)
        return self.views.get(key, "") if key is not None else ""


class Vocabulary:
    """A loaded anatomy vocabulary: canonical name -> :class:`StructureText`, with a phrase index.

    Build it with :func:`load_vocabulary` (package data) or :meth:`from_mapping` (a parsed JSON object); both
    check the data (types, regions, view keys, source ids, sides kept in synonyms, no phrase shared by two
    structures) and raise :class:`~medvlm.errors.InputError` on a violation.
    """

    def __init__(self, version: str, structures: Mapping[str, StructureText], sources: Mapping[str, str],
                 notes: str = "") -> None:
        self.version = version
        self.notes = notes
        self._structures = MappingProxyType(dict(sorted(structures.items())))
        self._sources = MappingProxyType(dict(sources))
        self._index: dict[str, str] = {}
        for name, entry in self._structures.items():
            if entry.name != name:
                raise input_error(f"anatomy vocabulary v{version}", expected="entries keyed by their own name",
                                  received=f"key {name!r} holding {entry.name!r}", fix="key each entry by its name")
            for phrase in entry.phrases:
                key = normalize_phrase(phrase)
                owner = self._index.setdefault(key, name)
                if not key or owner != name:
                    raise input_error(f"anatomy vocabulary v{version}",
                                      expected="each name or synonym (normalized) used by one structure only",
                                      received=f"{phrase!r} of {name!r} also matches {owner!r}" if key
                                      else f"an empty phrase in {name!r}",
                                      fix="remove or reword the shared synonym in the data file")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], origin: str = "<mapping>") -> Vocabulary:
        """Return the vocabulary described by a parsed ``anatomy_v*.json`` object (``origin`` names it in
        errors)."""
        what = f"anatomy vocabulary {origin}"
        if not isinstance(data, Mapping):
            raise input_error(what, expected="a JSON object", received=type(data).__name__,
                              fix="pass the parsed content of an anatomy_v*.json file")
        version = data.get("version")
        raw_structures = data.get("structures")
        raw_sources = data.get("sources", [])
        if not isinstance(version, str) or not isinstance(raw_structures, Mapping) or not raw_structures:
            raise input_error(what, expected='"version" (a string) and a non-empty "structures" object',
                              received=f"version={version!r}, structures of type {type(raw_structures).__name__}",
                              fix="follow the layout of prompts/data/anatomy_v1.json")
        sources: dict[str, str] = {}
        for item in raw_sources if isinstance(raw_sources, list) else [raw_sources]:
            if not (isinstance(item, Mapping) and isinstance(item.get("id"), str)
                    and isinstance(item.get("citation"), str)):
                raise input_error(f"{what} sources", expected='a list of {"id": str, "citation": str, ...}',
                                  received=repr(item)[:120], fix="give every source an id and a citation")
            sources[item["id"]] = item["citation"]
        structures = {str(name): _parse_entry(str(name), raw, sources, what) for name, raw in raw_structures.items()}
        notes = data.get("notes", "")
        return cls(version, structures, sources, notes if isinstance(notes, str) else "")

    @property
    def names(self) -> tuple[str, ...]:
        """All canonical structure names, sorted."""
        return tuple(self._structures)

    @property
    def sources(self) -> Mapping[str, str]:
        """Source id -> full citation."""
        return self._sources

    def get(self, name: str) -> StructureText:
        """Return the entry of canonical structure ``name``; an unknown name raises
        :class:`~medvlm.errors.InputError` listing the known names (and the match of :meth:`resolve`, if any)."""
        if isinstance(name, str) and name in self._structures:
            return self._structures[name]
        guess = self.resolve(name) if isinstance(name, str) else None
        fix = (f"use the canonical name {guess!r} (resolve_structure() maps phrases and synonyms to it)" if guess
               else "use one of the names listed, or map a free phrase with resolve_structure()")
        raise input_error(f"anatomy vocabulary v{self.version}",
                          expected=f"a canonical structure name, one of: {', '.join(self.names)}",
                          received=repr(name), fix=fix)

    def resolve(self, phrase: str) -> str | None:
        """Return the canonical name whose name or synonym equals ``phrase`` after :func:`normalize_phrase`, or
        ``None`` when none does."""
        return self._index.get(normalize_phrase(phrase))

    def citations(self, name: str) -> tuple[str, ...]:
        """Return the full citations of the sources of structure ``name``."""
        return tuple(self._sources[s] for s in self.get(name).sources)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._structures

    def __iter__(self) -> Iterator[str]:
        return iter(self._structures)

    def __len__(self) -> int:
        return len(self._structures)

    def __repr__(self) -> str:
        return f"Vocabulary(version={self.version!r}, structures={len(self)})"


def _parse_entry(name: str, raw: Any, sources: Mapping[str, str], what: str) -> StructureText:
    where = f"{what} structure {name!r}"
    fix = "follow the layout of prompts/data/anatomy_v1.json"
    if not isinstance(raw, Mapping):
        raise input_error(where, expected="an object", received=type(raw).__name__, fix=fix)
    synonyms = raw.get("synonyms")
    complex_text = raw.get("complex")
    views = raw.get("views", {})
    entry_sources = raw.get("sources", [])
    region = raw.get("region")
    if not (isinstance(synonyms, list) and all(isinstance(s, str) and s.strip() for s in synonyms)):
        raise input_error(where, expected='"synonyms": a list of non-empty strings', received=repr(synonyms)[:120],
                          fix=fix)
    if not isinstance(complex_text, str) or not complex_text.strip():
        raise input_error(where, expected='"complex": a non-empty string', received=repr(complex_text)[:120], fix=fix)
    if not (isinstance(views, Mapping) and all(k in VIEW_KEYS and isinstance(v, str) and v.strip()
                                               for k, v in views.items())):
        raise input_error(where, expected=f'"views": an object with keys among {VIEW_KEYS} and text values',
                          received=repr(views)[:120], fix=fix)
    if not (isinstance(entry_sources, list) and all(isinstance(s, str) and s in sources for s in entry_sources)):
        raise input_error(where, expected=f'"sources": a list of source ids among {sorted(sources)}',
                          received=repr(entry_sources), fix="add the source to the top-level \"sources\" list")
    if region not in REGIONS:
        raise input_error(where, expected=f'"region" among {REGIONS}', received=repr(region), fix=fix)
    side = side_of(name)
    for synonym in synonyms:
        if normalize_phrase(synonym) == normalize_phrase(name):
            raise input_error(where, expected="synonyms that differ from the name", received=repr(synonym),
                              fix="remove the repeated name from the synonyms")
        if side_of(synonym) != side:
            raise input_error(where, expected=f"synonyms that state the side of the name ({side or 'none'})",
                              received=repr(synonym), fix="keep the side word in every synonym of a sided structure")
    return StructureText(name=name, synonyms=tuple(synonyms), complex=complex_text.strip(),
                         views=MappingProxyType(dict(views)), sources=tuple(entry_sources), region=cast(str, region))


# ------------------------------------------------------------------------------------------------ loading


def available_versions() -> tuple[str, ...]:
    """Return the vocabulary versions shipped as package data (``prompts/data/anatomy_v<version>.json``),
    sorted."""
    folder = resources.files(_DATA_PACKAGE) / _DATA_DIR
    found = []
    for item in folder.iterdir():
        match = _FILE_RE.fullmatch(item.name)
        if match and item.is_file():
            found.append(match.group(1))
    return tuple(sorted(found))


def load_vocabulary(version: str = "1") -> Vocabulary:
    """Return the packaged vocabulary of ``version`` (read once, then cached: the same object every call); an
    unknown version raises :class:`~medvlm.errors.InputError` listing the shipped ones."""
    return _load_cached(version)


@cache
def _load_cached(version: str) -> Vocabulary:
    if not isinstance(version, str) or not _FILE_RE.fullmatch(f"anatomy_v{version}.json"):
        raise input_error("load_vocabulary", expected=f"a version string among {available_versions()}",
                          received=repr(version), fix="pass e.g. version='1'")
    resource = resources.files(_DATA_PACKAGE) / _DATA_DIR / f"anatomy_v{version}.json"
    if not resource.is_file():
        raise input_error("load_vocabulary", expected=f"a shipped version, one of {available_versions()}",
                          received=repr(version), fix="pass one of the versions listed (the default is '1')")
    origin = f"prompts/data/anatomy_v{version}.json"
    try:
        data = json.loads(resource.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise input_error(f"anatomy vocabulary {origin}", expected="valid JSON", received=str(exc),
                          fix="repair the data file (or reinstall the package)") from exc
    vocabulary = Vocabulary.from_mapping(data, origin)
    if vocabulary.version != version:
        raise input_error(f"anatomy vocabulary {origin}", expected=f'"version": "{version}"',
                          received=repr(vocabulary.version), fix="make the file's version match its file name")
    return vocabulary


def _vocab(vocabulary: Vocabulary | None) -> Vocabulary:
    return load_vocabulary() if vocabulary is None else vocabulary


def _check_level(level: object) -> DescriptionLevel:
    if level not in LEVELS:
        raise input_error("description level", expected=f"one of {LEVELS}", received=repr(level),
                          fix="pass 'none', 'simple' or 'complex'")
    return level


# ------------------------------------------------------------------------------------------------ public API


def all_phrases(name: str, vocabulary: Vocabulary | None = None) -> list[str]:
    """Return ``[name, *synonyms]`` of canonical structure ``name`` (a new list)."""
    return list(_vocab(vocabulary).get(name).phrases)


def describe(name: str, level: DescriptionLevel, *, modality: str | None = None, synonym: str | None = None,
             vocabulary: Vocabulary | None = None) -> str:
    """Return the text prompt of structure ``name`` at ``level``.

    - ``"none"``: ``""``;
    - ``"simple"``: ``synonym`` if given, else the name;
    - ``"complex"``: the structure's description followed by the view sentence of ``modality`` when it has one
      (see :func:`view_key`; ``None`` or another modality adds nothing); when ``synonym`` is given (and is not the
      name) the text starts with ``"<synonym>: "``.

    ``synonym`` must be one of the structure's phrases (compared after :func:`normalize_phrase`); it is returned
    as given. An unknown name, level or synonym raises :class:`~medvlm.errors.InputError`.
    """
    entry = _vocab(vocabulary).get(name)
    checked = _check_level(level)
    if synonym is not None:
        wanted = normalize_phrase(synonym) if isinstance(synonym, str) else None
        if wanted is None or wanted not in {normalize_phrase(p) for p in entry.phrases}:
            raise input_error(f"describe({name!r}) synonym", expected=f"one of {list(entry.phrases)}",
                              received=repr(synonym), fix="pick a phrase from all_phrases(name), or pass synonym=None")
    if checked == "none":
        return ""
    phrase = name if synonym is None else synonym
    if checked == "simple":
        return phrase
    text = entry.complex
    view = entry.view_sentence(modality)
    if view:
        text = f"{text} {view}"
    if synonym is not None and normalize_phrase(synonym) != normalize_phrase(name):
        text = f"{synonym}: {text}"
    return text


def sample_text(name: str, rng: random.Random, *, levels: Sequence[DescriptionLevel] = LEVELS,
                weights: Sequence[float] | None = None, modality: str | None = None,
                vocabulary: Vocabulary | None = None) -> tuple[str, DescriptionLevel]:
    """Return ``(text, level)`` for training augmentation: a level drawn from ``levels`` (uniformly, or by
    ``weights``), then for "simple"/"complex" a phrase drawn uniformly from the name and its synonyms, rendered
    by :func:`describe`. Uses only ``rng``, so a seeded ``random.Random`` gives the same draws every time."""
    entry = _vocab(vocabulary).get(name)
    if not isinstance(rng, random.Random):
        raise input_error("sample_text rng", expected="a random.Random instance", received=type(rng).__name__,
                          fix="pass random.Random(seed)")
    if isinstance(levels, str) or not levels:
        raise input_error("sample_text levels", expected=f"a non-empty sequence of levels among {LEVELS}",
                          received=repr(levels), fix="pass e.g. levels=('simple', 'complex')")
    checked = [_check_level(level) for level in levels]
    if weights is not None:
        values = list(weights)
        if (len(values) != len(checked) or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0
                                                   for w in values) or sum(values) <= 0):
            raise input_error("sample_text weights",
                              expected=f"{len(checked)} finite non-negative numbers with a positive sum",
                              received=repr(weights), fix="give one weight per level, e.g. weights=(1, 2, 2)")
        level = rng.choices(checked, weights=values)[0]
    else:
        level = rng.choices(checked)[0]
    if level == "none":
        return "", level
    phrase = rng.choice(entry.phrases)
    synonym = None if phrase == entry.name else phrase
    return describe(entry.name, level, modality=modality, synonym=synonym, vocabulary=vocabulary), level


def resolve_structure(phrase: str, vocabulary: Vocabulary | None = None) -> str | None:
    """Return the canonical structure name that ``phrase`` names ("cardiac silhouette" -> "heart", "the Left
    Clavicle" -> "left clavicle"), matching names and synonyms case-insensitively after dropping articles and
    punctuation (:func:`normalize_phrase`); ``None`` when nothing matches. Matching is exact, so a side never
    changes ("left femur" is ``None`` when only "right femur" exists)."""
    if not isinstance(phrase, str):
        raise input_error("resolve_structure", expected="a phrase (str)", received=type(phrase).__name__,
                          fix="pass text such as 'left lung'")
    return _vocab(vocabulary).resolve(phrase)
