"""Anatomy text vocabulary (prompts/): coverage of the real data's structures, synonyms, sides, description levels,
views (modality + site hint), wholes and parts, sampling, phrase resolution and errors. The default is version 2;
version 1 must still load unchanged. No network; the coverage tests skip when ../shared/data is absent."""

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
from prompts.anatomy import DEFAULT_VERSION, MR_SITE_VIEWS, REGIONS, VIEW_KEYS, parts_of, view_key, wholes_of
from tests.conftest import DATA_ROOT

# Landmarks that are not vocabulary entries but anchor a description.
LANDMARKS = ("diaphragm", "hemidiaphragm", "sternum", "mediastinum", "spine", "vertebra", "rib", "midline",
             "pericardium", "pleura", "hilum", "fissure", "abdominal wall", "pelvis", "skull", "kidney", "sacrum",
             "femur", "ilium", "chest wall", "esophagus", "scapula", "trachea", "temporal lobe", "lateral ventricle",
             "amygdala", "thalamus", "uterus", "epidermis", "skin", "mucosa", "rectum", "white matter")

V1_COUNT = 62
NEW_IN_V2 = ("kidney", "clavicles", "hippocampus", "anterior hippocampus", "posterior hippocampus", "brain",
             "whole tumor", "tumor core", "enhancing tumor", "fetal head", "skin lesion", "polyp")
WHOLES = {"lung": ("left lung", "right lung"), "kidney": ("left kidney", "right kidney"),
          "hippocampus": ("anterior hippocampus", "posterior hippocampus"),
          "clavicles": ("left clavicle", "right clavicle")}
CARDIAC_SITE = "heart"  # index.csv site of mr_acdc_cardiac
BRAIN_SITE = "brain (glioma)"  # index.csv site of mr_brats2015_slices


def _v_file(version: str) -> dict:
    resource = resources.files("prompts") / "data" / f"anatomy_v{version}.json"
    return json.loads(resource.read_text(encoding="utf-8"))


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


def test_every_reader_structure_is_in_the_vocabulary(vocab):
    """Without data: every structure a reader declares (class attribute) and every non-TotalSegmentator mask name
    of the CT/MR/US/dermoscopy/endoscopy readers is a v2 entry."""
    from medvlm.datasets import DATASETS, MODALITY_STRUCTURES
    from medvlm.datasets import modalities as modality_readers

    new_readers = [cls for cls in DATASETS.values() if cls.__module__ == modality_readers.__name__]
    assert {cls.name for cls in new_readers} >= {"ct_curvas_abdomen", "ct_msd_spleen", "mr_hippocampus_msd",
                                                 "mr_brats2015_slices", "mr_acdc_cardiac", "us_hc18_fetal_head",
                                                 "derm_ham10000", "endo_kvasir_polyp"}
    declared = {s for cls in DATASETS.values() if isinstance(cls.structures, tuple) for s in cls.structures}
    assert declared >= {"liver", "kidney", "pancreas", "spleen", "brain", "fetal head", "polyp"}
    missing = sorted((declared | set(MODALITY_STRUCTURES)) - set(vocab.names))
    assert not missing, f"reader structures without a vocabulary entry: {missing}"


@pytest.mark.data
def test_new_readers_samples_get_a_view_sentence_from_their_modality_and_site(vocab):
    """The first sample of each CT/MR/US/dermoscopy/endoscopy folder on disk: every mask gets a view sentence from
    the image's modality and sample.meta's site; ACDC picks mr_cardiac and BraTS mr_brain."""
    if not DATA_ROOT.is_dir():
        pytest.skip(f"real data root {DATA_ROOT} is absent")
    from medvlm.datasets import DATASETS, open_dataset
    from medvlm.datasets import modalities as modality_readers

    expected = {"ct_curvas_abdomen": "ct_mr_axial", "ct_msd_spleen": "ct_mr_axial",
                "mr_hippocampus_msd": "ct_mr_axial", "mr_brats2015_slices": "mr_brain",
                "mr_acdc_cardiac": "mr_cardiac", "us_hc18_fetal_head": "ultrasound", "derm_ham10000": "dermoscopy",
                "endo_kvasir_polyp": "endoscopy"}
    checked = 0
    for name, cls in sorted(DATASETS.items()):
        if cls.__module__ != modality_readers.__name__ or not (DATA_ROOT / name).is_dir():
            continue
        ds = open_dataset(name, root=DATA_ROOT)
        sample = next(s for s in (ds.load(i) for i in ds.ids()[:40]) if s.masks)
        modality, site = sample.image.modality, sample.meta.get("site")
        assert view_key(modality, site) == expected[name], (name, modality, site)
        for structure in sample.masks:
            sentence = vocab.get(structure).views.get(expected[name])
            assert sentence, f"{name}: {structure!r} has no {expected[name]} sentence"
            text = describe(structure, "complex", modality=modality, site=site)
            assert text == f"{vocab.get(structure).complex} {sentence}"
        checked += 1
    if not checked:
        pytest.skip(f"no CT/MR/US/dermoscopy/endoscopy folder under {DATA_ROOT}")


def test_required_names_and_canonical_keys(vocab):
    from medvlm.datasets import CXR_STRUCTURES, MODALITY_STRUCTURES, STRUCTURE_VOCABULARY

    for name in (*CXR_STRUCTURES, *MODALITY_STRUCTURES, *NEW_IN_V2, "lung", "lesion", "lung nodule"):
        assert name in vocab
    # keys are the readers' canonical names; the others are the finding "lung nodule" and the wholes of pairs
    extra = set(vocab.names) - STRUCTURE_VOCABULARY
    assert extra == {"lung nodule", "hippocampus", "clavicles"}
    assert all(parts_of(name) for name in extra - {"lung nodule"})
    assert len(vocab) == len(vocab.names) == V1_COUNT + len(NEW_IN_V2)
    assert list(vocab) == sorted(vocab.names)
    assert "not a structure" not in vocab and 3 not in vocab


def test_data_file_found_with_importlib_resources_and_matches_loader(vocab):
    resource = resources.files("prompts") / "data" / "anatomy_v2.json"
    assert resource.is_file()
    data = _v_file("2")
    assert data["version"] == "2" == vocab.version == DEFAULT_VERSION
    assert set(data["structures"]) == set(vocab.names)
    assert data["sources"] and data["notes"]
    citations = " ".join(s["citation"] for s in data["sources"])
    for source in ("Terminologia Anatomica", "Gray's Anatomy", "Felson", "Menze", "Bernard", "van den Heuvel",
                   "Tschandl", "Jha", "Antonelli", "CURVAS"):
        assert source in citations
    assert set(vocab.sources) == {s["id"] for s in data["sources"]}
    assert {"1", "2"} <= set(available_versions())
    assert load_vocabulary("2") is vocab is load_vocabulary()  # cached, and "2" is the default


def test_version_1_still_loads_unchanged_and_version_2_keeps_all_of_it(vocab):
    v1 = load_vocabulary("1")
    data = _v_file("1")
    assert v1.version == data["version"] == "1" and len(v1) == V1_COUNT == len(data["structures"])
    assert v1 is not vocab and "kidney" not in v1 and v1.resolve("both kidneys") is None
    for name, raw in data["structures"].items():
        entry = v1.get(name)
        assert entry.parts == () and list(entry.synonyms) == raw["synonyms"] and entry.complex == raw["complex"]
        assert dict(entry.views) == raw["views"] and list(entry.sources) == raw["sources"]
        assert entry.region == raw["region"]
        new = vocab.get(name)  # v2 keeps the name, the text and every synonym, view and source
        assert new.complex == entry.complex and new.region == entry.region
        assert set(entry.synonyms) <= set(new.synonyms) and set(entry.sources) <= set(new.sources)
        assert all(new.views[k] == v for k, v in entry.views.items())
    assert set(v1.sources.items()) <= set(vocab.sources.items())
    assert set(vocab.names) - set(v1.names) == set(NEW_IN_V2)


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
        assert entry.region in REGIONS
        assert entry.sources and all(s in vocab.sources for s in entry.sources)
        assert set(entry.views) <= set(VIEW_KEYS)
    assert set(REGIONS) >= {"chest", "abdomen", "pelvis", "head_neck", "musculoskeletal", "lesion", "fetal"}


def test_every_view_key_has_sentences_and_new_entries_are_complete(vocab):
    for key in VIEW_KEYS:
        assert [n for n in vocab.names if key in vocab.get(n).views], f"no structure has a {key!r} sentence"
    expected_views = {"kidney": {"ct_mr_axial"}, "clavicles": {"xray", "ct_mr_axial"},
                      "hippocampus": {"ct_mr_axial", "mr_brain"}, "anterior hippocampus": {"ct_mr_axial", "mr_brain"},
                      "posterior hippocampus": {"ct_mr_axial", "mr_brain"}, "brain": {"ct_mr_axial", "mr_brain"},
                      "whole tumor": {"ct_mr_axial", "mr_brain"}, "tumor core": {"ct_mr_axial", "mr_brain"},
                      "enhancing tumor": {"ct_mr_axial", "mr_brain"}, "fetal head": {"ultrasound"},
                      "skin lesion": {"dermoscopy"}, "polyp": {"endoscopy"}}
    assert set(expected_views) == set(NEW_IN_V2)
    for name, views in expected_views.items():
        entry = vocab.get(name)
        assert set(entry.views) >= views, name
        assert len(entry.synonyms) >= 4 and entry.sources
    for name in ("left ventricle", "myocardium", "right ventricle"):
        assert "mr_cardiac" in vocab.get(name).views
    assert "FLAIR" in vocab.get("whole tumor").views["mr_brain"]
    assert "T1c" in vocab.get("enhancing tumor").views["mr_brain"]
    assert "skull" in vocab.get("fetal head").views["ultrasound"]
    assert vocab.get("fetal head").region == "fetal" and vocab.get("brain").region == "head_neck"
    assert {"BRATS", "ACDC", "HC18", "HAM10000", "KVASIRSEG", "MSD", "CURVAS"} <= set(vocab.sources)
    assert "BRATS" in vocab.get("whole tumor").sources and "ACDC" in vocab.get("myocardium").sources
    assert "CURVAS" in vocab.get("kidney").sources and "MSD" in vocab.get("anterior hippocampus").sources


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


# ------------------------------------------------------------------------------------------------ wholes, parts


def test_parts_and_wholes(vocab):
    for whole, parts in WHOLES.items():
        assert parts_of(whole) == parts == vocab.get(whole).parts == vocab.parts(whole)
        for part in parts:
            assert wholes_of(part) == (whole,) == vocab.wholes(part)
    assert {n for n in vocab.names if parts_of(n)} == set(WHOLES)
    assert parts_of("heart") == () and wholes_of("heart") == () and wholes_of("lung") == ()
    assert wholes_of("left lower lobe") == ()  # a lobe is not declared a part of anything
    assert parts_of("kidney", vocabulary=vocab) == ("left kidney", "right kidney")
    v1 = load_vocabulary("1")
    assert parts_of("lung", vocabulary=v1) == () and wholes_of("left lung", vocabulary=v1) == ()
    for whole in WHOLES:  # a whole is unsided, and its parts are never the whole itself
        assert side_of(whole) is None and whole not in parts_of(whole)
    with pytest.raises(InputError):
        parts_of("kidneys")  # a synonym, not a canonical name
    assert wholes_of("not a structure") == () == wholes_of("esophagus")  # any reader's mask name may be asked
    with pytest.raises(InputError):
        wholes_of(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("phrase", "expected"), [
    ("kidney", "kidney"), ("kidneys", "kidney"), ("both kidneys", "kidney"), ("The Kidneys", "kidney"),
    ("renal parenchyma", "kidney"), ("lungs", "lung"), ("both lungs", "lung"), ("hippocampi", "hippocampus"),
    ("hippocampal formation", "hippocampus"), ("both hippocampal parts", "hippocampus"),
    ("both clavicles", "clavicles"), ("collarbones", "clavicles"), ("clavicle", None), ("collarbone", None),
    ("left kidney", "left kidney"), ("kidney on the right", "right kidney"),
    ("hippocampal head", "anterior hippocampus"),
    ("body and tail of the hippocampus", "posterior hippocampus"), ("whole tumour", "whole tumor"),
    ("enhancing tumour", "enhancing tumor"), ("foetal head", "fetal head"), ("colonic polyp", "polyp"),
    ("pigmented skin lesion", "skin lesion"), ("encephalon", "brain"),
])
def test_resolve_wholes_and_new_structures(phrase, expected):
    assert resolve_structure(phrase) == expected


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


@pytest.mark.parametrize(("modality", "site", "key"), [
    ("CT", None, "ct_mr_axial"), ("MR", None, "ct_mr_axial"), ("mri", None, "ct_mr_axial"),
    ("US", None, "ultrasound"), ("ultrasound", None, "ultrasound"), ("DMS", None, "dermoscopy"),
    ("dermoscopy", None, "dermoscopy"), ("ES", None, "endoscopy"), ("endoscopy", None, "endoscopy"),
    ("CR", None, "xray"), ("DX", "heart", "xray"), ("PT", None, None), (None, "heart", None),
    ("MR", CARDIAC_SITE, "mr_cardiac"), ("MR", "short-axis cine", "mr_cardiac"), ("MR", "Cardiac", "mr_cardiac"),
    ("MR", BRAIN_SITE, "mr_brain"), ("MR", "axial FLAIR", "mr_brain"), ("MR", "T1c", "mr_brain"),
    ("MRI", "brain", "mr_brain"), ("CT", "brain", "ct_mr_axial"), ("CT", "heart", "ct_mr_axial"),
    ("MR", "abdomen", "ct_mr_axial"), ("MR", "brain and heart", "ct_mr_axial"), ("MR", "", "ct_mr_axial"),
    ("US", "fetal head", "ultrasound"),
])
def test_view_key_from_modality_and_site(modality, site, key):
    assert view_key(modality, site) == key
    assert view_key(modality, site=site) == key


def test_view_key_tables():
    assert set(MR_SITE_VIEWS.values()) == {"mr_brain", "mr_cardiac"}
    assert view_key("MR") == view_key("MR", None) == "ct_mr_axial"  # the old one-argument call is unchanged
    with pytest.raises(InputError):
        view_key("MR", site=3)  # type: ignore[arg-type]


def test_describe_with_modality_and_site(vocab):
    liver = vocab.get("liver")
    text = describe("liver", "complex", modality="CT")
    assert liver.views["ct_mr_axial"] in text and text == f"{liver.complex} {liver.views['ct_mr_axial']}"
    lv = vocab.get("left ventricle")
    cardiac = describe("left ventricle", "complex", modality="MR", site=CARDIAC_SITE)
    assert lv.views["mr_cardiac"] in cardiac and cardiac == f"{lv.complex} {lv.views['mr_cardiac']}"
    # without a site MR keeps the axial sentence (old behaviour)
    assert describe("left ventricle", "complex", modality="MR") == f"{lv.complex} {lv.views['ct_mr_axial']}"
    tumour = describe("whole tumor", "complex", modality="MR", site=BRAIN_SITE)
    assert tumour.endswith(vocab.get("whole tumor").views["mr_brain"]) and "FLAIR" in tumour
    # brain MR is axial: a structure without an mr_brain sentence falls back to its axial one; cardiac does not
    cord = vocab.get("spinal cord")
    cord_text = describe("spinal cord", "complex", modality="MR", site="brain")
    assert cord_text == f"{cord.complex} {cord.views['ct_mr_axial']}"
    assert describe("liver", "complex", modality="MR", site="heart") == liver.complex
    assert describe("fetal head", "complex", modality="US").endswith(vocab.get("fetal head").views["ultrasound"])
    assert describe("skin lesion", "complex", modality="DMS").endswith(vocab.get("skin lesion").views["dermoscopy"])
    assert describe("polyp", "complex", modality="endoscopy").endswith(vocab.get("polyp").views["endoscopy"])
    assert describe("polyp", "complex", modality="CT") == vocab.get("polyp").complex
    assert describe("kidney", "simple", synonym="both kidneys", modality="CT", site="abdomen") == "both kidneys"
    v1_lv = load_vocabulary("1").get("left ventricle")
    assert describe("left ventricle", "complex", modality="MR", site="heart", vocabulary=load_vocabulary("1")) == (
        v1_lv.complex)  # v1 has no cardiac sentence


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


def test_sample_text_with_site_hint(vocab):
    sentence = vocab.get("myocardium").views["mr_cardiac"]
    draws = [sample_text("myocardium", random.Random(s), levels=("complex",), modality="MR", site="heart")
             for s in range(10)]
    assert all(level == "complex" and text.endswith(sentence) for text, level in draws)
    again = [sample_text("myocardium", random.Random(s), levels=("complex",), modality="MR", site="heart")
             for s in range(10)]
    assert draws == again
    plain = sample_text("myocardium", random.Random(0), levels=("complex",), modality="MR")[0]
    assert plain.endswith(vocab.get("myocardium").views["ct_mr_axial"])


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
    ("kidney", "kidney"),  # v2: both kidneys in one mask (v1 had no such entry)
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
    for key, bad in (("region", "space"), ("views", {"pet": "x"}), ("sources", ["NOPE"]), ("complex", ""),
                     ("parts", "heart"), ("parts", ["a", "a"]), ("parts", [""]), ("parts", [3])):
        broken = json.loads(json.dumps(base))
        broken["structures"]["heart"][key] = bad
        with pytest.raises(InputError):
            Vocabulary.from_mapping(broken)
    with_parts = json.loads(json.dumps(base))
    with_parts["structures"]["lung"] = dict(entry, synonyms=["p1", "p2", "p3", "p4"], parts=["heart"])
    assert Vocabulary.from_mapping(with_parts).parts("lung") == ("heart",)
    assert Vocabulary.from_mapping(with_parts).wholes("heart") == ("lung",)
    itself = json.loads(json.dumps(base))
    itself["structures"]["heart"]["parts"] = ["heart"]
    with pytest.raises(InputError, match="whole itself"):
        Vocabulary.from_mapping(itself)


def test_v2_file_with_an_unknown_part_is_refused():
    data = _v_file("2")
    assert Vocabulary.from_mapping(data, "anatomy_v2.json").parts("kidney") == ("left kidney", "right kidney")
    data["structures"]["kidney"]["parts"] = ["left kidney", "middle kidney"]
    with pytest.raises(InputError, match="middle kidney") as info:
        Vocabulary.from_mapping(data, "anatomy_v2.json")
    assert "no such structure" in str(info.value) and "How to fix" in str(info.value)
    renamed = _v_file("2")
    del renamed["structures"]["posterior hippocampus"]
    with pytest.raises(InputError, match="posterior hippocampus"):
        Vocabulary.from_mapping(renamed)


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
