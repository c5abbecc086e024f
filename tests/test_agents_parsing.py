"""agents.parsing: every reply format mapped to pixel xyxy of the ORIGINAL image, with hand-computed boxes.

Unless a test says otherwise the original image is H=1000 x W=2000 and the sent image H=500 x W=1000 (a 0.5
downscale), so pixel answers about the sent image double, and 0-1000 answers scale x by 2 and y by 1.
"""

from __future__ import annotations

import json

import pytest

from agents.parsing import (
    FORMATS,
    GROUNDING_SCHEMA,
    ParseResult,
    parse_grounding,
    qwen25vl_input_size,
    response_format,
)
from medvlm.errors import InputError
from medvlm.tokens import decode_box, encode_box
from medvlm.types import Box

IMAGE = (1000, 2000)  # (H, W) original
SENT = (500, 1000)  # (H, W) as sent


def parse(text: str, **kwargs: object) -> ParseResult:
    kwargs.setdefault("image_size", IMAGE)
    kwargs.setdefault("sent_size", SENT)
    return parse_grounding(text, **kwargs)  # type: ignore[arg-type]


def boxes(result: ParseResult) -> list[list[float]]:
    return [[round(v, 4) for v in r.box.to_list()] if r.box else [] for r in result.regions]


# ------------------------------------------------------------------------------------------------ formats


def test_project_json_schema_is_pixels_of_the_sent_image() -> None:
    reply = json.dumps({"regions": [{"label": "heart", "box": [100, 50, 300, 250], "points": [[200, 150]],
                                     "score": 0.8}]})
    result = parse(reply)
    assert result.format == "json" and result.warnings == []
    assert boxes(result) == [[200.0, 100.0, 600.0, 500.0]]
    region = result.regions[0]
    assert region.points == [(400.0, 300.0)] and region.label == "heart" and region.score == 0.8


def test_sent_size_defaults_to_the_image_size() -> None:
    result = parse('{"regions": [{"label": "x", "box": [100, 50, 300, 250]}]}', sent_size=None)
    assert boxes(result) == [[100.0, 50.0, 300.0, 250.0]]


def test_qwen2vl_tokens_per_mille_with_label_carried_to_following_boxes() -> None:
    reply = ("<|object_ref_start|>rib<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
             "<|box_start|>(500,600),(700,800)<|box_end|>"
             "<|object_ref_start|>heart<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>")
    result = parse(reply)
    assert result.format == "qwen2vl" and result.warnings == []
    # x * 2000 / 1000, y * 1000 / 1000
    assert boxes(result) == [[200.0, 200.0, 600.0, 400.0], [1000.0, 600.0, 1400.0, 800.0], [0.0, 0.0, 2000.0, 1000.0]]
    assert [r.label for r in result.regions] == ["rib", "rib", "heart"]


def test_qwen2vl_bare_form_and_special_tokens_stripped_form() -> None:
    assert boxes(parse("(100,200),(300,400)")) == [[200.0, 200.0, 600.0, 400.0]]
    result = parse("the heart(250, 100), (750, 900)")  # what skip_special_tokens=True leaves
    assert result.format == "qwen2vl" and boxes(result) == [[500.0, 100.0, 1500.0, 900.0]]


def test_qwen25vl_defaults_to_smart_resize_of_the_image() -> None:
    assert qwen25vl_input_size(*IMAGE) == (700, 1400)  # hand-computed: beta = sqrt(2e6 / 1003520)
    reply = '```json\n[{"bbox_2d": [140, 70, 280, 210], "label": "heart"}, {"point_2d": [700, 350], "label": "c"}]\n```'
    result = parse(reply, sent_size=None)
    assert result.format == "qwen25vl"
    assert boxes(result) == [[200.0, 100.0, 400.0, 300.0], []]  # x 2000/1400, y 1000/700
    assert result.regions[1].box is None and result.regions[1].points == [pytest.approx((1000.0, 500.0))]
    assert [r.label for r in result.regions] == ["heart", "c"]


def test_qwen25vl_uses_sent_size_when_given() -> None:
    result = parse('[{"bbox_2d": [10, 20, 30, 40], "label": "heart"}]', sent_size=(700, 1400))
    assert [round(v, 6) for v in result.regions[0].box.to_list()] == [
        round(10 * 2000 / 1400, 6), round(20 * 1000 / 700, 6), round(30 * 2000 / 1400, 6), round(40 * 1000 / 700, 6)]


@pytest.mark.parametrize("size", [(1, 1), (10, 1900), (28, 28), (100, 200), (500, 1000), (1000, 2000), (2048, 2500),
                                  (4000, 3000), (999, 1001), (14, 14), (3136, 3136), (27, 5000)])
@pytest.mark.parametrize("max_pixels", [28 * 28 * 1280, 12845056, 28 * 28 * 16])
def test_qwen25vl_input_size_equals_transformers_smart_resize(size: tuple[int, int], max_pixels: int) -> None:
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    assert qwen25vl_input_size(*size, max_pixels=max_pixels) == tuple(
        module.smart_resize(*size, factor=28, min_pixels=56 * 56, max_pixels=max_pixels))


def test_paligemma_loc_tokens_multi() -> None:
    reply = "<loc0256><loc0512><loc0767><loc1023> heart ; <loc0000><loc0000><loc0511><loc0511> left lung"
    result = parse(reply)
    assert result.format == "paligemma" and result.warnings == []
    # y0 = 256/1024*1000, x0 = 512/1024*2000, y1 = 768/1024*1000, x1 = 1024/1024*2000
    assert boxes(result) == [[1000.0, 250.0, 2000.0, 750.0], [0.0, 0.0, 1000.0, 500.0]]
    assert [r.label for r in result.regions] == ["heart", "left lung"]


def test_paligemma_out_of_range_and_inverted_bins() -> None:
    result = parse("<loc0767><loc1023><loc0256><loc2000> heart")
    assert boxes(result) == [[1998.0469, 250.0, 2000.0, 750.0]]  # x bins 1023..1023 after clipping 2000 -> 1023
    assert any("above 1023" in w for w in result.warnings)
    assert any("inverted" in w for w in result.warnings)


def _iou(a: Box, b: Box) -> float:
    inter = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    return inter / (a.area + b.area - inter)


@pytest.mark.parametrize(("size", "box"), [
    ((300, 700), Box(100.0, 50.0, 400.0, 250.0)),  # smaller than 1024: a bin is 700/1024 x 300/1024 pixels
    ((2000, 3000), Box(123.0, 456.0, 2345.0, 1789.0)),  # larger: a bin is ~2.93 x ~1.95 pixels
    ((1000, 2000), Box(0.0, 0.0, 2000.0, 1000.0)),  # the whole image
])
def test_medvlm_tokens_round_trip_encode_box_on_a_non_square_image(size: tuple[int, int], box: Box) -> None:
    height, width = size
    reply = f"heart: {encode_box(box, height, width)}"
    # the bins are fractions of the ORIGINAL image: the sent size plays no part
    for sent in (None, (height // 3, width // 3)):
        result = parse_grounding(reply, image_size=size, sent_size=sent)
        assert result.format == "medvlm" and result.warnings == []
        (region,) = result.regions
        assert region.label == "heart" and region.points == [] and region.score is None
        assert region.box is not None and region.box == decode_box(reply, height, width)  # the codec's inverse
        got = region.box.to_list()
        bin_x, bin_y = width / 1024, height / 1024
        assert all(abs(g - e) <= b for g, e, b in zip(got, box.to_list(), (bin_x, bin_y, bin_x, bin_y)))
        assert _iou(region.box, box) > 0.99
        assert 0 <= got[0] < got[2] <= width and 0 <= got[1] < got[3] <= height


def _loc_box(x0: int, y0: int, x1: int, y1: int, height: int = 1000, width: int = 2000) -> list[float]:
    """Hand formula of medvlm.tokens: bin b is the pixel (b + 0.5) * size / 1024 - 0.5; x1/y1 are the last pixel
    + 1; clipped to the image."""
    def px(b: int, size: int) -> float:
        return (b + 0.5) * size / 1024 - 0.5

    box = [max(0.0, px(x0, width)), max(0.0, px(y0, height)), min(width, px(x1, width) + 1),
           min(height, px(y1, height) + 1)]
    return [round(v, 4) for v in box]


def test_medvlm_tokens_several_boxes_labels_and_bin_frame() -> None:
    reply = ("left lung: <box><loc0000><loc0000><loc0511><loc0511></box>; "
             "right lung : <box> <loc0512> <loc0256> <loc1023> <loc0767> </box>;<box><loc0000><loc0000><loc1023>"
             "<loc1023></box>")
    result = parse(reply)
    assert result.format == "medvlm" and result.warnings == []
    # x first, fractions of the ORIGINAL 2000 x 1000 image (sent_size plays no part)
    assert boxes(result) == [_loc_box(0, 0, 511, 511), _loc_box(512, 256, 1023, 767), _loc_box(0, 0, 1023, 1023)]
    assert boxes(result)[0] == [0.4766, 0.0, 999.5234, 500.0117]  # by hand: y0 = -0.0117 clipped to 0
    assert [r.label for r in result.regions] == ["left lung", "right lung", None]
    assert parse(reply, fmt="medvlm").regions == result.regions


def test_medvlm_is_detected_only_with_box_markup_else_paligemma() -> None:
    bins = "<loc0256><loc0512><loc0767><loc1023>"
    medvlm = parse(f"heart: <box>{bins}</box>")
    paligemma = parse(f"{bins} heart")  # <loc> without <box>: PaliGemma, y x y x
    assert medvlm.format == "medvlm" and paligemma.format == "paligemma"
    assert boxes(medvlm) == [_loc_box(256, 512, 767, 1023)]  # x0 y0 x1 y1
    assert boxes(paligemma) == [[1000.0, 250.0, 2000.0, 750.0]]  # y0 = 256, x0 = 512, y1 = 767, x1 = 1023
    # a forced format reads only its own syntax
    assert parse(f"{bins} heart", fmt="medvlm").format == "unparsed"
    assert parse(f"heart: <box>{bins}</box>", fmt="paligemma").format == "paligemma"  # same bins read y first
    # <box> text without a medvlm group falls back to PaliGemma
    assert parse(f"{bins} heart <box>").format == "paligemma"


def test_medvlm_malformed_group_warns_and_gives_no_region() -> None:
    three = "heart: <box><loc0001><loc0002><loc0003></box>"
    for fmt in ("auto", "medvlm"):
        result = parse(three, fmt=fmt)
        assert result.regions == [] and result.format == "unparsed"
        assert any("without 4 <loc> tokens" in w for w in result.warnings)
    five = "heart: <box><loc0001><loc0002><loc0003><loc0004><loc0005></box>"
    assert parse(five, fmt="medvlm").regions == []
    result = parse(f"{three}; lung: <box><loc0000><loc0000><loc0511><loc0511></box>")
    assert result.format == "medvlm" and boxes(result) == [_loc_box(0, 0, 511, 511)]
    assert [r.label for r in result.regions] == ["lung"]
    assert result.warnings == ["1 <box> group(s) without 4 <loc> tokens ignored"]


OVER_1023 = ["<loc2000><loc0100><loc3000><loc0200>", "<loc0100><loc0100><loc2000><loc0200>",
             "<loc9999><loc9999><loc9999><loc9999>", "<loc1024><loc0000><loc1023><loc1023>"]


@pytest.mark.parametrize("bins", OVER_1023)
def test_medvlm_bins_above_1023_never_raise(bins: str) -> None:
    result = parse(f"heart: <box>{bins}</box>")  # any 4-digit bin matches the syntax (and TOKEN_ANSWER_REGEX)
    assert isinstance(result, ParseResult)
    for region in result.regions:
        assert region.box is not None
        assert 0 <= region.box.x0 < region.box.x1 <= 2000 and 0 <= region.box.y0 < region.box.y1 <= 1000


@pytest.mark.parametrize("bins", OVER_1023)
def test_medvlm_bins_above_1023_are_clipped_or_dropped_with_a_warning(bins: str) -> None:
    result = parse(f"heart: <box>{bins}</box>")
    assert any("1023" in w for w in result.warnings)  # as for PaliGemma's <loc> bins


def test_gemini_box_2d_is_y_first_per_mille() -> None:
    result = parse('[{"box_2d": [100, 200, 300, 400], "label": "heart"}]')
    assert result.format == "gemini" and boxes(result) == [[400.0, 100.0, 800.0, 300.0]]


def test_gemini_points_when_format_is_forced() -> None:
    result = parse('[{"point": [500, 250], "label": "heart"}]', fmt="gemini")
    assert result.regions[0].points == [(500.0, 500.0)]  # [y, x] per mille -> x = 250 * 2, y = 500


@pytest.mark.parametrize(("reply", "label", "score"), [
    ('{"bbox": [100, 50, 300, 250], "name": "heart", "confidence": 0.5}', "heart", 0.5),
    ('Here you go:\n```json\n{"bounding_box": [100, 50, 300, 250], "label": "heart"}\n```\nDone.', "heart", None),
    ('The answer is {"coordinates": [100, 50, 300, 250]} as requested.', None, None),
    ('{"boxes": [{"box": [100, 50, 300, 250], "score": "0.25"}]}', None, 0.25),
    ('{"objects": [{"box": {"x": 100, "y": 50, "width": 200, "height": 200}}]}', None, None),
    ('{"answer": {"box": {"xmin": 100, "ymin": 50, "xmax": 300, "ymax": 250}}}', None, None),
    ('{"box": [[100, 50], [300, 250]]}', None, None),
    ('{"box": "100, 50, 300, 250"}', None, None),
    ("The heart is at [100, 50, 300, 250].", None, None),
    ("{'box': [100, 50, 300, 250], 'label': 'heart', 'score': None,}", "heart", None),
])
def test_generic_json_variants(reply: str, label: str | None, score: float | None) -> None:
    result = parse(reply)
    assert result.format == "generic", result
    assert boxes(result) == [[200.0, 100.0, 600.0, 500.0]]
    assert result.regions[0].label == label and result.regions[0].score == score


def test_generic_points_forms() -> None:
    result = parse('{"label": "p", "points": [{"x": 10, "y": 20}, [30, 40]]}')
    assert result.regions[0].box is None and result.regions[0].points == [(20.0, 40.0), (60.0, 80.0)]
    assert parse('{"point": [10, 20]}').regions[0].points == [(20.0, 40.0)]


def test_normalised_fractions() -> None:
    result = parse('{"box": [0.1, 0.2, 0.3, 0.4], "points": [[0.5, 0.5]]}')
    assert boxes(result) == [[200.0, 200.0, 600.0, 400.0]]
    assert result.regions[0].points == [(1000.0, 500.0)]
    assert boxes(parse('[{"bbox_2d": [0.1, 0.2, 0.3, 1.0]}]')) == [[200.0, 200.0, 600.0, 1000.0]]
    assert boxes(parse('{"box": [0, 0, 1, 1]}')) == [[0.0, 0.0, 2.0, 2.0]]  # integers: pixels, not fractions


def test_multi_box_keeps_order_and_drops_only_the_bad_one() -> None:
    reply = json.dumps({"regions": [
        {"label": "a", "box": [0, 0, 10, 10]},
        {"label": "b", "box": [1, 2, 3]},
        {"label": "c", "box": [20, 20, 40, 60], "score": 3},
    ]})
    result = parse(reply)
    assert boxes(result) == [[0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 80.0, 120.0]]
    assert [r.label for r in result.regions] == ["a", "c"]
    assert result.regions[1].score is None
    assert any("region 2" in w and "not 4 finite numbers" in w for w in result.warnings)
    assert any("region 3" in w and "score" in w for w in result.warnings)


# ------------------------------------------------------------------------------------------------ geometry rules


def test_out_of_range_box_is_clipped_with_a_warning() -> None:
    result = parse("<|box_start|>(100,200),(1200,400)<|box_end|>")
    assert boxes(result) == [[200.0, 200.0, 2000.0, 400.0]]
    assert len(result.warnings) == 1 and "clipped" in result.warnings[0]
    result = parse('{"box": [-10, -10, 100, 100]}')
    assert boxes(result) == [[0.0, 0.0, 200.0, 200.0]] and "clipped" in result.warnings[0]


def test_inverted_corners_are_swapped_with_a_warning() -> None:
    result = parse('{"box": [300, 250, 100, 50]}')
    assert boxes(result) == [[200.0, 100.0, 600.0, 500.0]]
    assert len(result.warnings) == 1 and "inverted" in result.warnings[0]


def test_zero_area_boxes_are_dropped_with_a_warning() -> None:
    result = parse('{"regions": [{"label": "a", "box": [1100, 0, 1200, 10]}, {"label": "b", "box": [5, 5, 5, 9]}]}')
    assert result.regions == [] and result.format == "json"
    assert sum("dropped" in w for w in result.warnings) == 2


def test_points_outside_the_image_are_dropped_with_a_warning() -> None:
    result = parse('{"box": [0, 0, 10, 10], "points": [[5, 5], [1001, 5], [5, -1]]}')
    assert result.regions[0].points == [(10.0, 10.0)]
    assert sum("outside the image; dropped" in w for w in result.warnings) == 2


def test_no_regions_explicitly() -> None:
    for reply in ('{"regions": []}', "[]", '```json\n{"regions": []}\n```'):
        result = parse(reply)
        assert result.regions == [] and result.warnings == [] and result.format in ("json", "generic")


@pytest.mark.parametrize("reply", ["", "   \n", None])
def test_empty_reply(reply: str) -> None:
    result = parse(reply)
    assert (result.regions, result.format, result.warnings) == ([], "empty", [])


@pytest.mark.parametrize("reply", ["No.", "None", "No finding.", "The left lung is not visible in this image.",
                                   "I cannot locate the heart here.", "Nothing to ground", "null"])
def test_no_finding_replies(reply: str) -> None:
    result = parse(reply)
    assert (result.regions, result.format, result.warnings) == ([], "none", [])


@pytest.mark.parametrize("reply", ["The heart is in the middle of the chest.", "{not json at all", "<loc12> heart",
                                   "x" * 5000])
def test_unparseable_reply_warns_with_a_short_quote(reply: str) -> None:
    result = parse(reply)
    assert result.regions == [] and result.format == "unparsed"
    warning = result.warnings[0]
    assert warning.startswith("reply not parseable:")
    quoted = warning[len("reply not parseable: "):]
    assert quoted == repr(reply[:200]) + ("..." if len(reply) > 200 else "")  # at most 200 characters quoted


def test_truncated_json_is_recovered_by_key_pattern() -> None:
    result = parse('[{"bbox_2d": [140, 70, 280, 210], "label": "heart"}, {"bbox_2d": [0, 0, 14', sent_size=None)
    assert result.format == "qwen25vl" and boxes(result) == [[200.0, 100.0, 400.0, 300.0]]
    result = parse('{"bbox_2d": [140, 70, 280, 210], "label": "heart"', sent_size=None)
    assert boxes(result) == [[200.0, 100.0, 400.0, 300.0]] and result.regions[0].label == "heart"
    assert "recovered by pattern" in result.warnings[0]


def test_forced_format_reads_only_that_format() -> None:
    assert parse("(100,200),(300,400)", fmt="qwen2vl").format == "qwen2vl"
    assert parse('{"box": [1, 2, 3, 4]}', fmt="paligemma").format == "unparsed"
    # the same numbers read in two frames
    assert boxes(parse('{"box": [100, 200, 300, 400]}', fmt="gemini")) == [[400.0, 100.0, 800.0, 300.0]]
    assert boxes(parse('{"box": [100, 200, 300, 400]}', fmt="json")) == [[200.0, 400.0, 600.0, 800.0]]


@pytest.mark.parametrize("reply", ["{", "[[[[", "[" * 5000, "<loc9999><loc9999><loc9999><loc9999>",
                                   "<|box_start|>(a,b)<|box_end|>", '{"box": null}', '{"box": [NaN, 1, 2, 3]}',
                                   '{"box": [1e400, 0, 2, 3]}', "[NaN, 1, 2, 3]", "[Infinity, 1]",
                                   "[1e308, 0, 1e308, 5]", '{"box": [true, 0, 2, 3]}', '{"regions": "none"}',
                                   '{"points": [[1, 2, 3]]}', "\x00\xff\ufffd", '{"score": 0.5}'])
def test_never_raises_on_model_output(reply: str) -> None:
    result = parse(reply)
    assert isinstance(result, ParseResult)
    for region in result.regions:
        assert region.box is None or (0 <= region.box.x0 < region.box.x1 <= 2000 and 0 <= region.box.y0 < region.box.y1
                                      <= 1000)


def test_never_raises_on_random_text() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(st.text(alphabet=st.sampled_from(list('{}[](),:;"<>|0123456789.-box_2dloc lbe')), max_size=80))
    def check(text: str) -> None:
        result = parse(text)
        for region in result.regions:
            assert region.box is None or region.box.area > 0
            for x, y in region.points:
                assert 0 <= x <= 2000 and 0 <= y <= 1000

    check()


# ------------------------------------------------------------------------------------------------ caller errors, schema


@pytest.mark.parametrize("kwargs", [{"image_size": (0, 10)}, {"image_size": (10,)}, {"sent_size": (-1, 5)},
                                    {"image_size": (10.5, 10)}, {"fmt": "xml"}])
def test_bad_caller_arguments_raise_input_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(InputError, match="expected"):
        parse("(1,2),(3,4)", **kwargs)


def test_qwen25vl_input_size_rejects_bad_sizes() -> None:
    with pytest.raises(InputError):
        qwen25vl_input_size(0, 10)
    with pytest.raises(InputError, match="aspect ratio"):
        qwen25vl_input_size(1, 500)
    # ... but a reply about such an image still parses (read as image pixels, with a warning)
    result = parse_grounding('[{"bbox_2d": [0, 0, 100, 1]}]', image_size=(1, 500))
    assert boxes(result) == [[0.0, 0.0, 100.0, 1.0]] and "no Qwen2.5-VL input size" in result.warnings[0]


def test_response_format_shape_and_schema_validates_a_reply() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    fmt = response_format()
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "grounding" and fmt["json_schema"]["strict"] is False
    assert fmt["json_schema"]["schema"] == GROUNDING_SCHEMA
    fmt["json_schema"]["schema"]["required"].append("x")  # a copy: the module constant is untouched
    assert GROUNDING_SCHEMA["required"] == ["regions"]
    good = {"regions": [{"label": "heart", "box": [1, 2, 3, 4], "points": [[2, 3]], "score": 0.5}]}
    jsonschema.validate(good, GROUNDING_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"regions": [{"label": "heart", "box": [1, 2, 3]}]}, GROUNDING_SCHEMA)
    assert "auto" in FORMATS and "qwen25vl" in FORMATS
