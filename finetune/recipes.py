"""What the recipes over a Med-VLM checkpoint and data folders share (``finetune.kind_classifier``,
``finetune.postprocess``): the sample of ids and the common command-line options."""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

__all__ = ["checkpoint_recipe_parser", "pick_ids"]


def pick_ids(ids: Sequence[str], n: int, seed: int) -> list[str]:
    """Up to ``n`` of ``ids``: all of them when there are no more, else a seeded random sample."""
    ids = list(ids)
    return ids if len(ids) <= n else random.Random(seed).sample(ids, n)


def checkpoint_recipe_parser(doc: str | None, *, per_folder: int, per_folder_help: str) -> argparse.ArgumentParser:
    """A parser with ``--checkpoint`` (required), ``--folders``, ``--per-folder``, ``--out`` and ``--seed``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="Med-VLM checkpoint folder or packaged name (multi)")
    ap.add_argument("--folders", nargs="*", default=None, help="dataset names or paths (default: its sources)")
    ap.add_argument("--per-folder", type=int, default=per_folder, help=per_folder_help)
    ap.add_argument("--out", default=None, help="folder to write into (default: the checkpoint folder)")
    ap.add_argument("--seed", type=int, default=0)
    return ap
