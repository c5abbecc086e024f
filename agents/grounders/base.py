"""The grounder protocol: one phrase and one image in, zero or more regions out.

Every grounder returns geometry in the project's one convention: pixel xyxy (boxes) and pixel xy (points) of
the ORIGINAL image (``MedicalImage.shape``), whatever frame its model works in. Masks, when a grounder makes
them, are bool ``(H, W)`` on the original grid. A grounder that finds nothing returns an empty region list and
says why in ``GroundingResult.note``; it never invents a box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from medvlm.errors import input_error

if TYPE_CHECKING:
    from medvlm.io import MedicalImage
    from medvlm.types import Region

__all__ = ["GROUNDERS", "Grounder", "GroundingResult", "build_grounder"]


@dataclass
class GroundingResult:
    """What a grounder found for one phrase.

    ``regions``: best first; each has ``label`` (the phrase or the model's label), ``score`` in [0, 1] when the
    model gives one, and ``provenance`` with at least ``{"grounder": name, "model": ...}``; LLM grounders add
    ``"format"`` (which output format was parsed) and ``"raw"`` (the reply, truncated to 2000 characters).
    ``note``: why nothing (or less than asked) was found, e.g. "reply not parseable: ..."; empty when all went well.
    """

    phrase: str
    regions: list[Region] = field(default_factory=list)
    note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class Grounder(Protocol):
    """Phrase grounding on one image.

    ``ground_many`` must encode/send the image once for all phrases when the backend allows it (Med-VLM encodes
    the image once; LLM grounders send one request per phrase with the same data URL).
    """

    name: str

    def ground_many(self, image: MedicalImage, phrases: Sequence[str]) -> list[GroundingResult]:
        """One :class:`GroundingResult` per phrase, in order. Geometry in pixels of ``image`` (original grid)."""
        ...


#: preset name -> "module:class"; imported only when built, so that optional dependencies stay optional.
GROUNDERS: dict[str, str] = {
    "medvlm": "agents.grounders.medvlm:MedVLMGrounder",
    "openai": "agents.grounders.openai:OpenAIGrounder",
    "transformers": "agents.grounders.hf:TransformersGrounder",
    "mini": "agents.mini:MiniGrounder",
}


def build_grounder(name: str, **kwargs: Any) -> Grounder:
    """Build the grounder preset ``name`` (a key of :data:`GROUNDERS`) with its keyword options."""
    import importlib

    if name not in GROUNDERS:
        raise input_error("grounder", expected=" | ".join(GROUNDERS), received=repr(name),
                          fix="use --grounder medvlm (offline default), openai (needs --llm-url and --llm-model) "
                          "or transformers (needs --llm-model PATH), or mini (the shipped medvlm-mini)")
    module_name, cls_name = GROUNDERS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    grounder: Grounder = cls(**kwargs)
    return grounder
