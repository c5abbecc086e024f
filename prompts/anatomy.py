"""Anatomy text vocabulary: names, synonyms and descriptions of the structures annotated in ``../shared/data``.

The vocabulary is versioned package data (``prompts/data/anatomy_v<version>.json``, read with
:mod:`importlib.resources` so that it works from an installed wheel); :func:`load_vocabulary` reads version
:data:`DEFAULT_VERSION` ("2") unless told otherwise, and every function here uses that default when no
``vocabulary`` is passed. Keys are the canonical structure names of :mod:`medvlm.datasets`
(``STRUCTURE_VOCABULARY``), so a mask name from a reader is a key here. It holds every structure whose mask occurs
in the readers' samples, plus ``"lung"`` (unsided lung masks), ``"lesion"`` (CT lesion masks) and
``"lung nodule"``.

Version 2 keeps every entry of version 1 (which still loads, unchanged: 62 structures) and adds:

- the structures of the CT/MR/ultrasound/dermoscopy/endoscopy readers (:mod:`medvlm.datasets.modalities`):
  ``"kidney"`` (both kidneys in one mask, CURVAS), ``"anterior hippocampus"`` / ``"posterior hippocampus"`` (MSD
  Task04 crops), the BraTS regions ``"whole tumor"``, ``"tumor core"``, ``"enhancing tumor"`` and ``"brain"``,
  ``"fetal head"`` (HC18 ultrasound), ``"skin lesion"`` (HAM10000 dermoscopy) and ``"polyp"`` (Kvasir-SEG
  colonoscopy);
- WHOLES that name a pair or a whole, with their :attr:`StructureText.parts`: ``"lung"`` (left + right lung),
  ``"kidney"`` (left + right kidney), ``"hippocampus"`` (anterior + posterior hippocampus) and ``"clavicles"``
  (left + right clavicle); see :func:`parts_of` and :func:`wholes_of`. "both kidneys", "lungs", "both lungs",
  "hippocampi" and "both clavicles" name the wholes; the singular "clavicle" names none (its side is unknown);
- view sentences for the new kinds of image (:data:`VIEW_KEYS`) and the sources of the new data sets.

Each structure has three description levels, as in the Med-VLM paper's text-prompt ablation:

- ``"none"``: the empty string;
- ``"simple"``: the name (or one of its synonyms);
- ``"complex"``: an authoritative 1-3 sentence description of its position and its relations to its
  neighbours, followed, when the image modality is known, by a sentence on where and how it appears in that kind
  of image (``views[key]``, :func:`view_key`): ``"xray"`` for radiographs, ``"ct_mr_axial"`` for axial CT/MR,
  ``"mr_brain"`` for axial brain MR (FLAIR/T1c), ``"mr_cardiac"`` for short-axis cine cardiac MR,
  ``"ultrasound"``, ``"dermoscopy"`` and ``"endoscopy"``. Brain and cardiac MR share the modality "MR": a SITE hint
  (index.csv's ``site`` such as "brain (glioma)" or "heart", a sequence such as "FLAIR" or "short-axis cine")
  picks the MR view, and without one MR keeps the axial sentence of version 1.

Left and right are always the PATIENT's. Radiographs and axial CT/MR are in standard radiological display: the
patient's right is on the IMAGE left, and axial slices have anterior at the top. Short-axis cardiac MR, ultrasound,
dermoscopy and endoscopy images have no such convention; their sentences place a structure by anatomy (the
cardiac ones by the usual short-axis display, right ventricle toward the image left). Synonyms of a sided
structure always keep its side (English left/right or Latin sinister/dexter forms); synonyms of an unsided one
(wholes included) have no side word.

Provenance: the descriptions, view sentences and synonym lists were written for this project. Names follow
Terminologia Anatomica, 2nd ed. (FIPAT, 2019); positions and relations are paraphrased after Gray's Anatomy (42nd
ed.); radiograph appearance after Felson's Principles of Chest Roentgenology; axial appearance after Moeller and
Reif's Pocket Atlas of Sectional Anatomy; what each mask covers after the TotalSegmentator, SCR, JSRT and
DeepLesion papers; nodule and lesion terms after the Fleischner Society glossary and RECIST 1.1. Version 2 adds:
what the new masks cover and how they look after the data sets' papers (CURVAS challenge, MICCAI 2024; Medical
Segmentation Decathlon, Antonelli et al., Nat Commun 2022, and Simpson et al., arXiv:1902.09063; BraTS, Menze et
al., IEEE TMI 2015; ACDC, Bernard et al., IEEE TMI 2018; HC18, van den Heuvel et al., PLoS ONE 2018; HAM10000,
Tschandl et al., Sci Data 2018; Kvasir-SEG, Jha et al., MMM 2020), the short-axis plane after the AHA statement on
myocardial segmentation (Cerqueira et al., Circulation 2002), the head-circumference plane after the ISUOG
mid-trimester guideline (Salomon et al., 2011) and the hippocampal head/body/tail after Duvernoy's The Human
Hippocampus (4th ed.). Full citations are in the data file's ``"sources"`` and in :attr:`Vocabulary.sources`; each
structure names the ones it used. No passage is quoted and no ontology identifiers (RadLex, FMA) are given.

>>> describe("heart", "simple")
'heart'
>>> resolve_structure("the Cardiac Silhouette")
'heart'
>>> resolve_structure("both kidneys"), parts_of("kidney")
('kidney', ('left kidney', 'right kidney'))
>>> view_key("MR", site="heart")
'mr_cardiac'
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
    "DEFAULT_VERSION",
    "LEVELS",
    "MODALITY_VIEWS",
    "MR_SITE_VIEWS",
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
    "parts_of",
    "resolve_structure",
    "sample_text",
    "side_of",
    "view_key",
    "wholes_of",
]

DescriptionLevel = Literal["none", "simple", "complex"]
"""Text-prompt levels of the Med-VLM ablation: empty, name only, name + anatomical description."""

LEVELS: tuple[DescriptionLevel, ...] = ("none", "simple", "complex")
"""All description levels, in increasing amount of text."""

DEFAULT_VERSION = "2"
"""The vocabulary version :func:`load_vocabulary` reads by default (and every function without ``vocabulary``)."""

VIEW_KEYS: tuple[str, ...] = ("xray", "ct_mr_axial", "mr_brain", "mr_cardiac", "ultrasound", "dermoscopy",
                              "endoscopy")
"""Keys of :attr:`StructureText.views`: frontal radiograph; axial CT/MR slice (radiological convention); axial
brain MR, FLAIR or contrast-enhanced T1 (T1c) (radiological convention); short-axis cine cardiac MR (no
radiological left/right; the usual display has the right ventricle toward the image left); B-mode ultrasound;
dermoscopic photograph; endoscopy (colonoscopy) frame."""

REGIONS: tuple[str, ...] = ("chest", "abdomen", "pelvis", "head_neck", "musculoskeletal", "lesion", "fetal")
"""Allowed values of :attr:`StructureText.region` (a coarse grouping, not an anatomical claim). Focal
abnormalities are "lesion" wherever they lie (CT lesions, lung nodules, brain tumour regions, skin lesions,
polyps), the brain and the hippocampus "head_neck", and the fetal head "fetal" (a fetus in the mother's pelvis fits
no adult region)."""

MODALITY_VIEWS: Mapping[str, str] = MappingProxyType({
    "cr": "xray", "dx": "xray", "xray": "xray", "x-ray": "xray", "cxr": "xray",
    "ct": "ct_mr_axial", "mr": "ct_mr_axial", "mri": "ct_mr_axial", "ct_mr_axial": "ct_mr_axial",
    "us": "ultrasound", "ultrasound": "ultrasound", "ultrasonography": "ultrasound", "sonography": "ultrasound",
    "dms": "dermoscopy", "dermoscopy": "dermoscopy", "dermatoscopy": "dermoscopy",
    "es": "endoscopy", "endoscopy": "endoscopy", "colonoscopy": "endoscopy",
    "mr_brain": "mr_brain", "mr_cardiac": "mr_cardiac",
})
"""Modality string (DICOM code or common name, lower case) -> view key; other modalities get no view sentence.
The readers' codes: "CR"/"DX" (chest X-ray), "CT", "MR", "US" (HC18), "DMS" (HAM10000; index.csv says
"dermoscopy"), "ES" (Kvasir-SEG; index.csv says "endoscopy"). "MR" maps to "ct_mr_axial" unless a site hint picks
a view of :data:`MR_SITE_VIEWS` (see :func:`view_key`); view keys themselves are accepted too."""

MR_SITE_VIEWS: Mapping[str, str] = MappingProxyType({
    "brain": "mr_brain", "cerebral": "mr_brain", "cerebrum": "mr_brain", "intracranial": "mr_brain",
    "neuro": "mr_brain", "head": "mr_brain", "glioma": "mr_brain", "glioblastoma": "mr_brain",
    "hippocampus": "mr_brain", "hippocampal": "mr_brain", "flair": "mr_brain", "t1c": "mr_brain",
    "heart": "mr_cardiac", "cardiac": "mr_cardiac", "cardio": "mr_cardiac", "cardiovascular": "mr_cardiac",
    "cine": "mr_cardiac", "short axis": "mr_cardiac", "myocardium": "mr_cardiac", "myocardial": "mr_cardiac",
})
"""Site-hint word or phrase (matched as whole words of :func:`normalize_phrase` of the hint) -> view key for MR
images. Hints come from the readers' index.csv ``site`` ("brain (glioma)", "heart") or ``view_or_sequence``
("axial FLAIR", "short-axis cine") and ``sample.meta["sequence"]`` ("FLAIR", "T1c")."""

_VIEW_FALLBACK: Mapping[str, str] = MappingProxyType({"mr_brain": "ct_mr_axial"})
"""A structure without a sentence for the key uses this one: axial brain MR is axial MR in radiological display,
so the axial sentence holds; short-axis cardiac slices are not axial and have no fallback."""

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


def view_key(modality: str | None, site: str | None = None) -> str | None:
    """Return the :data:`VIEW_KEYS` entry for a modality string, or ``None`` for ``None`` and any other modality.

    Case-insensitive (:data:`MODALITY_VIEWS`): "CR", "DX", "xray", "cxr" -> "xray"; "CT", "MR", "MRI" ->
    "ct_mr_axial"; "US" -> "ultrasound"; "DMS", "dermoscopy" -> "dermoscopy"; "ES", "endoscopy" -> "endoscopy".

    ``site`` is an optional hint for MR images, whose modality alone does not tell brain from cardiac MR: the
    readers' index.csv ``site`` ("brain (glioma)", "heart"), ``view_or_sequence`` ("axial FLAIR", "short-axis
    cine") or ``sample.meta["sequence"]`` ("FLAIR", "T1c"). When its words (:data:`MR_SITE_VIEWS`) point to one
    MR view, that view is returned ("MR" + "heart" -> "mr_cardiac", "MR" + "brain (glioma)" -> "mr_brain");
    a hint that names neither (or both) or any other modality ignores it, so ``site=None`` gives the behaviour of
    version 1 ("MR" -> "ct_mr_axial").
    """
    if modality is None:
        return None
    if not isinstance(modality, str):
        raise input_error("view_key modality", expected="a modality string such as 'CT', 'MR' or 'US', or None",
                          received=type(modality).__name__, fix="pass image.modality")
    code = modality.strip().lower()
    key = MODALITY_VIEWS.get(code)
    if site is None or key != "ct_mr_axial" or code not in ("mr", "mri"):
        return key
    if not isinstance(site, str):
        raise input_error("view_key site", expected="a site hint string (e.g. 'brain', 'heart') or None",
                          received=type(site).__name__, fix="pass sample.meta.get('site') or None")
    words = f" {normalize_phrase(site)} "
    found = {view for hint, view in MR_SITE_VIEWS.items() if f" {hint} " in words}
    return found.pop() if len(found) == 1 else key


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
        parts: for a whole that names a pair or a whole (version 2: "lung", "kidney", "hippocampus",
            "clavicles"), the structures of the vocabulary that make it up, in file order; empty otherwise.
    """

    name: str
    synonyms: tuple[str, ...]
    complex: str
    views: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    sources: tuple[str, ...] = ()
    region: str = "chest"
    parts: tuple[str, ...] = ()

    @property
    def phrases(self) -> tuple[str, ...]:
        """The name followed by the synonyms."""
        return (self.name, *self.synonyms)

    @property
    def side(self) -> Literal["left", "right"] | None:
        """The patient side in the name ("left"/"right"), or ``None`` for an unsided structure."""
        return side_of(self.name)

    def view_sentence(self, modality: str | None, site: str | None = None) -> str:
        """Return the view sentence for ``modality`` and the optional ``site`` hint (see :func:`view_key`), or ""
        when there is none. A structure without an "mr_brain" sentence uses its "ct_mr_axial" one (brain MR
        slices are axial too)."""
        key = view_key(modality, site)
        if key is None:
            return ""
        sentence = self.views.get(key, "")
        fallback = _VIEW_FALLBACK.get(key)
        if not sentence and fallback is not None:
            sentence = self.views.get(fallback, "")
        return sentence


class Vocabulary:
    """A loaded anatomy vocabulary: canonical name -> :class:`StructureText`, with a phrase index.

    Build it with :func:`load_vocabulary` (package data) or :meth:`from_mapping` (a parsed JSON object); both
    check the data (types, regions, view keys, source ids, sides kept in synonyms, no phrase shared by two
    structures, parts that are other structures of the vocabulary) and raise :class:`~medvlm.errors.InputError`
    on a violation. Files of version 1 (no "parts") and version 2 are read alike.
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
        wholes: dict[str, list[str]] = {}
        for name, entry in self._structures.items():
            for part in entry.parts:
                if part == name or part not in self._structures:
                    raise input_error(f"anatomy vocabulary v{version} structure {name!r}",
                                      expected='"parts" that are other structures of the vocabulary',
                                      received=f"part {part!r}" + (" (the whole itself)" if part == name
                                                                   else " (no such structure)"),
                                      fix="list the canonical names of the structures that make up the whole")
                wholes.setdefault(part, []).append(name)
        self._wholes = MappingProxyType({part: tuple(sorted(names)) for part, names in wholes.items()})

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

    def parts(self, name: str) -> tuple[str, ...]:
        """Return the parts of structure ``name`` (empty for a structure without parts)."""
        return self.get(name).parts

    def wholes(self, name: str) -> tuple[str, ...]:
        """Return the wholes that list structure ``name`` among their parts, sorted; empty when none does, also
        for a name outside the vocabulary (a reader's mask name without an entry is part of nothing here)."""
        if not isinstance(name, str):
            raise input_error("anatomy wholes", expected="a structure name (str)", received=type(name).__name__,
                              fix="pass a canonical structure name such as 'left lung'")
        return self._wholes.get(name, ())

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
    parts = raw.get("parts", [])
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
    if not (isinstance(parts, list) and all(isinstance(p, str) and p.strip() for p in parts)
            and len(set(parts)) == len(parts)):
        raise input_error(where, expected='"parts": a list of distinct structure names (absent for no parts)',
                          received=repr(parts)[:120], fix="name each part once, by its canonical name")
    side = side_of(name)
    for synonym in synonyms:
        if normalize_phrase(synonym) == normalize_phrase(name):
            raise input_error(where, expected="synonyms that differ from the name", received=repr(synonym),
                              fix="remove the repeated name from the synonyms")
        if side_of(synonym) != side:
            raise input_error(where, expected=f"synonyms that state the side of the name ({side or 'none'})",
                              received=repr(synonym), fix="keep the side word in every synonym of a sided structure")
    return StructureText(name=name, synonyms=tuple(synonyms), complex=complex_text.strip(),
                         views=MappingProxyType(dict(views)), sources=tuple(entry_sources), region=cast(str, region),
                         parts=tuple(parts))


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


def load_vocabulary(version: str = DEFAULT_VERSION) -> Vocabulary:
    """Return the packaged vocabulary of ``version`` (default :data:`DEFAULT_VERSION`, "2"; "1" is still shipped
    unchanged), read once, then cached: the same object every call. An unknown version raises
    :class:`~medvlm.errors.InputError` listing the shipped ones."""
    return _load_cached(version)


@cache
def _load_cached(version: str) -> Vocabulary:
    if not isinstance(version, str) or not _FILE_RE.fullmatch(f"anatomy_v{version}.json"):
        raise input_error("load_vocabulary", expected=f"a version string among {available_versions()}",
                          received=repr(version), fix=f"pass e.g. version={DEFAULT_VERSION!r}")
    resource = resources.files(_DATA_PACKAGE) / _DATA_DIR / f"anatomy_v{version}.json"
    if not resource.is_file():
        raise input_error("load_vocabulary", expected=f"a shipped version, one of {available_versions()}",
                          received=repr(version),
                          fix=f"pass one of the versions listed (the default is {DEFAULT_VERSION!r})")
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
             vocabulary: Vocabulary | None = None, site: str | None = None) -> str:
    """Return the text prompt of structure ``name`` at ``level``.

    - ``"none"``: ``""``;
    - ``"simple"``: ``synonym`` if given, else the name;
    - ``"complex"``: the structure's description followed by the view sentence of ``modality`` (and of the
      optional ``site`` hint that tells brain from cardiac MR, e.g. ``sample.meta.get("site")``) when it has one
      (see :func:`view_key`; ``None`` or another modality adds nothing); when ``synonym`` is given (and is not
      the name) the text starts with ``"<synonym>: "``.

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
    view = entry.view_sentence(modality, site)
    if view:
        text = f"{text} {view}"
    if synonym is not None and normalize_phrase(synonym) != normalize_phrase(name):
        text = f"{synonym}: {text}"
    return text


def sample_text(name: str, rng: random.Random, *, levels: Sequence[DescriptionLevel] = LEVELS,
                weights: Sequence[float] | None = None, modality: str | None = None,
                vocabulary: Vocabulary | None = None, site: str | None = None) -> tuple[str, DescriptionLevel]:
    """Return ``(text, level)`` for training augmentation: a level drawn from ``levels`` (uniformly, or by
    ``weights``), then for "simple"/"complex" a phrase drawn uniformly from the name and its synonyms, rendered
    by :func:`describe` (with ``modality`` and the optional ``site`` hint). Uses only ``rng``, so a seeded
    ``random.Random`` gives the same draws every time."""
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
    return describe(entry.name, level, modality=modality, synonym=synonym, vocabulary=vocabulary, site=site), level


def resolve_structure(phrase: str, vocabulary: Vocabulary | None = None) -> str | None:
    """Return the canonical structure name that ``phrase`` names ("cardiac silhouette" -> "heart", "the Left
    Clavicle" -> "left clavicle"), matching names and synonyms case-insensitively after dropping articles and
    punctuation (:func:`normalize_phrase`); ``None`` when nothing matches. Matching is exact, so a side never
    changes ("left femur" is ``None`` when only "right femur" exists)."""
    if not isinstance(phrase, str):
        raise input_error("resolve_structure", expected="a phrase (str)", received=type(phrase).__name__,
                          fix="pass text such as 'left lung'")
    return _vocab(vocabulary).resolve(phrase)


def parts_of(name: str, vocabulary: Vocabulary | None = None) -> tuple[str, ...]:
    """Return the canonical names of the structures that make up the whole ``name`` ("kidney" ->
    ``("left kidney", "right kidney")``, "hippocampus" -> ``("anterior hippocampus", "posterior hippocampus")``),
    or ``()`` for a structure without parts. An unknown name raises :class:`~medvlm.errors.InputError`."""
    return _vocab(vocabulary).parts(name)


def wholes_of(name: str, vocabulary: Vocabulary | None = None) -> tuple[str, ...]:
    """Return the canonical names of the wholes that structure ``name`` is a part of, sorted ("left lung" ->
    ``("lung",)``, "posterior hippocampus" -> ``("hippocampus",)``), or ``()`` when it belongs to none. Unlike
    :func:`parts_of`, a name outside the vocabulary gives ``()`` (so that any reader's mask names can be passed);
    only a non-string raises :class:`~medvlm.errors.InputError`."""
    return _vocab(vocabulary).wholes(name)
