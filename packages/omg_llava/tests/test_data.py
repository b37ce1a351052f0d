import json

import numpy as np
import pytest

from groundlab.omg_llava.data import (
    caption_record,
    grandf_record,
    llava_record,
    load_grandf,
    load_llava,
    load_mdvp,
    load_osprey,
    load_refcocog_gcg,
    mdvp_record,
    osprey_record,
    refcocog_gcg_record,
    res_samples,
    same_category_refs,
    tag_caption,
    write_json,
)
from groundlab.omg_llava.processing import SEG
from groundlab.shared.world import World, WorldConfig
from groundlab.shared.world_io import Refer, encode_rle, save_image, write_refer


@pytest.fixture(scope="module")
def scenes():
    world = World(WorldConfig(min_objects=2), seed=0)
    return [world.scene("train", i) for i in range(4)]


def test_tag_caption():
    assert tag_caption("a red circle and a blue square.", [(17, 30), (0, 12)]) == \
        "<p> a red circle </p> [SEG] and <p> a blue square </p> [SEG]."
    with pytest.raises(ValueError, match="overlapping"):
        tag_caption("abcdef", [(0, 3), (2, 4)])


def test_formats_round_trip_through_their_loaders(tmp_path, scenes):
    for s in scenes:
        save_image(s, tmp_path / "images")
    llava = load_llava(write_json(tmp_path / "llava.json", [llava_record(s) for s in scenes] + [caption_record(scenes[0])]),
                       tmp_path / "images")
    assert len(llava) == 5 and llava[0].image.is_file() and llava[-1].conversation[1]["value"] == scenes[0].caption
    gcg = load_grandf(write_json(tmp_path / "grandf.json", [grandf_record(s) for s in scenes]), tmp_path / "images")
    for sample, scene in zip(gcg, scenes):
        answer = sample.conversation[1]["value"]
        assert answer.count(SEG) == len(scene.caption_phrases) == len(sample.seg_masks)
        for mask, ph in zip(sample.seg_masks, sorted(scene.caption_phrases, key=lambda p: p.start)):
            assert np.array_equal(mask, scene.objects[ph.object_id].mask)
        assert answer.replace("<p> ", "").replace(" </p> [SEG]", "") == scene.caption
    gcg2 = load_refcocog_gcg(write_json(tmp_path / "refcocog_gcg.json", [refcocog_gcg_record(s) for s in scenes]),
                             tmp_path / "images")
    assert [g.conversation[1]["value"] for g in gcg2] == [g.conversation[1]["value"] for g in gcg]
    assert all(np.array_equal(a, b) for x, y in zip(gcg2, gcg) for a, b in zip(x.seg_masks, y.seg_masks))
    osprey = load_osprey(write_json(tmp_path / "osprey.json", [osprey_record(scenes[1], 0, "a small circle.")]),
                         tmp_path / "images")
    assert np.array_equal(osprey[0].regions[0], scenes[1].objects[0].mask)
    mdvp = load_mdvp(write_json(tmp_path / "mdvp.json", [mdvp_record(scenes[2], 1, (10, 12), "a square.")]),
                     tmp_path / "images")
    assert mdvp[0].points == [(10.0, 12.0)]
    write_refer({"train": scenes[:3], "val": scenes[3:]}, tmp_path / "refer", tmp_path / "images")
    refer = Refer(tmp_path / "refer", tmp_path / "images")
    res = res_samples(refer, "val")
    assert res and all(len(r.seg_masks) == 1 and "Please segment" in r.conversation[0]["value"] for r in res)


def test_count_mismatches_and_bad_files_name_the_record(tmp_path, scenes):
    rec = grandf_record(scenes[0])
    phrase = next(iter(rec["groundings"]))
    rec["groundings"][phrase]["token_positives"][0] += 1
    with pytest.raises(ValueError, match="record 0: span"):
        load_grandf(write_json(tmp_path / "g.json", [rec]), tmp_path)
    missing = refcocog_gcg_record(scenes[0])
    missing["refs"][0]["sentence"] = "a purple hexagon"
    with pytest.raises(ValueError, match="not in the caption"):
        load_refcocog_gcg(write_json(tmp_path / "r.json", [missing]), tmp_path)
    bad = llava_record(scenes[0])
    bad["conversations"][1]["value"] += " [SEG]"
    with pytest.raises(ValueError, match=r"1 \[SEG\] tokens in the answers but 0 masks"):
        load_llava(write_json(tmp_path / "l.json", [bad]), tmp_path)
    two = mdvp_record(scenes[0], 0, (1, 1), "x")
    two["conversations"][0]["value"] += " and Mark 2 <mark>"
    with pytest.raises(ValueError, match="2 <mark> placeholders but 1 points"):
        load_mdvp(write_json(tmp_path / "m.json", [two]), tmp_path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json:1:2: not JSON"):
        load_llava(tmp_path / "broken.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_osprey(tmp_path / "missing.json", tmp_path)
    (tmp_path / "obj.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="list of records"):
        load_mdvp(tmp_path / "obj.json", tmp_path)


def _gcg_empty_masks(rec):
    rec["groundings"][next(iter(rec["groundings"]))]["rle_masks"] = []


def _gcg_blank_mask(rec):
    g = rec["groundings"][next(iter(rec["groundings"]))]
    g["rle_masks"] = [encode_rle(np.zeros((rec["height"], rec["width"]), bool))]


def _gcg_span(rec):
    rec["groundings"][next(iter(rec["groundings"]))]["token_positives"] = [5, 2]


def _osprey_nan_box(rec):
    rec["annotations"][0]["bbox"] = [1, 2, float("nan"), 3]


def _osprey_negative_box(rec):
    rec["annotations"][0]["bbox"] = [1, 2, -4, 3]


def _mdvp_nan(rec):
    rec["points"] = [[float("nan"), 3]]


def _mdvp_negative(rec):
    rec["points"] = [[-2, 3]]


def _mdvp_text(rec):
    rec["points"] = [["left", 3]]


def _turn(rec):
    rec["conversations"][1] = {"from": "robot", "value": "x"}


@pytest.mark.parametrize("writer,loader,damage,match", [
    ("grandf", load_grandf, _gcg_empty_masks, "has no mask in 'rle_masks'"),
    ("grandf", load_grandf, _gcg_blank_mask, "the mask is empty"),
    ("grandf", load_grandf, _gcg_span, "'token_positives' of"),
    ("osprey", load_osprey, _osprey_nan_box, "bbox must be finite"),
    ("osprey", load_osprey, _osprey_negative_box, "w, h > 0"),
    ("mdvp", load_mdvp, _mdvp_nan, "point 0 must be finite"),
    ("mdvp", load_mdvp, _mdvp_negative, "point 0 must be finite pixel coordinates >= 0"),
    ("mdvp", load_mdvp, _mdvp_text, "point 0 must be two numbers"),
    ("mdvp", load_mdvp, _turn, "turn 1 must be"),
])
def test_malformed_records_are_refused_naming_file_and_record(tmp_path, scenes, writer, loader, damage, match):
    rec = {"grandf": lambda s: grandf_record(s), "osprey": lambda s: osprey_record(s, 0, "A shape."),
           "mdvp": lambda s: mdvp_record(s, 0, (1, 1), "A shape.")}[writer](scenes[0])
    damage(rec)
    path = write_json(tmp_path / f"{writer}.json", [rec])
    with pytest.raises(ValueError, match=match) as err:
        loader(path, tmp_path)
    assert f"{writer}.json: record 0" in str(err.value)


def test_a_bom_is_read_and_bad_utf8_is_named(tmp_path, scenes):
    path = tmp_path / "l.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([llava_record(scenes[0])]).encode())
    assert len(load_llava(path, tmp_path)) == 1
    path.write_bytes(json.dumps([llava_record(scenes[0])]).encode().replace(b"what", b"wh\xe9t"))
    with pytest.raises(ValueError, match="l.json: not UTF-8"):
        load_llava(path, tmp_path)


def test_same_category_refs_are_the_objects_that_share_their_kind_with_another_in_the_image(tmp_path):
    world = World(WorldConfig(min_objects=2), seed=0)
    scenes = [world.scene("train", i) for i in range(40)]
    for s in scenes:
        save_image(s, tmp_path / "images")
    write_refer({"train": scenes}, tmp_path / "refer", tmp_path / "images")  # one ref per object, in order
    kinds = [[o.kind for o in s.objects] for s in scenes]
    want = {str(i) for i, (k, ks) in enumerate((k, ks) for ks in kinds for k in ks) if ks.count(k) > 1}
    hard = same_category_refs(Refer(tmp_path / "refer", tmp_path / "images"), "train")
    assert hard == want and 0 < len(hard) < sum(map(len, kinds))
