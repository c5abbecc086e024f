"""Chest X-ray findings vocabulary: canonical finding names, synonyms and where each finding is looked for.

Versioned package data (``prompts/data/findings_v<version>.json``, read with :mod:`importlib.resources`). Each
finding has synonyms (inflections, abbreviations, common report wordings: "effusions", "PTX", "enlarged heart"),
``default_regions`` (chest region keys of :mod:`prompts.regions` to ground when a phrase names no location) and
``whole_structure`` (the finding is a property of a whole structure, e.g. cardiomegaly of the cardiac silhouette).
Every NIH ChestX-ray14 box label resolves to a finding.

Provenance: names and synonyms after the Fleischner Society glossary and the NIH ChestX-ray14 label set; default
regions after Chest ImaGenome finding-region relations and Felson's Principles of Chest Roentgenology. Full
citations are in the data file's ``"sources"``. Written for this project; nothing is quoted.

>>> resolve_finding("Small left pleural effusions.")
'pleural effusion'
>>> expected_regions("cardiomegaly")
['cardiac silhouette']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Any

from medvlm.errors import input_error
from prompts.anatomy import normalize_phrase
from prompts.regions import REGION_KEYS, load_versioned, match_spans, parse_sources, string_list

__all__ = ["Finding", "FindingVocabulary", "expected_regions", "load_findings", "resolve_finding"]


@dataclass(frozen=True)
class Finding:
    """One finding: canonical ``name``, ``synonyms``, ``default_regions`` (region keys), ``whole_structure`` and
    ``sources`` (ids of :attr:`FindingVocabulary.sources`)."""

    name: str
    synonyms: tuple[str, ...]
    default_regions: tuple[str, ...]
    whole_structure: bool = False
    sources: tuple[str, ...] = ()

    @property
    def phrases(self) -> tuple[str, ...]:
        """The name followed by the synonyms."""
        return (self.name, *self.synonyms)


class FindingVocabulary:
    """A loaded findings vocabulary: name -> :class:`Finding`, with a phrase index. Build it with
    :func:`load_findings` or :meth:`from_mapping`; bad data raises :class:`~medvlm.errors.InputError`."""

    def __init__(self, version: str, findings: Mapping[str, Finding], sources: Mapping[str, str],
                 notes: str = "") -> None:
        self.version = version
        self.notes = notes
        self.findings: Mapping[str, Finding] = MappingProxyType(dict(findings))
        self.sources: Mapping[str, str] = MappingProxyType(dict(sources))
        index: dict[str, str] = {}
        for finding in findings.values():
            for phrase in finding.phrases:
                key = normalize_phrase(phrase)
                if not key or index.setdefault(key, finding.name) != finding.name:
                    raise input_error(f"findings vocabulary v{version}",
                                      expected="each name or synonym (normalized) used by one finding only",
                                      received=f"{phrase!r} of {finding.name!r}", fix="remove the shared synonym")
        self._index: Mapping[str, str] = MappingProxyType(index)
        self._max_len = max(len(key.split()) for key in index)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], origin: str = "<mapping>") -> FindingVocabulary:
        """Return the vocabulary described by a parsed ``findings_v*.json`` object (``origin`` names it in errors)."""
        what = f"findings vocabulary {origin}"
        if not (isinstance(data, Mapping) and isinstance(data.get("version"), str)
                and isinstance(data.get("findings"), Mapping) and data["findings"]):
            raise input_error(what, expected='an object with "version" (str) and a non-empty "findings" object',
                              received=repr(data)[:120], fix="follow the layout of prompts/data/findings_v1.json")
        sources = parse_sources(data.get("sources"), what)
        findings = {}
        for name, raw in data["findings"].items():
            where = f"{what} finding {name!r}"
            if not isinstance(raw, Mapping) or not isinstance(raw.get("whole_structure", False), bool):
                raise input_error(where, expected='an object with "whole_structure" true/false',
                                  received=repr(raw)[:120], fix="follow the layout of prompts/data/findings_v1.json")
            regions = string_list(raw.get("default_regions"), f"{where} default_regions")
            used = string_list(raw.get("sources"), f"{where} sources")
            if not set(regions) <= set(REGION_KEYS) or not set(used) <= set(sources):
                raise input_error(where, expected=f"default_regions among {REGION_KEYS} and sources among "
                                  f"{sorted(sources)}", received=f"{regions}, {used}",
                                  fix="use canonical region keys and declared source ids")
            findings[str(name)] = Finding(str(name), string_list(raw.get("synonyms"), f"{where} synonyms"), regions,
                                          raw.get("whole_structure", False), used)
        notes = data.get("notes", "")
        return cls(data["version"], findings, sources, notes if isinstance(notes, str) else "")

    def get(self, name: str) -> Finding:
        """Return finding ``name``; an unknown name raises :class:`~medvlm.errors.InputError` listing the names."""
        if isinstance(name, str) and name in self.findings:
            return self.findings[name]
        guess = self.resolve(name) if isinstance(name, str) else None
        raise input_error(f"findings vocabulary v{self.version}",
                          expected=f"a finding name, one of: {', '.join(self.findings)}", received=repr(name),
                          fix=f"use the name {guess!r}" if guess else "map a free phrase with resolve_finding()")

    def spans(self, tokens: Sequence[str]) -> list[tuple[int, int, str]]:
        """Return ``(start, end, finding)`` for each finding mention in normalized ``tokens`` (left to right,
        longest at each position, no overlaps)."""
        return match_spans(tokens, self._index, self._max_len)

    def resolve(self, phrase: str) -> str | None:
        """Return the finding mentioned anywhere in ``phrase``: the longest matching phrase wins, then the first."""
        tokens = normalize_phrase(phrase).split()
        for size in range(min(self._max_len, len(tokens)), 0, -1):
            for i in range(len(tokens) - size + 1):
                name = self._index.get(" ".join(tokens[i:i + size]))
                if name is not None:
                    return name
        return None

    def __repr__(self) -> str:
        return f"FindingVocabulary(version={self.version!r}, findings={len(self.findings)})"


def load_findings(version: str = "1") -> FindingVocabulary:
    """Return the packaged findings vocabulary of ``version`` (read once, then cached)."""
    return _load_cached(version)


@cache
def _load_cached(version: str) -> FindingVocabulary:
    return load_versioned("findings", version, "load_findings", FindingVocabulary.from_mapping)


def resolve_finding(phrase: str) -> str | None:
    """Return the canonical finding mentioned anywhere in ``phrase`` ("small left effusions" -> "pleural
    effusion", "PTX" -> "pneumothorax"), longest match first; ``None`` when it mentions none."""
    if not isinstance(phrase, str):
        raise input_error("resolve_finding", expected="a phrase (str)", received=type(phrase).__name__,
                          fix="pass text such as 'left pleural effusion'")
    return load_findings().resolve(phrase)


def expected_regions(finding: str) -> list[str]:
    """Return the default region keys of canonical ``finding`` (where it is looked for when no location is given)."""
    return list(load_findings().get(finding).default_regions)
