"""Training recipes behind ``medvlm train`` and ``medvlm export``: thin wrappers over library code.

``medvlm train medvlm finetune/configs/medvlm_default.yaml`` reproduces the shipped Med-VLM checkpoint
(then copy ``runs/medvlm_default/best`` to ``segmentation/textseg/weights/default``).

``medvlm train mllm finetune/configs/mllm_qwen25vl.yaml`` LoRA-fine-tunes Qwen2.5-VL-3B-Instruct on the grounding
tasks (a GPU job); ``medvlm export mllm runs/mllm_qwen25vl/adapter runs/mllm_qwen25vl/merged`` merges it for vLLM.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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
        return run_export_mini(args)

    out = export_merged(args.adapter, args.out, base_model=args.base_model)
    print(f"merged model written to {out}; serve it with: medvlm serve-llm --model {out}")
    return 0


def run_build_mini(args: argparse.Namespace) -> int:
    """``medvlm build-mini [--out DIR] [--force] [--seed N] [--parts DIR]``."""
    import time

    from agents.mini import BUILD_VERSION, base_build, default_model_dir
    from finetune.mini import assemble_mini

    start = time.perf_counter()
    target = Path(args.out) if args.out else default_model_dir()
    kept = base_build(target) == BUILD_VERSION and not args.force
    out = assemble_mini(target, seed=args.seed, parts_dir=args.parts, force=args.force)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    what = "kept the existing build (--force rebuilds)" if kept else f"built in {time.perf_counter() - start:.0f} s"
    print(f"medvlm-mini in {out} ({size / 2**20:.0f} MiB, {what}); serve it with: medvlm serve-llm --model {out}")
    return 0


def run_export_mini(args: argparse.Namespace) -> int:
    """``medvlm export mini ADAPTER [--out DIR]``."""
    from finetune.mini import pack_adapter

    out = pack_adapter(args.adapter, args.out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"medvlm-mini adapter packed in {out} ({size / 2**20:.1f} MiB); use it with: medvlm ask IMAGE QUESTION "
          f"--grounder mini")
    return 0
