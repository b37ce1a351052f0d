"""ClawMachine's model: configs, the visual tokenizer, fetching and decoding regions, the sequence
layout and its labels, constrained generation, packed batches, the hybrid path and the converter."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from groundlab.clawmachine.configuration import (
    RELEASE_CONFIGS,
    ClawMachineConfig,
    VisualTokenizerConfig,
)
from groundlab.clawmachine.convert import convert_release, load_release
from groundlab.clawmachine.eva import EvaVitConfig
from groundlab.clawmachine.modeling import ClawMachineForCausalLM, set_trainable
from groundlab.clawmachine.processing import (
    ClawCollator,
    RegionConstraint,
    add_tokens,
    box_cells,
    cells_box,
    decode_region,
    fetch_region,
    from_square,
    to_square,
)
from groundlab.clawmachine.visual_tokenizer import (
    DynamicVisualTokenizer,
    TokenizedImage,
    TokenizerPretrainer,
    TokenMerger,
)
from groundlab.shared.metrics import box_iou
from groundlab.shared.multimodal import IGNORE_INDEX
from groundlab.shared.testing import attention_outside_the_shared_dispatch
from groundlab.shared.world import World, WorldConfig

sys.path.insert(0, str(Path(__file__).parent))
from claw_zero2_worker import SAM, discrete_twin, tiny_claw_model  # noqa: E402


def _images(n=2, seed=0):
    scenes = World(WorldConfig(), seed=seed).scenes("train", n)
    return torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2)


def _image(codes, cells):
    return TokenizedImage(torch.tensor(codes), torch.tensor(cells))


# ----------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("name,total", [("clawmachine_7b", 8.26e9)])
def test_release_config_builds_on_meta(name, total):
    config = RELEASE_CONFIGS[name]()
    with torch.device("meta"):
        model = ClawMachineForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - total) / total < 0.01
    assert config.grid == 16 and config.code_offset == 32002 and config.text_config.vocab_size == 32002 + 16384
    assert model.visual_tokenizer.encoder.config.depth == 39


def test_misspelt_and_inconsistent_config_values_are_errors():
    with pytest.raises(TypeError, match="keep_ratoi"):
        VisualTokenizerConfig(keep_ratoi=0.3)
    with pytest.raises(ValueError, match="keep_ratio"):
        VisualTokenizerConfig(keep_ratio=0)
    with pytest.raises(ValueError, match="model_type"):
        VisualTokenizerConfig(vision_config={"model_type": "vit"})
    with pytest.raises(ValueError, match="must be a Llama config"):
        ClawMachineConfig(text_config={"model_type": "gemma"})
    with pytest.raises(ValueError, match="cannot hold"):
        ClawMachineConfig(text_config={"vocab_size": 100}, code_offset=90)


def test_the_tokenizer_must_agree_with_the_models_ids():
    model, processor = tiny_claw_model()
    tok = processor.tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})  # shifts the first code's id
    with pytest.raises(ValueError, match="differ from the tokenizer"):
        add_tokens(tok, model.config)


# ----------------------------------------------------------------------------------------------
# the visual tokenizer


def test_tokenize_is_deterministic_at_eval_and_sampled_when_asked():
    model, _ = tiny_claw_model()
    images = _images(3)
    a, b = model.tokenize(images), model.tokenize(images)
    for x, y in zip(a, b):
        assert torch.equal(x.codes, y.codes) and torch.equal(x.remained_map, y.remained_map)
        assert len(x.codes) >= 1 and bool((x.remained_map[1:] > x.remained_map[:-1]).all())
        assert int(x.codes.max()) < model.config.codebook_size and x.features.shape == (len(x.codes), 32)
    torch.manual_seed(1)
    drawn = [model.visual_tokenizer.tokenize(images, sample=True) for _ in range(3)]
    assert len({tuple(d[0].remained_map.tolist()) for d in drawn}) > 1  # Gumbel draws differ


def test_the_merger_is_causal_among_kept_tokens_and_reads_the_dropped_ones():
    torch.manual_seed(0)
    merger = TokenMerger(16, 2, 1, 2.0).eval()
    x = torch.randn(1, 6, 16)
    keep = torch.tensor([[True, True, True, False, True, True]])
    out = merger(x, keep)
    later = x.clone()
    later[0, 5] += torch.randn(16)  # a later kept token: earlier kept tokens do not see it
    assert torch.allclose(merger(later, keep)[0, :3], out[0, :3], atol=1e-6)
    dropped = x.clone()
    dropped[0, 3] += torch.randn(16)  # a dropped token: every token reads it through the cross-attention
    assert not torch.allclose(merger(dropped, keep)[0, 0], out[0, 0], atol=1e-4)


def test_pretraining_reduces_the_reconstruction_loss_and_holds_the_keep_rate():
    torch.manual_seed(0)
    config = VisualTokenizerConfig(vision_config=SAM, merger_depth=1, merger_heads=2, mlp_ratio=2.0, codebook_size=32,
                                   code_dim=8, keep_ratio=0.5, decoder_depth=1)
    pre = TokenizerPretrainer(DynamicVisualTokenizer(config))
    feats = pre.tokenizer.features(_images(8))
    pre.init_codebook(feats[:2])
    opt = torch.optim.Adam([p for p in pre.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(60):
        out = pre(features=feats)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else float(out["reconstruction"])
    assert float(out["reconstruction"]) < 0.7 * first
    assert 0.3 < float(out["keep_rate"]) < 0.7
    assert pre.tokenizer.encoder.patch_embed.proj.weight.grad is None  # the ViT stays frozen


def test_colour_channels_append_each_patchs_mean_colour_to_its_feature():
    with pytest.raises(ValueError, match="multiple of 3"):
        VisualTokenizerConfig(vision_config=SAM, colour_channels=4)
    with pytest.raises(ValueError, match="merger_heads"):  # 32 + 3 is not a multiple of 2 heads
        VisualTokenizerConfig(vision_config=SAM, merger_heads=2, colour_channels=3)
    torch.manual_seed(0)
    plain = DynamicVisualTokenizer(VisualTokenizerConfig(vision_config=SAM, merger_depth=1, merger_heads=2))
    config = VisualTokenizerConfig(vision_config=SAM, merger_depth=1, merger_heads=2, colour_channels=6)
    coloured = DynamicVisualTokenizer(config)
    coloured.encoder.load_state_dict(plain.encoder.state_dict())
    assert config.width == 38 and config.vit_width == 32
    images = _images(2)
    feats, colour = coloured.features(images).split([32, 6], dim=-1)
    torch.testing.assert_close(feats, plain.features(images))
    # each patch of 4 x 4 pixels: its normalised mean colour, each channel twice (r r g g b b)
    pixels = coloured.preprocess(images)
    patch = pixels[1, :, 8:12, 20:24].mean(dim=(1, 2))  # row 2, column 5 of the 16 x 16 grid
    torch.testing.assert_close(colour[1, 2 * 16 + 5], patch.repeat_interleave(2))
    assert len(coloured.tokenize(images)) == 2  # the merger and quantiser run at the wider width


# ----------------------------------------------------------------------------------------------
# fetching and decoding regions


def test_box_cells_follow_the_papers_rows_and_columns():
    assert box_cells((0.0, 0.0, 0.25, 0.25), 4) == [0]
    assert box_cells((0.1, 0.3, 0.6, 0.55), 4) == [4, 5, 6, 8, 9, 10]  # rows 1-2, columns 0-2


def test_fetch_merges_boxes_keeps_raster_order_and_falls_back_in_2d():
    kept = [0, 1, 5, 6, 10, 15]  # 4 x 4 grid
    assert fetch_region([(0.0, 0.0, 0.5, 0.5)], kept, 4) == [0, 1, 2]  # cells 0, 1, 5 (4 is not kept)
    assert fetch_region([(0.5, 0.5, 0.75, 0.75), (0.0, 0.0, 0.25, 0.25)], kept, 4) == [0, 4]  # cells 0 and 10
    # a box on cell 12 (row 3, column 0) with none of it kept: on the grid cell 5 (row 1, column 1) is the
    # nearest kept one (distance sqrt 5 against 3 for cells 0 and 15); by raster index it would be 15
    assert fetch_region([(0.0, 0.75, 0.25, 1.0)], [0, 5, 15], 4) == [1]


def test_box_tokens_box_round_trip_reaches_the_quantisation_bound():
    """With every cell kept and every cell a distinct code, a box -> its tokens -> the decoder gives the
    box of its cells; on world objects that box holds IoU >= 0.5 for >= 90 % (the bound at G = 16)."""
    grid = 16
    image = _image(list(range(grid * grid)), list(range(grid * grid)))
    hits = []
    for scene in World(WorldConfig(), seed=0).scenes("val", 60):
        for obj in scene.objects:
            x, y, w, h = obj.bbox
            box = (x, y, x + w, y + h)
            pos = fetch_region([to_square(box, 64, 64)], image.remained_map, grid)
            cells = decode_region(image.codes[pos].tolist(), image, grid)
            assert cells == [int(image.remained_map[p]) for p in pos]
            back = from_square(cells_box(cells, grid), 64, 64)
            assert back[0] <= box[0] and back[1] <= box[1] and back[2] >= box[2] and back[3] >= box[3]
            hits.append(float(box_iou(np.asarray([back]), np.asarray([box]))[0, 0]) >= 0.5)
    assert np.mean(hits) >= 0.9


def test_duplicate_codes_are_resolved_by_position_and_connectivity():
    # codes 7, 8 appear twice: at cells 0-1 (top left) and at cells 14-15 (top right); 9 only at cell 31,
    # under cell 15: the region 7, 8, 9 is the right-hand copy with it
    image = _image([7, 8, 3, 7, 8, 9], [0, 1, 5, 14, 15, 31])
    assert decode_region([7, 8, 9], image, 16) == [14, 15, 31]
    assert decode_region([7, 8], image, 16) in ([0, 1], [14, 15])
    assert decode_region([42], image, 16) is None  # no code of the image
    # a code whose only copy is far from the rest is dropped, not stretched to
    far = _image([7, 8, 9, 5], [0, 1, 2, 200])
    assert decode_region([7, 8, 5, 9], far, 16) == [0, 1, 2]


def test_padding_round_trip_for_non_square_images():
    box = (3.0, 5.0, 20.0, 30.0)
    sq = to_square(box, 40, 64)
    assert np.allclose(from_square(sq, 40, 64), box)


# ----------------------------------------------------------------------------------------------
# sequences


def test_layout_and_labels_of_referring_and_grounding():
    model, processor = tiny_claw_model()
    image = model.tokenize(_images(1))[0]
    c = model.config
    region = [[0.2, 0.2, 0.6, 0.7]]
    conv = [{"from": "human", "value": "<image>\nWhat is <ref_patch>?"}, {"from": "gpt", "value": "the red circle"},
            {"from": "human", "value": "Where is the square?"}, {"from": "gpt", "value": "<ref_patch>"}]
    enc = processor.encode(conv, image, [region, region])
    ids, labels = enc.input_ids, enc.labels
    starts = [i for i, t in enumerate(ids) if t == c.image_start_token_id]
    ends = [i for i, t in enumerate(ids) if t == c.image_end_token_id]
    assert len(starts) == len(ends) == 3
    scene, asked, answer = zip(starts, ends)
    assert ids[scene[0] + 1:scene[1]] == [c.code_offset + int(k) for k in image.codes]
    assert enc.scene == (scene[0] + 1, len(image.codes))
    assert all(label == IGNORE_INDEX for label in labels[scene[0]:scene[1] + 1])  # the image: never a target
    assert all(label == IGNORE_INDEX for label in labels[asked[0]:asked[1] + 1])  # a region in a question: input
    assert labels[answer[0]:answer[1] + 1] == ids[answer[0]:answer[1] + 1]  # a region in an answer: the target
    assert ids[asked[0]:asked[1] + 1] == ids[answer[0]:answer[1] + 1]  # the same region, fetched the same way
    assert any(label != IGNORE_INDEX for label in labels[asked[1]:answer[0]])  # the referring answer's words


def test_markers_and_ref_list_must_agree_and_text_only_samples_work():
    model, processor = tiny_claw_model()
    image = model.tokenize(_images(1))[0]
    conv = [{"from": "human", "value": "<image>\nWhere is the circle?"}, {"from": "gpt", "value": "<ref_patch>"}]
    with pytest.raises(ValueError, match="1 <ref_patch> markers but ref_list has 0"):
        processor.encode(conv, image, [], where="s7")
    with pytest.raises(ValueError, match="s7: ref_list\\[0\\]: box"):
        processor.encode(conv, image, [[[0.5, 0.5, 0.2, 0.9]]], where="s7")
    with pytest.raises(ValueError, match="no image was given"):
        processor.encode(conv, None, [[[0.1, 0.1, 0.2, 0.2]]])
    text = processor.encode([{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "yes"}], None)
    assert processor.start_id not in text.input_ids and any(x != IGNORE_INDEX for x in text.labels)


def test_split_answer_reads_text_and_regions():
    model, processor = tiny_claw_model()
    c = model.config
    words = processor.tokenizer("the red circle", add_special_tokens=False)["input_ids"]
    ids = words + [c.image_start_token_id, c.code_offset + 3, c.code_offset + 5, c.image_end_token_id,
                   processor.tokenizer.eos_token_id, c.code_offset + 9]
    text, regions = processor.split_answer(ids)
    assert text == "the red circle<ref_patch>" and regions == [[3, 5]]


def test_constrained_generation_writes_only_the_images_codes_inside_regions():
    model, processor = tiny_claw_model(codebook_size=64)
    c = model.config
    images = model.tokenize(_images(2, seed=3))
    allowed = model.allowed_codes(images)
    # a random model, pushed to open regions: every code it writes inside one is its image's
    bias = torch.zeros(c.text_config.vocab_size)
    bias[c.image_start_token_id] = bias[c.code_offset:] = 5.0
    model.language_model.lm_head.bias = torch.nn.Parameter(bias)
    batch = ClawCollator(processor.tokenizer.pad_token_id, padding_side="left")(
        [{"input_ids": processor.prompt("Where is the circle?", im)} for im in images])
    out = model.generate(batch["input_ids"], batch["attention_mask"], images, max_new_tokens=12,
                         eos_token_id=processor.tokenizer.eos_token_id, pad_token_id=processor.tokenizer.pad_token_id)
    for b, row in enumerate(out.tolist()):
        _, regions = processor.split_answer(row)
        codes = [x - c.code_offset for x in row if c.is_code(x)]
        assert regions and codes and all(bool(allowed[b, k]) for k in codes)
    scores = torch.zeros(1, c.text_config.vocab_size)
    outside = RegionConstraint(c, allowed[:1], 0)(torch.tensor([[c.image_end_token_id]]), scores)
    assert torch.isinf(outside[0, c.code_offset:]).all() and torch.isinf(outside[0, c.image_end_token_id])


def test_every_attention_runs_through_the_shared_dispatch():
    model, _ = tiny_claw_model()
    assert attention_outside_the_shared_dispatch(model) == []


def test_both_stages_train_the_llm_and_never_the_tokenizer():
    model, _ = tiny_claw_model(hybrid=True)
    for stage in ("stage1", "stage2"):
        names = set(set_trainable(model, stage))
        assert any(n.startswith("language_model.") for n in names) and "mm_projector.0.weight" in names
        assert not any(n.startswith("visual_tokenizer.") for n in names)


def _samples(model, processor):
    images = model.tokenize(_images(2))
    convs = [[{"from": "human", "value": "<image>\nWhere is the red circle?"}, {"from": "gpt", "value": "<ref_patch>"}],
             [{"from": "human", "value": "<image>\nWhat is <ref_patch>?"}, {"from": "gpt", "value": "a big blue square"}]]
    out = []
    for im, conv in zip(images, convs):
        enc = processor.encode(conv, im, [[[0.1, 0.1, 0.5, 0.6]]])
        out.append({"input_ids": enc.input_ids, "labels": enc.labels, **processor.scene_inputs(enc, im)})
    return out


def _ids_only(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


@pytest.mark.parametrize("config", [{}, {"scene_positions": True}])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(config):
    model, processor = tiny_claw_model(**config)
    set_trainable(model, "stage2")
    if config:
        with torch.no_grad():
            torch.nn.init.normal_(model.scene_rows.weight, std=0.1)
            torch.nn.init.normal_(model.scene_cols.weight, std=0.1)
    samples = _samples(model, processor)
    results = []
    for packed in (False, True):
        model.zero_grad()
        loss = model(**ClawCollator(processor.tokenizer.pad_token_id, packed=packed)(samples)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 5
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4)


def test_the_hybrid_path_puts_the_scenes_features_in_place_of_its_codes():
    model, processor = tiny_claw_model(hybrid=True)
    samples = _samples(model, processor)
    batch = ClawCollator(processor.tokenizer.pad_token_id)(samples)
    assert int(batch["scene_mask"].sum()) == len(batch["scene_features"]) == sum(s["scene"][1] for s in samples)
    hybrid = model(**batch).loss
    discrete = discrete_twin(model)[0](**_ids_only(batch)).loss
    assert torch.isfinite(hybrid) and not torch.isclose(hybrid, discrete)
    with pytest.raises(ValueError, match="scene needs scene_mask and its scene_features"):
        model(**_ids_only(batch))  # evaluated without its features, it would be another model
    left = ClawCollator(processor.tokenizer.pad_token_id, padding_side="left")(samples)
    assert torch.equal(left["input_ids"][left["scene_mask"]], batch["input_ids"][batch["scene_mask"]])
    plain, _ = tiny_claw_model()
    with pytest.raises(ValueError, match="hybrid=True"):
        plain(**batch)


def test_the_added_hybrid_path_keeps_the_codes_under_the_features():
    model, processor = tiny_claw_model(hybrid=True, hybrid_mode="add")
    batch = ClawCollator(processor.tokenizer.pad_token_id)(_samples(model, processor))
    twin, discrete = discrete_twin(model)[0], _ids_only(batch)
    # the projector's last layer starts at zero: the model starts as the discrete one
    torch.testing.assert_close(model(**batch).loss, twin(**discrete).loss)
    with torch.no_grad():
        torch.nn.init.normal_(model.mm_projector[2].weight, std=0.1)
    ids = batch["input_ids"]
    codes = model.language_model.get_input_embeddings()(ids)
    embeds = model.embed(ids, batch["scene_features"], batch["scene_mask"])
    projected = model.mm_projector(batch["scene_features"])
    assert projected.abs().max() > 0.01
    torch.testing.assert_close(embeds[batch["scene_mask"]], codes[batch["scene_mask"]] + projected)
    torch.testing.assert_close(embeds[~batch["scene_mask"]], codes[~batch["scene_mask"]])
    assert not torch.isclose(model(**batch).loss, twin(**discrete).loss)
    with pytest.raises(ValueError, match="hybrid_mode"):
        ClawMachineConfig(hybrid=True, hybrid_mode="concat")


def test_scene_positions_add_each_codes_row_and_column_and_start_as_the_discrete_model():
    model, processor = tiny_claw_model(scene_positions=True)
    samples = _samples(model, processor)
    batch = ClawCollator(processor.tokenizer.pad_token_id)(samples)
    assert "scene_features" not in batch and int(batch["scene_mask"].sum()) == len(batch["scene_cells"])
    assert torch.equal(batch["scene_cells"], torch.cat([torch.as_tensor(s["scene_cells"]) for s in samples]))
    twin, _ = discrete_twin(model)
    torch.testing.assert_close(model(**batch).loss, twin(**_ids_only(batch)).loss)  # zero at the start
    with torch.no_grad():
        torch.nn.init.normal_(model.scene_rows.weight, std=0.1)
        torch.nn.init.normal_(model.scene_cols.weight, std=0.1)
    ids, mask, cells, g = batch["input_ids"], batch["scene_mask"], batch["scene_cells"], model.config.grid
    codes = model.language_model.get_input_embeddings()(ids)
    embeds = model.embed(ids, None, mask, cells)
    torch.testing.assert_close(embeds[mask], codes[mask] + model.scene_rows.weight[cells // g]
                               + model.scene_cols.weight[cells % g])
    torch.testing.assert_close(embeds[~mask], codes[~mask])  # the regions and the text stay plain
    assert not torch.isclose(model(**batch).loss, twin(**_ids_only(batch)).loss)
    assert {"scene_rows.weight", "scene_cols.weight"} <= set(set_trainable(model, "stage2"))
    with pytest.raises(ValueError, match="scene needs scene_mask and its scene_cells"):
        model(**_ids_only(batch))
    with pytest.raises(ValueError, match="scene_mask marks"):
        model.embed(ids, None, mask, cells[:-1])
    with pytest.raises(ValueError, match="scene_positions=True"):
        twin(**batch)


def test_first_code_weight_weighs_each_answered_regions_first_code_only():
    model, processor = tiny_claw_model(first_code_weight=5.0)
    twin, _ = discrete_twin(model)  # the same weights, the plain loss
    samples = _samples(model, processor)
    for packed in (False, True):
        batch = ClawCollator(processor.tokenizer.pad_token_id, packed=packed)(samples)
        ids, labels = batch["input_ids"], batch["labels"]
        first = model.first_codes(ids, labels)
        # one grounding answer: its region's first code; the referring question's region is no target
        assert first.sum(1).tolist() == [1, 0]
        p = int(first[0].nonzero())
        assert ids[0, p - 1] == model.config.image_start_token_id and model.config.is_code(int(labels[0, p]))
        assert int((ids[0, :p] == model.config.image_start_token_id).sum()) == 2  # the scene's [IMG] came first
        out = model(**batch)
        logits = out.logits[:, :-1].float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                   reduction="none").view_as(targets)
        n = int((targets != -100).sum())
        torch.testing.assert_close(twin(**batch).loss, losses.sum() / n)  # the plain loss from the same logits
        torch.testing.assert_close(out.loss, (losses.sum() + 4.0 * losses[0, p - 1]) / n)
    model.config.first_code_weight = 1.0
    torch.testing.assert_close(model(**batch).loss, twin(**batch).loss)
    with pytest.raises(ValueError, match="first_code_weight must be > 0"):
        ClawMachineConfig(first_code_weight=0.0)


def test_tied_code_rows_score_codes_with_the_input_embedding_rows():
    model, processor = tiny_claw_model(tie_code_rows=True)
    twin, _ = discrete_twin(model)  # the same weights, the untied head
    batch = ClawCollator(processor.tokenizer.pad_token_id)(_samples(model, processor))
    off, n = model.config.code_offset, model.config.codebook_size
    out, plain = model(**batch), twin(**batch)
    hidden = model.language_model.model(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).last_hidden_state
    rows = model.language_model.get_input_embeddings().weight[off:off + n]
    torch.testing.assert_close(out.logits[..., off:off + n], hidden @ rows.t())  # the input rows score codes
    torch.testing.assert_close(out.logits[..., :off], plain.logits[..., :off])  # text is the untied head's
    torch.testing.assert_close(out.logits[..., off + n:], plain.logits[..., off + n:])
    assert not torch.allclose(out.logits[..., off:off + n], plain.logits[..., off:off + n])
    out.loss.backward()  # the input rows learn from the codes written too, the head's code rows from nothing
    plain.loss.backward()
    tied_grad = model.language_model.get_input_embeddings().weight.grad[off:off + n]
    assert not torch.allclose(tied_grad, twin.language_model.get_input_embeddings().weight.grad[off:off + n])
    assert model.language_model.lm_head.weight.grad[off:off + n].abs().sum() == 0
    with torch.no_grad():  # the head's own code rows are unused
        model.language_model.lm_head.weight[off:off + n] = 0
        torch.testing.assert_close(model(**batch).logits, out.logits.detach())


# ----------------------------------------------------------------------------------------------
# the release's weights


def _release_like(model):
    """A LaVIT-layout tokenizer state dict and a LLaVA-layout LLM state dict of ``model``'s weights."""
    tok = {f"model.vision_tower.vision_tower.visual_tokenizer.{k}": v.clone()
           for k, v in model.visual_tokenizer.state_dict().items() if not k.startswith("feature_")}  # not LaVIT's
    tok["decoder.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)  # pre-training parts: reported, not loaded
    tok["vit_proj.weight"] = torch.zeros(3, 3)
    llm = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    llm["model.vision_tower.vision_tower.cls_token"] = torch.zeros(1)
    llm |= {f"model.mm_projector.{k}": v.clone() for k, v in model.mm_projector.state_dict().items()}
    return tok, llm


def test_release_weights_convert_and_load_strictly(tmp_path):
    eva = EvaVitConfig(image_size=28, patch_size=14, hidden_size=16, depth=1, num_heads=2)
    model, _ = tiny_claw_model(hybrid=True)
    cfg = model.config.to_dict()
    cfg["tokenizer_config"]["vision_config"] = eva.to_dict()
    source = ClawMachineForCausalLM(ClawMachineConfig(**{k: v for k, v in cfg.items() if k in (
        "tokenizer_config", "text_config", "image_start_token_id", "image_end_token_id", "code_offset", "hybrid")}))
    tok, llm = _release_like(source)
    torch.save(tok, tmp_path / "tokenizer.bin")
    state = convert_release(tmp_path / "tokenizer.bin", llm)
    fresh = ClawMachineForCausalLM(source.config)
    load_release(fresh, state)
    for k, v in source.state_dict().items():  # the standardisation filled in as identity, as the source's
        assert torch.equal(fresh.state_dict()[k], v), k
    with pytest.raises(KeyError, match="unknown key 'rogue.weight'"):
        convert_release({**tok, "rogue.weight": torch.zeros(1)})
    del state["language_model.model.norm.weight"]
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_release(fresh, state)


def test_code_rows_start_from_the_codebook():
    from transformers import LlamaConfig, LlamaForCausalLM

    from groundlab.clawmachine.train import init_code_embeddings

    model, _ = tiny_claw_model(codebook_size=8)
    visual = model.visual_tokenizer
    with torch.no_grad():
        visual.quantize.embedding.weight[1] = visual.quantize.embedding.weight[0]  # two codes alike
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=20 + 8, tie_word_embeddings=False))
    text_std = float(lm.get_input_embeddings().weight[:20].std())
    init_code_embeddings(lm, visual, 20)
    for emb in (lm.get_input_embeddings(), lm.get_output_embeddings()):
        rows = emb.weight[20:]
        assert torch.allclose(rows[0], rows[1]) and not torch.allclose(rows[0], rows[2])
        assert abs(float(rows.std()) - text_std) < 0.2 * text_std
