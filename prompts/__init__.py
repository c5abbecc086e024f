"""Versioned prompt text: the anatomy vocabulary (names, synonyms, description levels) shared by text-guided
segmentation (Med-VLM) and the grounding agent. See :mod:`prompts.anatomy`."""

from prompts.anatomy import (
    LEVELS,
    MODALITY_VIEWS,
    REGIONS,
    SIDE_WORDS,
    VIEW_KEYS,
    DescriptionLevel,
    StructureText,
    Vocabulary,
    all_phrases,
    available_versions,
    describe,
    load_vocabulary,
    normalize_phrase,
    resolve_structure,
    sample_text,
    side_of,
    view_key,
)

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
