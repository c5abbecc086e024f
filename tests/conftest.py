"""Shared fixtures: where the real data lives, and skips with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub (CI has no network); set before huggingface_hub reads it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import medvlm  # noqa: F401  (installs the torchvision CPU fallback before any test imports it)

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("MEDVLM_DATA", REPO.parent / "shared" / "data"))


def data_dir(name: str) -> Path:
    """Path of ``../shared/data/<name>``; skips the calling test when it is absent."""
    path = DATA_ROOT / name
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set MEDVLM_DATA or place shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA_ROOT.is_dir():
        pytest.skip(f"real data root {DATA_ROOT} is absent (set MEDVLM_DATA or place shared/data beside the repo)")
    return DATA_ROOT
