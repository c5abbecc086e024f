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
``save_steps`` in ``out_dir/checkpoints``; a rerun resumes from the newest. With ``align_steps`` > 0 an alignment
stage runs first (``out_dir/align``): only the new token rows and ``modules_to_save`` train, at ``align_lr``, with
the LoRA frozen at zero; the LoRA stage then starts from its weights. The result ``out_dir/adapter`` is a PEFT
adapter (``adapter_config.json`` + ``adapter_model.safetensors``), the processor with its added tokens, and
``medvlm_mllm.json`` (base model, added tokens, answer format). vLLM serves LoRA weights only, not new token rows:
an adapter trained without new tokens is served as ``--lora NAME=out_dir/adapter``; one with new tokens is merged
first (:func:`export_merged`) and the merged folder is served as the model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from finetune.mllm_data import MLLMDataSource, build_examples
from medvlm.errors import input_error
from medvlm.tokens import LOC_BINS

__all__ = ["LANGUAGE_MODEL_LORA_TARGETS", "MLLMTrainConfig", "export_merged", "load_finetuned",
           "load_mllm_config", "location_loss", "prepare_model", "train_mllm"]

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
        if not self.lr > 0 or not 0 <= self.lora_dropout < 1:
            raise input_error("mllm train config", expected="lr > 0 and 0 <= lora_dropout < 1",
                              received=f"lr={self.lr}, lora_dropout={self.lora_dropout}", fix="e.g. lr: 2e-4")
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
    """A datasets.Dataset of prompt/completion/images whose images decode lazily from their PNG paths."""
    import datasets

    rows = [{"prompt": e["prompt"], "completion": e["completion"], "images": e["images"]} for e in examples]
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


def _full_logits_trainer(loc_ids: list[int] | None = None, sigma: float = 0.0) -> Any:
    from transformers import Trainer
    from trl import SFTTrainer

    class FullLogitsSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is the model's own (full logits). TRL's fused LM head multiplies by
        ``lm_head.weight`` directly, which skips peft's trainable new-token rows of ``lm_head``. With
        ``sigma`` > 0 the location tokens are scored by :func:`location_loss`."""

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if not loc_ids or sigma <= 0:
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            import torch

            labels = inputs.pop("labels")
            outputs = model(**inputs)
            total, count = location_loss(outputs.logits, labels, torch.as_tensor(loc_ids, device=labels.device),
                                         sigma)
            denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
            loss = total / denominator.to(total.device) if hasattr(denominator, "to") else total / denominator
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
    loc_ids = new_ids[:LOC_BINS] if cfg.loc_sigma > 0 else None  # mask_tokens(): the bins first, in order
    trainer_cls = _full_logits_trainer(loc_ids, cfg.loc_sigma) if new_ids else SFTTrainer
    dataset = _hf_dataset(examples)
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    aligned = None
    if cfg.align_steps and not (resume and checkpoints):  # a LoRA-stage checkpoint already holds every weight
        aligned = _align(cfg, model, processor, trainer_cls, dataset, out / "align", resume=resume)
    args = _sft_args(cfg, out / "checkpoints", cfg.steps, cfg.lr, cfg.warmup_steps, keep=2)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=processor)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if resume and checkpoints else None)
    wall = time.perf_counter() - start
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


def _align(cfg: MLLMTrainConfig, model: Any, processor: Any, trainer_cls: Any, dataset: Any, folder: Path, *,
           resume: bool) -> dict[str, Any]:
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
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=processor)
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
                     use_cpu=_use_bf16(cfg) and not torch.cuda.is_available())  # bf16 on CPU: autocast


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
