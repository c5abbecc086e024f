"""Rule-based text processing of the grounding agent (agents/text.py): question targets, report sentence splitting,
mentions with regions, negation / uncertainty / normal assertions and laterality. Pure Python: no model, no data."""

from __future__ import annotations

import pytest

from agents.text import Mention, extract_target, find_mentions, parse_phrase, split_sentences
from medvlm.errors import InputError

BOTH_LUNGS = ["right lung", "left lung"]
EFFUSION = ["right costophrenic angle", "left costophrenic angle", "right lower lung zone", "left lower lung zone"]
PTX = ["right apical zone", "left apical zone", "right upper lung zone", "left upper lung zone"]
HEART = ["cardiac silhouette"]


def _m(text, finding=None, structure=None, regions=(), assertion="present", side=None) -> Mention:
    return Mention(text, finding, structure, list(regions), assertion, side)


# ------------------------------------------------------------------------------------------------ extract_target


@pytest.mark.parametrize(("question", "target"), [
    ("where is the right apical pneumothorax?", "right apical pneumothorax"),
    ("Where's the heart?", "heart"),
    ("Where’s the heart?", "heart"),
    ("show me the left lung", "left lung"),
    ("segment the left clavicle", "left clavicle"),
    ("Is there a nodule in the right upper lobe?", "nodule in the right upper lobe"),
    ("find cardiomegaly", "cardiomegaly"),
    ("can you locate the pleural effusion on this image", "pleural effusion"),
    ("Could you please highlight the Left Hemidiaphragm in this radiograph?", "Left Hemidiaphragm"),
    ("Where is the heart located in this image, please?", "heart"),
    ("Are there any nodules?", "nodules"),
    ("draw a box around the mass", "mass"),
    ("point to the trachea", "trachea"),
    ("  Right apical   pneumothorax. ", "Right apical pneumothorax"),
    ("marked cardiomegaly", "marked cardiomegaly"),
    ("The heart", "The heart"),
    ("Findings of effusion", "Findings of effusion"),
])
def test_extract_target(question, target):
    assert extract_target(question) == target


@pytest.mark.parametrize("question", ["", "   \n ", "where is?", "show me", None])
def test_extract_target_rejects_empty(question):
    with pytest.raises(InputError) as info:
        extract_target(question)
    assert info.value.expected and info.value.received and info.value.fix


# ------------------------------------------------------------------------------------------------ split_sentences


REPORT = """EXAMINATION: CHEST (PA AND LAT)

INDICATION: Cough; fever. Evaluate for pneumonia.

COMPARISON: Chest radiograph from Dr. Smith's office, approx. 2 weeks ago.

FINDINGS:
Small left pleural effusion and right basilar atelectasis. No pneumothorax or
pleural effusion on the right; the heart size is normal.
The cardiomediastinal silhouette is within normal limits. A 2.5 cm nodule in
the left upper lobe may represent a granuloma, e.g. from prior infection.

IMPRESSION:
1. Right lower lobe opacity, likely atelectasis, but pneumonia cannot be excluded.
2. No pulmonary edema.
- Clinical correlation recommended.
"""

REPORT_SENTENCES = [
    "CHEST (PA AND LAT)",
    "Cough; fever.",
    "Evaluate for pneumonia.",
    "Chest radiograph from Dr. Smith's office, approx. 2 weeks ago.",
    "Small left pleural effusion and right basilar atelectasis.",
    "No pneumothorax or pleural effusion on the right; the heart size is normal.",
    "The cardiomediastinal silhouette is within normal limits.",
    "A 2.5 cm nodule in the left upper lobe may represent a granuloma, e.g. from prior infection.",
    "Right lower lobe opacity, likely atelectasis, but pneumonia cannot be excluded.",
    "No pulmonary edema.",
    "Clinical correlation recommended.",
]


def test_split_sentences_full_report():
    assert split_sentences(REPORT) == REPORT_SENTENCES


@pytest.mark.parametrize(("report", "sentences"), [
    ("Findings: Lungs are clear. Impression: Normal.", ["Lungs are clear.", "Normal."]),
    ("Heart normal\nLungs clear", ["Heart normal", "Lungs clear"]),
    ("* Effusion.\n* Atelectasis", ["Effusion.", "Atelectasis"]),
    ("1. Effusion. 2. No pneumothorax.", ["Effusion.", "No pneumothorax."]),
    ("Nodule measures 2.5 cm. Stable.", ["Nodule measures 2.5 cm.", "Stable."]),
    ("Opacity vs. atelectasis; no effusion.", ["Opacity vs. atelectasis; no effusion."]),
    ("Is this pneumonia? Possibly!", ["Is this pneumonia?", "Possibly!"]),
    ("", []), ("  \n\n IMPRESSION:  \n", []),
])
def test_split_sentences_cases(report, sentences):
    assert split_sentences(report) == sentences


def test_split_sentences_rejects_non_text():
    with pytest.raises(InputError, match="How to fix"):
        split_sentences(["a list"])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ find_mentions


@pytest.mark.parametrize(("sentence", "mentions"), [
    ("Small left pleural effusion and right basilar atelectasis.", [
        _m("left pleural effusion", "pleural effusion", None, ["left costophrenic angle", "left lower lung zone"],
           side="left"),
        _m("right basilar atelectasis", "atelectasis", None, ["right lower lung zone"], side="right")]),
    ("No pneumothorax or pleural effusion.", [
        _m("pneumothorax", "pneumothorax", None, PTX, "absent"),
        _m("pleural effusion", "pleural effusion", None, EFFUSION, "absent")]),
    ("The heart size is normal.", [_m("heart", None, "cardiac silhouette", HEART, "normal")]),
    ("Normal heart size.", [_m("heart", None, "cardiac silhouette", HEART, "normal")]),
    ("Lungs are clear.", [_m("Lungs", None, None, BOTH_LUNGS, "normal")]),
    ("The cardiomediastinal silhouette is within normal limits", [
        _m("cardiomediastinal silhouette", None, None, ["cardiac silhouette", "mediastinum"], "normal")]),
    ("Heart size and mediastinal contours are normal.", [
        _m("Heart", None, "cardiac silhouette", HEART, "normal"),
        _m("mediastinal contours", None, "mediastinum", ["mediastinum"], "normal")]),
    ("The heart is not enlarged.", [_m("heart", None, "cardiac silhouette", HEART, "normal")]),
    ("Comparison is made with the prior study.", []),
    ("Clinical correlation recommended.", []),
    ("No acute cardiopulmonary process.", []),
    ("Right apical pneumothorax.", [
        _m("Right apical pneumothorax", "pneumothorax", None, ["right apical zone"], side="right")]),
    ("Bibasilar atelectasis.", [
        _m("Bibasilar atelectasis", "atelectasis", None, ["right lower lung zone", "left lower lung zone"],
           side="bilateral")]),
    ("Mild cardiomegaly.", [_m("cardiomegaly", "cardiomegaly", None, HEART)]),
    ("There is a 2.5 cm nodule in the left upper lobe(S5); no effusion.", [
        _m("nodule in the left upper lobe", "nodule", None, ["left upper lung zone", "left mid lung zone"],
           side="left"),
        _m("effusion", "pleural effusion", None, EFFUSION, "absent")]),
    ("Retrocardiac opacity, possibly atelectasis.", [
        _m("Retrocardiac opacity", "opacity", None, ["left lower lung zone"], side="left"),
        _m("atelectasis", "atelectasis", None, BOTH_LUNGS, "uncertain")]),
    ("Pneumonia in the lingula.", [
        _m("Pneumonia in the lingula", "pneumonia", None, ["left mid lung zone", "left lower lung zone"],
           side="left")]),
    ("Left-sided pleural effusion.", [
        _m("Left-sided pleural effusion", "pleural effusion", None, ["left costophrenic angle",
                                                                     "left lower lung zone"], side="left")]),
    ("Right greater than left pleural effusions.", [
        _m("Right greater than left pleural effusions", "pleural effusion", None, EFFUSION, side="bilateral")]),
    ("The left lower lobe is collapsed.", [
        _m("left lower lobe is collapsed", "atelectasis", None, ["left mid lung zone", "left lower lung zone"],
           side="left")]),
    ("Enlarged cardiac silhouette.", [_m("Enlarged cardiac silhouette", "cardiomegaly", None, HEART)]),
    ("The right hemidiaphragm is elevated.", [
        _m("right hemidiaphragm", None, "right hemidiaphragm", ["right hemidiaphragm"], side="right")]),
    ("Effusion of pulmo dexter.", [
        _m("Effusion of pulmo dexter", "pleural effusion", None, ["right lung"], side="right")]),
    ("Nodulus in lobus superior pulmonis sinistri.", [
        _m("lobus superior pulmonis sinistri", None, None, ["left upper lung zone", "left mid lung zone"],
           side="left")]),
])
def test_find_mentions(sentence, mentions):
    assert find_mentions(sentence) == mentions


@pytest.mark.parametrize(("sentence", "assertions"), [
    # negation triggers and scope
    ("No pneumothorax.", ["absent"]),
    ("Lungs are clear without focal consolidation, effusion, or pneumothorax.",
     ["normal", "absent", "absent", "absent"]),
    ("Negative for pneumothorax.", ["absent"]),
    ("The lungs are free of consolidation.", ["absent"]),
    ("There is no evidence of pneumothorax.", ["absent"]),
    ("The right pleural effusion has resolved.", ["absent"]),
    ("Resolved left lower lobe pneumonia.", ["absent"]),
    ("Pneumothorax is not seen.", ["absent"]),
    ("Interval resolution of the right pleural effusion.", ["absent"]),
    ("No pneumothorax, but a small left effusion.", ["absent", "present"]),
    ("No effusion; however, bibasilar atelectasis is present.", ["absent", "present"]),
    ("No pneumothorax although a nodule is noted.", ["absent", "present"]),
    ("No focal consolidation which would suggest pneumonia.", ["absent", "present"]),
    ("Right effusion is unchanged and left effusion has resolved.", ["present", "absent"]),
    ("No change in small left pleural effusion.", ["present"]),
    # uncertainty
    ("Pneumothorax cannot be excluded.", ["uncertain"]),
    ("Cannot exclude a small pneumothorax.", ["uncertain"]),
    ("Small effusion cannot be excluded.", ["uncertain"]),
    ("Possible right lower lobe pneumonia.", ["uncertain"]),
    ("Possibly early edema.", ["uncertain"]),
    ("Opacity which may represent pneumonia.", ["present", "uncertain"]),
    ("Questionable nodule in the left apex.", ["uncertain"]),
    ("Findings suspicious for tuberculosis.", ["uncertain"]),
    ("Likely atelectasis.", ["uncertain"]),
    ("Probable small effusion.", ["uncertain"]),
    ("Opacity concerning for pneumonia.", ["present", "uncertain"]),
    ("Atelectasis versus consolidation.", ["uncertain", "uncertain"]),
    ("Right lower lobe opacity, likely atelectasis, but pneumonia cannot be excluded.",
     ["present", "uncertain", "uncertain"]),
])
def test_assertions(sentence, assertions):
    assert [m.assertion for m in find_mentions(sentence)] == assertions


def test_report_mentions_end_to_end():
    found = [(m.text, m.finding, m.assertion, m.regions) for s in split_sentences(REPORT) for m in find_mentions(s)]
    assert found == [
        ("pneumonia", "pneumonia", "uncertain", BOTH_LUNGS),
        ("left pleural effusion", "pleural effusion", "present", ["left costophrenic angle", "left lower lung zone"]),
        ("right basilar atelectasis", "atelectasis", "present", ["right lower lung zone"]),
        ("pneumothorax", "pneumothorax", "absent", PTX),
        ("pleural effusion on the right", "pleural effusion", "absent", ["right costophrenic angle",
                                                                        "right lower lung zone"]),
        ("heart", None, "normal", HEART),
        ("cardiomediastinal silhouette", None, "normal", ["cardiac silhouette", "mediastinum"]),
        ("nodule in the left upper lobe", "nodule", "present", ["left upper lung zone", "left mid lung zone"]),
        ("Right lower lobe opacity", "opacity", "present", ["right mid lung zone", "right lower lung zone"]),
        ("atelectasis", "atelectasis", "uncertain", BOTH_LUNGS),
        ("pneumonia", "pneumonia", "uncertain", BOTH_LUNGS),
        ("pulmonary edema", "edema", "absent", BOTH_LUNGS),
    ]


def test_find_mentions_rejects_non_text():
    assert find_mentions("") == []
    with pytest.raises(InputError):
        find_mentions(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ parse_phrase


@pytest.mark.parametrize(("phrase", "mention"), [
    ("right apical pneumothorax", _m("right apical pneumothorax", "pneumothorax", None, ["right apical zone"],
                                     side="right")),
    ("heart", _m("heart", None, "cardiac silhouette", HEART)),
    ("The Heart.", _m("The Heart", None, "cardiac silhouette", HEART)),
    ("left lung", _m("left lung", None, "left lung", ["left lung"], side="left")),
    ("left lower lobe", _m("left lower lobe", None, None, ["left mid lung zone", "left lower lung zone"],
                           side="left")),
    ("cardiomegaly", _m("cardiomegaly", "cardiomegaly", None, HEART)),
    ("left pleural effusion", _m("left pleural effusion", "pleural effusion", None,
                                 ["left costophrenic angle", "left lower lung zone"], side="left")),
    ("pleural effusion", _m("pleural effusion", "pleural effusion", None, EFFUSION)),
    ("30 mm benign lung nodule in the left upper lobe",
     _m("30 mm benign lung nodule in the left upper lobe", "nodule", None,
        ["left upper lung zone", "left mid lung zone"], side="left")),
    ("no pneumothorax", _m("no pneumothorax", "pneumothorax", None, PTX, "absent")),
    ("possible pneumonia", _m("possible pneumonia", "pneumonia", None, BOTH_LUNGS, "uncertain")),
    ("pulmo sinister", _m("pulmo sinister", None, "left lung", ["left lung"], side="left")),
    ("nodule in lobus superior pulmonis dextri", _m("nodule in lobus superior pulmonis dextri", "nodule", None,
                                                    ["right upper lung zone", "right apical zone"], side="right")),
    ("dexter pneumothorax", _m("dexter pneumothorax", "pneumothorax", None,
                               ["right apical zone", "right upper lung zone"], side="right")),
    ("bibasilar atelectasis", _m("bibasilar atelectasis", "atelectasis", None,
                                 ["right lower lung zone", "left lower lung zone"], side="bilateral")),
    ("trachea", _m("trachea")),
])
def test_parse_phrase(phrase, mention):
    assert parse_phrase(phrase) == mention


@pytest.mark.parametrize("phrase", ["", "  ", None])
def test_parse_phrase_rejects_empty(phrase):
    with pytest.raises(InputError, match="How to fix"):
        parse_phrase(phrase)


@pytest.mark.parametrize(("sentence", "regions"), [
    ("A 37 mm pulmonary nodule projects over the right lower lobe.", ["right mid lung zone", "right lower lung zone"]),
    ("A nodule overlies the left upper lobe.", ["left upper lung zone", "left mid lung zone"]),
    ("Nodule adjacent to the left hilum.", ["left hilar structures"]),
])
def test_placement_verbs_keep_the_location(sentence: str, regions: list[str]) -> None:
    [mention] = find_mentions(sentence)
    assert mention.regions == regions
