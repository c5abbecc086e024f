"""Markdown reports for the segmentation suites: a table, a per-structure plot and the worst cases as overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.suites import WorstCase, format_table
from medvlm.io import save_png
from medvlm.types import Box, Mask, Region
from medvlm.viz import draw_overlay


def plot_per_structure(payload: dict[str, Any], path: Path) -> None:
    """Bar chart of Dice per structure with HD95 (mm) on a second axis, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(payload["per_structure"])
    dice = [payload["per_structure"][n]["dice"] for n in names]
    hd95 = [payload["per_structure"][n]["hd95_mm"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names)), 3.6), dpi=110)
    ax.bar(x - 0.2, dice, width=0.4, color="#0072B2", label="Dice")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax2 = ax.twinx()
    ax2.bar(x + 0.2, hd95, width=0.4, color="#E69F00", label="HD95 (mm)")
    ax2.set_ylabel("HD95 (mm)")
    for xi, d in zip(x, dice):
        ax.text(xi - 0.2, d + 0.01, f"{d:.2f}", ha="center", fontsize=8)
    ax.set_title(f"{payload['suite']} — {payload['method']} ({payload['n_images']} images)")
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_segmentation_report(payload: dict[str, Any], worst: Sequence[WorstCase], out_dir: str | Path,
                              *, data: str | Path) -> Path:
    """Write ``out_dir/report.md`` with the table, ``per_structure.png`` and one overlay per worst case.

    Worst-case overlays show the ground truth (region 1) and the prediction (region 2) on the original image.
    Returns the path of the markdown file.
    """
    from medvlm.datasets import open_dataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_per_structure(payload, out / "per_structure.png")
    dataset = open_dataset(data)
    lines = [f"# {payload['suite']}: {payload['method']}", "", "```", format_table(payload), "```", "",
             "![per structure](per_structure.png)", "", "## Worst cases", "",
             "Overlay: 1 = ground truth, 2 = prediction (box = the prompt's box when there is one).", ""]
    for case in worst:
        image = dataset.load(case.sample_id).image
        regions = [Region.from_mask(Mask(case.gt), label="truth")]
        if case.pred.any():
            regions.append(Region.from_mask(Mask(case.pred), label="prediction", score=case.dice))
        elif case.box:
            regions.append(Region(box=Box.from_list(case.box), label="prompt (empty prediction)"))
        name = f"worst_{case.structure.replace(' ', '_')}_{case.sample_id}.png"
        save_png(draw_overlay(image.to_rgb_uint8(), regions, title=f"{case.structure} {case.sample_id}"),
                 out / name)
        lines += [f"- {case.structure}, {case.sample_id}: Dice {case.dice:.3f}", "", f"  ![{name}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
