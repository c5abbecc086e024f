"""Anatomy text vocabulary (prompts/): coverage of the real data's structures, synonyms, sides, description levels,
sampling, phrase resolution and errors. No network; the coverage test skips when ../shared/data is absent."""

from __future__ import annotations

import json
import random
import re
from importlib import resources

import pytest

from medvlm.errors import InputError
from prompts import (
    LEVELS,
    SIDE_WORDS,
    StructureText,
    Vocabulary,
    all_phrases,
    available_versions,
    describe,
    load_vocabulary,
    normalize_phrase,
    resolve_structure,
    sample_text,
    side_of,
)
from tests.conftest import DATA_ROOT

# Landmarks that are not vocabulary entries but anchor a description.
LANDMARKS = ("diaphragm", "hemidiaphragm", "sternum", "mediastinum", "spine", "vertebra", "rib", "midline",
             "pericardium", "pleura", "hilum", "fissure", "abdominal wall", "pelvis", "skull", "kidney", "sacrum",
             "femur", "ilium", "chest wall", "esophagus", "scapula", "trachea")


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return load_vocabulary()


@pytest.fixture(scope="module")
def data_structures() -> set[str]:
    """Every structure with a mask in the readers' samples of ../shared/data, plus each reader's declared ones."""
    if not DATA_ROOT.is_dir():
        pytest.skip(f"real data root {DATA_ROOT} is absent (set MEDVLM_DATA or place shared/data beside the repo)")
    from medvlm.datasets import DATASETS, open_dataset

    found: set[str] = set()
    opened = 0
    for name in sorted(DATASETS):
        if not (DATA_ROOT / name).is_dir():
            continue
        ds = open_dataset(name, root=DATA_ROOT)
        opened += 1
        found.update(ds.structures)
        for sample in ds:
            found.update(sample.masks)
    if not opened:
        pytest.skip(f"no known data folder under {DATA_ROOT}")
    return found


def _words(text: str) -> set[str]:
    return set(normalize_phrase(text).split())


# ------------------------------------------------------------------------------------------------ coverage


@pytest.mark.data
def test_every_structure_of_the_data_is_in_the_vocabulary(vocab, data_structures):
    assert data_structures, "the readers found no masks"
    missing = sorted(data_structures - set(vocab.names))
    assert not missing, f"structures with masks in ../shared/data but no vocabulary entry: {missing}"


def test_required_names_and_canonical_keys(vocab):
    from medvlm.datasets import CXR_STRUCTURES, STRUCTURE_VOCABULARY

    for name in (*CXR_STRUCTURES, "lung", "lesion", "lung nodule"):
        assert name in vocab
    # keys are the readers' canonical names (only "lung nodule" is a finding, not a mask name)
    assert set(vocab.names) - STRUCTURE_VOCABULARY == {"lung nodule"}
    assert len(vocab) == len(vocab.names) >= 62
    assert list(vocab) == sorted(vocab.names)
    assert "not a structure" not in vocab and 3 not in vocab


def test_data_file_found_with_importlib_resources_and_matches_loader(vocab):
    resource = resources.files("prompts") / "data" / "anatomy_v1.json"
    assert resource.is_file()
    data = json.loads(resource.read_text(encoding="utf-8"))
    assert data["version"] == "1" == vocab.version
    assert set(data["structures"]) == set(vocab.names)
    assert data["sources"] and data["notes"]
    citations = " ".join(s["citation"] for s in data["sources"])
    for source in ("Terminologia Anatomica", "Gray's Anatomy", "Felson"):
        assert source in citations
    assert "1" in available_versions()
    assert load_vocabulary("1") is vocab  # cached


# ------------------------------------------------------------------------------------------------ content


def test_synonyms_at_least_four_distinct_and_never_shared(vocab):
    owner: dict[str, str] = {}
    for name in vocab.names:
        entry = vocab.get(name)
        assert isinstance(entry, StructureText) and entry.name == name
        keys = {normalize_phrase(s) for s in entry.synonyms}
        assert len(keys) == len(entry.synonyms) >= 4, f"{name}: {entry.synonyms}"
        assert normalize_phrase(name) not in keys
        for phrase in entry.phrases:
            key = normalize_phrase(phrase)
            assert owner.setdefault(key, name) == name, f"{phrase!r} of {name!r} also belongs to {owner[key]!r}"


def test_sided_structures_keep_their_side_in_every_synonym(vocab):
    sided = [n for n in vocab.names if n.split()[0] in ("left", "right")]
    assert len(sided) >= 30
    for name in vocab.names:
        side = name.split()[0] if name in sided else None
        for synonym in vocab.get(name).synonyms:
            words = _words(synonym)
            if side is None:
                assert not words & (SIDE_WORDS["left"] | SIDE_WORDS["right"]), f"{name}: {synonym!r}"
                continue
            other = "right" if side == "left" else "left"
            assert words & SIDE_WORDS[side], f"{name}: synonym {synonym!r} lost its side"
            assert not words & SIDE_WORDS[other], f"{name}: synonym {synonym!r} names the opposite side"
            assert side_of(synonym) == side


def test_complex_descriptions_mention_neighbours_or_landmarks(vocab):
    for name in vocab.names:
        entry = vocab.get(name)
        text = entry.complex.lower()
        assert len(text) >= 40 and text.count(". ") + 1 <= 3, name
        others = [p.lower() for other in vocab.names if other != name for p in vocab.get(other).phrases]
        anchors = [a for a in (*others, *LANDMARKS) if re.search(rf"\b{re.escape(a)}\b", text)]
        assert anchors, f"{name}: the complex description names no neighbour or landmark"
        assert entry.region in ("chest", "abdomen", "pelvis", "head_neck", "musculoskeletal", "lesion")
        assert entry.sources and all(s in vocab.sources for s in entry.sources)
        assert set(entry.views) <= {"xray", "ct_mr_axial"}


def test_view_sentences_use_radiological_display(vocab):
    right = vocab.get("right lung").views
    left = vocab.get("left lung").views
    assert "left side of the image" in right["xray"] and "right side of the image" in left["xray"]
    assert "left side of the image" in right["ct_mr_axial"] and "right side of the image" in left["ct_mr_axial"]
    for name in ("right clavicle", "left clavicle", "right kidney", "left kidney", "left 9th rib", "right hip bone"):
        image_side = "right" if name.startswith("left") else "left"
        for sentence in vocab.get(name).views.values():
            assert re.search(rf"\b{image_side} (side|part) of the image", sentence), f"{name}: {sentence}"
    for name in vocab.names:
        side = side_of(name)
        for key, sentence in vocab.get(name).views.items():
            # a sided structure is never placed on the image side named like its own side
            assert side is None or f"{side} side of the image" not in sentence, f"{name} [{key}]: {sentence}"


# ------------------------------------------------------------------------------------------------ describe


def test_describe_levels(vocab):
    assert describe("heart", "none") == ""
    assert describe("heart", "simple") == "heart"
    assert describe("heart", "simple", synonym="cardiac silhouette") == "cardiac silhouette"
    plain = describe("heart", "complex")
    assert plain == vocab.get("heart").complex and "mediastinum" in plain
    for modality in ("CR", "DX", "xray", "cxr"):
        assert describe("heart", "complex", modality=modality) == f"{plain} {vocab.get('heart').views['xray']}"
    for modality in ("CT", "MR", "MRI", "ct"):
        assert describe("heart", "complex", modality=modality) == f"{plain} {vocab.get('heart').views['ct_mr_axial']}"
    assert describe("heart", "complex", modality="US") == plain
    assert describe("heart", "complex", modality=None) == plain
    assert describe("pancreas", "complex", modality="CR") == vocab.get("pancreas").complex  # no x-ray sentence
    with_syn = describe("heart", "complex", synonym="cor", modality="CT")
    assert with_syn.startswith("cor: ") and with_syn.endswith(vocab.get("heart").views["ct_mr_axial"])
    assert all_phrases("heart")[0] == "heart" and "cardiac silhouette" in all_phrases("heart")
    with pytest.raises(InputError, match="level"):
        describe("heart", "verbose")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="synonym"):
        describe("left lung", "simple", synonym="right lung field")


# ------------------------------------------------------------------------------------------------ sample_text


def test_sample_text_covers_levels_and_is_deterministic(vocab):
    draws = [sample_text("left lung", random.Random(7)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    rng = random.Random(0)
    seq = [sample_text("left lung", rng, modality="CR") for _ in range(300)]
    rng = random.Random(0)
    assert seq == [sample_text("left lung", rng, modality="CR") for _ in range(300)]
    assert {level for _, level in seq} == set(LEVELS)
    phrases = set(all_phrases("left lung"))
    for text, level in seq:
        if level == "none":
            assert text == ""
        elif level == "simple":
            assert text in phrases
        else:
            assert vocab.get("left lung").complex in text and vocab.get("left lung").views["xray"] in text
    assert {t for t, lvl in seq if lvl == "simple"} == phrases  # every phrase drawn
    only = {sample_text("heart", random.Random(s), levels=("simple",))[1] for s in range(20)}
    assert only == {"simple"}
    weighted = [sample_text("heart", random.Random(s), weights=(0, 0, 1))[1] for s in range(20)]
    assert set(weighted) == {"complex"}
    with pytest.raises(InputError):
        sample_text("heart", random.Random(0), weights=(1, 1))
    with pytest.raises(InputError):
        sample_text("heart", random.Random(0), levels=())
    with pytest.raises(InputError):
        sample_text("heart", 0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ resolve


@pytest.mark.parametrize(("phrase", "expected"), [
    ("cardiac silhouette", "heart"),
    ("Heart", "heart"),
    ("Right Lung", "right lung"),
    ("the left clavicle", "left clavicle"),
    ("The patient's left lung.", "left lung"),
    ("left-sided lung", "left lung"),
    ("  LEFT   LUNG FIELD ", "left lung"),
    ("pulmo sinister", "left lung"),
    ("collarbone on the right", None),
    ("right collarbone", "right clavicle"),
    ("ninth left rib", "left 9th rib"),
    ("IVC", "inferior vena cava"),
    ("pulmonary nodule", "lung nodule"),
    ("lungs", "lung"),
    ("T12", "T12 vertebra"),
    ("left femur", None),  # only the right femur is annotated: never map to the other side
    ("left heart", None),
    ("kidney", None),
    ("liver lesion mass", None),
    ("", None),
    ("the", None),
])
def test_resolve_structure(phrase, expected):
    assert resolve_structure(phrase) == expected


def test_resolve_never_crosses_sides(vocab):
    for name in vocab.names:
        side = side_of(name)
        if side is None:
            continue
        other = "right" if side == "left" else "left"
        for phrase in vocab.get(name).phrases:
            assert resolve_structure(phrase) == name
            swapped = re.sub(rf"\b{side}\b", other, phrase)
            if swapped != phrase:
                assert resolve_structure(swapped) in (None, re.sub(rf"\b{side}\b", other, name))
    with pytest.raises(InputError):
        resolve_structure(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_name_raises_helpful_input_error(vocab):
    with pytest.raises(InputError) as info:
        vocab.get("hart")
    message = str(info.value)
    assert "'hart'" in message and "heart" in message and "left lung" in message and "How to fix" in message
    with pytest.raises(InputError, match="canonical name 'heart'"):
        describe("cardiac silhouette", "simple")
    with pytest.raises(InputError):
        all_phrases("spleen capsule")
    with pytest.raises(InputError, match="version"):
        load_vocabulary("99")


def test_invalid_data_is_rejected():
    entry = {"synonyms": ["a1", "a2", "a3", "a4"], "complex": "Beside the sternum.", "region": "chest",
             "sources": ["S"], "views": {"xray": "On a radiograph."}}
    base = {"version": "t", "sources": [{"id": "S", "citation": "a book"}], "structures": {"heart": entry}}
    assert Vocabulary.from_mapping(base).names == ("heart",)
    shared = json.loads(json.dumps(base))
    shared["structures"]["liver"] = dict(entry, synonyms=["A1", "b2", "b3", "b4"])
    with pytest.raises(InputError, match="also matches"):
        Vocabulary.from_mapping(shared)
    sided = json.loads(json.dumps(base))
    sided["structures"]["left kidney"] = dict(entry, synonyms=["right renal unit", "ren sinister", "c3", "c4"])
    with pytest.raises(InputError, match="side"):
        Vocabulary.from_mapping(sided)
    for key, bad in (("region", "space"), ("views", {"ultrasound": "x"}), ("sources", ["NOPE"]), ("complex", "")):
        broken = json.loads(json.dumps(base))
        broken["structures"]["heart"][key] = bad
        with pytest.raises(InputError):
            Vocabulary.from_mapping(broken)


# ------------------------------------------------------------------------------------------------ chat templates


def test_grounding_tokens_template_renders_only_a_user_message():
    from prompts.templates import load_templates

    template = load_templates("1")["grounding_tokens"]
    assert template.system == "" and template.fields == {"phrase"}
    assert template.render(phrase="heart") == [{"role": "user", "content": "Locate the heart in this image."}]
    # braces in a phrase are kept as written, never filled again
    assert template.render(phrase="{phrase} lung")[0]["content"] == "Locate the {phrase} lung in this image."
    with pytest.raises(InputError, match="fields"):
        template.render(phrase="heart", width=3)


def test_templates_with_a_system_text_render_system_then_user():
    from prompts.templates import REQUIRED_TEMPLATES, load_templates

    templates = load_templates("1")
    fields: dict[str, dict[str, object]] = {"grounding": {"phrase": "left lung", "width": 640, "height": 480},
              "extract_target": {"question": "Is the heart enlarged?"}}
    assert set(fields) == set(REQUIRED_TEMPLATES)
    for name, values in fields.items():
        system, user = templates[name].render(**values)
        assert system == {"role": "system", "content": templates[name].system} and system["content"].strip()
        assert user["role"] == "user"
    assert "left lung" in templates["grounding"].render(**fields["grounding"])[1]["content"]
    assert "640x480 pixels" in templates["grounding"].render(**fields["grounding"])[1]["content"]
    assert templates["extract_target"].render(question="Q?")[1] == {"role": "user", "content": "Question: Q?"}
