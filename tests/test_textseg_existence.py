"""Med-VLM v2 plumbing: the existence head ("not in this image"), negatives from other kinds of image, thinning
of volume slices, and a tiny training run that learns with all of them and writes a loadable checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlm.datasets.kinds import kind_of, mismatched_structures
from medvlm.errors import InputError
from segmentation.textseg.config import MedVLMConfig, tiny_test_config
from tests.conftest import data_dir


def _tiny(existence: bool = True) -> MedVLMConfig:
    cfg = tiny_test_config()
    return MedVLMConfig.from_json({**cfg.to_json(), "existence_head": existence})


def test_existence_head_shapes_and_config_round_trip() -> None:
    from segmentation.textseg.model import build_medvlm

    torch.manual_seed(0)
    model = build_medvlm(_tiny()).eval()
    assert model.config.existence_head is True
    assert MedVLMConfig.from_json(model.config.to_json()).existence_head is True
    size = model.config.image_encoder.image_size
    feats = model.image_encoder(torch.rand(3, 3, size, size))
    ids, am = model.text_encoder.tokenize(["liver", "left lung", "polyp"], feats.device)
    logits, exist = model.forward_with_existence(feats, ids, am)
    assert logits.shape == (3, 1, size, size) and exist is not None and exist.shape == (3,)
    assert torch.equal(model.forward_encoded(feats, ids, am), logits)  # the old entry point is the same model
    assert "existence.mlp.fc1.weight" in model.trainable_state_dict()
    plain = build_medvlm(_tiny(existence=False))
    assert plain.existence is None and plain.forward_with_existence(feats, ids, am)[1] is None
    with pytest.raises(InputError, match="existence_head"):
        MedVLMConfig.from_json({**_tiny().to_json(), "existence_head": "yes"})


def test_mismatched_structures_by_kind() -> None:
    assert kind_of("mr_brats2015_slices") == "brain_mr" and kind_of("/x/y/cxr_jsrt_scr/") == "chest_xray"
    brain = mismatched_structures("mr_brats2015_slices")
    assert "liver" in brain and "polyp" in brain and "left lung" in brain
    assert "hippocampus" not in brain and "brain" not in brain  # the same kind of image
    cxr = mismatched_structures("cxr_jsrt_scr")
    # chest radiographs, body CT and cardiac MR share anatomy: none is a negative for another
    assert "liver" not in cxr and "left ventricle" not in cxr and "whole tumor" in cxr and "polyp" in cxr
    assert "brain" not in mismatched_structures("us_hc18_fetal_head")  # a fetal head holds a brain
    assert mismatched_structures("unknown_folder") == ()


def test_thin_per_case_keeps_every_kth_slice_of_each_case() -> None:
    from finetune.textseg_train import thin_per_case

    ids = [f"v{v}_z{k:03d}" for v in (1, 2) for k in range(7)]
    kept = thin_per_case(ids, 3, lambda i: i.split("_z")[0])
    assert kept == ["v1_z000", "v1_z003", "v1_z006", "v2_z000", "v2_z003", "v2_z006"]


@pytest.mark.data
def test_training_with_existence_and_foreign_negatives(tmp_path: Path) -> None:
    """Tiny random model on 4 JSRT images: foreign negatives (other kinds' structures, empty target) enter the
    batch, the existence BCE is part of the loss, the checkpoint keeps the head, and the predictor reports
    ``found`` / ``existence`` per prompt."""
    import random

    from finetune.textseg_cache import FeatureCache
    from finetune.textseg_train import DataSource, TrainConfig, mask_loss_rows, sample_batch, train_medvlm
    from medvlm.datasets import open_dataset
    from segmentation.base import Prompt
    from segmentation.textseg.model import build_medvlm
    from segmentation.textseg.predictor import MedVLMSegmenter

    folder = data_dir("cxr_jsrt_scr")
    cfg = TrainConfig(model=_tiny().to_json(), data=[DataSource(str(folder), 1, 1.0, limit=4)],
                      out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), steps=3, batch_images=2,
                      texts_per_image=3, warmup_steps=1, eval_every=3, checkpoint_every=3, val_fraction=0.25,
                      foreign_negative_prob=1.0, negatives_per_image=2, balance="source", hard_negatives=True)
    summary = train_medvlm(cfg, progress=False)
    assert summary["steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(log[-1]["loss_ema"])

    model = build_medvlm(_tiny())
    cache = FeatureCache(tmp_path / "cache", model.image_encoder)
    entries = [e for e in cache.entries if e.structures]
    weights = np.full(len(entries), 1.0 / len(entries))
    batch = sample_batch(entries, weights, cache, cfg, random.Random(0), np.random.default_rng(0))
    rows, texts, targets = batch.rows, batch.texts, batch.targets
    # 2 images x (1 structure + 2 foreign negatives); every negative has an empty target
    assert len(texts) == 6 and rows == [0, 0, 0, 1, 1, 1]
    empty = [float(t.sum()) == 0 for t in targets]
    assert sum(empty) >= 4
    assert sum(batch.negative) == 4 and all(empty[r] for r, neg in enumerate(batch.negative) if neg)
    # the mask loss covers every row, or only the positives when foreign negatives train the existence head alone
    assert mask_loss_rows(batch, cfg).tolist() == [True] * 6
    cfg.foreign_negative_mask_loss = False
    assert mask_loss_rows(batch, cfg).tolist() == [not n for n in batch.negative]
    assert all(batch.names[r] not in ("", "heart", "left lung", "right lung") for r, neg in enumerate(batch.negative)
               if neg)

    seg = MedVLMSegmenter(tmp_path / "run" / "last")
    assert seg.model.config.existence_head
    sample = open_dataset(folder).load(open_dataset(folder).ids()[0])
    results = seg.segment(sample.image, [Prompt(text="heart"), Prompt(text="polyp")])
    for r in results:
        assert isinstance(r.meta["found"], bool) and 0.0 <= r.meta["existence"] <= 1.0
        assert r.meta["found"] == bool(r.mask.data.any())


@pytest.mark.data
def test_train_modules_trains_the_existence_head_alone(tmp_path: Path) -> None:
    """``train_modules: [existence.]`` (run 7): two steps change only ``existence.*``; every other trained weight
    is saved unchanged; a prefix that matches nothing is refused."""
    from finetune.textseg_train import DataSource, TrainConfig, train_medvlm
    from segmentation.textseg.checkpoint import load_medvlm, save_medvlm
    from segmentation.textseg.model import build_medvlm

    torch.manual_seed(2)
    base = build_medvlm(_tiny())
    save_medvlm(base, tmp_path / "base")
    folder = data_dir("cxr_jsrt_scr")
    cfg = TrainConfig(model=_tiny().to_json(), data=[DataSource(str(folder), 1, 1.0, limit=3)],
                      out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), steps=2, batch_images=1,
                      texts_per_image=2, warmup_steps=1, eval_every=2, checkpoint_every=2, lr=1e-2,
                      init_from=str(tmp_path / "base"), train_modules=["existence."], negative_prob=0.5)
    train_medvlm(cfg, progress=False)
    tuned, _ = load_medvlm(tmp_path / "run" / "last")
    a, b = base.trainable_state_dict(), tuned.trainable_state_dict()
    assert set(a) == set(b)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("existence.") for k in changed)
    with pytest.raises(InputError, match="train_modules"):
        build_medvlm(_tiny()).freeze_except(["no-such-module."])


def test_init_from_a_checkpoint_without_the_head(tmp_path: Path) -> None:
    """Fine-tuning the shipped architecture with a new existence head copies every trained weight it has."""
    from finetune.textseg_train import DataSource, TrainConfig, train_medvlm
    from segmentation.textseg.checkpoint import load_medvlm, save_medvlm
    from segmentation.textseg.model import build_medvlm

    torch.manual_seed(1)
    base = build_medvlm(_tiny(existence=False))
    save_medvlm(base, tmp_path / "base")
    folder = data_dir("cxr_jsrt_scr")
    cfg = TrainConfig(model=_tiny().to_json(), data=[DataSource(str(folder), 1, 1.0, limit=3)],
                      out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), steps=1, batch_images=1,
                      texts_per_image=1, warmup_steps=1, eval_every=1, checkpoint_every=1, lr=0.0,
                      init_from=str(tmp_path / "base"))
    train_medvlm(cfg, progress=False)
    tuned, _ = load_medvlm(tmp_path / "run" / "last")
    a, b = base.trainable_state_dict(), tuned.trainable_state_dict()
    assert set(b) - set(a) == {k for k in b if k.startswith("existence.")}
    assert all(torch.equal(a[k], b[k]) for k in a)



def test_init_from_with_more_image_lora_stages_starts_from_the_same_model(tmp_path: Path) -> None:
    """``image_lora_stages`` above the checkpoint's: the new encoder adapters start at zero (step 0 answers as the
    checkpoint does), the run trains them and saves its config with the new stage count; fewer is refused."""
    from finetune.textseg_train import DataSource, TrainConfig, train_medvlm
    from segmentation.textseg.checkpoint import load_medvlm, save_medvlm
    from segmentation.textseg.model import build_medvlm

    torch.manual_seed(3)
    base = build_medvlm(_tiny()).eval()
    save_medvlm(base, tmp_path / "base")
    folder = data_dir("cxr_jsrt_scr")

    def run(name: str, stages: int, lr: float) -> Path:
        cfg = TrainConfig(data=[DataSource(str(folder), 1, 1.0, limit=3)], out_dir=str(tmp_path / name),
                          cache_dir=str(tmp_path / f"cache{stages}"), steps=2, batch_images=1, texts_per_image=1,
                          warmup_steps=1, eval_every=2, checkpoint_every=2, lr=lr, image_lora_stages=stages,
                          init_from=str(tmp_path / "base"), train_modules=["image_encoder."])
        train_medvlm(cfg, progress=False)
        return tmp_path / name / "last"

    still, _ = load_medvlm(run("still", 2, 0.0))
    assert still.config.image_encoder.lora_last_stages == 2
    assert still.image_encoder.first_adapted == base.image_encoder.first_adapted - 1
    a, b = base.trainable_state_dict(), still.trainable_state_dict()
    new = set(b) - set(a)
    assert new and all(k.startswith(f"image_encoder.stages.{still.image_encoder.first_adapted}.") for k in new)
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(base.image_encoder(pixels), still.image_encoder(pixels), atol=1e-6)
    moved, _ = load_medvlm(run("moved", 2, 1e-2))
    c = moved.trainable_state_dict()
    changed = {k for k in c if not torch.equal(c[k], b[k])}
    assert changed & new and all(k.startswith("image_encoder.") for k in changed)
    with pytest.raises(InputError, match="init_from"):
        run("fewer", 0, 0.0)
    with pytest.raises(InputError, match="image_lora_stages"):
        TrainConfig(data=[DataSource(str(folder), 1, 1.0)], image_lora_stages=-2).validate()

@pytest.mark.data
def test_distillation_keeps_the_teachers_answer(tmp_path: Path) -> None:
    """Learning without forgetting: the soft-target BCE has zero gradient where the student equals the teacher,
    pulls a changed student back, and only counts present structures of the distilled sources."""
    from finetune.textseg_cache import FeatureCache
    from finetune.textseg_train import DataSource, TrainConfig, distill_loss, load_teacher, train_medvlm
    from segmentation.textseg.checkpoint import save_medvlm
    from segmentation.textseg.model import build_medvlm

    torch.manual_seed(2)
    teacher_model = build_medvlm(_tiny())
    save_medvlm(teacher_model, tmp_path / "teacher")
    folder = data_dir("cxr_jsrt_scr")
    source = DataSource(str(folder), 1, 1.0, limit=3)
    cfg = TrainConfig(model=_tiny().to_json(), data=[source], out_dir=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "cache"), steps=2, batch_images=1, texts_per_image=2, warmup_steps=1,
                      eval_every=2, checkpoint_every=2, init_from=str(tmp_path / "teacher"),
                      distill_from=str(tmp_path / "teacher"), distill_weight=1.0, distill_sources=[source.name])
    assert np.isfinite(train_medvlm(cfg, progress=False)["best_val_dice"])

    teacher = load_teacher(cfg, _tiny())
    cache = FeatureCache(tmp_path / "cache", teacher.image_encoder)
    entry = next(e for e in cache.entries if e.structures)
    prefixes = cache.prefix[entry.key].float()[None]
    texts = ["heart", "left lung", "liver"]
    rows = [0, 0, 0]
    mask = next(iter(cache.masks[entry.key].values()))[None].float()
    targets = torch.stack([mask, mask, torch.zeros_like(mask)])  # the third row is a negative
    is_prior = torch.zeros(3, dtype=torch.bool)
    from finetune.textseg_train import forward_cached

    with torch.no_grad():
        same = forward_cached(teacher, prefixes, rows, texts)
    logits = same.clone().requires_grad_(True)
    distill_loss(teacher, prefixes, rows, texts, logits, targets, is_prior, [entry.dataset] * 3,
                 {entry.dataset}).backward()
    assert logits.grad is not None and float(logits.grad.abs().max()) < 1e-7
    moved = (same + 2.0).requires_grad_(True)
    distill_loss(teacher, prefixes, rows, texts, moved, targets, is_prior, [entry.dataset] * 3,
                 {entry.dataset}).backward()
    assert moved.grad is not None
    assert float(moved.grad[:2].min()) > 0  # pushed back down towards the teacher
    assert float(moved.grad[2].abs().max()) == 0.0  # the negative row is not distilled
    other = distill_loss(teacher, prefixes, rows, texts, moved, targets, is_prior, ["elsewhere"] * 3,
                         {entry.dataset})
    assert float(other.detach()) == 0.0
    with pytest.raises(Exception, match="distill_from"):
        TrainConfig(data=[source], distill_weight=1.0, distill_sources=[source.name]).validate()
    with pytest.raises(Exception, match="distill_sources"):
        TrainConfig(data=[source], distill_from=str(tmp_path / "teacher"), distill_weight=1.0,
                    distill_sources=["nope"]).validate()


@pytest.mark.data
def test_teacher_labels_structures_a_source_does_not_annotate(tmp_path: Path) -> None:
    """distill_structures: a lung-only chest X-ray folder gets one extra row per image for a structure it has
    no mask for (heart); its target is the teacher's mask of that text, the other rows keep their ground truth,
    and a run with it trains."""
    import random

    from finetune.textseg_cache import FeatureCache
    from finetune.textseg_train import (
        DataSource,
        TrainConfig,
        forward_cached,
        load_teacher,
        pseudo_targets,
        sample_batch,
        train_medvlm,
    )
    from segmentation.textseg.checkpoint import save_medvlm
    from segmentation.textseg.model import build_medvlm

    torch.manual_seed(3)
    save_medvlm(build_medvlm(_tiny()), tmp_path / "teacher")
    folder = data_dir("cxr_shenzhen_lungs")
    source = DataSource(str(folder), 1, 1.0, limit=3)
    cfg = TrainConfig(model=_tiny().to_json(), data=[source], out_dir=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "cache"), steps=2, batch_images=2, texts_per_image=2, warmup_steps=1,
                      eval_every=2, checkpoint_every=2, val_fraction=0.34, distill_from=str(tmp_path / "teacher"),
                      distill_weight=1.0, distill_sources=[source.name], distill_structures=["heart"])
    assert np.isfinite(train_medvlm(cfg, progress=False)["best_val_dice"])

    teacher = load_teacher(cfg, _tiny())
    cache = FeatureCache(tmp_path / "cache", teacher.image_encoder)
    entries = [e for e in cache.entries if e.structures]
    assert entries and all("heart" not in e.structures for e in entries)
    weights = np.full(len(entries), 1.0 / len(entries))
    batch = sample_batch(entries, weights, cache, cfg, random.Random(0), np.random.default_rng(0))
    prefixes, rows, texts, targets, pseudo = batch.prefixes, batch.rows, batch.texts, batch.targets, batch.pseudo
    assert int(pseudo.sum()) == 2  # one heart row per image
    assert all(float(targets[i].sum()) == 0 for i in range(len(texts)) if pseudo[i])
    assert all(float(targets[i].sum()) > 0 for i in range(len(texts)) if not pseudo[i])  # the lungs' masks
    filled = pseudo_targets(teacher, prefixes, rows, texts, targets, pseudo)
    with torch.no_grad():
        expected = (forward_cached(teacher, prefixes, rows, texts) > 0).float()
    assert torch.equal(filled[pseudo], expected[pseudo])
    assert torch.equal(filled[~pseudo], targets[~pseudo])
    with pytest.raises(Exception, match="distill_structures"):
        TrainConfig(data=[source], distill_structures=["heart"]).validate()
    with pytest.raises(Exception, match="canonical structure"):
        TrainConfig(data=[source], distill_from=str(tmp_path / "teacher"), distill_weight=1.0,
                    distill_sources=[source.name], distill_structures=["cardiac thing"]).validate()


@pytest.mark.data
def test_cross_source_heart_boxes_are_scored_against_cardiomegaly_boxes() -> None:
    """eval text-seg --all's check on another hospital: the box of the heart mask against each NIH cardiomegaly
    box; a perfect mask scores 1, a mask shifted by half its width ~1/3, no mask 0."""
    from types import SimpleNamespace

    from eval.textseg_all import finding_box_suite
    from medvlm.datasets import open_dataset
    from medvlm.types import Mask

    folder = data_dir("cxr_nih_bbox")
    dataset = open_dataset(folder)

    class Fake:
        def __init__(self, shift: float, found: bool = True) -> None:
            self.shift, self.found, self.asked = shift, found, []

        def encode(self, image: object) -> object:
            return image

        def predict_many(self, image: object, prompts: list) -> list:
            self.asked += [p.text for p in prompts]
            mask = np.zeros(image.shape, bool)  # type: ignore[attr-defined]
            for sample_id in dataset.ids():  # the image's own cardiomegaly box, found by identity of its pixels
                sample = dataset.load(sample_id)
                if sample.image.pixels.shape == image.pixels.shape and np.array_equal(sample.image.pixels,
                                                                                      image.pixels):
                    for ann in sample.boxes:
                        if ann.label == "cardiomegaly":
                            b = ann.box
                            dx = round(self.shift * (b.x1 - b.x0))
                            mask[round(b.y0):round(b.y1), round(b.x0) + dx:round(b.x1) + dx] = True
            return [SimpleNamespace(mask=Mask(mask), meta={"found": self.found and bool(mask.any())})]

    perfect = finding_box_suite(folder, Fake(0.0), "heart", "cardiomegaly")
    assert perfect["n"] == 3 and perfect["miou"] == pytest.approx(1.0, abs=0.01)
    half = finding_box_suite(folder, Fake(0.5), "heart", "cardiomegaly")
    assert 0.3 < half["miou"] < 0.45  # 1/3 for a box shifted by half its width (more where the image edge clips it)
    missing = finding_box_suite(folder, Fake(0.0, found=False), "heart", "cardiomegaly")
    assert missing["miou"] == 0.0 and [c["iou"] for c in missing["per_case"]] == [0.0] * 3
    assert finding_box_suite(folder, Fake(0.0), "heart", "no such finding")["miou"] is None


def test_hard_negative_miner_draws_what_the_model_still_calls_present() -> None:
    """The running score is an EMA of the existence probabilities; draws are distinct and follow score + floor."""
    import random

    from finetune.textseg_train import HardNegativeMiner

    miner = HardNegativeMiner(momentum=0.5, floor=0.05, start=0.5)
    miner.update("mr_brats2015_slices", "polyp", 1.0)
    assert miner.scores[("brain_mr", "polyp")] == pytest.approx(0.75)
    miner.update("mr_hippocampus_msd", "polyp", 1.0)  # another brain MR folder: the same key
    for name in ("liver", "heart", "kidney"):
        for _ in range(8):
            miner.update("/data/mr_brats2015_slices/", name, 0.0)
    assert miner.scores[("brain_mr", "polyp")] == pytest.approx(0.875)
    assert miner.scores[("brain_mr", "liver")] == pytest.approx(0.5 * 0.5 ** 8)
    rng = random.Random(0)
    candidates = ["heart", "kidney", "liver", "polyp"]
    first = [miner.pick("mr_hippocampus_msd", candidates, 1, rng)[0] for _ in range(2000)]
    # polyp weight 0.925 against 3 x ~0.052: drawn ~86 % of the time; another kind still starts uniform
    assert 0.80 < first.count("polyp") / 2000 < 0.91
    other = [miner.pick("derm_ham10000", candidates, 1, rng)[0] for _ in range(2000)]
    assert 0.2 < other.count("polyp") / 2000 < 0.3
    assert HardNegativeMiner.key("my_folder/") == "my_folder"
    two = miner.pick("mr_brats2015_slices", candidates, 2, rng)
    assert len(set(two)) == 2 and len(miner.pick("mr_brats2015_slices", candidates, 9, rng)) == 4


def test_packaged_checkpoints_resolve_by_name() -> None:
    """``multi`` and ``default`` name the packaged folders; an unknown bare name is refused with the choices."""
    from segmentation.textseg.predictor import packaged_checkpoints, resolve_checkpoint

    packaged = packaged_checkpoints()
    assert {"default", "multi"} <= set(packaged)
    assert resolve_checkpoint("multi") == packaged["multi"] and (packaged["multi"] / "model.safetensors").is_file()
    with pytest.raises(InputError, match="multi"):
        resolve_checkpoint("no-such-checkpoint")


@pytest.mark.slow
@pytest.mark.data
def test_packaged_multi_checkpoint_segments_and_says_not_found() -> None:
    """The packaged multi-modality checkpoint on held-out images of two kinds: the brain on a BraTS MR slice and
    the heart on a JSRT radiograph are found with high Dice; the brain on the radiograph and the liver on the MR
    are not found (no mask). Body structures are no negatives on a chest radiograph (it shows the liver dome)."""
    from eval.metrics import dice
    from medvlm.datasets import open_dataset
    from segmentation.base import Prompt
    from segmentation.requests import segment_to_regions
    from segmentation.textseg.checkpoint import read_checkpoint_config
    from segmentation.textseg.predictor import MedVLMSegmenter, resolve_checkpoint

    seg = MedVLMSegmenter("multi")
    val = set(read_checkpoint_config(resolve_checkpoint("multi"))[1]["val_ids"])
    cases = [("cxr_jsrt_scr", "heart", 0.85, "brain"), ("mr_brats2015_slices", "brain", 0.9, "liver")]
    for folder_name, name, floor, absent in cases:
        ds = open_dataset(data_dir(folder_name))
        ids = [i for i in ds.ids() if i in val] or ds.ids()  # BraTS has too few cases for a val split
        sample = next(s for s in (ds.load(i) for i in ids[:10]) if name in s.masks and s.masks[name].any())
        found, other = seg.segment(sample.image, [Prompt(text=name), Prompt(text=absent)])
        assert found.meta["found"] and dice(found.mask.data, sample.masks[name]) > floor, folder_name
        assert not other.meta["found"] and not other.mask.data.any() and other.meta["existence"] < 0.5, folder_name
    # what `medvlm segment` writes: the answer "not found" and the existence in each region's provenance
    regions = segment_to_regions(seg, sample.image, [Prompt(text="brain"), Prompt(text="liver")], ["brain", "liver"])
    assert [r.provenance["found"] for r in regions] == [True, False]
    assert regions[0].provenance["existence"] > 0.5 > regions[1].provenance["existence"]
