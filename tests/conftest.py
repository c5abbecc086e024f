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


# ------------------------------------------------------------------------- medvlm-mini (test_mini*.py share one build)

@pytest.fixture(scope="session")
def mini_parts() -> dict[str, Path]:
    for module in ("torch", "transformers", "gguf", "onnx", "onnxruntime"):
        pytest.importorskip(module)
    from finetune.mini import default_parts_dir, fetch_parts
    from medvlm.errors import MedvlmError

    try:
        # tests never use the network: `make mini` (part of `make test`) fetched the parts at install time
        return fetch_parts(download=False)
    except (MedvlmError, OSError) as exc:
        pytest.skip(f"medvlm-mini parts are not in {default_parts_dir()}: {exc}")


@pytest.fixture(scope="session")
def mini_base(mini_parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.mini import assemble_mini

    # laid out as $MEDVLM_HOME/mini/model, so a CLI run with MEDVLM_HOME=<its home> finds it as the default
    return assemble_mini(tmp_path_factory.mktemp("home") / "mini" / "model", parts_dir=mini_parts["llm"].parent)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """One tiny random Med-VLM checkpoint with an existence head, built once per run; tests copy it. Returns
    (folder, image-encoder channels)."""
    import torch

    from segmentation.textseg.checkpoint import save_medvlm
    from segmentation.textseg.config import MedVLMConfig, tiny_test_config
    from segmentation.textseg.model import build_medvlm

    torch.manual_seed(0)
    cfg = MedVLMConfig.from_json({**tiny_test_config().to_json(), "existence_head": True})
    model = build_medvlm(cfg).eval()
    return save_medvlm(model, tmp_path_factory.mktemp("tiny") / "ckpt"), int(model.image_encoder.out_channels)
