"""Ablations of Med-VLM like the paper's tables 2 (text descriptions) and 4 (adapters), at a reduced budget.

``medvlm eval text-seg --ablation descriptions|adapters --config CONFIG.yaml [--ablation-steps N]`` trains one
variant per row from the same config, seed, data and feature cache, for N steps each (default 300, documented
in the table header), and scores every variant on the JSRT/SCR val split in the 256 x 256 letterbox frame
(Dice, and HD95/ASD in mm with the spacing scaled to that frame). The budget is far below the shipped model's,
so compare rows with each other, not with the shipped model's numbers.

- descriptions: the text is always empty (``none``), the structure's name or a synonym (``simple``), or the
  authoritative description (``complex``); trained and evaluated at that level.
- adapters: LoRA in neither encoder, text only, image only, both (rank from the config; 0 = none).
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from finetune.textseg_train import JSRT, TrainConfig, cached_predictions, train_medvlm

__all__ = ["ABLATIONS", "format_ablation", "run_ablation"]

ABLATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "descriptions": [
        ("none (empty text)", {"level_weights": {"none": 1.0}}),
        ("simple (name or synonym)", {"level_weights": {"simple": 1.0}}),
        ("complex (description)", {"level_weights": {"complex": 1.0}}),
    ],
    "adapters": [
        ("no adapters", {"image_lora": 0, "text_lora": 0}),
        ("text LoRA only", {"image_lora": 0}),
        ("image LoRA only", {"text_lora": 0}),
        ("both (paper)", {}),
    ],
}


def _variant(base: TrainConfig, name: str, change: dict[str, Any], steps: int, out_dir: Path) -> TrainConfig:
    cfg = replace(base, model=copy.deepcopy(base.model), steps=steps, out_dir=str(out_dir / name.split()[0]),
                  eval_every=steps, checkpoint_every=steps, warmup_steps=min(base.warmup_steps, steps // 5))
    if "level_weights" in change:
        cfg.level_weights = dict(change["level_weights"])
    for key, part in (("image_lora", "image_encoder"), ("text_lora", "text_encoder")):
        if key in change:
            cfg.model.setdefault(part, {})["lora_rank"] = int(change[key])
    return cfg


def score_variant(run_dir: Path, level: str, cache_dir: Path) -> dict[str, Any]:
    """Dice / HD95 / ASD per structure of ``run_dir/best`` on the cached val images, in the 256 frame."""
    from eval.metrics import SegmentationAccumulator
    from finetune.textseg_cache import FeatureCache
    from medvlm.datasets import open_dataset
    from segmentation.textseg.checkpoint import load_medvlm

    model, _ = load_medvlm(run_dir / "best")
    cache = FeatureCache(cache_dir / "val", model.image_encoder)
    ds = open_dataset(JSRT)
    acc = SegmentationAccumulator()
    for e, names, logits in cached_predictions(model, cache, cache.entries, level):
        image = ds.load(e.sample_id).image
        # one pixel of the 256 letterbox frame covers (longer side / 256) original pixels
        scale = max(image.shape[:2]) / 256.0
        row_mm, col_mm = image.spacing_mm or (1.0, 1.0)
        for i, n in enumerate(names):
            acc.update(n, (logits[i, 0] > 0).numpy(), cache.masks[e.key][n].numpy(),
                       spacing_mm=(row_mm * scale, col_mm * scale))
    return acc.compute()


def run_ablation(kind: str, base: TrainConfig, steps: int, out_dir: str | Path) -> dict[str, Any]:
    """Train and score every variant of ``kind``; returns {"ablation", "steps", "rows": [{name, ..., scores}]}."""
    if kind not in ABLATIONS:
        from medvlm.errors import input_error

        raise input_error("--ablation", expected=" or ".join(ABLATIONS), received=repr(kind),
                          fix="use --ablation descriptions or --ablation adapters")
    root = Path(out_dir) / kind
    rows = []
    for name, change in ABLATIONS[kind]:
        cfg = _variant(base, name, change, steps, root)
        t0 = time.time()
        train_medvlm(cfg, progress=False)
        level = next(iter(cfg.level_weights)) if kind == "descriptions" else "complex"
        scores = score_variant(Path(cfg.out_dir), level, Path(cfg.cache_dir))
        rows.append({"name": name, "level": level, "seconds": round(time.time() - t0, 1),
                     "image_lora_rank": cfg.model.get("image_encoder", {}).get("lora_rank", 8),
                     "text_lora_rank": cfg.model.get("text_encoder", {}).get("lora_rank", 8), **scores})
    return {"suite": f"text-seg ablation {kind}", "steps": steps, "frame": "256x256 letterbox", "rows": rows}


def format_ablation(result: dict[str, Any]) -> str:
    structures = sorted({s for r in result["rows"] for s in r["per_structure"]})
    head = f"{'variant':<26} " + " ".join(f"{s[:14]:>14}" for s in structures) + f" {'mean Dice':>10} " \
           f"{'HD95 mm':>8} {'ASD mm':>7}"
    lines = [f"{result['suite']} | {result['steps']} steps per variant | val split, {result['frame']} | Dice per "
             "structure", head, "-" * len(head)]
    for r in result["rows"]:
        cells = " ".join(f"{r['per_structure'].get(s, {}).get('dice', float('nan')):>14.3f}" for s in structures)
        m = r["mean"]
        lines.append(f"{r['name']:<26} {cells} {m['dice']:>10.3f} {m['hd95_mm']:>8.2f} {m['asd_mm']:>7.2f}")
    return "\n".join(lines)
