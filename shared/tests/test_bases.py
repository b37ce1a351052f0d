"""Tiny pretrained bases: build, cache, reload through the real loaders, resume after a stop."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    PaliGemmaForConditionalGeneration,
    TrainerCallback,
)

from groundlab.shared.bases import base_dir, default_spec, ensure_base, load_tiny_sam, vlm
from groundlab.shared.bases import sam as sam_mod
from groundlab.shared.runs import check_complete
from groundlab.shared.world import World, WorldConfig


def micro(name, steps=12, save_steps=4, **kw):
    spec = default_spec(name)
    train = replace(spec.train, max_steps=steps, save_steps=save_steps, logging_steps=2, progress_bar=False,
                    warmup_steps=2, **kw)
    return replace(spec, train=train, train_scenes=64, eval_scenes=8)


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
    for key in ("caption/token_acc", "caption/exact_match", "qa/accuracy"):
        assert 0.0 <= metrics[key] <= 1.0 and f"baseline/untrained/{key}" in metrics
    assert metrics["config"]["key"] == spec.key() and "git_commit" in metrics
    # the loss went down over the few steps
    state = json.loads((base_dir(spec, root) / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]


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
    enc = sam_mod.build_tiny_sam(sam_mod.TinySamConfig()).image_encoder
    sam_mod.load_sam_checkpoint(enc, path, prefix="image_encoder.")
    torch.testing.assert_close(enc.patch_embed.proj.weight, sam.image_encoder.patch_embed.proj.weight)
    # a checkpoint missing a key, or of another size, is refused with the key named
    broken = dict(state)
    broken.pop("mask_decoder.iou_token.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="mask_decoder.iou_token.weight"):
        sam_mod.build_tiny_sam(checkpoint=tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="shape mismatches"):
        sam_mod.build_tiny_sam(sam_mod.TinySamConfig(encoder_dim=32), checkpoint=path)
    with pytest.raises(FileNotFoundError):
        sam_mod.build_tiny_sam(checkpoint=tmp_path / "none.pth")
    metrics = json.loads((base_dir(spec, tmp_path) / "metrics.json").read_text())
    # 60 steps already lift the masks well above the untrained model
    assert metrics["sam/box/mIoU"] > metrics["baseline/untrained/sam/box/mIoU"] + 0.2
    # the training-only class head: reported, never saved into the SAM checkpoint
    assert 0.0 <= metrics["sam/semantic_head/pixel_accuracy"] <= 1.0
    assert not any("semantic" in k for k in state)


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
