"""Grounders: a phrase + an image -> :class:`~medvlm.types.Region` list (see :mod:`agents.grounders.base`).

Presets (``build_grounder``): ``medvlm`` (embedded default, offline: Med-VLM text-guided segmentation),
``openai`` (any OpenAI-compatible multimodal endpoint, e.g. vLLM), ``transformers`` (an in-process HF model).
"""

from agents.grounders.base import GROUNDERS, Grounder, GroundingResult, build_grounder

__all__ = ["GROUNDERS", "Grounder", "GroundingResult", "build_grounder"]
