"""Rule-based text processing of the grounding agent (agents/text.py): question targets, report sentence splitting,
mentions with regions, negation / uncertainty / normal assertions and laterality. Pure Python: no model, no data."""

from __future__ import annotations

import pytest

from agents.text import (
    Mention,
    assert_target,
    assertion_triggers,
    extract_target,
    find_mentions,
    parse_phrase,
    refine_sentences,
    split_sentences,
)
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
    ("Retrocardiac opacity, possibly atelectasis.", [  # the atelectasis takes the opacity's side
        _m("Retrocardiac opacity", "opacity", None, ["left lower lung zone"], side="left"),
        _m("atelectasis", "atelectasis", None, ["left lung"], "uncertain", side="left")]),
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
        ("atelectasis", "atelectasis", "uncertain", ["right lung"]),  # the sentence's side carries
        ("pneumonia", "pneumonia", "uncertain", ["right lung"]),
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


# ---------------------------------------------------------------------------------------- faults of real reports


@pytest.mark.parametrize(("sentence", "text", "regions", "side"), [
    ("A small left pleural effusion with adjacent atelectasis.", "atelectasis", ["left lung"], "left"),
    ("Persistent right pleural effusion with adjacent atelectasis.", "atelectasis", ["right lung"], "right"),
    ("Right lower lobe opacity, likely atelectasis.", "atelectasis", ["right lung"], "right"),
    ("Left apical pneumothorax and adjacent effusion.", "effusion",
     ["left costophrenic angle", "left lower lung zone"], "left"),
    ("Bibasilar opacities with small effusions.", "effusions", EFFUSION, "bilateral"),
])
def test_a_sentence_side_carries_to_its_other_findings(sentence, text, regions, side):
    mention = next(m for m in find_mentions(sentence) if m.text == text)
    assert (mention.regions, mention.side) == (regions, side)


@pytest.mark.parametrize(("sentence", "text", "mention"), [
    # a negated finding neither takes nor gives a side
    ("Left effusion, no pneumothorax.", "pneumothorax", _m("pneumothorax", "pneumothorax", None, PTX, "absent")),
    ("No left effusion. Atelectasis.", "Atelectasis", _m("Atelectasis", "atelectasis", None, BOTH_LUNGS)),
    # a midline finding keeps its region; a finding with its own side keeps it
    ("Left upper lobe nodule and cardiomegaly.", "cardiomegaly", _m("cardiomegaly", "cardiomegaly", None, HEART)),
    ("Left effusion and right basilar atelectasis.", "right basilar atelectasis",
     _m("right basilar atelectasis", "atelectasis", None, ["right lower lung zone"], side="right")),
])
def test_side_does_not_carry(sentence, text, mention):
    assert next(m for m in find_mentions(sentence) if m.text == text) == mention


@pytest.mark.parametrize(("sentence", "text"), [
    ("Pacemaker leads terminate in the right atrium.", "right atrium"),
    ("The tip is in the upper right atrium.", "upper right atrium"),  # IU: "upper" is the chamber's, not a zone
    ("Cardiac defibrillator XXXX overlies the right ventricle.", "right ventricle"),  # IU
    ("A left-sided hemodialysis catheter is in XXXX with its distal tip at the right atrium.", "right atrium"),  # IU
])
def test_a_device_sentence_grounds_the_named_heart_chamber(sentence, text):
    # the chest vocabulary has no chamber: the cardiac silhouette, midline (the side word is the chamber's)
    assert find_mentions(sentence) == [_m(text, None, "cardiac silhouette", HEART)]


def test_heart_chamber_phrases_parse_to_the_cardiac_silhouette():
    assert parse_phrase("right atrium") == _m("right atrium", None, "cardiac silhouette", HEART)
    assert parse_phrase("left ventricle").regions == HEART
    [mention] = find_mentions("Mass in the right atrium.")
    assert (mention.finding, mention.regions, mention.side) == ("mass", HEART, None)


def test_both_faults_at_the_text_level_of_link_report():
    from agents.report import sentence_links

    links = sentence_links("A small left pleural effusion with adjacent atelectasis. "
                           "Pacemaker leads terminate in the right atrium.", method="rules")
    assert [link.status for link in links] == ["grounded", "grounded"]
    effusion, atelectasis = links[0].mentions
    assert effusion["regions"] == ["left costophrenic angle", "left lower lung zone"]
    assert (atelectasis["regions"], atelectasis["side"]) == (["left lung"], "left")
    assert atelectasis["grounded_as"] == "left atelectasis"  # the grounder reads the phrase alone
    assert parse_phrase("left atelectasis").regions == ["left lung"]
    [atrium] = links[1].mentions
    assert (atrium["regions"], atrium["structure"]) == (HEART, "cardiac silhouette") and "grounded_as" not in atrium


# ------------------------------------------------------------------------------------------------ assert_target


@pytest.mark.parametrize(("sentence", "target", "assertion"), [
    ("Extremities reveal no peripheral cyanosis or EDEMA.", "edema", "absent"),
    ("No pneumothorax, but a small left effusion.", "left effusion", "present"),
    ("Pneumothorax cannot be excluded.", "pneumothorax", "uncertain"),
    ("The right pleural effusion has resolved.", "right pleural effusion", "absent"),
    ("No change in the   small calcified nodule.", "small  calcified nodule", "present"),  # pseudo; spaces free
    ("HYPERTENSION.", "Hypertension", "present"),
    ("The oral mucosa is moist with no erythema.", "oral mucosa is moist with no erythema", "present"),  # inside
    ("No edema", (3, 8), "absent"),
])
def test_assert_target(sentence, target, assertion):
    assert assert_target(sentence, target) == assertion


@pytest.mark.parametrize("target", ["pneumonia", (0, 99), (5, 5), ""])
def test_assert_target_rejects_a_target_outside_the_sentence(target):
    with pytest.raises(InputError, match="How to fix"):
        assert_target("No pleural effusion.", target)


def test_assertion_triggers_for_other_engines():
    triggers = assertion_triggers()
    assert ("no change", "pseudo", "forward") in triggers
    assert ("cannot be excluded", "uncertain", "backward") in triggers
    assert ("versus", "uncertain", "both") in triggers and ("has resolved", "negated", "backward") in triggers
    assert all(kind in ("negated", "uncertain", "pseudo") for _, kind, _ in triggers)
    assert not any(phrase == "normal" for phrase, _, _ in triggers)


# ------------------------------------------------------------------------------------------------ refine_sentences


@pytest.mark.parametrize(("pieces", "sentences"), [
    (["Chest radiograph from Dr.", "Smith's office, approx.", "2 weeks ago."],
     ["Chest radiograph from Dr. Smith's office, approx. 2 weeks ago."]),
    (["No acute cardiopulmonary abnormality. 2. 1.7 cm nodular opacity within the right hilum."],  # IU CXR729
     ["No acute cardiopulmonary abnormality.", "1.7 cm nodular opacity within the right hilum."]),
    (["No pleural effusions or pneumothoraces.", "cardiomegaly."],  # IU CXR50: a lower-case start stays apart
     ["No pleural effusions or pneumothoraces.", "cardiomegaly."]),
    (["No evidence of acute cardiopulmonary process. 2."], ["No evidence of acute cardiopulmonary process."]),
    ([], []),
])
def test_refine_sentences(pieces, sentences):
    assert refine_sentences(pieces) == sentences


# ------------------------------------------------------------------------------------------------ on the image


@pytest.fixture(scope="module")
def demo():
    from agents.pipeline import GroundingAgent
    from medvlm.assets import DEMO_IMAGE, asset_path
    from medvlm.io import load_image

    return GroundingAgent("medvlm"), load_image(asset_path(DEMO_IMAGE))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rules", "combined"])
def test_faults_on_the_bundled_chest_xray(demo, method):
    """The real offline Med-VLM grounder on the bundled PA chest X-ray (cardiomegaly with a pacemaker)."""
    import numpy as np

    from agents import clinical_nlp
    from agents.report import link_report

    if method != "rules" and not clinical_nlp.available():
        pytest.skip("medspaCy is not installed")
    agent, image = demo
    effusion, device = link_report(agent, image, "A small left pleural effusion with adjacent atelectasis. "
                                   "Pacemaker leads terminate in the right atrium.", method=method)
    assert (effusion.status, device.status) == ("grounded", "grounded")
    # (a) two regions, both on the patient's LEFT (the image right of the midline); none on the right
    assert [r.provenance["regions"] for r in effusion.regions] == [
        ["left costophrenic angle", "left lower lung zone"], ["left lung"]]
    midline = agent.anatomy(image).midline_x()
    for region in effusion.regions:
        columns = np.nonzero(region.mask.data)[1]
        assert (columns > midline).mean() > 0.95
    assert effusion.regions[1].label == "left lung, where the phrase places the atelectasis"
    # (b) the named anatomy: the cardiac silhouette, segmented
    [heart] = device.regions
    assert heart.provenance["regions"] == ["cardiac silhouette"] and heart.label == "right atrium"
    assert heart.provenance["localisation"] == "segmented" and heart.provenance["sentence"] == 2
    x0, y0, x1, _ = heart.box.to_list()
    assert x0 < midline < x1 and y0 > image.height * 0.35  # straddles the midline, in the lower chest
