"""The world's ground truth is consistent. Expressions are checked by a parser written here, apart
from the generator: it reads the text alone and finds the objects it can denote."""

import json
import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from groundlab.shared.world import COLOURS, KINDS, NUMBER_WORDS, SIZES, World, WorldConfig, shape_mask
from groundlab.shared.world_io import (
    Refer,
    coco_dict,
    decode_rle,
    encode_rle,
    image_file_name,
    load_image,
    write_coco,
    write_refer,
)

CFG = WorldConfig(max_objects=4)
MARGIN = CFG.spatial_margin * CFG.image_size
ATTR = re.compile(rf"^the (?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLOURS)}) )?({'|'.join(KINDS)})$")


def _centre(obj):
    ys, xs = np.nonzero(obj.mask)
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2


def _attr(text, objects):
    m = ATTR.match(text)
    assert m, f"not an attribute expression: {text!r}"
    size, colour, kind = m.groups()
    return [o for o in objects if o.kind == kind and colour in (None, o.colour) and size in (None, o.size)]


def _rel(a, b, rel, margin):
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel] >= margin


def denotations(text, objects):
    """All objects the expression can denote, read from its text alone."""
    m = re.match(r"^the (leftmost|rightmost|topmost|bottommost) (.+)$", text)
    if m:
        group = _attr("the " + m.group(2), objects)
        axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}[m.group(1)]
        vals = sorted(sign * _centre(o)[axis] for o in group)
        best = [o for o in group if sign * _centre(o)[axis] == vals[0]]
        # a superlative counts only when it is clear: the runner-up is at least a margin away
        return best if len(vals) >= 2 and vals[1] - vals[0] >= MARGIN else group
    m = re.match(r"^(the .+?) (left of|right of|above|below) (the .+)$", text)
    if m:
        anchors = _attr(m.group(3), objects)
        assert len(anchors) == 1, f"anchor of {text!r} is ambiguous"
        # objects of the description on that side (even barely, margin 0) all count as candidates
        return [o for o in _attr(m.group(1), objects) if o is not anchors[0] and _rel(o, anchors[0], m.group(2), 0.0)]
    return _attr(text, objects)


@pytest.fixture(scope="module")
def scenes():
    return World(CFG, seed=11).scenes("train", 150) + World(CFG, seed=11).scenes("test", 50)


def test_every_expression_denotes_exactly_its_target(scenes):
    n = 0
    for s in scenes:
        for ref in s.refs:
            hits = denotations(ref.text, s.objects)
            assert [o.id for o in hits] == [ref.target], (s.image_id, ref.text, [o.describe() for o in s.objects])
            if ref.type == "relation":
                anchor = s.objects[ref.anchor]
                assert _rel(s.objects[ref.target], anchor, re.search("left of|right of|above|below", ref.text)[0], MARGIN)
            n += 1
    assert n > 1000
    assert {r.type for s in scenes for r in s.refs} == {"attribute", "superlative", "relation"}


def test_every_object_has_an_expression_and_visible_pixels(scenes):
    for s in scenes:
        assert 1 <= len(s.objects) <= 4
        for o in s.objects:
            assert s.refs_for(o.id), (s.image_id, o.describe())
            full = shape_mask(o.kind, o.center, o.radius, s.size)
            assert o.mask.sum() >= CFG.min_visible_fraction * full.sum()
            assert not (o.mask & ~full).any()


def test_masks_are_disjoint_and_match_the_pixels(scenes):
    for s in scenes:
        inst = s.instance_map()
        total = sum(o.mask.sum() for o in s.objects)
        assert (inst > 0).sum() == total  # disjoint visible masks
        bg = inst == 0
        assert (s.image[bg] == CFG.background).all()
        for o in s.objects:
            assert (s.image[o.mask] == COLOURS[o.colour]).all()


def test_boxes_enclose_masks_tightly(scenes):
    for s in scenes:
        for o in s.objects:
            x, y, w, h = o.bbox
            assert o.mask[y : y + h, x : x + w].sum() == o.area
            assert o.mask[y, x : x + w].any() and o.mask[y + h - 1, x : x + w].any()
            assert o.mask[y : y + h, x].any() and o.mask[y : y + h, x + w - 1].any()
            assert mask_utils.toBbox(encode_rle(o.mask)).tolist() == [x, y, w, h]


def test_an_objects_mask_is_read_only_so_its_cached_box_cannot_go_stale(scenes):
    o = scenes[0].objects[0]
    assert o.bbox is o.bbox and o.area == int(o.mask.sum())
    with pytest.raises(ValueError, match="read-only"):
        o.mask[0, 0] = True
    grown = o.mask.copy()  # a copy is the caller's to change
    grown[0, 0] = True
    assert grown.sum() >= o.area


def test_captions_list_every_object_left_to_right_and_phrases_align(scenes):
    for s in scenes:
        assert s.caption.endswith(".")
        assert len(s.caption_phrases) == len(s.objects)
        assert sorted(p.object_id for p in s.caption_phrases) == [o.id for o in s.objects]
        xs = [_centre(s.objects[p.object_id])[0] for p in s.caption_phrases]
        assert xs == sorted(xs)
        for p in s.caption_phrases:
            o = s.objects[p.object_id]
            assert s.caption[p.start : p.end] == p.text == f"a {o.size} {o.colour} {o.kind}"


def test_answers_agree_with_the_scene(scenes):
    for s in scenes:
        for q in s.qa:
            if q.type == "count":
                m = re.match(r"how many (?:shapes|(\w+) shapes|(\w+)s) are there\?", q.question)
                colour, kind = m.groups()
                n = sum((colour is None or o.colour == colour) and (kind is None or o.kind == kind) for o in s.objects)
                assert q.answer == NUMBER_WORDS[n]
            elif q.type == "exist":
                colour, kind = re.match(r"is there a (\w+) (\w+)\?", q.question).groups()
                present = any(o.colour == colour and o.kind == kind for o in s.objects)
                assert q.answer == ("yes" if present else "no")
            elif q.type in ("colour", "size"):
                text = re.match(rf"what {q.type} is (the .+)\?", q.question).group(1)
                (obj,) = denotations(text, s.objects)
                assert q.answer == getattr(obj, q.type)
            elif q.type == "shape":
                words = re.match(r"what shape is the (.+) one\?", q.question).group(1).split()
                hits = [o for o in s.objects if o.colour == words[-1] and (len(words) == 1 or o.size == words[0])]
                assert len(hits) == 1 and q.answer == hits[0].kind
            elif q.type == "spatial":
                a, rel, b = re.match(r"is (the .+?) (left of|right of|above|below) (the .+)\?", q.question).groups()
                (oa,), (ob,) = _attr(a, s.objects), _attr(b, s.objects)
                assert q.answer == ("yes" if _rel(oa, ob, rel, MARGIN) else "no")
                if q.answer == "no":
                    assert not _rel(oa, ob, rel, 0.0)
    answers = [q.answer for s in scenes for q in s.qa if q.type == "exist"]
    assert 0.3 < answers.count("yes") / len(answers) < 0.7


def test_determinism_and_splits():
    w = World(CFG, seed=3)
    a, b = w.scene("train", 5), World(CFG, seed=3).scene("train", 5)
    assert np.array_equal(a.image, b.image) and a.describe() == b.describe()
    assert not np.array_equal(a.image, w.scene("test", 5).image)
    assert not np.array_equal(a.image, World(CFG, seed=4).scene("train", 5).image)
    assert w.scene("test", 5).image_id != a.image_id
    json.dumps(a.describe())  # JSON-able
    with pytest.raises(ValueError, match="unknown split"):
        w.scene("dev", 0)
    with pytest.raises(ValueError, match="min_objects"):
        WorldConfig(min_objects=3, max_objects=2)


def test_glyph_option():
    s = World(WorldConfig(glyph_prob=1.0, image_size=96), seed=0).scenes("train", 20)
    glyphs = [o for sc in s for o in sc.objects if o.glyph]
    assert glyphs and all(o.size == "large" for o in glyphs)
    assert all("with the letter" in sc.caption for sc in s if any(o.glyph for o in sc.objects))
    assert any(q.type == "glyph" for sc in s for q in sc.qa)


def test_coco_export_reads_back_through_pycocotools(tmp_path, scenes):
    sub = scenes[:25]
    ann = write_coco(sub, tmp_path / "instances.json", tmp_path / "images")
    coco = COCO(str(ann))
    assert len(coco.getImgIds()) == 25
    assert len(coco.getAnnIds()) == sum(len(s.objects) for s in sub)
    cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for s in sub:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[s.image_id]))
        for a, o in zip(sorted(anns, key=lambda a: a["id"]), s.objects):
            assert np.array_equal(coco.annToMask(a).astype(bool), o.mask)
            assert cats[a["category_id"]] == o.kind and a["bbox"] == list(map(float, o.bbox))
        img = np.asarray(load_image(tmp_path / "images" / coco.imgs[s.image_id]["file_name"]))
        assert img.shape == s.image.shape and np.abs(img.astype(int) - s.image).mean() < 3  # JPEG q95


def test_refer_export_reads_back(tmp_path, scenes):
    splits = {"train": scenes[:20], "val": scenes[150:160], "testA": scenes[160:170]}
    write_refer(splits, tmp_path / "refer", tmp_path / "images")
    refer = Refer(tmp_path / "refer", tmp_path / "images", dataset="refcoco", split_by="unc")
    assert refer.splits() == ["testA", "train", "val"]
    val = refer.samples("val")
    assert len(val) == sum(len(s.refs) for s in splits["val"])
    by_id = {s.image_id: s for s in splits["val"]}
    for smp in val:
        s = by_id[smp.image_id]
        (target,) = denotations(smp.sentence, s.objects)
        assert np.array_equal(smp.mask, target.mask)
        assert smp.image_path.is_file()
    ids = refer.image_ids()
    for s in splits["val"]:
        masks = refer.instance_masks(ids[tmp_path / "images" / image_file_name(s)])
        assert len(masks) == len(s.objects) and all(np.array_equal(m, o.mask) for m, o in zip(masks, s.objects))
    with pytest.raises(ValueError, match=r"no refs of split 'testB'; its splits: \['testA', 'train', 'val'\]"):
        refer.samples("testB")


def test_refer_datasets_and_partitions_are_checked(tmp_path, scenes):
    write_refer({"val": scenes[:4]}, tmp_path / "refer", tmp_path / "images", dataset="refcocog", split_by="umd")
    refer = Refer(tmp_path / "refer", tmp_path / "images", dataset="refcocog", split_by="umd")
    assert len(refer.samples("val")) == sum(len(s.refs) for s in scenes[:4])
    with pytest.raises(ValueError, match=r"'refcocog' has no 'unc' partition; it has \['umd', 'google'\]"):
        Refer(tmp_path / "refer", tmp_path / "images", dataset="refcocog", split_by="unc")
    with pytest.raises(ValueError, match="unknown REFER dataset 'refcoco-g'"):
        write_refer({"val": scenes[:1]}, tmp_path / "refer", tmp_path / "images", dataset="refcoco-g")
    with pytest.raises(FileNotFoundError, match=r"'refcoco\+': missing .*refcoco\+/instances.json"):
        Refer(tmp_path / "refer", tmp_path / "images", dataset="refcoco+")


def test_rle_round_trip_and_bad_files(tmp_path):
    m = World(seed=0).scene("train", 0).objects[0].mask
    assert np.array_equal(decode_rle(encode_rle(m)), m)
    assert np.array_equal(decode_rle(json.loads(json.dumps(encode_rle(m)))), m)
    with pytest.raises(FileNotFoundError, match="missing"):
        Refer(tmp_path, tmp_path, dataset="refcoco")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*bad.jpg"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "nothing.jpg")


def test_coco_dict_annotation_ids_unique(scenes):
    d = coco_dict(scenes)
    ids = [a["id"] for a in d["annotations"]]
    assert len(ids) == len(set(ids))


def _damaged_refer(tmp_path, scenes, damage):
    import pickle

    write_refer({"val": scenes[:3]}, tmp_path / "refer", tmp_path / "images")
    root = tmp_path / "refer" / "refcoco"
    inst = json.loads((root / "instances.json").read_text())
    with open(root / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    if damage(root, inst, refs) is None:  # a damage to the records, not to the files: write them back
        (root / "instances.json").write_text(json.dumps(inst))
        with open(root / "refs(unc).p", "wb") as f:
            pickle.dump(refs, f)


def _bbox(value):
    def damage(root, inst, refs):
        inst["annotations"][0]["bbox"] = value
    return damage


@pytest.mark.parametrize("damage,match", [
    (lambda root, inst, refs: (root / "instances.json").write_text('{"images": [,]}'), r"instances.json:1:\d+: not JSON"),
    (lambda root, inst, refs: (root / "refs(unc).p").write_bytes(b"not a pickle"), r"refs\(unc\).p: not a REFER refs pickle"),
    (_bbox([1, 2, float("nan"), 4]), "instances.json: annotation 100 bbox must be finite"),
    (_bbox([-3, 2, 4, 4]), "bbox .*needs x, y >= 0"),
    (_bbox([1, 2, 0, 4]), "bbox .*w, h > 0"),
    (lambda root, inst, refs: refs[0].update(sentences=[]), "needs a non-empty list of sentences"),
    (lambda root, inst, refs: refs[0].update(image_id=99999), "points at image 99999"),
    (lambda root, inst, refs: refs[0].pop("ann_id") and None, r"lacks keys \['ann_id'\]"),
    (lambda root, inst, refs: inst["annotations"][0].update(segmentation={"size": [64, 64], "counts": "zz"}),
     "unreadable segmentation|Invalid RLE"),
])
def test_refer_reader_names_the_file_for_every_damage(tmp_path, scenes, damage, match):
    _damaged_refer(tmp_path, scenes, damage)
    with pytest.raises(ValueError, match=match):
        Refer(tmp_path / "refer", tmp_path / "images").samples("val")
