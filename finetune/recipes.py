"""Training recipes behind ``medvlm train``: thin wrappers over library code.

``medvlm train medvlm finetune/configs/medvlm_default.yaml`` reproduces the shipped Med-VLM checkpoint
(then copy ``runs/medvlm_default/best`` to ``segmentation/textseg/weights/default``).
"""

from __future__ import annotations

import argparse
import json


def run_train(args: argparse.Namespace) -> int:
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
