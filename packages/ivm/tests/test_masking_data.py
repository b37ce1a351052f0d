import json

import numpy as np
import pytest
import torch

from groundlab.ivm.data import (
    CORRUPTIONS,
    INSTRUCTION_TYPES,
    IVMDataset,
    corrupt,
    export_world,
    read_mask,
    read_split,
    target_instructions,
    typed_instructions,
    write_split,
)
from groundlab.ivm.masking import apply_mask, box_of, cv2_sigma, soft_mask
from groundlab.ivm.processing import IVMCollator, masked_image
from groundlab.shared.bases.vlm import TinyVLMConfig, build_processor
from groundlab.shared.metrics import mask_iou
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.world import World, WorldConfig


def hand_made():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    heat = torch.zeros(40, 40)
    heat[10:20, 10:20] = 0.95
    return image, heat


def test_soft_mask_dilates_blurs_and_keeps_everything_below_threshold():
    _, heat = hand_made()
    m = soft_mask(heat, threshold=0.8)  # k = int(40 * 0.05) * 2 + 1 = 5: dilate by 2, blur reaches 2 further
    assert m[15, 15] == 1 and m[10, 15] == 1 and 0.5 < m[8, 15] < 1 and 0 < m[7, 15] < 0.5  # dilated to 8..21, blurred
    assert m[0, 0] == 0 and m[30, 30] == 0
    support = np.nonzero(m.numpy() > 0)
    assert (support[0].min(), support[0].max(), support[1].min(), support[1].max()) == (6, 23, 6, 23)
    assert torch.equal(soft_mask(heat * 0.5, threshold=0.8), torch.ones(40, 40))  # nothing passes: keep all
    assert cv2_sigma(5) == pytest.approx(1.1)


@pytest.mark.parametrize("mode", ["overlay", "blur", "grayscale", "crop"])
def test_the_four_modes_produce_the_expected_pixels(mode):
    image, heat = hand_made()
    m = soft_mask(heat, threshold=0.8)
    out = apply_mask(image, m, mode, colour=(255, 0, 255))
    if mode == "crop":
        assert out.shape == (18, 18, 3)  # the box of m > 0: rows / cols 6..23
        assert np.array_equal(out[15 - 6, 15 - 6], image[15, 15])
        assert np.abs(out[0, 0].astype(int) - [255, 0, 255]).max() <= 3  # the corner of the box: m is tiny there
        return
    assert out.shape == image.shape
    assert np.array_equal(out[15, 15], image[15, 15])  # kept where m = 1
    f = image[0, 0].astype(float)
    if mode == "overlay":
        expected = np.array([255, 0, 255])
    elif mode == "grayscale":
        expected = np.full(3, round(0.299 * f[0] + 0.587 * f[1] + 0.114 * f[2]))
    else:  # blur: a 9x9 Gaussian (k = int(40 * 0.1) * 2 + 1) with reflect-101 borders, computed here
        k, s = 9, cv2_sigma(9)
        g = np.exp(-((np.arange(k) - 4) ** 2) / (2 * s * s))
        g /= g.sum()
        pad = np.pad(image.astype(float), ((4, 4), (4, 4), (0, 0)), mode="reflect")
        window = pad[0:9, 0:9]
        expected = np.round(np.einsum("i,j,ijc->c", g, g, window))
    assert np.abs(out[0, 0].astype(int) - expected).max() <= 1
    # in between, a convex mix of image and background
    mid = m[7, 15].item()
    assert 0 < mid < 1


def test_modes_keep_the_whole_image_when_nothing_passes():
    image, heat = hand_made()
    m = soft_mask(heat * 0.5, threshold=0.8)
    for mode in ("overlay", "blur", "grayscale", "crop"):
        assert np.array_equal(apply_mask(image, m, mode), image)
    assert box_of(heat, 0.8) == (10, 10, 19, 19) and box_of(heat * 0.5, 0.8) is None
    with pytest.raises(ValueError, match="mode"):
        apply_mask(image, m, "sepia")
    with pytest.raises(ValueError, match="do not fit"):
        apply_mask(image, m[:20], "overlay")


def test_world_export_reads_back_with_clean_human_and_corrupted_machine_labels(tmp_path):
    world = World(WorldConfig(), seed=0)
    counts = export_world(world, tmp_path, human_scenes=6, machine_scenes=12, corrupt_prob=1.0, seed=0)
    human = read_split(tmp_path / "HumanLabelData")
    machine = read_split(tmp_path / "VQAMachineData")
    assert len(human) == counts["HumanLabelData"] and len(machine) == counts["VQAMachineData"]
    assert all(it.is_human for it in human) and not any(it.is_human for it in machine)
    kinds = {it.extra["corruption"] for it in machine}
    assert kinds <= set(CORRUPTIONS) and len(kinds) >= 3
    for it in human:
        scene_idx, target = int(it.uuid[5:11]), int(it.uuid.split("_")[1])
        truth = world.scene("train", scene_idx).objects[target].mask
        assert mask_iou(read_mask(it.mask) > 0.5, truth) > 0.95  # JPEG round trip keeps the label
        assert it.instructions and all(isinstance(x, str) for x in it.instructions)
    for it in machine:
        scene_idx, target = int(it.uuid[5:11]), int(it.uuid.split("_")[1])
        truth = world.scene("train", scene_idx).objects[target].mask
        assert mask_iou(read_mask(it.mask) > 0.5, truth) < 0.75, it.extra  # every corruption is really wrong


def test_human_items_carry_only_the_chosen_instruction_types(tmp_path):
    world = World(WorldConfig(), seed=0)
    scenes = [world.scene("train", i) for i in range(12)]
    attribute = {r.text for s in scenes for r in s.refs if r.type == "attribute"}
    other = {r.text for s in scenes for r in s.refs if r.type != "attribute"}
    assert attribute and other
    counts = export_world(world, tmp_path, human_scenes=12, machine_scenes=12, corrupt_prob=0.5, seed=0,
                          human_types=("attribute",))
    human = read_split(tmp_path / "HumanLabelData")
    said = [x for it in human for x in it.instructions]
    assert said and all(x.startswith("find ") and x[5:-1] in attribute for x in said)
    # every target without an attribute phrase is counted, none is dropped silently
    with_one = sum(len(target_instructions(s, ("attribute",))) for s in scenes)
    assert len(human) == with_one
    assert counts["HumanLabelData/no_instruction_of_types"] == sum(len(s.objects) for s in scenes) - with_one
    # the machine split keeps every type
    machine = read_split(tmp_path / "VQAMachineData")
    texts = {x for it in machine for x in it.instructions}
    assert any(x.endswith("?") for x in texts) and any(x[5:-1] not in attribute for x in texts if x.startswith("find "))
    # typing is the world's: the order is kept, and every type is known
    typed = typed_instructions(scenes[0])
    assert {k for xs in typed.values() for k, _ in xs} <= set(INSTRUCTION_TYPES)
    assert target_instructions(scenes[0]) == {t: [x for _, x in xs] for t, xs in typed.items()}
    with pytest.raises(ValueError, match="unknown instruction types \\['adjective'\\]"):
        target_instructions(scenes[0], ("adjective",))


def test_corruptions_are_what_they_say():
    world = World(WorldConfig(min_objects=2), seed=0)
    scene = world.scene("train", 1)
    rng = np.random.default_rng(0)
    truth = scene.objects[0].mask
    wrong = corrupt(scene, 0, "wrong_object", rng)  # exactly one of the other objects' masks
    assert sorted(mask_iou(wrong, o.mask) == 1.0 for o in scene.objects[1:]) == [False] * (len(scene.objects) - 2) + [True]
    assert mask_iou(wrong, truth) < 1.0
    big = corrupt(scene, 0, "too_large", rng)
    assert (big & truth).sum() == truth.sum() and big.sum() > 3 * truth.sum()
    part = corrupt(scene, 0, "partial", rng)
    assert part.sum() < truth.sum() and not (part & ~truth).any()
    shifted = corrupt(scene, 0, "shifted", rng)
    assert abs(int(shifted.sum()) - int(truth.sum())) <= truth.sum() * 0.5 and mask_iou(shifted, truth) < 0.75
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(scene, 0, "melted", rng)


def test_reader_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.jsonl"):
        read_split(tmp_path / "HumanLabelData")
    img = np.zeros((16, 16, 3), np.uint8)
    write_split(tmp_path / "HumanLabelData", [("a", img, np.ones((16, 16)), ["find it."], {})])
    meta = tmp_path / "HumanLabelData" / "meta.jsonl"
    meta.write_text(meta.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"meta.jsonl:2: not JSON"):
        read_split(tmp_path / "HumanLabelData")
    meta.write_text(json.dumps({"uuid": "a", "instruction": []}) + "\n")
    with pytest.raises(ValueError, match=r"meta.jsonl:1: 'instruction'"):
        read_split(tmp_path / "HumanLabelData")
    with pytest.raises(ValueError, match="unknown split name"):
        write_split(tmp_path / "Other", [("a", img, np.ones((16, 16)), ["x"], {})])
        read_split(tmp_path / "Other")
    with pytest.raises(FileNotFoundError, match="mask_missing.jpg"):
        read_mask(tmp_path / "mask_missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        read_mask(tmp_path / "bad.jpg")


def test_mask_reader_normalises_like_the_release(tmp_path):
    from PIL import Image

    gray = np.array([[0, 50], [100, 200]], np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "m.png")
    m = read_mask(tmp_path / "m.png")
    assert m.ravel().tolist() == pytest.approx([0.0, 75 / 255, 150 / 255, 1.0])  # x1.5, saturated, min-max
    Image.fromarray(np.zeros((2, 2), np.uint8), mode="L").save(tmp_path / "z.png")
    assert read_mask(tmp_path / "z.png").max() == 0


def test_dataset_crops_image_and_mask_together_and_collates(tmp_path):
    tok = load_tokenizer()
    vcfg = TinyVLMConfig(kind="llava")
    processor = build_processor(vcfg, tok)
    image = np.zeros((64, 64, 3), np.uint8)
    image[20:40, 30:50] = 255
    heat = (image[..., 0] > 0).astype(np.float32)
    write_split(tmp_path / "HumanLabelData", [("a", image, heat, ["find the white box.", "where is it?"], {})])
    items = read_split(tmp_path / "HumanLabelData")
    ds = IVMDataset(items, tok, vcfg.n_image_tokens, size=64, augment=True, seed=0)
    for _ in range(5):
        s = ds[0]
        bright = s["image"][..., 0] > 127
        assert mask_iou(bright, s["mask"].numpy() > 0.5) > 0.9  # the crop moved both the same way
    batch = IVMCollator(processor)([ds[0], ds[0]])
    assert batch["images"].shape == (2, 3, 64, 64) and batch["masks"].shape == (2, 64, 64)
    assert batch["is_human"].tolist() == [1.0, 1.0]
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padded
    disc = IVMDataset(items, tok, vcfg.n_image_tokens, size=64, role="discriminator", augment=False)
    s = disc[0]
    assert (s["image"][0, 0] == 255).all() and np.array_equal(s["image"], masked_image(disc.images[0], disc.heats[0]))
    # a mask whose size is not its image's is refused with both names
    write_split(tmp_path / "VQAMachineData", [("b", image, heat[:32], ["x"], {})])
    with pytest.raises(ValueError, match="mask_b.jpg"):
        IVMDataset(read_split(tmp_path / "VQAMachineData"), tok, vcfg.n_image_tokens, size=64)


def test_box_labels_on_the_centre_padded_square(tmp_path):
    from groundlab.ivm.data import box_heatmap

    # a 40 x 20 (W x H) image is padded to 40 x 40 with 10 rows above: the box's y is shifted by 10 px
    heat = box_heatmap([0.25, 0.25, 0.75, 0.5], width=40, height=20)
    ys, xs = np.nonzero(heat)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 29, 0, 9)
    with pytest.raises(ValueError, match="normalised"):
        box_heatmap([0.5, 0.1, 0.2, 0.3], 10, 10)
    img = np.zeros((20, 40, 3), np.uint8)
    write_split(tmp_path / "RobotMachineData", [("r", img, np.zeros((20, 40)), ["pick the cup."], {})])
    (tmp_path / "RobotMachineData" / "masks" / "mask_r.jpg").unlink()
    meta = tmp_path / "RobotMachineData" / "meta.jsonl"
    meta.write_text(json.dumps({"uuid": "r", "instruction": ["pick the cup."], "box": [0.25, 0.25, 0.75, 0.5]}) + "\n")
    [item] = read_split(tmp_path / "RobotMachineData")
    assert not item.is_human and np.array_equal(item.heatmap(40, 20), heat)
    meta.write_text(json.dumps({"uuid": "r", "instruction": ["x"], "box": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match="meta.jsonl:1: 'box'"):
        read_split(tmp_path / "RobotMachineData")
    # the release's key: "boxes", one flat box
    meta.write_text(json.dumps({"uuid": "r", "instruction": ["pick the cup."], "boxes": [0.25, 0.25, 0.75, 0.5]}) + "\n")
    [item] = read_split(tmp_path / "RobotMachineData")
    assert np.array_equal(item.heatmap(40, 20), heat) and "boxes" not in item.extra
    meta.write_text(json.dumps({"uuid": "r", "instruction": ["x"], "boxes": [0.5, 0.1, 0.2]}) + "\n")
    with pytest.raises(ValueError, match="meta.jsonl:1: 'boxes'"):
        read_split(tmp_path / "RobotMachineData")
    meta.write_text(json.dumps({"uuid": "r", "instruction": ["x"], "box": [0, 0, 1, 1], "boxes": [0, 0, 0.5, 1]}) + "\n")
    with pytest.raises(ValueError, match="disagree"):
        read_split(tmp_path / "RobotMachineData")


def test_chat_completions_answerer_talks_to_an_openai_compatible_server():
    import base64
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from PIL import Image

    from groundlab.ivm.evaluation import chat_completions_answerer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = body["messages"][0]["content"]
            png = base64.b64decode(content[0]["image_url"]["url"].split(",", 1)[1])
            pixel = np.asarray(Image.open(io.BytesIO(png)))[0, 0]
            seen.append((self.path, self.headers.get("Authorization"), content[1]["text"]))
            reply = {"choices": [{"message": {"content": "Red." if pixel[0] > 128 else "Blue."}}]}
            out = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        answer = chat_completions_answerer(f"http://127.0.0.1:{server.server_port}/v1", "some-lmm", api_key="k")
        red, blue = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
        red[..., 0], blue[..., 2] = 255, 255
        assert answer([red, blue], ["what colour?", "and this?"]) == ["red", "blue"]
    finally:
        server.shutdown()
    assert seen[0][0] == "/v1/chat/completions" and seen[0][1] == "Bearer k" and seen[0][2].startswith("what colour?")


def test_rec_boxes_are_in_pixel_edges_so_small_targets_count():
    from groundlab.ivm.evaluation import GroundingSample, _scores, heatmap_box

    mask = np.zeros((16, 16), bool)
    mask[5, 7] = True  # a one-pixel target: an inclusive box (7, 5, 7, 5) has area 0 and IoU 0
    sample = GroundingSample("s", np.zeros((16, 16, 3), np.uint8), "it", mask)
    assert sample.box == (7, 5, 8, 6)
    assert _scores([mask.astype(np.float32)], [sample], 0.5, "x")["x/rec_acc"] == 1.0
    shifted = np.zeros((16, 16), np.float32)
    shifted[5, 8] = 1.0  # the neighbouring pixel: IoU 0
    assert _scores([shifted], [sample], 0.5, "x")["x/rec_acc"] == 0.0
    wide = np.zeros((16, 16), np.float32)
    wide[5, 7:9] = 1.0  # two pixels, one right: IoU 1/2
    assert heatmap_box(wide, 0.5) == (7, 5, 9, 6)
    assert _scores([wide], [sample], 0.5, "x")["x/rec_acc"] == 1.0
    assert heatmap_box(np.zeros((16, 12)), 0.5) == (0, 0, 12, 16)  # nothing passes: the whole image


def test_the_lmm_sees_a_non_square_image_squashed_whole_not_centre_cropped():
    from PIL import Image

    from groundlab.ivm.processing import tower_pixels

    processor = build_processor(TinyVLMConfig(kind="llava"), load_tokenizer())
    image = np.full((64, 128, 3), 200, np.uint8)
    image[:, :16] = (255, 0, 0)  # a red band at the left border, outside a centre crop
    pixels = tower_pixels(processor.image_processor, [image])
    assert pixels.shape == (1, 3, 64, 64)
    squashed = np.asarray(Image.fromarray(image).resize((64, 64), Image.BICUBIC))
    torch.testing.assert_close(pixels, processor.image_processor([squashed], return_tensors="pt")["pixel_values"])
    cropped = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    red = pixels[0, 0, :, :6].mean() - pixels[0, 2, :, :6].mean()
    assert red > 1.0 and cropped[0, 0, :, :6].mean() - cropped[0, 2, :, :6].mean() < 0.1
    square = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # square: unchanged
    torch.testing.assert_close(tower_pixels(processor.image_processor, [square]),
                               processor.image_processor([square], return_tensors="pt")["pixel_values"])


def test_heldout_figures_by_instruction_type():
    from groundlab.ivm.evaluation import GroundingSample, _scores, grounding_samples

    scenes = World(WorldConfig(), seed=0).scenes("val", 10)
    samples = grounding_samples(scenes)
    for s in samples:  # the sample's type is its instruction's
        scene_idx, target = (int(v) for v in s.id.split("-")[1:])
        assert (s.kind, s.instruction) in typed_instructions(scenes[scene_idx])[target]
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    pair = [GroundingSample("a", np.zeros((16, 16, 3), np.uint8), "find it.", mask, kind="attribute"),
            GroundingSample("b", np.zeros((16, 16, 3), np.uint8), "find the one left of it.", mask, kind="relation")]
    half = mask.astype(np.float32)
    half[4:8, 6:8] = 0.0  # IoU 0.5
    out = _scores([mask.astype(np.float32), half], pair, 0.5, "x")
    assert out["x/mIoU_attribute"] == 1.0 and out["x/mIoU_relation"] == 0.5 and out["x/mIoU"] == 0.75
    assert out["x/n_attribute"] == out["x/n_relation"] == 1 and "x/mIoU_question" not in out
