"""Grounding with an in-process Hugging Face image-text-to-text model (Qwen2-VL, Qwen2.5-VL, PaliGemma, ...).

Same prompt and parsing as :mod:`agents.grounders.openai`: the v1 ``grounding`` template with the image (downscaled
to ``max_side``) through the processor's chat template, greedy generation, only the new tokens decoded, then
:func:`agents.parsing.parse_grounding`. Qwen2.5-VL answers in absolute pixels of its own resized input; that size is
read from the processor output (``image_grid_thw * patch_size``), so no resize rule is guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agents.grounders.base import GroundingResult
from agents.grounders.openai import check_phrases, grounding_result
from agents.llm import fit_image
from agents.parsing import parse_grounding, qwen25vl_input_size
from medvlm.errors import input_error, missing_dependency
from prompts.templates import load_templates

if TYPE_CHECKING:
    from medvlm.io import MedicalImage

__all__ = ["LocationTokenGrammar", "TransformersGrounder"]


class TransformersGrounder:
    """:class:`~agents.grounders.base.Grounder` running a transformers model in this process.

    Args:
        model: local model folder or (cached) hub id (``--llm-model``), loaded on first use with ``AutoProcessor``
            and ``AutoModelForImageTextToText``.
        device: torch device string.
        max_new_tokens: reply length limit.
        max_side: longer side, pixels, of the image given to the processor (never enlarged).
        answer: ``"json"`` (any instruction-following VLM, the v1 ``grounding`` template) or ``"tokens"`` (a model
            fine-tuned by ``medvlm train mllm``, e.g. a merged medvlm-mini: the ``grounding_tokens`` template it
            was trained on, replies ``label: <box>4 x <locNNNN></box>``, bins of the image sent), decoded under
            :class:`LocationTokenGrammar` (the syntax vLLM's regex holds served answers to); a reply that never
            opens a box is reported as not parseable.
        batch_size: phrases generated together per forward pass (left padding).
    """

    name = "transformers"

    def __init__(self, model: str | None = None, *, device: str = "cpu", max_new_tokens: int = 256,
                 max_side: int = 1024, answer: str = "json", batch_size: int = 8) -> None:
        from agents.grounders.openai import ANSWER_FORMATS

        if answer not in ANSWER_FORMATS:
            raise input_error("transformers grounder answer", expected=f"one of {ANSWER_FORMATS}",
                              received=repr(answer), fix="use 'tokens' for models fine-tuned by `medvlm train mllm`, "
                              "else 'json'")
        if not isinstance(model, str) or not model.strip():
            raise input_error("transformers grounder", expected="a model folder or hub id (--llm-model)",
                              received=repr(model), fix="pass --llm-model PATH, e.g. a local Qwen2-VL checkpoint")
        self.model_id = model
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.max_side = max_side
        self.answer = answer
        self.batch_size = max(1, int(batch_size))
        self.template = load_templates("1")["grounding" if answer == "json" else "grounding_tokens"]
        self._processor: Any = None
        self._model: Any = None

    @classmethod
    def from_loaded(cls, processor: Any, model: Any, *, name: str = "loaded", answer: str = "tokens",
                    max_new_tokens: int = 32, max_side: int = 1024, batch_size: int = 8) -> TransformersGrounder:
        """A grounder over a processor and model already in memory (a model being trained, for its held-out
        probe); the model stays on its device and in the mode its caller sets. Generation pads on the left, so
        the caller restores the tokenizer's ``padding_side`` if it needs another one."""
        grounder = cls(name, device=str(getattr(model, "device", "cpu")), max_new_tokens=max_new_tokens,
                       max_side=max_side, answer=answer, batch_size=batch_size)
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        grounder._processor, grounder._model = processor, model
        return grounder

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            try:
                from transformers import AutoModelForImageTextToText, AutoProcessor
            except ImportError as exc:
                raise missing_dependency("the transformers grounder", "pip install 'medvlm[text]'") from exc
            try:
                processor = AutoProcessor.from_pretrained(self.model_id)
                model: Any = AutoModelForImageTextToText.from_pretrained(self.model_id)
            except (OSError, ValueError) as exc:
                raise input_error("--llm-model", expected="a folder (or cached hub id) holding an image-text-to-text "
                                  "model and its processor", received=f"{self.model_id!r}: {str(exc)[:300]}",
                                  fix="download the model first (hf download ID --local-dir DIR) and pass DIR") from exc
            tokenizer = getattr(processor, "tokenizer", processor)
            tokenizer.padding_side = "left"  # batched generation continues every row from its last prompt token
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._processor, self._model = processor, model.to(self.device).eval()
        return self._processor, self._model

    def ground_many(self, image: MedicalImage, phrases: Sequence[str]) -> list[GroundingResult]:
        """One greedy generation per phrase, ``batch_size`` phrases per forward pass (left-padded: decoding is
        bound by reading the weights, so a batch costs about one phrase on CPU); geometry in pixels of ``image``."""
        checked = check_phrases(phrases)
        processor, _ = self._load()
        picture = fit_image(image.to_rgb_uint8(), self.max_side)
        sent = (picture.height, picture.width)
        conversations = []
        for phrase in checked:
            fields = {"phrase": phrase, "width": sent[1], "height": sent[0]} if self.answer == "json" else {
                "phrase": phrase}
            conversations.append(with_image_placeholder(self.template.render(**fields)))
        results = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start:start + self.batch_size]
            replies, inputs = self.generate_batch(chunk, [[picture]] * len(chunk))
            model_input = _model_input_size(processor, inputs)
            for phrase, reply in zip(checked[start:start + self.batch_size], replies):
                parsed = parse_grounding(reply, image_size=image.shape, sent_size=sent,
                                         fmt="auto" if self.answer == "json" else "medvlm")
                if parsed.format == "qwen25vl":
                    frame = model_input or qwen25vl_input_size(*sent)
                    parsed = parse_grounding(reply, image_size=image.shape, sent_size=frame, fmt="qwen25vl")
                provenance = {"grounder": self.name, "model": self.model_id, "sent_size": list(sent),
                              "model_input_size": list(model_input) if model_input else None,
                              "template": f"{self.template.name}/v1"}
                results.append(grounding_result(phrase, reply, parsed, provenance))
        return results

    def generate_chat(self, messages: list[dict[str, Any]], pictures: Sequence[Any],
                      max_new_tokens: int | None = None) -> tuple[str, Any]:
        """Greedy reply to chat ``messages`` whose content parts hold ``{"type": "image"}`` placeholders, one per
        PIL image of ``pictures`` in order; returns (reply without end markers, processor inputs)."""
        replies, inputs = self.generate_batch([messages], [list(pictures)], max_new_tokens)
        return replies[0], inputs

    def generate_batch(self, conversations: Sequence[list[dict[str, Any]]], pictures: Sequence[Sequence[Any]],
                       max_new_tokens: int | None = None) -> tuple[list[str], Any]:
        """Greedy replies to several conversations at once (``pictures[i]``: the images of conversation ``i``),
        left-padded; returns (replies, processor inputs)."""
        import torch

        processor, model = self._load()
        prompts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                   for m in conversations]
        images = [p for group in pictures for p in group]
        inputs = processor(text=prompts, images=images or None, return_tensors="pt",
                           padding=len(prompts) > 1).to(self.device)
        extra: dict[str, Any] = {}
        if self.answer == "tokens":  # the grammar vLLM's regex enforces when served; the same answers in process
            from transformers import LogitsProcessorList

            grammar = LocationTokenGrammar(getattr(processor, "tokenizer", processor), inputs["input_ids"].shape[1])
            if grammar.active:
                extra["logits_processor"] = LogitsProcessorList([grammar])
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False,
                                    **extra)
        start = inputs["input_ids"].shape[1]
        return [_decode(processor, row[start:]) for row in output], inputs


class LocationTokenGrammar:
    """A transformers logits processor that holds location-token answers to their syntax while decoding: after
    ``<box>`` only ``<locNNNN>`` tokens until there are 4, then only ``</box>``; after ``<poly>`` only location
    tokens, and ``</poly>`` once an even number >= 6 (3 vertices) has been written. Elsewhere scores pass
    unchanged. A model trained with a distance-aware location loss spreads an answer's mass over neighbouring
    bins, so unconstrained greedy decoding can prefer a single ``</box>`` over any one bin; served through vLLM
    the same answers are held to this syntax by a regex.

    ``tokenizer``: one with the :func:`medvlm.tokens.mask_tokens` added (``active`` is False otherwise, and the
    processor changes nothing); ``prompt_length``: columns of ``input_ids`` before the generated tokens.
    """

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        from medvlm.tokens import LOC_BINS, mask_tokens

        ids = [tokenizer.convert_tokens_to_ids(t) for t in mask_tokens()]
        unknown = getattr(tokenizer, "unk_token_id", None)
        self.active = all(isinstance(i, int) and i >= 0 and i != unknown for i in ids) and len(set(ids)) == len(ids)
        self.loc = list(ids[:LOC_BINS])
        self._loc = set(self.loc)
        self.poly_open, self.poly_close, self.box_open, self.box_close = ids[LOC_BINS:LOC_BINS + 4]
        self.start = int(prompt_length)

    def allowed(self, generated: Sequence[int]) -> list[int] | None:
        """Token ids allowed next after ``generated`` (the answer so far), or None for any."""
        opener, count = None, 0
        for token in generated:
            if token in (self.box_open, self.poly_open):
                opener, count = token, 0
            elif token in (self.box_close, self.poly_close):
                opener = None
            elif opener is not None and token in self._loc:
                count += 1
        if opener == self.box_open:
            return self.loc if count < 4 else [self.box_close]
        if opener == self.poly_open:
            return self.loc + ([self.poly_close] if count >= 6 and count % 2 == 0 else [])
        return None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """``input_ids (B, T)``, ``scores (B, V)`` -> scores with every disallowed token at -inf."""
        for row in range(input_ids.shape[0]):
            allowed = self.allowed(input_ids[row, self.start:].tolist())
            if allowed is not None:
                keep = scores[row, allowed].clone()
                scores[row] = float("-inf")
                scores[row, allowed] = keep
        return scores


def with_image_placeholder(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with an image placeholder before the last message's text."""
    out = [dict(m) for m in messages]
    out[-1]["content"] = [{"type": "image"}, {"type": "text", "text": out[-1]["content"]}]
    return out


def _decode(processor: Any, tokens: Any) -> str:
    """New tokens -> text. Special tokens are kept because Qwen2-VL's box markup (``<|box_start|>`` ...) is made of
    them; only end/padding markers are removed."""
    tokenizer = getattr(processor, "tokenizer", processor)
    text = str(tokenizer.decode(tokens, skip_special_tokens=False))
    for marker in {tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token, "<|im_end|>", "<|endoftext|>"}:
        if isinstance(marker, str) and marker:
            text = text.replace(marker, "")
    return text.strip()


def _model_input_size(processor: Any, inputs: Any) -> tuple[int, int] | None:
    """``(H, W)`` pixels the vision encoder saw, for Qwen2-VL-class processors (``image_grid_thw`` rows are
    ``(t, h_patches, w_patches)``); None for other processors."""
    grid = inputs.get("image_grid_thw") if hasattr(inputs, "get") else None
    patch = getattr(getattr(processor, "image_processor", None), "patch_size", None)
    if grid is None or not isinstance(patch, int):
        return None
    _, rows, cols = (int(v) for v in grid[0].tolist())
    return rows * patch, cols * patch
