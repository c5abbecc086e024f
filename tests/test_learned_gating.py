"""Learned anatomy gating: the prior-mass loss, the finding priors built from anatomy masks, and a training run
with the option on (tiny random model, real JSRT masks)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.textseg_prior import chest_anatomy, prior_for_phrase, sample_finding_prior
from medvlm.errors import InputError
from segmentation.textseg.losses import prior_mass_loss
from tests.conftest import data_dir


def _chest_masks(size: int = 128) -> dict[str, np.ndarray]:
    """A synthetic frontal film: lungs in the left/right thirds of the image, heart low in the middle. Patient's
    right lung at small x."""
    m = {k: np.zeros((size, size), dtype=bool) for k in ("right lung", "left lung", "heart")}
    m["right lung"][16:112, 8:56] = True
    m["left lung"][16:112, 72:120] = True
    m["heart"][72:108, 44:90] = True
    return m


def test_prior_mass_loss_known_values() -> None:
    prior = torch.zeros(1, 1, 4, 4)
    prior[..., :2, :] = 1.0  # top half allowed
    flat = torch.zeros(1, 1, 4, 4)
    assert prior_mass_loss(flat, prior).item() == pytest.approx(0.5, abs=1e-6)
    inside = torch.full((1, 1, 4, 4), -20.0)
    inside[..., 0, 0] = 20.0
    assert prior_mass_loss(inside, prior).item() < 1e-6
    outside = torch.full((1, 1, 4, 4), -20.0)
    outside[..., 3, 3] = 20.0
    assert prior_mass_loss(outside, prior).item() == pytest.approx(1.0, abs=1e-6)
    # scale-blind: a map switched off everywhere keeps its share outside
    assert prior_mass_loss(flat - 30.0, prior).item() == pytest.approx(0.5, abs=1e-6)
    # soft priors count fractionally; mean over the batch
    soft = torch.full((2, 1, 4, 4), 0.25)
    assert prior_mass_loss(torch.zeros(2, 1, 4, 4), soft).item() == pytest.approx(0.75, abs=1e-6)


def test_prior_mass_loss_gradient_moves_mass_into_the_prior() -> None:
    prior = torch.zeros(1, 1, 8, 8)
    prior[..., :, :4] = 1.0
    logits = torch.zeros(1, 1, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(prior_mass_loss(logits, prior), logits)
    assert (grad[..., :, :4] < 0).all() and (grad[..., :, 4:] > 0).all()


def test_finding_priors_follow_the_findings_regions() -> None:
    masks = _chest_masks()
    anatomy = chest_anatomy(masks)
    assert anatomy is not None
    cardio = prior_for_phrase(anatomy, "cardiomegaly")
    assert cardio is not None and cardio.shape == (128, 128) and cardio.dtype == np.float32
    assert cardio[90, 67] == pytest.approx(1.0) and cardio[20, 20] < 1e-3  # heart vs right apex
    right = prior_for_phrase(anatomy, "right pleural effusion")
    assert right is not None
    assert right[105, 20] == pytest.approx(1.0)  # right lower zone
    assert right[105, 100] < 1e-3 and right[20, 30] < 0.05  # not the left side, not the right apex
    ptx = prior_for_phrase(anatomy, "pneumothorax")
    assert ptx is not None and ptx[20, 30] == pytest.approx(1.0) and ptx[20, 100] == pytest.approx(1.0)
    assert ptx[110, 30] < 1e-3
    assert prior_for_phrase(anatomy, "heart") is None  # an anatomy name is no finding
    # lungs without a heart mask: cardiomegaly cannot be placed, lung findings can
    lungs_only = chest_anatomy({k: v for k, v in masks.items() if k != "heart"})
    assert prior_for_phrase(lungs_only, "cardiomegaly") is None
    assert prior_for_phrase(lungs_only, "nodule") is not None


def test_sample_finding_prior_only_on_chest_films() -> None:
    rng = random.Random(0)
    drawn = [sample_finding_prior(_chest_masks(), rng) for _ in range(20)]
    assert all(d is not None for d in drawn)
    assert len({d[0] for d in drawn if d is not None}) >= 10  # phrases vary
    for d in drawn:
        assert d is not None and float(d[1].min()) >= 0.0 and float(d[1].max()) == 1.0
    small = {k: np.zeros_like(v) for k, v in _chest_masks().items()}
    small["right lung"][60:70, 20:30] = True  # a CT-sized lung: not a film
    small["left lung"][60:70, 90:100] = True
    assert sample_finding_prior(small, rng) is None
    assert sample_finding_prior({"liver": np.ones((32, 32), dtype=bool)}, rng) is None


@pytest.mark.data
def test_training_with_learned_gating_runs_resumes_and_reports(tmp_path: Path) -> None:
    """Tiny random model on 3 JSRT images: the prior rows are built, the loss is finite, a checkpoint is written
    and a second call resumes at the last step; init_from copies a checkpoint's weights."""
    from finetune.textseg_train import DataSource, TrainConfig, sample_batch, train_medvlm
    from segmentation.textseg.checkpoint import load_medvlm
    from segmentation.textseg.config import tiny_test_config

    folder = data_dir("cxr_jsrt_scr")
    cfg = TrainConfig(model=tiny_test_config().to_json(), data=[DataSource(str(folder), 1, 1.0, limit=4)],
                      out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), steps=3, batch_images=2,
                      texts_per_image=2, warmup_steps=1, eval_every=3, checkpoint_every=3, val_fraction=0.25,
                      prior_weight=1.0, prior_texts_per_image=2)
    summary = train_medvlm(cfg, progress=False)
    assert summary["steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and np.isfinite(log[-1]["loss_ema"])
    cfg.steps = 4  # a second call resumes from last/ at step 3 and runs one more step
    train_medvlm(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 4]
    assert torch.load(tmp_path / "run" / "last" / "trainer_state.pt", weights_only=False)["step"] == 4

    from finetune.textseg_cache import FeatureCache
    from segmentation.textseg.model import build_medvlm

    model = build_medvlm(tiny_test_config())
    cache = FeatureCache(tmp_path / "cache", model.image_encoder)
    entries = [e for e in cache.entries if e.structures]
    weights = np.full(len(entries), 1.0 / len(entries))
    batch = sample_batch(entries, weights, cache, cfg, random.Random(0), np.random.default_rng(0))
    rows, texts, targets, is_prior = batch.rows, batch.texts, batch.targets, batch.is_prior
    assert int(is_prior.sum()) == 4 and int((~is_prior).sum()) == 4  # 2 images x (2 structures + 2 findings)
    assert len(rows) == len(texts) == targets.shape[0] == 8
    soft = targets[is_prior]
    assert float(soft.min()) >= 0.0 and float(soft.max()) == 1.0 and bool(((soft > 0) & (soft < 1)).any())
    assert set(torch.unique(targets[~is_prior]).tolist()) <= {0.0, 1.0}

    # fine-tuning from that checkpoint starts from its weights
    cfg2 = TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "run2"), "steps": 1,
                          "init_from": str(tmp_path / "run" / "last"), "lr": 0.0})
    train_medvlm(cfg2, progress=False)
    first, _ = load_medvlm(tmp_path / "run" / "last")
    second, _ = load_medvlm(tmp_path / "run2" / "last")
    a, b = first.trainable_state_dict(), second.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: weights carried over unchanged


def test_init_from_must_be_a_checkpoint(tmp_path: Path) -> None:
    from finetune.textseg_train import TrainConfig

    with pytest.raises(InputError, match="init_from"):
        TrainConfig(init_from=str(tmp_path)).validate()
    with pytest.raises(InputError, match="prior_weight"):
        TrainConfig(prior_weight=-1.0).validate()
