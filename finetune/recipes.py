"""Training recipes behind ``medvlm train`` and ``medvlm export``: thin wrappers over library code.

``medvlm train medvlm finetune/configs/medvlm_default.yaml`` reproduces the shipped Med-VLM checkpoint
(then copy ``runs/medvlm_default/best`` to ``segmentation/textseg/weights/default``).

``medvlm train mllm finetune/configs/mllm_qwen25vl.yaml`` LoRA-fine-tunes Qwen2.5-VL-3B-Instruct on the grounding
tasks (a GPU job); ``medvlm export mllm runs/mllm_qwen25vl/adapter runs/mllm_qwen25vl/merged`` merges it for vLLM.
"""

from __future__ import annotations

import argparse
import json


def run_train(args: argparse.Namespace) -> int:
    if args.model == "mllm":
        return run_train_mllm(args)
    from finetune.textseg_train import load_train_config, train_medvlm

    if args.model != "medvlm":  # argparse only offers known models; kept for direct calls
        raise ValueError(f"unknown model {args.model!r}")
    cfg = load_train_config(args.config)
    for key in ("steps", "out_dir", "cache_dir"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key, value)
    cfg.validate()
    summary = train_medvlm(cfg, resume=not args.no_resume)
    print(json.dumps(summary, indent=2))
    print(f"checkpoints: {cfg.out_dir}/best (best val Dice) and {cfg.out_dir}/last (resume)")
    return 0


def run_train_mllm(args: argparse.Namespace) -> int:
    from finetune.mllm_train import load_mllm_config, train_mllm

    cfg = load_mllm_config(args.config)
    for key in ("steps", "out_dir", "base_model"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key, value)
    summary = train_mllm(cfg, resume=not args.no_resume)
    print(json.dumps(summary, indent=2))
    if summary["servable_as_lora"]:
        print(f"serve: medvlm serve-llm --model {cfg.base_model} --lora grounding={summary['adapter']}")
    else:
        print(f"merge (new tokens): medvlm export mllm {summary['adapter']} {cfg.out_dir}/merged, then "
              f"medvlm serve-llm --model {cfg.out_dir}/merged")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from finetune.mllm_train import export_merged

    if args.model == "mini":
        from finetune.mini import run_export_mini

        return run_export_mini(args)

    out = export_merged(args.adapter, args.out, base_model=args.base_model)
    print(f"merged model written to {out}; serve it with: medvlm serve-llm --model {out}")
    return 0
