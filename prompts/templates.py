"""Versioned prompt templates (system + user text) of the LLM grounding agent.

Templates are package data (``prompts/data/templates_v<version>.json``, read with :mod:`importlib.resources` so that
they work from an installed wheel), so that a result can name the exact prompt that produced it. v1 holds:

- ``"grounding"`` (fields ``phrase``, ``width``, ``height``): locate one phrase; the model must answer only with
  :data:`agents.parsing.GROUNDING_SCHEMA` JSON, boxes in pixels of the image it sees (``width`` x ``height``), and is
  told that the patient's right is on the image left on radiographs and axial CT/MR.
- ``"grounding_tokens"`` (field ``phrase``): the question a model fine-tuned by ``medvlm train mllm`` was trained
  on (no system message); it answers ``phrase: <box><locX0><locY0><locX1><locY1></box>`` (:mod:`medvlm.tokens`).
  :func:`finetune.tasks.anatomy_grounding` builds its examples from this template, so the two never drift apart.
- ``"segment_tokens"`` (field ``phrase``): the anatomy-token question; a fine-tuned model answers ``<poly>`` +
  location-token vertices + ``</poly>`` (:func:`medvlm.tokens.encode_mask`). :func:`finetune.tasks.anatomy_segmentation`
  builds its examples from it and :meth:`agents.mini.MiniGrounder.segment` asks it.
- ``"reference_pair"`` (fields ``name``, ``box``: the reference box as ``<box>`` location tokens): the RAU question
  of a fine-tuned model given a reference image then a target image; answered like ``grounding_tokens`` in the
  target's frame (:func:`finetune.tasks.reference_pair` builds its examples from it).
- ``"extract_target"`` (field ``question``): turn a user question into the phrase to ground; answer
  ``{"phrase": ...}``.

Fields are written ``{name}``; any other brace (the JSON examples) is literal text, so templates need no escaping.

>>> load_templates()["extract_target"].render(question="Is the heart enlarged?")[1]
{'role': 'user', 'content': 'Question: Is the heart enlarged?'}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from medvlm.errors import input_error

__all__ = ["REQUIRED_TEMPLATES", "Template", "available_versions", "load_templates"]

REQUIRED_TEMPLATES: tuple[str, ...] = ("grounding", "extract_target")
"""Template names every shipped version must define."""

_FIELD_RE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_FILE_RE = re.compile(r"templates_v([0-9A-Za-z_.-]+)\.json")


@dataclass(frozen=True)
class Template:
    """One prompt: ``system`` and ``user`` text with ``{field}`` placeholders."""

    name: str
    system: str
    user: str

    @property
    def fields(self) -> frozenset[str]:
        """Names of the ``{field}`` placeholders that :meth:`render` needs."""
        return frozenset(_FIELD_RE.findall(self.system) + _FIELD_RE.findall(self.user))

    def render(self, **fields: Any) -> list[dict[str, Any]]:
        """OpenAI chat messages ``[{"role": "system", ...}, {"role": "user", "content": str}]`` with every field
        filled (values through ``str``); a template with an empty ``system`` gives the user message only. The
        caller adds the image part to the user message. Missing or unknown fields raise
        :class:`~medvlm.errors.InputError`."""
        missing = self.fields - fields.keys()
        unknown = fields.keys() - self.fields
        if missing or unknown:
            raise input_error(f"template {self.name!r}", expected=f"fields {sorted(self.fields)}",
                              received=f"missing {sorted(missing)}, unknown {sorted(unknown)}",
                              fix=f"call render({', '.join(f'{f}=...' for f in sorted(self.fields))})")

        def fill(text: str) -> str:
            # one pass, so braces inside a value (a user's phrase) are never substituted again
            return _FIELD_RE.sub(lambda m: str(fields[m.group(1)]), text)

        user = {"role": "user", "content": fill(self.user)}
        return [{"role": "system", "content": fill(self.system)}, user] if self.system else [user]


def available_versions() -> tuple[str, ...]:
    """Template versions shipped as package data, sorted."""
    folder = resources.files("prompts") / "data"
    return tuple(sorted(m.group(1) for item in folder.iterdir() if (m := _FILE_RE.fullmatch(item.name))))


def load_templates(version: str = "1") -> dict[str, Template]:
    """Templates of ``version`` by name (a new dict each call; the file is read once). An unknown version or a
    malformed file raises :class:`~medvlm.errors.InputError`."""
    return dict(_load_cached(version))


@cache
def _load_cached(version: str) -> dict[str, Template]:
    if not isinstance(version, str) or not _FILE_RE.fullmatch(f"templates_v{version}.json"):
        raise input_error("load_templates", expected=f"a version string among {available_versions()}",
                          received=repr(version), fix="pass e.g. version='1'")
    resource = resources.files("prompts") / "data" / f"templates_v{version}.json"
    if not resource.is_file():
        raise input_error("load_templates", expected=f"a shipped version, one of {available_versions()}",
                          received=repr(version), fix="pass one of the versions listed (the default is '1')")
    origin = f"prompts/data/templates_v{version}.json"
    fix = "repair the data file (or reinstall the package)"
    try:
        data = json.loads(resource.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise input_error(origin, expected="valid JSON", received=str(exc), fix=fix) from exc
    if not isinstance(data, dict) or data.get("version") != version or not isinstance(data.get("templates"), dict):
        raise input_error(origin, expected=f'an object with "version": "{version}" and a "templates" object',
                          received=repr(data)[:120], fix=fix)
    templates = {}
    for name, entry in data["templates"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("system"), str)
                and isinstance(entry.get("user"), str) and entry["user"].strip()):
            raise input_error(f"{origin} template {name!r}", expected='"system" (may be empty) and "user" (non-empty) '
                              'strings',
                              received=repr(entry)[:120], fix=fix)
        templates[name] = Template(name=name, system=entry["system"], user=entry["user"])
    absent = [n for n in REQUIRED_TEMPLATES if n not in templates]
    if absent:
        raise input_error(origin, expected=f"templates {list(REQUIRED_TEMPLATES)}", received=f"{absent} absent",
                          fix=fix)
    return templates
