"""LoRA fine-tuning of a multimodal LLM on the grounding tasks (library code; the recipe is
``medvlm train mllm CONFIG.yaml``, the export ``medvlm export mllm RUN_DIR OUT_DIR``).

Model: any ``AutoModelForImageTextToText`` checkpoint with an ``AutoProcessor`` (hub id or local folder; the
documented GPU default is Qwen2.5-VL-3B-Instruct). With ``add_location_tokens`` the 1024 ``<locNNNN>`` tokens and
``<box>``/``<poly>`` markers of :mod:`medvlm.tokens` join the vocabulary as ordinary (not special) tokens, so
servers do not strip them from replies; their embedding and output rows start at the mean of the existing rows
(``resize_token_embeddings(mean_resizing=True)``) and are trained through peft's ``trainable_token_indices``. All
other base weights stay frozen; LoRA adapters go on the language model's attention and MLP projections only
(``target_modules`` is a regex that leaves the vision tower out).

Training is TRL's ``SFTTrainer`` on prompt-completion examples (loss on the answer only), with checkpoints every
``save_steps`` in ``out_dir/checkpoints``; a rerun resumes from the newest, and a run in a later session that
kept only an adapter goes on from it with ``init_adapter`` (fresh optimizer and schedule). With ``align_steps`` > 0
an alignment stage runs first (``out_dir/align``): only the new token rows and ``modules_to_save`` train, at
``align_lr``, with the LoRA frozen at zero; the LoRA stage then starts from its weights. The result
``out_dir/adapter`` is a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``), the processor with
its added tokens, and ``medvlm_mllm.json`` (base model, added tokens, answer format). vLLM serves LoRA weights only,
not new token rows: an adapter trained without new tokens is served as ``--lora NAME=out_dir/adapter``; one with new
tokens is merged first (:func:`export_merged`) and the merged folder is served as the model.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from finetune.mllm_data import MLLMDataSource, build_examples
from medvlm.errors import input_error
from medvlm.tokens import LOC_BINS

__all__ = ["LANGUAGE_MODEL_LORA_TARGETS", "PROBE_STRUCTURES", "HeldoutProbe", "MLLMTrainConfig", "export_merged",
           "format_probe_table", "layout_prior", "load_adapter_weights", "load_finetuned", "load_mllm_config",
           "location_loss", "prepare_model", "probe_adapters", "train_mllm", "training_chat_template"]

log = logging.getLogger(__name__)

LANGUAGE_MODEL_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
"""LoRA targets: every attention and MLP projection of the language model; Qwen2.5-VL's vision blocks also have
``gate_proj``/``up_proj``/``down_proj``, so the regex anchors on ``language_model``."""

META_FILE = "medvlm_mllm.json"


@dataclass
class MLLMTrainConfig:
    """Everything one fine-tuning run depends on; written to ``out_dir/train_config.json``."""

    base_model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    out_dir: str = "runs/mllm"
    data: list[MLLMDataSource] = field(default_factory=lambda: [MLLMDataSource("cxr_jsrt_scr")])
    data_root: str | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    image_max_side: int = 512
    add_location_tokens: bool = True
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = LANGUAGE_MODEL_LORA_TARGETS
    #: base modules trained in full and saved with the adapter (peft ``modules_to_save``), e.g.
    #: ``[multi_modal_projector]`` to align a fresh projector (medvlm-mini stage 1)
    modules_to_save: list[str] = field(default_factory=list)
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2e-4
    warmup_steps: int = 30
    save_steps: int = 100
    logging_steps: int = 10
    max_length: int | None = None
    bf16: bool | None = None  # None: bf16 when CUDA is available; true on CPU = fp32 weights, bf16 autocast
    gradient_checkpointing: bool = False
    seed: int = 0
    #: alignment stage before the LoRA one: ``align_steps`` steps at ``align_lr`` that train only the new token
    #: rows and ``modules_to_save`` (the projector) while the LoRA stays at its zero start, so the language model
    #: first learns to read the image features and to emit location tokens (0 = no such stage)
    align_steps: int = 0
    align_lr: float = 1e-3
    #: a sense of distance for coordinates: the target of a ``<locNNNN>`` answer token is a Gaussian over the
    #: 1024 bins with this standard deviation (in bins) instead of the one bin, so a near miss costs less than a
    #: far one (0 = plain cross-entropy); needs ``add_location_tokens``
    loc_sigma: float = 0.0
    #: 2D position on the image tokens, shaped like the location-token rows: an auxiliary loss with this weight
    #: (0 = off; :func:`position_alignment_loss`) makes the projector's output for the image token of grid cell
    #: (row r, column c) score, against the rows of the location tokens (the LLM's tied input and output
    #: embeddings), the bin of its centre's x in one half of its dimensions and of its y in the other, so that
    #: attention which finds a structure's tokens can copy where they are into a ``<locNNNN>`` answer. Needs
    #: ``add_location_tokens``.
    pos_align_weight: float = 0.0
    #: the width of that target in bins (the 8 x 8 token grid is 128 bins a cell)
    pos_align_sigma: float = 48.0
    #: several questions about one image in one multi-turn conversation (:func:`finetune.mllm_data.pack_turns`):
    #: the image tokens and the system prompt are paid once per group, and every answer is trained (TRL
    #: assistant-only loss); 1 = one question per example
    turns_per_image: int = 1
    #: the held-out curve: every ``probe_every`` optimizer steps (and at the start of each stage), the box mIoU of
    #: the five chest structures, asked by name, on the first ``probe_images`` held-out JSRT images, beside the
    #: image-blind prior (each structure's mean relative box on the JSRT train images), appended to
    #: ``out_dir/probe.jsonl`` (0 = off)
    probe_every: int = 0
    probe_images: int = 10
    #: continue from a trained adapter of this recipe (a folder with ``adapter_config.json`` and
    #: ``adapter_model.safetensors``: a run's ``adapter`` or ``checkpoints/checkpoint-N``, or the shipped
    #: ``agents/weights/mini``): its weights are loaded strictly into the new run, which skips the alignment stage
    #: (its rows are already aligned) and starts a fresh optimizer and schedule. How a run goes on in a later
    #: session when only the adapter, not the optimizer state, was kept (None = start from the base)
    init_adapter: str | None = None

    def validate(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise input_error("base_model", expected="a hub id or a local model folder", received=repr(self.base_model),
                              fix="e.g. base_model: Qwen/Qwen2.5-VL-3B-Instruct")
        ints = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "lora_rank": self.lora_rank, "save_steps": self.save_steps, "logging_steps": self.logging_steps,
                "image_max_side": self.image_max_side}
        bad = {k: v for k, v in ints.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise input_error("mllm train config", expected="positive integers", received=repr(bad),
                              fix="e.g. steps: 1000, batch_size: 4, grad_accum: 4, lora_rank: 16")
        if not isinstance(self.align_steps, int) or self.align_steps < 0 or not self.align_lr > 0:
            raise input_error("mllm train config align", expected="align_steps >= 0 and align_lr > 0",
                              received=f"align_steps={self.align_steps}, align_lr={self.align_lr}",
                              fix="e.g. align_steps: 200, align_lr: 1e-3 (or align_steps: 0)")
        if self.loc_sigma < 0 or (self.loc_sigma > 0 and not self.add_location_tokens):
            raise input_error("mllm train config loc_sigma", expected=">= 0, and add_location_tokens when > 0",
                              received=f"loc_sigma={self.loc_sigma}, add_location_tokens={self.add_location_tokens}",
                              fix="e.g. loc_sigma: 2.0 with add_location_tokens: true (or loc_sigma: 0)")
        if self.pos_align_weight < 0 or (self.pos_align_weight > 0 and not self.add_location_tokens) \
                or not self.pos_align_sigma > 0:
            raise input_error("mllm train config pos_align_weight",
                              expected=">= 0 (add_location_tokens when > 0) and pos_align_sigma > 0",
                              received=f"pos_align_weight={self.pos_align_weight}, pos_align_sigma="
                                       f"{self.pos_align_sigma}, add_location_tokens={self.add_location_tokens}",
                              fix="e.g. pos_align_weight: 0.1 with add_location_tokens: true (or 0)")
        others = {"turns_per_image": (self.turns_per_image, 1), "probe_every": (self.probe_every, 0),
                  "probe_images": (self.probe_images, 1)}
        odd = {k: v for k, (v, low) in others.items() if not isinstance(v, int) or v < low}
        if odd:
            raise input_error("mllm train config", expected="turns_per_image >= 1, probe_every >= 0, probe_images >= 1",
                              received=repr(odd), fix="e.g. turns_per_image: 5, probe_every: 100, probe_images: 10")
        if not self.lr > 0 or not 0 <= self.lora_dropout < 1:
            raise input_error("mllm train config", expected="lr > 0 and 0 <= lora_dropout < 1",
                              received=f"lr={self.lr}, lora_dropout={self.lora_dropout}", fix="e.g. lr: 2e-4")
        if self.init_adapter is not None:
            folder = Path(self.init_adapter).expanduser()
            missing = [n for n in ("adapter_config.json", "adapter_model.safetensors") if not (folder / n).is_file()]
            if missing:
                raise input_error("mllm train config init_adapter", expected="a folder with "
                                  "adapter_config.json and adapter_model.safetensors", received=f"{folder} (no "
                                  f"{', '.join(missing)})", fix="name a run's adapter or checkpoint-N folder, or "
                                  "agents/weights/mini")
        if not self.data:
            raise input_error("data", expected="at least one data source", received="[]",
                              fix="add e.g. - name: cxr_jsrt_scr")
        for src in self.data:
            src.validate()


def load_mllm_config(path: str | Path) -> MLLMTrainConfig:
    """Read a YAML (or JSON) config; unknown keys are an error."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in fields(MLLMTrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise input_error(f"mllm train config {path}", expected=f"keys among {sorted(known)}",
                          received=str(sorted(unknown)), fix="remove or rename them")
    if "data" in raw:
        raw["data"] = [MLLMDataSource(**d) if isinstance(d, dict) else MLLMDataSource(str(d)) for d in raw["data"]]
    cfg = MLLMTrainConfig(**raw)
    cfg.validate()
    return cfg


def _load_base(base_model: str, dtype: Any = None) -> tuple[Any, Any]:
    """(processor, model) of a hub id or folder; InputError naming the fix when it cannot be loaded."""
    import os

    import transformers

    base_model = os.path.expanduser(base_model)  # configs may name ~/.cache/medvlm/mini/model
    try:
        processor = transformers.AutoProcessor.from_pretrained(base_model)
        model = transformers.AutoModelForImageTextToText.from_pretrained(base_model, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise input_error("base model", expected="a multimodal model loadable by AutoModelForImageTextToText",
                          received=f"{base_model!r} ({type(exc).__name__}: {str(exc)[:200]})",
                          fix="pass a local folder or a hub id cached on this machine (HF_HUB_OFFLINE=1 needs the "
                              "cache)") from exc
    return processor, model


def _add_tokens(processor: Any, model: Any) -> list[int]:
    """Add the location/marker tokens (ordinary tokens); returns their ids. Rows start at the mean row."""
    from medvlm.tokens import mask_tokens

    tokenizer = processor.tokenizer
    tokenizer.add_tokens(mask_tokens(), special_tokens=False)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return [int(i) for i in tokenizer.convert_tokens_to_ids(mask_tokens())]


def prepare_model(cfg: MLLMTrainConfig) -> tuple[Any, Any, list[int]]:
    """(processor, peft model, added token ids): base loaded, tokens added, LoRA attached (only LoRA and the new
    token rows require grad)."""
    import torch
    from peft import LoraConfig, get_peft_model

    # bf16 weights on GPU (memory); on CPU fp32 weights under bf16 autocast (2x faster steps with avx512_bf16,
    # and updates of the token rows and LoRA are not rounded away in bf16)
    dtype = torch.bfloat16 if _use_bf16(cfg) and torch.cuda.is_available() else torch.float32
    processor, model = _load_base(cfg.base_model, dtype)
    new_ids = _add_tokens(processor, model) if cfg.add_location_tokens else []
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM",
                      trainable_token_indices={"embed_tokens": new_ids, "lm_head": new_ids} if new_ids else None,
                      modules_to_save=list(cfg.modules_to_save) or None)
    return processor, get_peft_model(model, lora), new_ids


def _use_bf16(cfg: MLLMTrainConfig) -> bool:
    import torch

    return bool(cfg.bf16) if cfg.bf16 is not None else torch.cuda.is_available()


def _hf_dataset(examples: list[dict[str, Any]]) -> Any:
    """A datasets.Dataset of prompt/completion/images (or, packed, messages/images) whose images decode lazily
    from their PNG paths."""
    import datasets

    keys = ("messages",) if "messages" in examples[0] else ("prompt", "completion")
    rows = [{**{k: e[k] for k in keys}, "images": e["images"]} for e in examples]
    ds = datasets.Dataset.from_list(rows)
    return ds.cast_column("images", datasets.Sequence(datasets.Image()))


def location_loss(logits: Any, labels: Any, loc_ids: Any, sigma: float) -> tuple[Any, Any]:
    """Next-token loss where every ``<locNNNN>`` label is scored against a Gaussian over the location bins.

    ``logits (B, T, V)``, ``labels (B, T)`` (-100 = not scored; shifted here as the model's own loss does),
    ``loc_ids (1024,)`` the token ids of bins 0..1023 in order, ``sigma`` in bins. Other tokens keep plain
    cross-entropy. Returns ``(summed loss, number of scored tokens)``."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    valid = labels != -100
    logp = torch.log_softmax(logits, dim=-1)
    safe = labels.clamp(min=0)
    loss = -logp.gather(-1, safe[..., None])[..., 0]
    bin_of = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=labels.device)
    bin_of[loc_ids] = torch.arange(len(loc_ids), device=labels.device)
    bins = bin_of[safe]
    is_loc = valid & (bins >= 0)
    if bool(is_loc.any()) and sigma > 0:
        grid = torch.arange(len(loc_ids), device=labels.device, dtype=logits.dtype)
        target = torch.exp(-0.5 * ((grid[None, :] - bins[is_loc][:, None].to(logits.dtype)) / sigma) ** 2)
        target = target / target.sum(dim=-1, keepdim=True)
        loss = loss.clone()
        loss[is_loc] = -(target * logp[is_loc][:, loc_ids]).sum(dim=-1)
    return loss[valid].sum(), valid.sum()


def position_alignment_loss(tokens: Any, loc_rows: Any, sigma: float) -> Any:
    """Mean cross-entropy that puts each image token's own position into the location-token space.

    ``tokens (N, T, D)``: the projector's output for ``N`` images, ``T`` = side x side tokens in row-major grid
    order; ``loc_rows (1024, D)``: the embedding rows of ``<loc0000>`` .. ``<loc1023>``. The first half of the
    ``D`` dimensions of the token of cell (r, c), scored against the first half of the rows, must name the bin of
    its centre's x (normalised image coordinates binned like :mod:`medvlm.tokens`: a Gaussian target of ``sigma``
    bins), the second half its y. Two halves, not one sum of two rows: a sum would read the same at (r, c) and
    (c, r), and an answer must tell x from y; an attention head can copy either half into a ``<locNNNN>`` logit."""
    import torch

    n_tokens = int(tokens.shape[1])
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise input_error("position_alignment_loss", expected="a square grid of image tokens",
                          received=f"{n_tokens} tokens", fix="use pos_align_weight: 0 for this projector")
    device = tokens.device
    centre = torch.round((torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side * LOC_BINS - 0.5)
    grid = torch.arange(LOC_BINS, device=device, dtype=torch.float32)
    half = int(tokens.shape[-1]) // 2
    total = tokens.new_zeros((), dtype=torch.float32)
    # token t = r * side + c: x from c, y from r
    for bins, dims in ((centre.repeat(side), slice(0, half)), (centre.repeat_interleave(side), slice(half, None))):
        target = torch.exp(-0.5 * ((grid[None, :] - bins[:, None]) / sigma) ** 2)
        target = target / target.sum(dim=-1, keepdim=True)  # (T, 1024)
        logp = torch.log_softmax(tokens[..., dims].float() @ loc_rows[:, dims].float().T, dim=-1)  # (N, T, 1024)
        total = total + 0.5 * -(target[None] * logp).sum(dim=-1).mean()
    return total


def _full_logits_trainer(loc_ids: list[int] | None = None, sigma: float = 0.0, pos_weight: float = 0.0,
                         pos_sigma: float = 48.0) -> Any:
    from transformers import Trainer
    from trl import SFTTrainer

    class FullLogitsSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is the model's own (full logits). TRL's fused LM head multiplies by
        ``lm_head.weight`` directly, which skips peft's trainable new-token rows of ``lm_head``. With
        ``sigma`` > 0 the location tokens are scored by :func:`location_loss`; with ``pos_weight`` > 0
        :func:`position_alignment_loss` on the projector's output is added (its values go to
        ``<output_dir>/pos_align.jsonl``)."""

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if not loc_ids or (sigma <= 0 and pos_weight <= 0):
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            import torch

            ids = torch.as_tensor(loc_ids, device=inputs["input_ids"].device)
            captured: list[Any] = []
            handle = None
            if pos_weight > 0:
                projector = next((m for n, m in model.named_modules() if n.endswith("multi_modal_projector")), None)
                if projector is None:
                    raise input_error("pos_align_weight", expected="a model whose image tokens come from a "
                                      "`multi_modal_projector` (InternVL or LLaVA format, as medvlm-mini)",
                                      received=type(model).__name__, fix="set pos_align_weight: 0 for this model")
                handle = projector.register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                if sigma > 0:
                    labels = inputs.pop("labels")
                    outputs = model(**inputs)
                    total, count = location_loss(outputs.logits, labels, ids, sigma)
                    denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
                    loss = total / denominator.to(total.device) if hasattr(denominator, "to") else total / denominator
                else:
                    loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                         num_items_in_batch=num_items_in_batch)
            finally:
                if handle is not None:
                    handle.remove()
            if captured:
                aux = position_alignment_loss(captured[0], model.get_input_embeddings()(ids), pos_sigma)
                loss = loss + pos_weight * aux
                if model.training:
                    with open(Path(str(self.args.output_dir)) / "pos_align.jsonl", "a") as fh:
                        fh.write(json.dumps({"step": int(self.state.global_step), "pos_align": float(aux)}) + "\n")
            return (loss, outputs) if return_outputs else loss

    return FullLogitsSFTTrainer


def train_mllm(cfg: MLLMTrainConfig, *, resume: bool = True, examples: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    """Run the recipe; returns a summary (steps, first/last logged loss, train samples/s, paths).

    ``examples``: pre-built TRL examples (images as file paths) instead of building them from ``cfg.data``.
    """
    from trl import SFTTrainer

    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    val_ids: list[str] = []
    if examples is None:
        examples, val_ids = build_examples(cfg.data, out, data_root=cfg.data_root, image_max_side=cfg.image_max_side,
                                           val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, seed=cfg.seed)
    if not examples:
        raise input_error("mllm training data", expected="at least one example", received="none",
                          fix="check the data sources' names and tasks")
    processor, model, new_ids = prepare_model(cfg)
    # mask_tokens(): the bins first, in order
    loc_ids = new_ids[:LOC_BINS] if cfg.loc_sigma > 0 or cfg.pos_align_weight > 0 else None
    trainer_cls = (_full_logits_trainer(loc_ids, cfg.loc_sigma, cfg.pos_align_weight, cfg.pos_align_sigma)
                   if new_ids else SFTTrainer)
    if cfg.turns_per_image > 1:
        import random

        from finetune.mllm_data import pack_turns

        examples = pack_turns(examples, cfg.turns_per_image, random.Random(cfg.seed))
    dataset = _hf_dataset(examples)
    probe = HeldoutProbe(processor, out / "probe.jsonl", cfg.probe_every, n_images=cfg.probe_images,
                         val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                         data_root=cfg.data_root) if cfg.probe_every else None
    inference_template = processor.chat_template
    if cfg.turns_per_image > 1:  # TRL's assistant-only loss reads the turns from {% generation %} markers
        processor.chat_template = training_chat_template(inference_template, processor)
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    aligned = None
    if cfg.init_adapter is not None and not (resume and checkpoints):  # a checkpoint of this run is newer
        load_adapter_weights(model, cfg.init_adapter)
    try:
        # a LoRA-stage checkpoint already holds every weight, and an initial adapter is aligned already
        if cfg.align_steps and cfg.init_adapter is None and not (resume and checkpoints):
            aligned = _align(cfg, model, processor, trainer_cls, dataset, out / "align", resume=resume, probe=probe)
        args = _sft_args(cfg, out / "checkpoints", cfg.steps, cfg.lr, cfg.warmup_steps, keep=2)
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=processor,
                              callbacks=[probe.callback("lora")] if probe else None)
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if resume and checkpoints else None)
        wall = time.perf_counter() - start
    finally:
        processor.chat_template = inference_template  # what inference and vLLM render: saved with the adapter
    adapter = out / "adapter"
    trainer.save_model(str(adapter))
    processor.save_pretrained(str(adapter))
    meta = {"base_model": cfg.base_model, "added_tokens": bool(new_ids), "answer_format": "tokens",
            "servable_as_lora": not new_ids and not cfg.modules_to_save, "val_ids": val_ids}
    (adapter / META_FILE).write_text(json.dumps(meta, indent=2))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {"steps": trainer.state.global_step, "examples": len(examples), "first_loss": losses[0] if losses
               else None, "last_loss": losses[-1] if losses else None,
               "train_samples_per_second": result.metrics.get("train_samples_per_second"), "wall_s": round(wall, 2),
               "adapter": str(adapter), "servable_as_lora": not new_ids and not cfg.modules_to_save,
               "align": aligned}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_adapter_weights(model: Any, adapter_dir: str | Path) -> None:
    """Copy a saved adapter's weights into ``model`` (a peft model prepared by :func:`prepare_model` with the
    same rank, targets, added tokens and ``modules_to_save``), strictly: a key of the file the model lacks, or a
    trained module of the model the file lacks, is an error that names them. bf16 files load into fp32 weights."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(adapter_dir).expanduser()
    saved = load_file(str(folder / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(model)
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(expected) & set(saved) if tuple(expected[k].shape) != tuple(saved[k].shape))
    if missing or extra or wrong:
        raise input_error(f"init_adapter {folder}", expected="the weights of an adapter with this config's rank, "
                          "targets, added tokens and modules_to_save", received=f"missing {missing[:5]} "
                          f"({len(missing)}), unexpected {extra[:5]} ({len(extra)}), other shape {wrong[:5]}",
                          fix="train with the config that wrote that adapter (lora_rank, add_location_tokens, "
                              "modules_to_save)")
    set_peft_model_state_dict(model, saved)


def _align(cfg: MLLMTrainConfig, model: Any, processor: Any, trainer_cls: Any, dataset: Any, folder: Path, *,
           resume: bool, probe: HeldoutProbe | None = None) -> dict[str, Any]:
    """The alignment stage (``cfg.align_steps``): LoRA frozen, the new token rows and ``modules_to_save``
    trained at ``cfg.align_lr``; checkpoints in ``folder/checkpoints``, the result in ``folder/adapter`` with
    ``folder/done.json``. A finished stage is loaded, not rerun. Returns ``{"steps", "first_loss", "last_loss"}``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    done = folder / "done.json"
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    if resume and done.is_file():
        set_peft_model_state_dict(model, load_file(str(folder / "adapter" / "adapter_model.safetensors")))
        return dict(json.loads(done.read_text()))
    for p in lora:
        p.requires_grad_(False)
    args = _sft_args(cfg, folder / "checkpoints", cfg.align_steps, cfg.align_lr,
                     min(cfg.warmup_steps, cfg.align_steps // 10), keep=1)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=processor,
                          callbacks=[probe.callback("align")] if probe else None)
    checkpoints = sorted((folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    try:
        trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if resume and checkpoints else None)
    finally:
        for p in lora:
            p.requires_grad_(True)
    trainer.save_model(str(folder / "adapter"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {"steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None}
    done.write_text(json.dumps(summary, indent=2))
    return summary


def _sft_args(cfg: MLLMTrainConfig, output_dir: Path, steps: int, lr: float, warmup: int, *, keep: int) -> Any:
    """TRL's SFTConfig of one stage (``keep``: checkpoints kept); the rest comes from ``cfg``."""
    import torch
    from trl import SFTConfig

    return SFTConfig(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=cfg.batch_size,
                     gradient_accumulation_steps=cfg.grad_accum, learning_rate=lr, lr_scheduler_type="cosine",
                     warmup_steps=warmup, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
                     save_total_limit=keep, seed=cfg.seed, bf16=_use_bf16(cfg),
                     gradient_checkpointing=cfg.gradient_checkpointing, max_length=cfg.max_length, report_to="none",
                     dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
                     assistant_only_loss=cfg.turns_per_image > 1,
                     use_cpu=_use_bf16(cfg) and not torch.cuda.is_available())  # bf16 on CPU: autocast


def training_chat_template(template: str, processor: Any = None) -> str:
    """``template`` with ``{% generation %}`` markers around every assistant turn (its text and its end-of-turn
    token), which TRL's assistant-only loss needs to find the answers of a multi-turn conversation; unchanged when
    it has markers. Works for ChatML templates that write each message as ``<|im_start|>{{ message['role'] }}``
    + newline ... ``<|im_end|>`` + newline in one loop (medvlm-mini's). With ``processor`` the new template is
    checked to render a two-turn conversation exactly as the old one does."""
    if "generation %}" in template:
        return template
    head, tail = "<|im_start|>{{ message['role'] }}\n", "<|im_end|>\n{% endfor %}"
    i = template.find(head)
    j = template.find(tail, i + len(head)) if i >= 0 else -1
    if j < 0:
        raise input_error("chat template for turns_per_image > 1",
                          expected="a template with {% generation %} markers, or medvlm-mini's ChatML one",
                          received=template[:120].replace("\n", " ") + " ...",
                          fix="add {% generation %}...{% endgeneration %} around the assistant turns of the "
                              "processor's chat_template, or use turns_per_image: 1")
    start, body = i + len(head), template[i + len(head):j]
    marked = (template[:start] + "{% if message['role'] == 'assistant' %}{% generation %}" + body
              + "<|im_end|>\n{% endgeneration %}{% else %}" + body + "<|im_end|>\n{% endif %}{% endfor %}"
              + template[j + len(tail):])
    if processor is not None:
        talk = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q1"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
                {"role": "user", "content": [{"type": "text", "text": "q2"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a2"}]}]
        if (processor.apply_chat_template(talk, tokenize=False, chat_template=marked)
                != processor.apply_chat_template(talk, tokenize=False, chat_template=template)):
            raise input_error("chat template for turns_per_image > 1", expected="markers that change no text",
                              received="a different rendering", fix="use turns_per_image: 1")
    return marked


PROBE_STRUCTURES: tuple[str, ...] = ("heart", "left lung", "right lung", "left clavicle", "right clavicle")
"""What the held-out probe asks, by name, on each probe image."""


@functools.lru_cache(maxsize=4)
def layout_prior(root: str, ids: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The image-blind prior of :data:`PROBE_STRUCTURES`: each one's mean box over the JSRT images ``ids`` of the
    folder ``root``, relative to the image (x0/W, y0/H, x1/W, y1/H), shape (4,). Cached: every probe of a
    process shares it (reading the 129 train images takes ~20 s)."""
    from medvlm.datasets import open_dataset

    ds = open_dataset(root)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for sid in ids:
        sample = ds.load(sid)
        h, w = sample.image.shape
        for name in PROBE_STRUCTURES:
            box = sample.mask(name).to_box() if name in sample.masks else None
            if box is not None:
                sums[name] = sums.get(name, np.zeros(4)) + box.to_array() / [w, h, w, h]
                counts[name] = counts.get(name, 0) + 1
    return {n: sums[n] / counts[n] for n in sums}


class HeldoutProbe:
    """The held-out curve of a run: box mIoU of :data:`PROBE_STRUCTURES` on a fixed set of held-out JSRT images,
    asked through the ``grounding_tokens`` prompt and parsed as ``--grounder mini`` parses it, beside the
    image-blind prior (each structure's mean box relative to the image, over the JSRT train images).

    The probe images are the first ``n_images`` held-out JSRT ids of the split that :func:`build_examples` makes
    (``val_fraction``, ``split_seed``), so no run trains on them; ``path``: JSON lines ``{"stage", "step", "miou",
    "per_target", "prior_miou", "prior_per_target", "answered", "seconds"}``; ``every``: optimizer steps between
    probes. Boxes are pixel xyxy of the original image; a missing or unparseable answer scores IoU 0, and
    ``answered`` is the share of questions answered with a box at all (format learnt vs. place learnt).
    """

    def __init__(self, processor: Any, path: Path | None, every: int, *, n_images: int = 10, val_fraction: float = 0.2,
                 split_seed: int = 0, data_root: str | None = None) -> None:
        from medvlm.datasets import open_dataset, split_ids
        from medvlm.types import Box

        self.processor, self.path, self.every = processor, Path(path) if path else None, every
        ds = open_dataset("cxr_jsrt_scr", root=data_root)
        train, val_ids = split_ids(ds.ids(), val_fraction, split_seed, group=ds.group)  # as build_examples splits
        self.samples = [ds.load(i) for i in val_ids[:n_images]]
        self.prior = layout_prior(str(ds.root), tuple(train))
        self.truth: list[dict[str, Box]] = []
        for sample in self.samples:
            boxes = {n: sample.mask(n).to_box() for n in PROBE_STRUCTURES if n in sample.masks}
            self.truth.append({n: b for n, b in boxes.items() if b is not None})

    def measure(self, model: Any, processor: Any = None, *, swap_images: bool = False) -> dict[str, Any]:
        """Ground every probe structure on every probe image with ``model`` and its ``processor`` (default: the
        probe's); returns the record without stage/step (:meth:`score_answers` of :meth:`model_answers`)."""
        answers, seconds = self.model_answers(model, processor)
        return self.score_answers(answers, swap_images=swap_images, seconds=seconds)

    def model_answers(self, model: Any, processor: Any = None) -> tuple[list[dict[str, list[Any]]], float]:
        """:meth:`answers` of ``model`` through the grounding prompt (greedy, no grad, eval mode; its mode and the
        tokenizer's padding side are restored), and the seconds they took."""
        import torch

        from agents.grounders.hf import TransformersGrounder

        processor = processor if processor is not None else self.processor
        tokenizer = getattr(processor, "tokenizer", processor)
        side, training = tokenizer.padding_side, model.training
        t0 = time.perf_counter()
        model.eval()
        try:
            grounder = TransformersGrounder.from_loaded(processor, model, name="probe", max_new_tokens=24)
            with torch.no_grad():
                answers = self.answers(grounder)
        finally:
            tokenizer.padding_side = side
            model.train(training)
        return answers, time.perf_counter() - t0

    def answers(self, grounder: Any) -> list[dict[str, list[Any]]]:
        """Each probe image asked once for every probe structure that it or the previous probe image (the one
        whose questions the image-use control moves onto it) has: per image ``{structure: [Box, ...]}``, the
        grounder's boxes best first, in that image's pixel frame. ``grounder``: anything with
        ``ground_many(image, names) -> [GroundingResult]``."""
        out = []
        for i, sample in enumerate(self.samples):
            needed = self.truth[i].keys() | self.truth[i - 1].keys()
            names = [name for name in PROBE_STRUCTURES if name in needed]
            results = grounder.ground_many(sample.image, names)
            out.append({name: [r.box for r in result.regions] for name, result in zip(names, results)})
        return out

    def score(self, grounder: Any, *, swap_images: bool = False) -> dict[str, Any]:
        """:meth:`score_answers` of ``grounder``'s :meth:`answers`."""
        t0 = time.perf_counter()
        answers = self.answers(grounder)
        return self.score_answers(answers, swap_images=swap_images, seconds=time.perf_counter() - t0)

    def score_answers(self, answers: list[dict[str, list[Any]]], *, swap_images: bool = False,
                      seconds: float = 0.0) -> dict[str, Any]:
        """Box mIoU of :meth:`answers` on the probe, per structure and overall, beside the image-blind prior.

        ``swap_images``: the image-use control. The answer to a question about probe image i is taken from image
        i+1 (the next probe image, cyclically; the same question asked there), its box scaled from that image's
        pixel frame to image i's and scored against image i's truth. A grounder that answers from the layout
        alone scores the same either way; one that reads the image loses what the image told it (the prior,
        image-blind by construction, is unchanged). Both come from one set of answers: no image is asked twice.
        Needs >= 2 probe images. The record has ``"images": "swapped"`` or ``"own"``; ``seconds``: what the
        answers took, passed through."""
        from medvlm.coords import resized_frame
        from medvlm.types import Box

        n = len(self.samples)
        if swap_images and n < 2:
            raise ValueError(f"swap_images needs at least 2 probe images, got {n}")
        ious: dict[str, list[float]] = {name: [] for name in PROBE_STRUCTURES}
        prior: dict[str, list[float]] = {name: [] for name in PROBE_STRUCTURES}
        boxed: list[bool] = []
        for i, (sample, truth) in enumerate(zip(self.samples, self.truth)):
            j = (i + 1) % n if swap_images else i
            h, w = sample.image.shape
            to_own = resized_frame(*self.samples[j].image.shape, h, w)  # pixels of image j -> of image i
            for name in (name for name in PROBE_STRUCTURES if name in truth):
                boxes = [Box.from_list(to_own.forward_box(b).tolist()) for b in answers[j].get(name, [])]
                ious[name].append(max((b.iou(truth[name]) for b in boxes), default=0.0))
                boxed.append(bool(boxes))
                if name in self.prior:
                    rel = self.prior[name] * [w, h, w, h]
                    prior[name].append(Box(*(float(v) for v in rel)).iou(truth[name]))
        per = {name: float(np.mean(v)) for name, v in ious.items() if v}
        per_prior = {name: float(np.mean(v)) for name, v in prior.items() if v}
        return {"miou": float(np.mean([x for v in ious.values() for x in v])), "per_target": per,
                "prior_miou": float(np.mean([x for v in prior.values() for x in v])), "prior_per_target": per_prior,
                "answered": float(np.mean(boxed)) if boxed else 0.0, "images": "swapped" if swap_images else "own",
                "n_images": n, "seconds": round(seconds, 1)}

    def record(self, model: Any, stage: str, step: int) -> dict[str, Any]:
        """:meth:`measure` appended to the log as ``{"stage", "step", ...}``."""
        if self.path is None:
            raise ValueError("HeldoutProbe.record needs the probe built with a log path")
        out = {"stage": stage, "step": step, **self.measure(model)}
        with self.path.open("a") as fh:
            fh.write(json.dumps(out) + "\n")
        log.info("probe %s step %d: mIoU %.3f (prior %.3f)", stage, step, out["miou"], out["prior_miou"])
        return out

    def callback(self, stage: str) -> Any:
        """A transformers ``TrainerCallback`` that records at the first step of a fresh stage and every
        ``every`` optimizer steps."""
        from transformers import TrainerCallback

        probe = self

        class _Probe(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
                if state.global_step == 0 and model is not None:
                    probe.record(model, stage, 0)

            def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
                if model is not None and state.global_step % probe.every == 0:
                    probe.record(model, stage, state.global_step)

        return _Probe()


def format_probe_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :class:`HeldoutProbe` records (``{"stage"|"adapter", "step", "miou", "per_target",
    "prior_miou"}``), one row each, the prior's row last."""
    if not rows:
        return "(no probe records)"
    head = "| run | step | box mIoU | " + " | ".join(PROBE_STRUCTURES) + " |"
    lines = [head, "|" + "---|" * (3 + len(PROBE_STRUCTURES))]
    for r in rows:
        per = r.get("per_target", {})
        cells = [f"{per[n]:.3f}" if n in per else "-" for n in PROBE_STRUCTURES]
        lines.append(f"| {r.get('adapter') or r.get('stage', '')} | {r.get('step', '-')} | {r['miou']:.3f} | "
                     + " | ".join(cells) + " |")
    last = rows[-1]
    prior = [f"{last['prior_per_target'][n]:.3f}" if n in last.get("prior_per_target", {}) else "-"
             for n in PROBE_STRUCTURES]
    lines.append(f"| image-blind prior (mean train box) | - | {last['prior_miou']:.3f} | " + " | ".join(prior) + " |")
    return "\n".join(lines)


def probe_adapters(adapters: list[str], *, n_images: int = 10, data_root: str | None = None,
                   swap_images: bool = False) -> list[dict[str, Any]]:
    """:meth:`HeldoutProbe.measure` of each medvlm-mini adapter folder (the shipped ``agents/weights/mini``, a
    run's ``adapter`` or one of its checkpoints), merged into the ``medvlm build-mini`` base, on the same probe
    images; records with ``adapter``. ``swap_images``: a second record per adapter with the image-use control
    (:meth:`HeldoutProbe.score_answers`, from the same answers), labelled ``ADAPTER (images swapped)``."""
    from agents.mini import load_mini

    out = []
    probe = None
    for adapter in adapters:
        processor, model = load_mini(adapter)
        if probe is None:  # the probe images and the prior are read once for every adapter
            probe = HeldoutProbe(processor, None, 0, n_images=n_images, data_root=data_root)
        answers, seconds = probe.model_answers(model, processor)  # the control reuses them: no image asked twice
        out.append({"adapter": adapter, **probe.score_answers(answers, seconds=seconds)})
        if swap_images:
            out.append({"adapter": f"{adapter} (images swapped)",
                        **probe.score_answers(answers, swap_images=True, seconds=seconds)})
    return out


def load_finetuned(adapter_dir: str | Path, *, base_model: str | None = None) -> tuple[Any, Any]:
    """(processor, PeftModel) of a recipe's ``adapter`` folder: the base (from ``medvlm_mllm.json`` unless given)
    with the added tokens restored, then the adapter loaded strictly."""
    from peft import PeftModel

    folder = Path(adapter_dir)
    meta_path = folder / META_FILE
    if not meta_path.exists():
        raise input_error("fine-tuned adapter", expected=f"a folder written by `medvlm train mllm` (with {META_FILE})",
                          received=str(folder), fix="pass RUN_DIR/adapter of a finished run")
    meta = json.loads(meta_path.read_text())
    processor, model = _load_base(base_model or meta["base_model"])
    if meta.get("added_tokens"):
        _add_tokens(processor, model)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder))  # the adapter's copy has the added tokens
    rows = model.get_input_embeddings().weight.shape[0]
    if len(processor.tokenizer) != rows:
        raise input_error("fine-tuned adapter", expected="a tokenizer as large as the model's embedding",
                          received=f"{len(processor.tokenizer)} tokens vs {rows} rows",
                          fix="load it with the base model it was trained from")
    return processor, PeftModel.from_pretrained(model, str(folder), is_trainable=False)


def export_merged(adapter_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None) -> Path:
    """Merge LoRA (and new token rows) into the base and save a standalone model + processor to ``out_dir``,
    servable by vLLM (``medvlm serve-llm --model OUT_DIR``) or transformers."""
    processor, model = load_finetuned(adapter_dir, base_model=base_model)
    merged = model.merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out
