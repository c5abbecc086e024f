"""Med-VLM text-guided segmenter: architecture, equations, gradients, checkpoints, predictor, training step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlm.errors import InputError, MissingDependencyError
from segmentation.base import Prompt
from segmentation.textseg.checkpoint import load_medvlm, save_medvlm
from segmentation.textseg.config import (
    DecoderConfig,
    ImageEncoderConfig,
    MedVLMConfig,
    MixerConfig,
    TextEncoderConfig,
    tiny_test_config,
)
from segmentation.textseg.losses import bce_dice_loss, positive_bce_loss, soft_dice_loss
from segmentation.textseg.model import Attention, MaskDecoder, MixerBlock, build_medvlm, sine_position_2d
from tests.conftest import DATA_ROOT, data_dir

TRAINABLE_PREFIXES = ("image_proj.", "text_proj.", "mixer.", "decoder.")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_medvlm(tiny_test_config())


def _batch(model, texts, size=32):
    torch.manual_seed(1)
    ids, am = model.text_encoder.tokenize(texts)
    return torch.randn(len(texts), 3, size, size), ids, am


# ------------------------------------------------------------------------------------------- architecture


def test_shapes_and_trainable_set(tiny):
    pixels, ids, am = _batch(tiny, ["the heart", "left lung, lateral to the heart"])
    logits = tiny(pixels, ids, am)
    assert logits.shape == (2, 1, 32, 32)
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    for name in trainable:
        assert name.startswith(TRAINABLE_PREFIXES) or "lora_" in name, name
    # adapters exist in both encoders, and only in the adapted stage of the image encoder
    assert any(n.startswith("text_encoder.") and "lora_" in n for n in trainable)
    img_lora = [n for n in trainable if n.startswith("image_encoder.") and "lora_" in n]
    assert img_lora and all(n.startswith("image_encoder.stages.2.") for n in img_lora)
    n_train, n_total = tiny.parameter_counts()
    assert 0 < n_train < n_total


def test_gradients_reach_only_trainable_parts(tiny):
    tiny.zero_grad(set_to_none=True)
    pixels, ids, am = _batch(tiny, ["heart", "right lung"])
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    bce_dice_loss(tiny(pixels, ids, am), target).backward()
    for name, p in tiny.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} received a gradient"
    grads = {n: p.grad for n, p in tiny.named_parameters() if p.requires_grad}
    # LoRA B starts at zero, so its gradient is the first to be non-zero in both encoders
    for enc in ("image_encoder.", "text_encoder."):
        b = [g for n, g in grads.items() if n.startswith(enc) and "lora_B" in n]
        assert b and any(g is not None and g.abs().sum() > 0 for g in b), enc
    for part in TRAINABLE_PREFIXES:
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(part)), part
    tiny.zero_grad(set_to_none=True)


def test_encoder_prefix_suffix_equals_full_forward(tiny):
    pixels = torch.randn(1, 3, 32, 32)
    enc = tiny.image_encoder
    full = enc(pixels)
    assert torch.allclose(enc.suffix(enc.prefix(pixels)), full)
    assert full.shape == (1, 32, 4, 4)


# ---------------------------------------------------------------------------------------------- equations


def _zero_linear(layer: torch.nn.Linear) -> None:
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)


def test_mixer_block_residuals_are_identity_when_branches_are_zero():
    torch.manual_seed(0)
    block = MixerBlock(MixerConfig(dim=8, heads=2, depth=1))
    for attn in (block.self_attn, block.text_to_image, block.image_to_text):
        _zero_linear(attn.o)
    _zero_linear(block.mlp.fc2)
    f_im, f_text = torch.randn(1, 6, 8), torch.randn(1, 3, 8)
    out_im, out_text = block(f_im, f_text, torch.ones(1, 3, dtype=torch.bool), torch.zeros(6, 8))
    assert torch.equal(out_im, f_im) and torch.equal(out_text, f_text)


def test_mixer_block_matches_hand_computation_with_one_text_token():
    """One text token: every attention over text has a single key, so softmax = 1 and the attended value is
    o(v(token)) for every query; self-attention on one token is the same. The equations then read:
    t1 = t + o(v(n1 t)); t2 = t1 + attn(n2 t1, n_i F_im); fused_t = t2 + mlp(n3 t2);
    fused_im = F_im + o'(v'(n4 fused_t))."""
    torch.manual_seed(0)
    block = MixerBlock(MixerConfig(dim=8, heads=2, depth=1)).eval()
    f_im, t = torch.randn(1, 5, 8), torch.randn(1, 1, 8)
    pos = sine_position_2d(1, 8).expand(5, 8).clone() * 0  # no position: queries only differ by content
    mask = torch.ones(1, 1, dtype=torch.bool)
    out_im, out_text = block(f_im, t, mask, pos)
    with torch.no_grad():
        sa = block.self_attn
        t1 = t + sa.o(sa.v(block.norm_t1(t)))
        ti = block.text_to_image
        q = ti.q(block.norm_t2(t1)).view(1, 1, 2, 4).transpose(1, 2)
        im = block.norm_i1(f_im)
        k = ti.k(im).view(1, 5, 2, 4).transpose(1, 2)
        v = ti.v(im).view(1, 5, 2, 4).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
        t2 = t1 + ti.o((w @ v).transpose(1, 2).reshape(1, 1, 8))
        fused_t = t2 + block.mlp(block.norm_t3(t2))
        it = block.image_to_text
        fused_im = f_im + it.o(it.v(block.norm_t4(fused_t)))
    assert torch.allclose(out_text, fused_t, atol=1e-6)
    assert torch.allclose(out_im, fused_im.expand_as(out_im), atol=1e-6)


def test_mask_decoder_is_mlp_of_f2_times_f1():
    torch.manual_seed(0)
    dec = MaskDecoder(8, DecoderConfig(channels=(4, 2), dilations=(1,), heads=2)).eval()
    f_im, text = torch.randn(1, 9, 8), torch.randn(1, 1, 8)
    out = dec(f_im, text, torch.ones(1, 1, dtype=torch.bool), grid=3)
    with torch.no_grad():
        f1 = dec.upsample(dec.dilated(f_im.transpose(1, 2).reshape(1, 8, 3, 3)))  # (1, 2, 6, 6)
        f2 = dec.cross_attn.o(dec.cross_attn.v(dec.norm_kv(text)))  # one text token: same for every pixel
        weights = dec.mlp(f2)[0, 0]  # (2,)
        expected = (weights[None, :, None, None] * f1).sum(1, keepdim=True)
    assert out.shape == (1, 1, 6, 6)
    assert torch.allclose(out, expected, atol=1e-5)


def test_attention_ignores_padded_keys():
    torch.manual_seed(0)
    attn = Attention(8, 2)
    q, kv = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    mask = torch.tensor([[True, True, False]])
    out = attn(q, kv, mask)
    kv2 = kv.clone()
    kv2[0, 2] = 100.0
    assert torch.allclose(attn(q, kv2, mask), out)


def test_losses_known_values():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    perfect = (target * 2 - 1) * 50  # confident, correct logits
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert bce_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    wrong = -perfect
    assert soft_dice_loss(wrong, target).item() == pytest.approx(1 - 1 / 17, abs=1e-4)  # (0 + 1) / (0 + 8 + 1)...
    zero = torch.zeros(1, 1, 4, 4)
    # sigmoid(0) = 0.5: Dice = (2 * 4 + 1) / (8 + 8 + 1); BCE = ln 2
    assert soft_dice_loss(zero, target).item() == pytest.approx(1 - 9 / 17, abs=1e-6)
    assert bce_dice_loss(zero, target).item() == pytest.approx(np.log(2) + 1 - 9 / 17, abs=1e-6)
    # positive BCE: over each row's target pixels only; an empty row does not count
    assert positive_bce_loss(zero, target).item() == pytest.approx(np.log(2), abs=1e-6)
    assert positive_bce_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.cat([wrong, zero]), torch.cat([target, torch.zeros_like(target)])
    assert positive_bce_loss(*two).item() == pytest.approx(50.0, abs=1e-4)  # softplus(50) on 8 pixels, row 1 only
    assert positive_bce_loss(zero, torch.zeros_like(target)).item() == 0.0
    # its gradient on a saturated small target does not vanish, unlike BCE + Dice's
    small = torch.zeros(1, 1, 64, 64)
    small[..., :2, :2] = 1
    sunk = torch.full_like(small, -12.0, requires_grad=True)
    bce_dice_loss(sunk, small).backward()
    weak = float(sunk.grad[small > 0].abs().mean())  # type: ignore[index]
    sunk.grad = None
    positive_bce_loss(sunk, small).backward()
    assert float(sunk.grad[small > 0].abs().mean()) > 100 * weak  # type: ignore[index]


# -------------------------------------------------------------------------------------------- checkpoints


def test_save_and_strict_load_round_trip(tiny, tmp_path: Path):
    with torch.no_grad():
        for p in tiny.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # make LoRA B non-zero so adapters matter
    folder = save_medvlm(tiny, tmp_path / "ckpt", meta={"note": "test"})
    loaded, meta = load_medvlm(folder)
    assert meta["note"] == "test"
    pixels, ids, am = _batch(tiny, ["heart"])
    tiny.eval()
    assert torch.allclose(loaded(pixels, ids, am), tiny(pixels, ids, am), atol=1e-6)
    # only trained weights are stored
    from safetensors.torch import load_file

    stored = load_file(str(folder / "model.safetensors"))
    assert set(stored) == set(tiny.trainable_state_dict())
    # strict: a missing key and an unexpected key are both reported by name
    from safetensors.torch import save_file

    broken = dict(stored)
    gone = sorted(broken)[0]
    del broken[gone]
    broken["decoder.extra.weight"] = torch.zeros(1)
    save_file(broken, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match=r"1 missing keys.*" + gone.split(".")[0] + r".*1 unexpected keys"):
        load_medvlm(folder)


def test_config_json_round_trip_and_unknown_keys():
    cfg = MedVLMConfig()
    again = MedVLMConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert again == cfg
    bad = cfg.to_json()
    bad["mixer"]["width"] = 3
    with pytest.raises(InputError, match="width"):
        MedVLMConfig.from_json(bad)
    with pytest.raises(InputError, match="divisible by heads"):
        MixerConfig(dim=10, heads=4).validate()
    with pytest.raises(InputError, match="256 for litemedsam"):
        ImageEncoderConfig(kind="litemedsam", image_size=224).validate()


def test_biobert_preset_offline_names_the_offline_preset(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from segmentation.textseg.encoders import build_text_encoder

    with pytest.raises(MissingDependencyError, match=r"(?s)biobert.*'minilm'"):
        build_text_encoder(TextEncoderConfig(preset="biobert"))


def test_biomedbert_vocabulary_with_random_bert(tmp_path: Path):
    vocab = DATA_ROOT.parent / "tokenizers" / "biomedbert_base_uncased_abstract_fulltext"
    if not (vocab / "vocab.txt").is_file():
        pytest.skip(f"BiomedBERT vocabulary {vocab} is absent")
    model = build_medvlm(tiny_test_config(vocab_size=30522, tokenizer=str(vocab)))
    ids, am = model.text_encoder.tokenize(["right apical pneumothorax", "cardiomegaly"])
    words = model.text_encoder.tokenizer.convert_ids_to_tokens(ids[0][am[0].bool()].tolist())
    # the biomedical vocabulary keeps the clinical word whole (BERT-base's general vocabulary splits it)
    assert words == ["[CLS]", "right", "apical", "pneumothorax", "[SEP]"]
    logits = model(torch.randn(2, 3, 32, 32), ids, am)
    assert logits.shape == (2, 1, 32, 32) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------- predictor


def test_predictor_encodes_once_and_returns_masks_at_original_size(tiny, tmp_path: Path):
    from segmentation.textseg.predictor import MedVLMSegmenter

    folder = save_medvlm(tiny, tmp_path / "ckpt")
    seg = MedVLMSegmenter(folder)
    calls = {"n": 0}
    encode = seg.encode

    def counting(image):
        calls["n"] += 1
        return encode(image)

    seg.encode = counting  # type: ignore[method-assign]
    image = (np.random.default_rng(0).random((40, 70)) * 255).astype(np.uint8)
    texts = ["heart", "left lung", "right lung", "cardiac silhouette", "a round opacity in the right upper zone"]
    results = seg.segment(image, [Prompt(text=t) for t in texts])
    assert calls["n"] == 1
    assert [r.mask.data.shape for r in results] == [(40, 70)] * 5
    assert all(0.0 <= r.score <= 1.0 for r in results)
    assert results[3].meta["structure"] == "heart"  # a synonym is resolved and expanded
    assert results[4].meta["structure"] is None and results[4].meta["text_read"] == texts[4]
    with pytest.raises(InputError, match="text-guided"):
        seg.segment(image, [Prompt.from_box(1, 1, 10, 10)])


def test_expand_text_uses_descriptions_for_known_structures():
    from segmentation.textseg.predictor import expand_text

    text, name = expand_text("Cardiac silhouette", "complex", "CR")
    assert name == "heart" and "mediastinum" in text and "radiograph" in text
    assert expand_text("heart", "simple") == ("heart", "heart")
    assert expand_text("something unknown", "complex") == ("something unknown", None)


# --------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_loss_decreases_on_a_real_batch():
    """Real LiteMedSAM encoder on two JSRT images, tiny text encoder and heads: 25 AdamW steps."""
    folder = data_dir("cxr_jsrt_scr")
    from finetune.textseg_cache import letterbox_mask
    from medvlm.datasets import open_dataset

    torch.manual_seed(0)
    cfg = MedVLMConfig(
        image_encoder=ImageEncoderConfig(kind="litemedsam", lora_rank=4, lora_last_stages=1),
        text_encoder=tiny_test_config().text_encoder, mixer=MixerConfig(dim=32, heads=2, depth=2),
        decoder=DecoderConfig(channels=(16, 8, 8), dilations=(1, 2), heads=2))
    model = build_medvlm(cfg)
    ds = open_dataset(folder)
    samples = [ds.load(i) for i in ds.ids()[:2]]
    names = ["heart", "right lung", "left clavicle"]
    prefixes, targets = [], []
    for s in samples:
        chw, _ = model.image_encoder.preprocess(s.image.to_rgb_uint8())
        prefixes.append(model.image_encoder.prefix(torch.from_numpy(chw)[None])[0])
        targets += [torch.from_numpy(letterbox_mask(s.masks[n], 256)).float()[None] for n in names]
    prefix = torch.stack(prefixes)
    target = torch.stack(targets)
    ids, am = model.text_encoder.tokenize(names * 2)
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        logits = model.forward_encoded(model.image_encoder.suffix(prefix)[rows], ids, am)
        loss = bce_dice_loss(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_ablation_variants_change_only_what_they_ablate(tmp_path: Path):
    from finetune.textseg_ablation import ABLATIONS, _variant, format_ablation
    from finetune.textseg_train import TrainConfig

    base = TrainConfig(model={"image_encoder": {"lora_rank": 8}}, steps=1000, warmup_steps=50)
    rows = {name: _variant(base, name, change, 20, tmp_path) for name, change in ABLATIONS["adapters"]}
    assert rows["no adapters"].model["image_encoder"]["lora_rank"] == 0
    assert rows["no adapters"].model["text_encoder"]["lora_rank"] == 0
    assert rows["text LoRA only"].model["image_encoder"]["lora_rank"] == 0
    assert "text_encoder" not in rows["text LoRA only"].model
    assert rows["both (paper)"].model == base.model and rows["both (paper)"].steps == 20
    assert base.model == {"image_encoder": {"lora_rank": 8}}  # the base config is not mutated
    levels = [_variant(base, n, c, 20, tmp_path).level_weights for n, c in ABLATIONS["descriptions"]]
    assert levels == [{"none": 1.0}, {"simple": 1.0}, {"complex": 1.0}]
    # rank 0 keeps the encoder split (same feature cache) but adds no image adapter
    cfg = tiny_test_config()
    cfg.image_encoder.lora_rank = 0
    model = build_medvlm(cfg)
    assert not any("lora_" in n for n, _ in model.image_encoder.named_parameters())
    assert model.image_encoder.first_adapted == len(model.image_encoder.stages) - 1
    m = {"dice": 0.5, "hd95_mm": 3.0, "asd_mm": 1.0, "n": 2}
    table = format_ablation({"suite": "text-seg ablation adapters", "steps": 20, "frame": "256x256 letterbox",
                             "rows": [{"name": "both (paper)", "per_structure": {"heart": m}, "mean": m}]})
    assert "both (paper)" in table and "0.500" in table and "20 steps" in table


@pytest.mark.slow
def test_shipped_checkpoint_segments_held_out_jsrt_images():
    """The shipped default on JSRT val images it never trained on: laterality right and Dice well above chance."""
    from eval.metrics import dice
    from medvlm.datasets import open_dataset
    from segmentation.textseg.predictor import MedVLMSegmenter, default_checkpoint_dir

    folder = data_dir("cxr_jsrt_scr")
    seg = MedVLMSegmenter()
    ds = open_dataset(folder)
    present = set(ds.ids())
    val_ids = [i for i in seg.meta["val_ids"] if i in present]  # a multi-source checkpoint lists every folder's
    assert len(val_ids) >= 20 and default_checkpoint_dir().is_dir()
    names = ["heart", "right lung", "left lung", "right clavicle", "left clavicle"]
    scores: dict[str, list[float]] = {n: [] for n in names}
    for sample_id in val_ids[:3]:
        sample = ds.load(sample_id)
        results = seg.segment(sample.image, [Prompt(text=n) for n in names])
        for n, r in zip(names, results):
            scores[n].append(dice(r.mask.data, sample.masks[n]))
        width = sample.image.shape[1]
        cx = {n: float(np.nonzero(r.mask.data)[1].mean()) for n, r in zip(names, results)}
        assert cx["right lung"] < width / 2 < cx["left lung"]  # patient's right is on the image left
        assert cx["right clavicle"] < width / 2 < cx["left clavicle"]
    assert np.mean(scores["heart"]) > 0.8
    assert min(np.mean(scores["right lung"]), np.mean(scores["left lung"])) > 0.9
    assert min(np.mean(scores["right clavicle"]), np.mean(scores["left clavicle"])) > 0.5


def test_the_cache_entries_follow_the_stored_files_when_another_seed_rebuilds(tmp_path: Path) -> None:
    """A rebuild with another seed reuses the stored augmented variants but draws other augmentations: a structure
    at the border may be in one draw and not the other. The index then disagrees with the files, and the training
    entries must follow the files (before: a KeyError at step 84 of a run, or a present structure taken for a
    negative)."""
    import json

    import torch

    from finetune.textseg_cache import FeatureCache, build_cache
    from medvlm.datasets import Sample
    from medvlm.io import MedicalImage
    from segmentation.textseg.config import tiny_test_config
    from segmentation.textseg.model import build_medvlm

    torch.manual_seed(0)
    encoder = build_medvlm(tiny_test_config()).image_encoder
    pixels = np.random.default_rng(0).uniform(0, 1, (64, 64)).astype(np.float32)
    edge = np.zeros((64, 64), bool)
    edge[0:2, 30:34] = True  # a sliver on the top border: the similarity transform keeps it in some draws only
    body = np.zeros((64, 64), bool)
    body[20:44, 20:44] = True
    items = [("ds", Sample(id="s", image=MedicalImage(pixels), masks={"edge": edge, "body": body}), 8,
              ("edge", "body"))]
    build_cache(encoder, items, tmp_path, seed=0, progress=False)
    first = {e["key"]: e["structures"] for e in json.loads((tmp_path / "index.json").read_text())["entries"]}
    for seed in range(1, 40):
        build_cache(encoder, items, tmp_path, seed=seed, progress=False)
        index = {e["key"]: e["structures"] for e in json.loads((tmp_path / "index.json").read_text())["entries"]}
        if index != first:
            break
    else:
        pytest.fail("no seed changed a draw's structures: this test could not fail")
    cache = FeatureCache(tmp_path, encoder)
    for e in cache.entries:
        assert e.structures == tuple(sorted(cache.masks[e.key])), e.key
        assert set(e.structures) | set(e.absent) == {"edge", "body"} and not set(e.structures) & set(e.absent)
    assert [e.structures for e in cache.entries if e.key in first] == [tuple(first[e.key]) for e in cache.entries]
