"""Chest X-ray regions and findings vocabularies (prompts/regions.py, prompts/findings.py): keys, synonyms, sides,
location words, lobe projections, findings and their default regions, data validation. The JSRT and NIH checks
skip when ../shared/data is absent."""

from __future__ import annotations

import csv
import json
import re
from importlib import resources

import pytest

from medvlm.errors import InputError
from prompts import (
    REGION_KEYS,
    SIDE_WORDS,
    ChestRegion,
    FindingVocabulary,
    RegionVocabulary,
    expected_regions,
    laterality,
    load_findings,
    load_regions,
    load_vocabulary,
    location_regions,
    region_side,
    resolve_finding,
    resolve_region,
    side_of,
)
from tests.conftest import data_dir

BRIEF_KEYS = (
    "right lung", "left lung", "right upper lung zone", "right mid lung zone", "right lower lung zone",
    "left upper lung zone", "left mid lung zone", "left lower lung zone", "right apical zone", "left apical zone",
    "right costophrenic angle", "left costophrenic angle", "right hilar structures", "left hilar structures",
    "right hemidiaphragm", "left hemidiaphragm", "cardiac silhouette", "mediastinum", "upper mediastinum",
    "right clavicle", "left clavicle",
)
LOBE_ZONES = {
    "right upper lobe": ["right upper lung zone", "right apical zone"],
    "right middle lobe": ["right mid lung zone", "right lower lung zone"],
    "right lower lobe": ["right mid lung zone", "right lower lung zone"],
    "left upper lobe": ["left upper lung zone", "left mid lung zone"],
    "left lower lobe": ["left mid lung zone", "left lower lung zone"],
    "right lung": ["right lung"],
    "left lung": ["left lung"],
}
REQUIRED_FINDINGS = ("pneumothorax", "pleural effusion", "cardiomegaly", "nodule", "mass", "atelectasis",
                     "consolidation", "infiltrate", "pneumonia", "opacity", "edema", "emphysema", "fibrosis",
                     "pleural thickening", "hernia", "fracture", "tuberculosis", "lesion")
NIH_LABELS = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Effusion": "pleural effusion",
              "Infiltrate": "infiltrate", "Infiltration": "infiltrate", "Mass": "mass", "Nodule": "nodule",
              "Pneumonia": "pneumonia", "Pneumothorax": "pneumothorax", "Emphysema": "emphysema",
              "Fibrosis": "fibrosis", "Pleural_Thickening": "pleural thickening", "Hernia": "hernia",
              "Edema": "edema", "Consolidation": "consolidation"}
BOTH_LUNGS = ["right lung", "left lung"]


@pytest.fixture(scope="module")
def regions() -> RegionVocabulary:
    return load_regions()


# ------------------------------------------------------------------------------------------------ regions


def test_keys_are_exactly_the_contract_and_data_is_package_data(regions):
    assert REGION_KEYS == BRIEF_KEYS == tuple(regions.regions)
    resource = resources.files("prompts") / "data" / "chest_regions_v1.json"
    data = json.loads(resource.read_text(encoding="utf-8"))
    assert tuple(data["regions"]) == REGION_KEYS and data["version"] == "1" == regions.version
    citations = " ".join(regions.sources.values())
    for source in ("Chest ImaGenome", "Felson", "Fleischner", "Segmentation of anatomical structures"):
        assert source in citations
    assert load_regions("1") is regions  # cached
    assert "PATIENT" in regions.notes


@pytest.mark.parametrize("key", BRIEF_KEYS)
def test_every_region_resolves_from_each_synonym_and_keeps_its_side(regions, key):
    region = regions.get(key)
    assert isinstance(region, ChestRegion) and region.key == key
    assert len(region.synonyms) >= 4
    expected_side = key.split()[0] if key.split()[0] in ("left", "right") else None
    assert region.side == expected_side == region_side(key)
    for phrase in region.phrases:
        assert side_of(phrase) == expected_side, phrase
        for variant in (phrase, phrase.upper(), f"the {phrase}.", f"  {phrase.title()} "):
            assert resolve_region(variant) == key, variant
    assert region.structure in load_vocabulary()
    assert region.rule.endswith(".") and ". " not in region.rule[:-1] and len(region.rule) > 20
    assert set(region.sources) <= set(regions.sources) and region.sources


def test_region_structures_and_rules():
    expected = {"right lung": "right lung", "left mid lung zone": "left lung", "right apical zone": "right lung",
                "cardiac silhouette": "heart", "mediastinum": "lung", "upper mediastinum": "lung",
                "left clavicle": "left clavicle", "right hemidiaphragm": "right lung"}
    for key, structure in expected.items():
        assert load_regions().get(key).structure == structure
    assert "third" in load_regions().get("right upper lung zone").rule
    assert "clavicle" in load_regions().get("left apical zone").rule and "15 %" in load_regions().get(
        "left apical zone").rule


@pytest.mark.parametrize(("phrase", "key"), [
    ("heart", "cardiac silhouette"), ("The Heart", "cardiac silhouette"), ("cardiac shadow", "cardiac silhouette"),
    ("right apex", "right apical zone"), ("apex of the left lung", "left apical zone"),
    ("right CP angle", "right costophrenic angle"), ("left hilum", "left hilar structures"),
    ("superior mediastinum", "upper mediastinum"), ("left lung base", "left lower lung zone"),
    ("pulmo dexter", "right lung"), ("clavicula sinistra", "left clavicle"),
    ("left kidney", None), ("lung", None), ("left lower lobe", None), ("", None),
])
def test_resolve_region(phrase, key):
    assert resolve_region(phrase) == key


@pytest.mark.parametrize(("phrase", "expected"), [
    ("right apical pneumothorax", ["right apical zone"]),
    ("bibasilar atelectasis", ["right lower lung zone", "left lower lung zone"]),
    ("nodule in the left upper lobe(S5)", ["left upper lung zone", "left mid lung zone"]),
    ("left lower lobe", ["left mid lung zone", "left lower lung zone"]),
    ("cardiomegaly", []),
    ("right upper lobe", ["right upper lung zone", "right apical zone"]),
    ("right middle lobe(S4)", ["right mid lung zone", "right lower lung zone"]),
    ("right lower lobe", ["right mid lung zone", "right lower lung zone"]),
    ("lingular opacity", ["left mid lung zone", "left lower lung zone"]),
    ("retrocardiac opacity", ["left lower lung zone"]),
    ("basilar atelectasis", ["right lower lung zone", "left lower lung zone"]),
    ("right basilar atelectasis", ["right lower lung zone"]),
    ("left base", ["left lower lung zone"]),
    ("opacity at the left lung base", ["left lower lung zone"]),
    ("upper lobe of the right lung", ["right upper lung zone", "right apical zone"]),
    ("apical pneumothorax", ["right apical zone", "left apical zone"]),
    ("biapical pleural thickening", ["right apical zone", "left apical zone"]),
    ("left upper zone", ["left upper lung zone"]),
    ("upper zone opacity on the right", ["right upper lung zone"]),
    ("left mid lung", ["left mid lung zone"]),
    ("perihilar opacities", ["right mid lung zone", "right hilar structures", "left mid lung zone",
                             "left hilar structures"]),
    ("left perihilar opacity", ["left mid lung zone", "left hilar structures"]),
    ("blunting of the right costophrenic angle", ["right costophrenic angle"]),
    ("left CP angle blunting", ["left costophrenic angle"]),
    ("costophrenic angles", ["right costophrenic angle", "left costophrenic angle"]),
    ("enlarged right hilum", ["right hilar structures"]),
    ("bilateral hilar enlargement", ["right hilar structures", "left hilar structures"]),
    ("left subpulmonic effusion", ["left hemidiaphragm"]),
    ("elevated right hemidiaphragm", ["right hemidiaphragm"]),
    ("widened mediastinum", ["mediastinum"]),
    ("paratracheal stripe", ["upper mediastinum"]),
    ("cardiomediastinal silhouette", ["cardiac silhouette", "mediastinum"]),
    ("the heart", ["cardiac silhouette"]),
    ("lungs", BOTH_LUNGS),
    ("left lung", ["left lung"]),
    ("right apex and left base", ["right apical zone", "left lower lung zone"]),
    ("opacities at the bases bilaterally", ["right lower lung zone", "left lower lung zone"]),
    ("bilateral upper lobe opacities", ["right upper lung zone", "right apical zone", "left upper lung zone",
                                        "left mid lung zone"]),
    ("RUL nodule", ["right upper lung zone", "right apical zone"]),
    ("LLL consolidation", ["left mid lung zone", "left lower lung zone"]),
    ("left clavicle fracture", ["left clavicle"]),
    ("rib fractures", []),
])
def test_location_regions(phrase, expected):
    assert location_regions(phrase) == expected


@pytest.mark.parametrize("side", ["left", "right"])
def test_latin_side_words_give_the_side(side):
    other = "left" if side == "right" else "right"
    for word in sorted(SIDE_WORDS[side]):
        phrase = f"upper lobe {word}"
        assert side_of(phrase) == side == laterality(phrase)
        assert location_regions(phrase) == LOBE_ZONES[f"{side} upper lobe"]
        assert location_regions(f"basal {word}") == [f"{side} lower lung zone"]
        assert other not in " ".join(location_regions(f"apex {word}"))
    assert location_regions(f"lobus inferior pulmonis {'sinistri' if side == 'left' else 'dextri'}") == \
        LOBE_ZONES[f"{side} lower lobe"]


@pytest.mark.parametrize(("phrase", "side"), [
    ("left pleural effusion", "left"), ("pulmo sinister", "left"), ("apex pulmonis dextri", "right"),
    ("bibasilar atelectasis", "bilateral"), ("bilateral effusions", "bilateral"), ("both lungs", "bilateral"),
    ("right greater than left effusions", "bilateral"), ("cardiomegaly", None), ("retrocardiac opacity", None),
])
def test_laterality(phrase, side):
    assert laterality(phrase) == side


def test_region_errors():
    with pytest.raises(InputError, match="right apical zone"):
        region_side("right apex")  # a synonym, not a key: the message names the key
    with pytest.raises(InputError, match="How to fix"):
        region_side("left kidney")
    with pytest.raises(InputError, match="version"):
        load_regions("99")
    with pytest.raises(InputError, match="str"):
        location_regions(3)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        resolve_region(None)  # type: ignore[arg-type]


def _region_data() -> dict:
    return json.loads((resources.files("prompts") / "data" / "chest_regions_v1.json").read_text(encoding="utf-8"))


def test_invalid_region_data_is_rejected():
    assert RegionVocabulary.from_mapping(_region_data()).regions.keys() == load_regions().regions.keys()
    broken = _region_data()
    del broken["regions"]["left clavicle"]
    with pytest.raises(InputError, match="exactly the region keys"):
        RegionVocabulary.from_mapping(broken)
    broken = _region_data()
    broken["regions"]["left lung"]["synonyms"].append("right lung field 2")
    with pytest.raises(InputError, match="side"):
        RegionVocabulary.from_mapping(broken)
    broken = _region_data()
    broken["regions"]["mediastinum"]["structure"] = "thymus"
    with pytest.raises(InputError, match="structure"):
        RegionVocabulary.from_mapping(broken)
    broken = _region_data()
    broken["locations"].append({"words": ["retrosternal"], "regions": ["{side} anterior zone"]})
    with pytest.raises(InputError, match="canonical keys"):
        RegionVocabulary.from_mapping(broken)
    broken = _region_data()
    broken["locations"].append({"words": ["Right Apex"], "regions": ["right apical zone"]})
    with pytest.raises(InputError, match="used once"):
        RegionVocabulary.from_mapping(broken)
    with pytest.raises(InputError):
        RegionVocabulary.from_mapping({"version": "1"})


# ------------------------------------------------------------------------------------------------ findings


def test_findings_file_and_required_findings():
    vocab = load_findings()
    assert load_findings("1") is vocab and vocab.version == "1"
    assert set(REQUIRED_FINDINGS) <= set(vocab.findings)
    citations = " ".join(vocab.sources.values())
    for source in ("Fleischner", "ChestX-ray8", "Chest ImaGenome"):
        assert source in citations
    assert [n for n, f in vocab.findings.items() if f.whole_structure] == ["cardiomegaly"]
    for finding in vocab.findings.values():
        assert set(finding.default_regions) <= set(REGION_KEYS) and finding.default_regions
        assert set(finding.sources) <= set(vocab.sources) and finding.sources


@pytest.mark.parametrize("name", REQUIRED_FINDINGS)
def test_every_finding_resolves_from_each_synonym(name):
    finding = load_findings().get(name)
    assert len(finding.synonyms) >= 4
    for phrase in finding.phrases:
        assert resolve_finding(phrase) == name, phrase
        assert resolve_finding(phrase.upper()) == name, phrase
        assert resolve_finding(f"There is a small {phrase} today.") == name, phrase


@pytest.mark.parametrize(("phrase", "name"), [
    ("PTX", "pneumothorax"), ("effusions", "pleural effusion"), ("enlarged heart", "cardiomegaly"),
    ("cardiac enlargement", "cardiomegaly"), ("the heart is enlarged", "cardiomegaly"),
    ("hiatal hernia", "hernia"), ("mass lesion", "mass"), ("pleural scarring", "pleural thickening"),
    ("lung nodule", "nodule"), ("nodules", "nodule"), ("pulmonary oedema", "edema"), ("TB", "tuberculosis"),
    ("30 mm benign lung nodule in the left upper lobe", "nodule"),
    ("pulmonary edema with pleural effusions", "edema"),  # equal length: the first wins
    ("bibasilar atelectatic changes", "atelectasis"), ("right rib fractures", "fracture"),
    ("heart", None), ("no acute cardiopulmonary process", None), ("", None),
])
def test_resolve_finding(phrase, name):
    assert resolve_finding(phrase) == name


@pytest.mark.parametrize(("name", "regions"), [
    ("cardiomegaly", ["cardiac silhouette"]),
    ("pleural effusion", ["right costophrenic angle", "left costophrenic angle", "right lower lung zone",
                          "left lower lung zone"]),
    ("pneumothorax", ["right apical zone", "left apical zone", "right upper lung zone", "left upper lung zone"]),
    ("nodule", BOTH_LUNGS), ("mass", BOTH_LUNGS), ("edema", BOTH_LUNGS), ("atelectasis", BOTH_LUNGS),
    ("tuberculosis", ["right apical zone", "left apical zone", "right upper lung zone", "left upper lung zone"]),
])
def test_expected_regions(name, regions):
    assert expected_regions(name) == regions
    expected_regions(name).append("mutated")
    assert expected_regions(name) == regions


def test_finding_errors_and_validation():
    with pytest.raises(InputError, match="'pleural effusion'"):
        expected_regions("effusion")
    with pytest.raises(InputError, match="version"):
        load_findings("0")
    with pytest.raises(InputError):
        resolve_finding(None)  # type: ignore[arg-type]
    data = json.loads((resources.files("prompts") / "data" / "findings_v1.json").read_text(encoding="utf-8"))
    assert set(FindingVocabulary.from_mapping(data).findings) == set(load_findings().findings)
    data["findings"]["mass"]["default_regions"] = ["left lobe"]
    with pytest.raises(InputError, match="default_regions"):
        FindingVocabulary.from_mapping(data)
    data["findings"]["mass"]["default_regions"] = ["left lung"]
    data["findings"]["mass"]["synonyms"].append("Nodules")
    with pytest.raises(InputError, match="one finding only"):
        FindingVocabulary.from_mapping(data)


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.data
def test_nih_bbox_labels_all_resolve():
    for label, name in NIH_LABELS.items():
        assert resolve_finding(label.replace("_", " ")) == name
    with (data_dir("cxr_nih_bbox") / "BBox_List_2017.csv").open(newline="") as handle:
        labels = {row["Finding Label"] for row in csv.DictReader(handle)}
    assert labels and labels <= set(NIH_LABELS)
    assert all(resolve_finding(label) for label in labels)


@pytest.mark.data
def test_jsrt_locations_and_phrases_map_to_lobe_zones():
    with (data_dir("cxr_jsrt_scr") / "nodules.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["location"]]
    assert len(rows) >= 90
    for row in rows:
        lobe = re.sub(r"\(.*\)", "", row["location"]).strip()
        assert location_regions(row["location"]) == LOBE_ZONES[lobe], row["location"]
        assert location_regions(row["phrase"]) == LOBE_ZONES[lobe], row["phrase"]
        assert resolve_finding(row["phrase"]) == "nodule"
        assert laterality(row["phrase"]) == lobe.split()[0]
