"""Med-VLM checkpoints: ``model.safetensors`` (only the trained weights) + ``config.json`` (what builds the model).

The frozen bases (image and text encoders) are named in the config by preset or path and rebuilt from there,
which keeps a checkpoint a few MB. Loading is strict: a missing or unexpected key is an error that lists them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvlm.errors import InputError, input_error
from segmentation.textseg.config import MedVLMConfig

if TYPE_CHECKING:  # torch is imported by what builds or saves a model; the names and the config reader need none
    from segmentation.textseg.model import MedVLM

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_medvlm", "read_checkpoint_config", "save_medvlm"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_medvlm(model: MedVLM, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/config.json`` (atomically); returns the directory.

    ``meta`` (JSON-serialisable: training data, command, seed, metrics) is stored in config.json under "meta".
    """
    from safetensors.torch import save

    from medvlm.io import atomic_open

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = model.trainable_state_dict()
    with atomic_open(out / WEIGHTS_NAME, "wb") as fh:
        fh.write(save(tensors, metadata={"format": "pt", "model": "medvlm-textseg"}))
    payload = {"model_type": "medvlm-textseg", "config": model.config.to_json(), "meta": meta or {}}
    with atomic_open(out / CONFIG_NAME, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    return out


def read_checkpoint_config(directory: str | Path) -> tuple[MedVLMConfig, dict[str, Any]]:
    """``(config, meta)`` of a checkpoint folder, without loading any weights."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise input_error("Med-VLM checkpoint", expected=f"a folder with {CONFIG_NAME} and {WEIGHTS_NAME}",
                          received=f"{directory} (no {CONFIG_NAME})",
                          fix="pass the folder written by `medvlm train medvlm` (or leave it unset for the default)")
    try:
        payload = json.loads(path.read_text())
        config = MedVLMConfig.from_json(payload["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise input_error("Med-VLM checkpoint config", expected="the JSON written by save_medvlm",
                          received=f"{path}: {exc}", fix="re-save the checkpoint with save_medvlm") from exc
    return config, dict(payload.get("meta", {}))


def load_medvlm(directory: str | Path, device: str = "cpu",
                overrides: dict[str, Any] | None = None) -> tuple[MedVLM, dict[str, Any]]:
    """Build the model from ``directory/config.json`` and load its trained weights strictly.

    ``overrides`` replace config fields before building, e.g. ``{"text_encoder": {"path": "/models/biobert"}}``
    when the base lives somewhere else on this machine. Returns ``(model in eval mode, meta)``.
    """
    from safetensors.torch import load_file

    config, meta = read_checkpoint_config(directory)
    if overrides:
        data = config.to_json()
        for part, values in overrides.items():
            data[part] = {**data[part], **values}
        config = MedVLMConfig.from_json(data)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise input_error("Med-VLM checkpoint", expected=f"{WEIGHTS_NAME} next to {CONFIG_NAME}",
                          received=f"{directory} (no {WEIGHTS_NAME})", fix="copy the whole checkpoint folder")
    import torch

    from segmentation.textseg.model import build_medvlm

    model = build_medvlm(config)
    state = load_file(str(weights))
    expected = set(model.trainable_state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise InputError(
            f"Med-VLM checkpoint {directory} does not match its config: {len(missing)} missing keys "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Expected the trainable weights of the "
            "model that config.json builds. Fix: save and load with the same medvlm version, or retrain."
        )
    own = model.state_dict()
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise InputError(f"Med-VLM checkpoint {directory}: {key} has shape {tuple(value.shape)}, the model "
                             f"expects {tuple(own[key].shape)}. Fix: the config and weights come from different "
                             "runs; copy both files of one checkpoint.")
    model.load_state_dict(state, strict=False)
    model.to(torch.device(device))
    model.eval()
    return model, meta
