"""A tiny RANDOM Qwen2-VL built from config, offline: the stand-in multimodal LLM for tests and benchmarks.

No pretrained multimodal LLM installs here, so every code path that a user runs with a Qwen2-VL-class checkpoint
(``finetune.mllm_train``, ``medvlm serve-llm``, the ``transformers`` and ``openai`` grounders, ``medvlm bench llm``)
is exercised with this model. The folder it writes is complete, as a hub checkpoint is: a byte-level BPE tokenizer
(no merges: one token per byte) with Qwen2-VL's special tokens, a ``Qwen2VLImageProcessor`` with a small
``max_pixels`` (so the vision tower sees few patches), Qwen2-VL's chat template and random weights.

Sizes are chosen so that vLLM's CPU attention accepts the model (head size 32) and a forward pass costs
milliseconds. Its replies are noise; tests check plumbing and geometry, never answers.

``python -m finetune.tiny_mllm OUT_DIR`` writes one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = ["QWEN2VL_CHAT_TEMPLATE", "QWEN2VL_SPECIALS", "build_tiny_qwen2vl"]

QWEN2VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                    "<|video_pad|>"]

# Qwen2-VL-Instruct's template, reduced to text and image parts: it must accept both TRL's {"type": "image"} parts
# and the {"type": "image_url"} parts that reach vLLM from OpenAI clients.
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2vl(folder: str | Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0,
                       min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 16) -> Path:
    """Write a random Qwen2-VL (model, tokenizer, processor, chat template) to ``folder``; returns it.

    ``hidden_size`` must be a multiple of 64 (2 heads of >= 32, the smallest head size vLLM's CPU attention
    takes). ``min_pixels``/``max_pixels``: the image processor's resize bounds in pixels (28x28 per merged patch,
    so the defaults give 4 to 16 image tokens).
    """
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if hidden_size % 64 or hidden_size <= 0:
        raise ValueError(f"hidden_size: expected a positive multiple of 64; received {hidden_size}")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(QWEN2VL_SPECIALS)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    processor = transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer, video_processor=transformers.Qwen2VLVideoProcessor(),
        chat_template=QWEN2VL_CHAT_TEMPLATE)
    ids = {s: int(tokenizer.convert_tokens_to_ids(s)) for s in QWEN2VL_SPECIALS}  # type: ignore[arg-type]
    head_dim = hidden_size // 2
    unit = head_dim // 16  # mrope sections (temporal, height, width) in 2:3:3, summing to head_dim / 2
    text_config: dict[str, Any] = {
        "vocab_size": len(tokenizer), "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "mrope_section": [unit * 2, unit * 3, unit * 3],
                            "rope_theta": 10000.0},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
        # a wider init than the usual 0.02: with a frozen random LM head of width 64, 0.02 caps the logit margin
        # near 2 nats, so what a LoRA adapter learns would hardly outweigh numerical noise between two runtimes
        "initializer_range": 0.2,
    }
    config = transformers.Qwen2VLConfig(
        text_config=text_config,
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": hidden_size, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


if __name__ == "__main__":  # pragma: no cover - thin command
    if len(sys.argv) != 2:
        sys.exit("usage: python -m finetune.tiny_mllm OUT_DIR")
    build_tiny_qwen2vl(sys.argv[1])
