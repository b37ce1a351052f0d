"""Tiny pretrained bases: build, cache, reload through the real loaders, resume after a stop."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    PaliGemmaForConditionalGeneration,
    TrainerCallback,
)

from groundlab.shared.bases import (
    _adopt_vision_checkpoints,
    base_dir,
    default_spec,
    ensure_base,
    evaluate_base,
    load_tiny_sam,
    main,
    report,
    smoke_spec,
    vision_dir,
    vlm,
)
from groundlab.shared.bases import sam as sam_mod
from groundlab.shared.runs import check_complete
from groundlab.shared.world import World, WorldConfig


def micro(name, steps=12, save_steps=4, **kw):
    return smoke_spec(name, steps=steps, save_steps=save_steps, **kw)


class StopAt(TrainerCallback):
    """Stops a run abruptly (as a kill would) after step ``n``."""

    def __init__(self, n):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.n:
            raise KeyboardInterrupt(f"stopped at step {self.n}")


@pytest.fixture(scope="module")
def llava_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    spec = micro("llava")
    return root, spec, ensure_base(spec, root=root)


def test_llava_base_loads_through_from_pretrained_and_reports_figures(llava_base):
    root, spec, path = llava_base
    assert check_complete(base_dir(spec, root)) == (True, "")
    model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    processor = AutoProcessor.from_pretrained(path)
    cfg = vlm.TinyVLMConfig(**spec.model)
    world = World(spec.world, seed=spec.world_seed)
    # the processor saved with the model expands <image> into one token per patch
    out = processor(images=[world.scene("val", 0).image], text=["USER: <image>\nhi ASSISTANT:"], return_tensors="pt")
    assert int((out["input_ids"] == model.config.image_token_index).sum()) == cfg.n_image_tokens
    metrics = json.loads((base_dir(spec, root) / "metrics.json").read_text())
    for key in ("caption/token_acc", "caption/exact_match", "qa/accuracy", "rec/acc50", "region/colour_kind",
                "grounded/box_acc50", "vision/object_patch_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0 and f"baseline/untrained/{key}" in metrics
    for key in ("baseline/random_object/rec/acc50", "baseline/majority/qa/accuracy", "probe/hidden/all",
                "probe/words/attribute", "time/vision_s"):
        assert key in metrics
    # every figure make bases prints is there, with its target
    lines = report("llava", metrics)
    assert any("rec/acc50" in line and "target >= 0.80" in line and "random object" in line for line in lines)
    assert metrics["config"]["key"] == spec.key() and "git_commit" in metrics
    # the loss went down over the few steps
    state = json.loads((base_dir(spec, root) / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]


def test_a_built_base_is_evaluated_again_on_more_held_out_scenes(llava_base, tmp_path, capsys):
    root, spec, path = llava_base
    built = json.loads((base_dir(spec, root) / "metrics.json").read_text())
    # reloaded from its model directory, on the build's own scenes: the figures the build wrote
    same = evaluate_base(spec, spec.eval_scenes, root=root)
    for key in ("caption/exact_match", "qa/accuracy", "rec/acc50", "region/colour_kind", "grounded/box_acc50",
                "baseline/random_object/rec/acc50"):
        assert same[key] == built[key], key
    more = evaluate_base(spec, 3 * spec.eval_scenes, root=root)
    world = World(spec.world, seed=spec.world_seed)
    items = vlm.rec_items(world.scenes("val", 3 * spec.eval_scenes))
    assert more["rec/n"] == len(items) > built["rec/n"]
    p = more["rec/acc50"]
    assert more["rec/acc50_stderr"] == pytest.approx((p * (1 - p) / len(items)) ** 0.5)
    # the split by the scene's number of objects makes up the whole, for the model and for a random object
    counts = {k: sum(len(s.objects) == k for s, _, _ in items) for k in (1, 2, 3, 4, 5)}
    for prefix in ("", "baseline/random_object/"):
        whole = sum(n * more[f"{prefix}rec/objects_{k}/acc50"] for k, n in counts.items() if n) / len(items)
        assert whole == pytest.approx(more[f"{prefix}rec/acc50"])
    assert more["baseline/random_object/rec/objects_2/acc50"] == pytest.approx(0.5, abs=0.05)
    # in scenes of several objects: "the <kind>" items and the rest, which together make up those scenes
    several = [(s, o, e) for s, o, e in items if len(s.objects) > 1]
    kind_only = sum(e == f"the {o.kind}" for _, o, e in several)
    assert (more["rec/several/kind_only/n"], more["rec/several/more_than_kind/n"]) == (kind_only, len(several) - kind_only)
    assert 0 < kind_only < len(several)
    share = {k: more[f"rec/several/{k}/n"] * more[f"rec/several/{k}/acc50"] for k in ("kind_only", "more_than_kind")}
    multi = sum(counts[k] * more[f"rec/objects_{k}/acc50"] for k in (2, 3, 4, 5) if counts[k])
    assert sum(share.values()) == pytest.approx(multi)
    saved = json.loads((path.parent / f"eval-val-{3 * spec.eval_scenes}.json").read_text())
    assert saved["rec/acc50"] == p and saved["path"] == str(path)
    # the command line: another build by its path; a missing one is named
    main(["evaluate", "--only", "llava", "--scenes", "4", "--path", str(path)])
    out = capsys.readouterr().out
    assert f"base llava on 4 held-out scenes: {path}" in out and "standard error" in out and "rec/objects_2" in out
    with pytest.raises(FileNotFoundError, match="no llava base at .*nothing"):
        evaluate_base(spec, 4, path=tmp_path / "nothing")


def test_second_build_is_a_no_op_and_half_written_entries_are_rebuilt(llava_base):
    root, spec, path = llava_base
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert ensure_base(spec, root=root) == path
    assert weights.stat().st_mtime_ns == mtime  # reused, not retrained
    # a file cut short: detected, rebuilt, never loaded
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    ok, why = check_complete(base_dir(spec, root))
    assert not ok and "model.safetensors" in why
    ensure_base(spec, root=root)
    assert check_complete(base_dir(spec, root)) == (True, "")
    assert weights.stat().st_size == len(data)
    # a missing file: the same
    (path / "config.json").unlink()
    assert not check_complete(base_dir(spec, root))[0]
    ensure_base(spec, root=root)
    LlavaForConditionalGeneration.from_pretrained(path)


class MaxSteps(TrainerCallback):
    """Records, for every training step taken, the length of the stage it belongs to."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.max_steps)


def test_bases_that_differ_after_the_vision_stage_share_it(llava_base, tmp_path):
    root, spec, _ = llava_base
    assert (vision_dir(spec, root) / f"checkpoint-{spec.vision.max_steps}").is_dir()
    assert not (base_dir(spec, root) / "vision_checkpoints").exists()
    shorter = replace(spec, train=replace(spec.train, max_steps=5, save_steps=5), mix={"rec": 1})
    assert shorter.key() != spec.key() and shorter.vision_key() == spec.vision_key()
    steps = MaxSteps()
    shared = ensure_base(shorter, root=root, callbacks=[steps])
    assert steps.seen == [5] * 5  # the main stage only: the finished vision stage was resumed, not retrained
    alone = ensure_base(shorter, root=tmp_path)  # the same base from nothing: the same weights
    a = LlavaForConditionalGeneration.from_pretrained(shared).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(alone).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)
    # what the vision stage depends on changes its key: another vision schedule, another seed
    assert replace(spec, vision=replace(spec.vision, max_steps=5)).vision_key() != spec.vision_key()
    assert replace(spec, train=replace(spec.train, seed=1)).vision_key() != spec.vision_key()


def test_vision_checkpoints_of_a_build_stopped_before_sharing_move_to_the_shared_place(tmp_path):
    own, shared = tmp_path / "llava-x" / "vision_checkpoints", tmp_path / "vision" / "llava-y"
    (own / "checkpoint-2").mkdir(parents=True)
    (own / "checkpoint-2" / "model.safetensors").write_bytes(b"w")
    _adopt_vision_checkpoints(own, shared)
    assert (shared / "checkpoint-2" / "model.safetensors").read_bytes() == b"w" and not own.exists()
    (own / "checkpoint-1").mkdir(parents=True)  # the shared place already has a stage: left alone
    _adopt_vision_checkpoints(own, shared)
    assert (own / "checkpoint-1").is_dir() and not (shared / "checkpoint-1").exists()


def test_stopped_run_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    spec = micro("llava", steps=10, save_steps=3)
    whole = LlavaForConditionalGeneration.from_pretrained(ensure_base(spec, root=tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        ensure_base(spec, root=tmp_path / "b", callbacks=[StopAt(7)])
    out = base_dir(spec, tmp_path / "b")
    assert not check_complete(out)[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    resumed = LlavaForConditionalGeneration.from_pretrained(ensure_base(spec, root=tmp_path / "b"))
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    fresh = vlm.build_model(vlm.TinyVLMConfig(**spec.model), _tok())
    assert not torch.equal(whole.model.multi_modal_projector.linear_1.weight,
                           fresh.model.multi_modal_projector.linear_1.weight)  # it trained


def _tok():
    from groundlab.shared.tokenizer import load_tokenizer

    return load_tokenizer()


def test_paligemma_base_loads_and_generates(tmp_path):
    spec = micro("paligemma", steps=4)
    path = ensure_base(spec, root=tmp_path)
    model, info = PaliGemmaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    processor = AutoProcessor.from_pretrained(path)
    cfg = vlm.TinyVLMConfig(**spec.model)
    image = World(spec.world, seed=0).scene("val", 1).image
    out = vlm.generate(model, processor, cfg, [image], ["caption en"], max_new_tokens=5)
    assert len(out) == 1 and len(out[0]) <= 5
    # the training layout: labels and token_type_ids cover exactly the suffix
    sample = vlm.encode_text(processor.tokenizer, cfg, "caption en", "a small red circle.")
    suffix = [i for i, t in zip(sample["input_ids"], sample["token_type_ids"]) if t == 1]
    assert [lab for lab in sample["labels"] if lab != -100] == suffix
    assert processor.tokenizer.decode(suffix) == "a small red circle.</s>"


def test_sam_base_official_layout_strict_loads_and_learning(tmp_path):
    from segment_anything import sam_model_registry

    spec = micro("sam", steps=60, save_steps=30)
    path = ensure_base(spec, root=tmp_path)
    sam = load_tiny_sam(path)
    state = torch.load(path, weights_only=True)
    official = set(sam_model_registry["vit_b"](checkpoint=None).state_dict())
    assert set(state) <= official  # the same key names as the released ViT-B checkpoint
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    # the encoder alone loads from the checkpoint's image_encoder.* keys (what IVM does)
    cfg = sam_mod.TinySamConfig.from_json(path.parent / "config.json")
    enc = sam_mod.build_tiny_sam(cfg).image_encoder
    sam_mod.load_sam_checkpoint(enc, path, prefix="image_encoder.")
    torch.testing.assert_close(enc.patch_embed.proj.weight, sam.image_encoder.patch_embed.proj.weight)
    # a checkpoint missing a key, or of another size, is refused with the key named
    broken = dict(state)
    broken.pop("mask_decoder.iou_token.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="mask_decoder.iou_token.weight"):
        sam_mod.build_tiny_sam(cfg, checkpoint=tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="shape mismatches"):
        sam_mod.build_tiny_sam(replace(cfg, encoder_dim=32), checkpoint=path)
    with pytest.raises(FileNotFoundError):
        sam_mod.build_tiny_sam(checkpoint=tmp_path / "none.pth")
    metrics = json.loads((base_dir(spec, tmp_path) / "metrics.json").read_text())
    # 60 steps already lift the masks well above the untrained model
    assert metrics["sam/box/mIoU"] > metrics["baseline/untrained/sam/box/mIoU"] + 0.2
    n, k = metrics["sam/n_objects"], metrics["sam/n_touching"]  # the split figures make up the whole
    whole = (k * metrics["sam/point_touching/mIoU"] + (n - k) * metrics["sam/point_isolated/mIoU"]) / n
    assert abs(whole - metrics["sam/point/mIoU"]) < 1e-9
    # the training-only class head: reported, never saved into the SAM checkpoint
    assert 0.0 <= metrics["sam/semantic_head/pixel_accuracy"] <= 1.0
    assert not any("semantic" in k for k in state)
    # evaluated again from its checkpoint on the build's own scenes: the build's figures
    again = evaluate_base(spec, spec.eval_scenes, root=tmp_path)
    for key in ("sam/point/mIoU", "sam/box/mIoU", "baseline/filled_box/sam/box/mIoU"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_sam_semantic_head_targets_and_gradients():
    world = World(WorldConfig(min_objects=2), seed=0)
    item = sam_mod.WorldSamDataset(world, "train", 2)[0]
    p = item["prompts"]
    cmap = sam_mod.class_map(p["masks"], p["classes"])
    for m, c in zip(p["masks"], p["classes"]):
        assert (cmap[m > 0.5] == c).all()
    assert (cmap[(p["masks"].sum(0) == 0)] == 0).all() and sam_mod.num_semantic_classes(world) == 13
    sam = sam_mod.build_tiny_sam()
    wrapper = sam_mod.SamForTraining(sam, sam_mod.num_semantic_classes(world), semantic_weight=1.0)
    wrapper(**sam_mod.collate_sam([item]))["loss"].backward()
    assert wrapper.semantic_head.weight.grad.abs().sum() > 0
    assert sam.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_classes"):
        sam_mod.SamForTraining(sam, 0, semantic_weight=1.0)
    # a class head with a hidden 3x3 conv: per-pixel logits of the image's size, gradients to the encoder
    sam.zero_grad()
    deep = sam_mod.SamForTraining(sam, sam_mod.num_semantic_classes(world), semantic_weight=1.0, semantic_hidden=8)
    deep(**sam_mod.collate_sam([item]))["loss"].backward()
    emb = sam.image_encoder(sam.preprocess(item["images"][None]))
    assert deep.semantic_logits(emb, 64).shape == (1, 13, 64, 64)
    assert deep.semantic_head[0].weight.grad.abs().sum() > 0
    assert sam.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_sam_touching_weight_weighs_the_mask_loss_of_objects_that_touch_another():
    """Prompts carry whether their object touches another; the mask loss is the mean over prompts with
    ``touching_weight`` on those (1: the plain mean, what every cached SAM trained on)."""
    torch.manual_seed(0)
    world = World(WorldConfig(min_objects=3), seed=0)
    data = sam_mod.WorldSamDataset(world, "train", 40)
    items = [data[i] for i in range(40)]
    for item in items:
        p = item["prompts"]
        assert p["touching"].tolist() == sam_mod.touching(p["masks"].numpy() > 0.5).tolist()
    mixed = [it for it in items if 0 < int(it["prompts"]["touching"].sum()) < len(it["prompts"]["touching"])]
    assert mixed, "no scene with both touching and isolated objects"
    batch = sam_mod.collate_sam(mixed[:2])
    sam = sam_mod.build_tiny_sam().eval()
    ps = batch["prompts"]
    index = torch.cat([torch.full((len(p["use_box"]),), b) for b, p in enumerate(ps)])
    points, boxes, use_box, masks, near = (torch.cat([p[k] for p in ps])
                                           for k in ("points", "boxes", "use_box", "masks", "touching"))
    with torch.no_grad():
        emb = sam.image_encoder(sam.preprocess(batch["images"]))
        logits, iou = sam_mod.predict_masks_batched(sam, emb, index, points, boxes, use_box, 64)
        per = (torch.nn.functional.binary_cross_entropy_with_logits(logits, masks, reduction="none").flatten(1).mean(1)
               + sam_mod.dice_loss(logits, masks, reduce=False))
        iou_loss = torch.nn.functional.mse_loss(iou, sam_mod.achieved_iou(logits, masks))
        plain = sam_mod.SamForTraining(sam)(**batch)["loss"]
        torch.testing.assert_close(plain, per.mean() + iou_loss)
        torch.testing.assert_close(plain, torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
                                   + sam_mod.dice_loss(logits, masks) + iou_loss)  # the loss before the option
        w = 1 + 2 * near.float()
        weighted = sam_mod.SamForTraining(sam, touching_weight=3.0)(**batch)["loss"]
        torch.testing.assert_close(weighted, (per * w).sum() / w.sum() + iou_loss)
        assert not torch.isclose(weighted, plain)
    with pytest.raises(ValueError, match="touching_weight"):
        sam_mod.SamForTraining(sam, touching_weight=0.0)
    # a build trains with every option of its config
    cfg = sam_mod.TinySamConfig(semantic_weight=0.5, semantic_hidden=8, multimask_clicks=True, touching_weight=2.5)
    wrapper = sam_mod.SamForTraining.for_config(sam, cfg, world)
    assert (wrapper.semantic_weight, wrapper.semantic_head[0].out_channels, wrapper.multimask_clicks,
            wrapper.touching_weight) == (0.5, 8, True, 2.5)
    # at its default the option leaves the cache key of a SAM base as it was
    spec = default_spec("sam")
    assert replace(spec, model={**spec.model, "touching_weight": 1.0}).key() == replace(
        spec, model={k: v for k, v in spec.model.items() if k != "touching_weight"}).key()
    assert replace(spec, model={**spec.model, "touching_weight": 2.0}).key() != replace(
        spec, model={**spec.model, "touching_weight": 1.0}).key()


def test_sam_mask_loss_focal_dice_is_sams_twenty_to_one():
    """``mask_loss="focal_dice"`` is 20 x the focal loss (gamma 2, alpha 0.25; the mean over pixels) +
    Dice per mask, in both decoding paths; the default is the BCE + Dice every cached SAM trained on,
    and leaves the cache key as it was."""
    torch.manual_seed(0)
    world = World(WorldConfig(min_objects=2), seed=0)
    data = sam_mod.WorldSamDataset(world, "train", 4)
    batch = sam_mod.collate_sam([data[i] for i in range(2)])
    sam = sam_mod.build_tiny_sam().eval()
    logits = torch.randn(3, 16, 16)
    target = (torch.rand(3, 16, 16) > 0.7).float()
    p = logits.sigmoid()
    pt = p * target + (1 - p) * (1 - target)
    focal = (-(0.25 * target + 0.75 * (1 - target)) * (1 - pt) ** 2 * pt.log()).flatten(1).mean(1)
    torch.testing.assert_close(sam_mod.mask_loss(logits, target, "focal_dice"),
                               20 * focal + sam_mod.dice_loss(logits, target, reduce=False))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(sam_mod.mask_loss(logits, target), bce + sam_mod.dice_loss(logits, target, reduce=False))
    with pytest.raises(ValueError, match="unknown mask loss 'l2'"):
        sam_mod.mask_loss(logits, target, "l2")
    with pytest.raises(ValueError, match="mask_loss must be one of"):
        sam_mod.SamForTraining(sam, mask_loss="l2")
    ps = batch["prompts"]
    index = torch.cat([torch.full((len(q["use_box"]),), b) for b, q in enumerate(ps)])
    points, boxes, use_box, masks = (torch.cat([q[k] for q in ps]) for k in ("points", "boxes", "use_box", "masks"))
    with torch.no_grad():
        emb = sam.image_encoder(sam.preprocess(batch["images"]))
        out, iou = sam_mod.predict_masks_batched(sam, emb, index, points, boxes, use_box, 64)
        expected = (sam_mod.mask_loss(out, masks, "focal_dice").mean()
                    + torch.nn.functional.mse_loss(iou, sam_mod.achieved_iou(out, masks)))
        torch.testing.assert_close(sam_mod.SamForTraining(sam, mask_loss="focal_dice")(**batch)["loss"], expected)
        multi = sam_mod.SamForTraining(sam, multimask_clicks=True, mask_loss="focal_dice")(**batch)["loss"]
        assert not torch.isclose(multi, sam_mod.SamForTraining(sam, multimask_clicks=True)(**batch)["loss"])
    cfg = sam_mod.TinySamConfig(mask_loss="focal_dice")
    assert sam_mod.SamForTraining.for_config(sam, cfg, world).mask_loss == "focal_dice"
    spec = default_spec("sam")
    assert replace(spec, model={**spec.model, "mask_loss": "bce_dice"}).key() == replace(
        spec, model={k: v for k, v in spec.model.items() if k != "mask_loss"}).key()
    assert replace(spec, model={**spec.model, "mask_loss": "focal_dice"}).key() != replace(
        spec, model={**spec.model, "mask_loss": "bce_dice"}).key()


def test_batched_decoding_equals_sams_own_decoder_per_prompt():
    """The training pass decodes every prompt of a batch at once; each mask and IoU is what SAM's own
    ``MaskDecoder`` gives that prompt alone on its image, for clicks and boxes mixed in one batch."""
    torch.manual_seed(0)
    world = World(WorldConfig(min_objects=2), seed=0)
    data = sam_mod.WorldSamDataset(world, "train", 6, box_prob=0.5)
    batch = sam_mod.collate_sam([data[i] for i in range(6)])
    sam = sam_mod.build_tiny_sam(sam_mod.TinySamConfig(patch_size=4)).eval()
    with torch.no_grad():
        emb = sam.image_encoder(sam.preprocess(batch["images"]))
        ps = batch["prompts"]
        index = torch.cat([torch.full((len(p["use_box"]),), b) for b, p in enumerate(ps)])
        points, boxes, use_box = (torch.cat([p[k] for p in ps]) for k in ("points", "boxes", "use_box"))
        assert 0 < int(use_box.sum()) < len(use_box)  # both kinds in the batch
        logits, iou = sam_mod.predict_masks_batched(sam, emb, index, points, boxes, use_box, 64)
        for j in range(len(index)):
            one = emb[index[j] : index[j] + 1]
            ref_logits, ref_iou = sam_mod.predict_masks(sam, one, None if use_box[j] else points[j : j + 1],
                                                        boxes[j : j + 1] if use_box[j] else None, 64)
            torch.testing.assert_close(logits[j], ref_logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[j], ref_iou[0], atol=1e-5, rtol=1e-5)


def test_multimask_clicks_train_the_lowest_loss_output_and_answer_the_most_confident():
    """SAM's recipe for ambiguous clicks: the batched pass gives every mask token's output, SAM's own
    decoder answers a click with the output of the highest predicted IoU, and the training loss is
    the lowest-loss multi-mask output's for clicks and the single-mask output's for boxes."""
    torch.manual_seed(0)
    world = World(WorldConfig(min_objects=2), seed=0)
    data = sam_mod.WorldSamDataset(world, "train", 4, box_prob=0.5)
    batch = sam_mod.collate_sam([data[i] for i in range(4)])
    sam = sam_mod.build_tiny_sam(sam_mod.TinySamConfig(patch_size=4, multimask_clicks=True)).eval()
    ps = batch["prompts"]
    index = torch.cat([torch.full((len(p["use_box"]),), b) for b, p in enumerate(ps)])
    points, boxes, use_box, masks = (torch.cat([p[k] for p in ps]) for k in ("points", "boxes", "use_box", "masks"))
    with torch.no_grad():
        emb = sam.image_encoder(sam.preprocess(batch["images"]))
        logits, iou = sam_mod.predict_masks_batched(sam, emb, index, points, boxes, use_box, 64, all_outputs=True)
        assert logits.shape == (len(index), 4, 64, 64) and iou.shape == (len(index), 4)
        j = int((~use_box).nonzero()[0])
        one, _ = sam_mod.predict_masks(sam, emb[index[j]:index[j] + 1], points[j:j + 1], None, 64, multimask=True)
        best = 1 + int(iou[j, 1:].argmax())
        torch.testing.assert_close(one[0], logits[j, best], atol=1e-5, rtol=1e-5)
        wrapper = sam_mod.SamForTraining(sam, multimask_clicks=True)
        loss = wrapper._multimask_loss(emb, index, points, boxes, use_box, masks, 64)
        per = (torch.nn.functional.binary_cross_entropy_with_logits(logits, masks[:, None].expand_as(logits),
                                                                    reduction="none").flatten(2).mean(2)
               + sam_mod.dice_loss(logits.flatten(0, 1), masks[:, None].expand_as(logits).flatten(0, 1),
                                   reduce=False).view(len(index), 4))
        chosen = torch.where(use_box, per[:, 0], per[:, 1:].min(1).values)
        target = sam_mod.achieved_iou(logits.flatten(0, 1), masks[:, None].expand_as(logits).flatten(0, 1)).view(-1, 4)
        asked = torch.cat([use_box[:, None], (~use_box)[:, None].expand(-1, 3)], 1)
        torch.testing.assert_close(loss, chosen.mean() + ((iou - target)[asked] ** 2).mean())


# ----------------------------------------------------------------------------------------------
# the VLM bases' data: what each task asks and answers


def _scene(n_objects=3, seed=0):
    world = World(WorldConfig(min_objects=n_objects, max_objects=n_objects), seed=seed)
    return world, world.scene("train", 0)


def test_grounded_caption_puts_each_box_after_its_phrase():
    from groundlab.shared.boxes import loc_to_boxes, xywh_to_xyxy

    _, scene = _scene()
    text = vlm.grounded_caption(scene, "llava")
    boxes = loc_to_boxes(text, 64, 64, order="xyxy")
    assert len(boxes) == len(scene.objects)
    for box, ph in zip(boxes, sorted(scene.caption_phrases, key=lambda p: p.start)):
        gt = xywh_to_xyxy(scene.objects[ph.object_id].bbox)
        assert max(abs(a - b) for a, b in zip(box, gt)) <= 64 / 31 / 2 + 1e-6  # within half a bin
        assert text.index(ph.text) < text.index(vlm.box_text(scene.objects[ph.object_id], "llava", 64))
    import re

    assert re.sub(r" (<loc\d{4}>)+", "", text) == scene.caption


def test_llava_conversations_hold_at_most_one_box_task_each():
    import numpy as np

    world = World(WorldConfig(), seed=0)
    grounded = 0
    for i in range(40):
        scene = world.scene("train", i)
        convs = vlm.llava_conversations(scene, np.random.default_rng(i), vlm.MixConfig())
        for conv in convs:  # REC, region and grounded caption all hold boxes: one of them at most
            assert sum("<loc" in prompt + answer for prompt, answer in conv) <= 1
        assert convs[0][0] == (vlm.PROMPTS["llava"]["caption"], scene.caption)
        assert sum(p.startswith("Please provide the bounding box") for c in convs for p, _ in c) == 1
        grounded += any(c[0][0] == vlm.PROMPTS["llava"]["grounded"] for c in convs)
        # rec=3: one REC conversation per object (scenes hold 1-3), each for a different object
        convs = vlm.llava_conversations(scene, np.random.default_rng(i), vlm.MixConfig(rec=3))
        answers = [a for c in convs for p, a in c if p.startswith("Please provide the bounding box")]
        assert len(answers) == len(set(answers)) == len(scene.objects)
        assert set(answers) == {vlm.box_text(o, "llava", 64) for o in scene.objects}
        # separate_box_tasks=False: the same REC turns, all in the first conversation
        joint = vlm.llava_conversations(scene, np.random.default_rng(i), vlm.MixConfig(rec=3, separate_box_tasks=False))
        assert [a for p, a in joint[0] if p.startswith("Please provide the bounding box")] == answers
        assert len(joint) == 1 + any(c[0][0] == vlm.PROMPTS["llava"]["grounded"] for c in convs)
    assert 5 <= grounded <= 25  # about a third of the scenes


def test_rec_contrast_draws_attribute_expressions_for_objects_that_share_their_kind():
    world = World(WorldConfig(), seed=0)
    scenes = [world.scene("train", i) for i in range(300)]
    uniform, contrast = vlm.MixConfig(), vlm.MixConfig(rec_contrast=1.0)
    shared_kind = 0
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            refs = scene.refs_for(obj.id)
            # at 0 the draw is the old one exactly (same stream): older mixes, and their cached bases, stay
            rng = np.random.default_rng(i)
            assert vlm.rec_expression(scene, obj.id, rng, uniform) == refs[int(np.random.default_rng(i).integers(len(refs)))]
            ref = vlm.rec_expression(scene, obj.id, np.random.default_rng(i), contrast)
            assert ref in refs
            if sum(o.kind == obj.kind for o in scene.objects) > 1:
                shared_kind += 1
                # (an object the same colour and size as another of its kind has no attribute expression)
                assert ref.type == "attribute" or all(r.type != "attribute" for r in refs)
                # an attribute expression of such an object names what tells it apart: colour or size
                assert ref.type != "attribute" or {obj.colour, obj.size} & set(ref.text.split())
    assert shared_kind > 50
    # the share of draws that need the attribute grows with rec_contrast
    def share(mix):
        rng, hits, n = np.random.default_rng(0), 0, 0
        for scene in scenes:
            for obj in scene.objects:
                ref = vlm.rec_expression(scene, obj.id, rng, mix)
                hits += ref.type == "attribute" and sum(o.kind == obj.kind for o in scene.objects) > 1
                n += 1
        return hits / n
    assert share(uniform) < 0.15 < 0.22 < share(vlm.MixConfig(rec_contrast=0.75))
    # rec_per_object: up to that many distinct expressions of each object, each answered with its box
    twice = vlm.MixConfig(rec=3, separate_box_tasks=False, rec_per_object=2)
    more = 0
    for i, scene in enumerate(scenes[:40]):
        turns = [(q, a) for q, a in vlm.llava_conversations(scene, np.random.default_rng(i), twice)[0]
                 if q.startswith("Please provide the bounding box")]
        assert len(turns) == len(set(turns))
        for obj in scene.objects:
            box = vlm.box_text(obj, "llava", 64)
            mine = [q for q, a in turns if a == box]
            assert 1 <= len(mine) <= 2 and {q for q in mine} <= {
                vlm.PROMPTS["llava"]["rec"].format(expression=r.text) for r in scene.refs_for(obj.id)}
            more += len(mine) == 2
    assert more > 40


def test_rec_shortest_asks_each_objects_first_expression_in_its_shortest_form():
    world = World(WorldConfig(), seed=0)
    scenes = [world.scene("train", i) for i in range(200)]
    prompt = vlm.PROMPTS["llava"]["rec"]
    base = {"rec": 3, "separate_box_tasks": False, "rec_per_object": 2}

    def first_turns(mix, scene, i):
        turns = [(q, a) for q, a in vlm.llava_conversations(scene, np.random.default_rng(i), mix)[0]
                 if q.startswith("Please provide the bounding box")]
        firsts = {}
        for q, a in turns:
            firsts.setdefault(a, q)  # an object's first turn (its box is the answer)
        return firsts

    kind_only = {0.0: 0, 1.0: 0}
    for i, scene in enumerate(scenes):
        for share in kind_only:
            firsts = first_turns(vlm.MixConfig(**base, rec_shortest=share), scene, i)
            for obj in scene.objects:
                q = firsts.get(vlm.box_text(obj, "llava", 64))
                if q is None:
                    continue
                shortest = prompt.format(expression=scene.refs_for(obj.id)[0].text)
                if share == 1.0:
                    assert q == shortest
                kind_only[share] += len(scene.objects) > 1 and q == prompt.format(expression=f"the {obj.kind}")
    # the form a uniform draw rarely gives: "the <kind>" in a scene of several objects
    assert kind_only[1.0] > 3 * kind_only[0.0] > 0
    # at 0 a first turn draws no extra number: the old uniform draw exactly (older mixes stay as they were)
    for i, scene in enumerate(scenes[:30]):
        for obj in scene.objects:
            refs = scene.refs_for(obj.id)
            drawn = vlm.rec_expression(scene, obj.id, np.random.default_rng(i), vlm.MixConfig(), first=True)
            assert drawn == refs[int(np.random.default_rng(i).integers(len(refs)))]


def test_region_list_questions_number_every_box_and_ask_for_one():
    import re

    world = World(WorldConfig(), seed=0)
    asked = set()
    for i in range(40):
        scene = world.scene("train", i)
        prompt, obj = vlm.region_list_question(scene, np.random.default_rng(i))
        listed = re.fullmatch(r"Regions: (.*)\. What is region (\d+)\?", prompt)
        items = listed.group(1).split(", ")
        k = int(listed.group(2))
        assert [int(it.split(" ")[0]) for it in items] == list(range(1, len(scene.objects) + 1))
        boxes = [it.split(" ", 1)[1] for it in items]
        assert sorted(boxes) == sorted(vlm.box_text(o, "llava", 64) for o in scene.objects)
        assert boxes[k - 1] == vlm.box_text(obj, "llava", 64)
        asked.add(k)
        # in the first conversation, answered with the object's description; none without the option
        first = vlm.llava_conversations(scene, np.random.default_rng(i), vlm.MixConfig(region_list=1))[0]
        turns = [(p, a) for p, a in first if p.startswith("Regions:")]
        assert len(turns) == 1 and turns[0][1] in {o.phrase for o in scene.objects}
        plain = vlm.llava_conversations(scene, np.random.default_rng(i), vlm.MixConfig())
        assert not any(p.startswith("Regions:") for c in plain for p, _ in c)
    assert {1, 2} <= asked
    # the held-out items: scenes of two or more objects, the same ones on every call
    scenes = world.scenes("val", 20)
    items = vlm.region_list_items(scenes)
    assert len(items) == sum(len(s.objects) > 1 for s in scenes)
    assert [q for _, q, _ in items] == [q for _, q, _ in vlm.region_list_items(scenes)]


def test_rec_misses_say_which_box_an_answer_gave():
    world = World(WorldConfig(), seed=0)
    scene = next(s for s in world.scenes("val", 200)
                 if len(s.objects) == 3 and s.objects[0].kind == s.objects[1].kind != s.objects[2].kind)
    a, b, c = scene.objects
    items = [(scene, a, "")] * 6
    x0, y0, x1, y1 = vlm.xywh_to_xyxy(a.bbox)
    loose = (x0 - 0.6 * (x1 - x0), y0 - 0.6 * (y1 - y0), x1 + 0.6 * (x1 - x0), y1 + 0.6 * (y1 - y0))
    locs = re.findall(r"<loc\d+>", vlm.box_to_loc((x0, y0, x1, y1), 64, 64, order="xyxy"))
    backwards = "".join(locs[2:] + locs[:2])  # corners the wrong way round, as a weak model can answer: a miss
    answers = [vlm.box_text(a, "llava", 64), vlm.box_text(b, "llava", 64), vlm.box_text(c, "llava", 64),
               vlm.box_to_loc(loose, 64, 64, order="xyxy"), "a red circle", backwards]
    assert vlm._box_hits("llava", answers, items, 64) == [True, False, False, False, False, False]
    assert vlm.rec_misses("llava", answers, items, 64) == {
        "rec/miss/no_box": 1, "rec/miss/other_object": 2, "rec/miss/other_object/same_kind": 1,
        "rec/miss/no_object": 2, "rec/miss/no_object/loose": 1}


def test_paligemma_detect_answers_every_match_left_to_right():
    import numpy as np

    world = World(WorldConfig(min_objects=3), seed=4)
    for i in range(30):
        scene = world.scene("train", i)
        for prefix, suffix in vlm.paligemma_samples(scene, np.random.default_rng(i), vlm.MixConfig()):
            if not prefix.startswith("detect "):
                continue
            phrase = prefix[len("detect "):]
            parts = suffix.split(" ; ")
            assert all(p.endswith(" " + phrase) and p.count("<loc") == 4 for p in parts)
            if not phrase.startswith("the "):  # a category (not a referring expression): every object of it
                kind = phrase.split()[-1]
                colour = phrase.split()[0] if len(phrase.split()) == 2 else None
                n = sum(o.kind == kind and (colour is None or o.colour == colour) for o in scene.objects)
                assert len(parts) == n


def test_detect_contrast_asks_for_objects_that_share_their_kind_by_colour_and_kind():
    import numpy as np

    world = World(WorldConfig(min_objects=2), seed=0)
    scenes = [world.scene("train", i) for i in range(200)]
    mix, contrast = vlm.MixConfig(detect=2), vlm.MixConfig(detect=2, detect_contrast=1.0)

    def detects(scene, i, m):
        return [(p[len("detect "):], a) for p, a in vlm.paligemma_samples(scene, np.random.default_rng(i), m)
                if p.startswith("detect ") and not p.startswith("detect the ")]

    shared_scenes = 0
    for i, scene in enumerate(scenes):
        shared = [o for o in scene.objects if vlm.shares_kind(scene, o)]
        # without a kind-sharing object even 1.0 draws what the default (0: the old draws) does
        if not shared:
            assert detects(scene, i, contrast) == detects(scene, i, mix)
            continue
        shared_scenes += 1
        for phrase, answer in detects(scene, i, contrast):
            named = [o for o in shared if phrase == f"{o.colour} {o.kind}"]
            assert named, (phrase, [(o.colour, o.kind) for o in shared])
            boxes = sorted(vlm.box_text(o, "paligemma", 64) for o in scene.objects
                           if o.colour == named[0].colour and o.kind == named[0].kind)
            assert sorted(part[:len(boxes[0])] for part in answer.split(" ; ")) == boxes
    assert shared_scenes > 40

    def share(m):  # detect samples whose colour decides (the kind alone would match another object)
        n = hits = 0
        for i, scene in enumerate(scenes):
            for phrase, _ in detects(scene, i, m):
                words = phrase.split()
                n += 1
                hits += len(words) == 2 and sum(o.kind == words[1] for o in scene.objects) > 1
        return hits / n
    # at 1.0 every detect sample of such a scene is one (2 a scene, every scene); uniform draws about half as many
    assert share(contrast) == shared_scenes / len(scenes)
    assert share(mix) < 0.35 < share(vlm.MixConfig(detect=2, detect_contrast=0.5)) < share(contrast)


def test_dense_targets_by_hand():
    import numpy as np

    from groundlab.shared.bases.sam import semantic_class

    world, scene = _scene(1)
    classes, boxes = vlm.dense_targets(scene, world, 8)
    obj = scene.objects[0]
    covered = obj.mask.reshape(8, 8, 8, 8).sum((1, 3)).flatten() > 0
    assert (classes[covered] == semantic_class(world, obj)).all() and (classes[~covered] == 0).all()
    x, y, w, h = obj.bbox
    assert np.allclose(boxes[covered], np.array([x, y, x + w, y + h]) / 64)


def test_location_tokens_start_ordinal_and_positions_start_as_a_2d_code():
    from groundlab.shared.tokenizer import load_tokenizer

    tok = load_tokenizer()
    model = vlm.build_model(vlm.TinyVLMConfig(kind="llava"), tok)
    ids = tok.convert_tokens_to_ids([f"<loc{i:04d}>" for i in range(32)])
    w = torch.nn.functional.normalize(model.get_input_embeddings().weight[ids], dim=1)
    sim = w @ w.T
    assert sim[10, 11] > sim[10, 20] > sim[10, 31] - 0.5 and sim[0, 1] > 0.9
    pos = vlm.vision_tower(model).embeddings.position_embedding.weight[1:]  # (64, D), CLIP's class row first
    p = torch.nn.functional.normalize(pos, dim=1)
    assert (p[0] @ p[1]) > (p[0] @ p[7]) and (p[0] @ p[8]) > (p[0] @ p[63])


def test_trivial_baselines_are_what_they_say():
    world = World(WorldConfig(min_objects=1, max_objects=1), seed=0)
    b = vlm.trivial_baselines(world, n_train=50, n_scenes=20)
    # one object a scene: any "random object" or the union box is the object itself
    assert b["baseline/random_object/rec/acc50"] == 1.0 and b["baseline/union_box/rec/acc50"] == 1.0
    assert 0.0 < b["baseline/majority/qa/accuracy"] < 1.0
    assert "baseline/random_object/region_list/colour_kind" not in b  # no scene to list regions of
    assert not any(np.isnan(v) for v in b.values())


def test_sam_touching_objects_and_the_split_evaluation():
    masks = np.zeros((3, 8, 8), bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 3:5, 3:5] = True  # diagonal neighbour of mask 0: touching in the 8-neighbourhood
    masks[2, 6:8, 0:2] = True  # two pixels away from both
    assert sam_mod.touching(masks).tolist() == [True, True, False]
    assert sam_mod.touching(masks[2:]).tolist() == [False]
    world = World(WorldConfig(min_objects=3, max_objects=3), seed=0)
    m = sam_mod.evaluate(sam_mod.build_tiny_sam(), world, "val", 6)
    n, k = m["n_objects"], m["n_touching"]
    assert n == 18 and 0 < k < n
    for prompt in ("point", "box"):  # the overall figure is the two groups' weighted mean
        both = (k * m[f"{prompt}_touching/mIoU"] + (n - k) * m[f"{prompt}_isolated/mIoU"]) / n
        assert abs(both - m[f"{prompt}/mIoU"]) < 1e-9


def test_building_several_bases_runs_each_in_a_process_of_its_own(tmp_path, monkeypatch, capsys):
    import groundlab.shared.bases as bases_mod

    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path))
    for name in bases_mod.BASE_NAMES:  # what each child leaves behind
        d = bases_mod.base_dir(bases_mod.default_spec(name))
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"figure": float(len(name))}))
    calls = []
    monkeypatch.setattr(bases_mod, "_build_in_child", lambda name, force: calls.append((name, force)) or 0)
    main(["build", "--force"])
    assert calls == [(name, True) for name in bases_mod.BASE_NAMES]
    summary = json.loads((tmp_path / "bases" / "metrics.json").read_text())
    assert {k: summary[k] for k in ("llava/figure", "paligemma/figure", "sam/figure")} == \
        {"llava/figure": 5.0, "paligemma/figure": 9.0, "sam/figure": 3.0}
    monkeypatch.setattr(bases_mod, "_build_in_child", lambda name, force: 3)
    with pytest.raises(SystemExit, match="building the llava base failed"):
        main(["build"])
