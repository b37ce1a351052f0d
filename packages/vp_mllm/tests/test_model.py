import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from groundlab.shared.testing import attention_outside_the_shared_dispatch
from groundlab.vp_mllm.configuration import (
    RELEASE_CONFIGS,
    VisualPromptEncoderConfig,
    VPMLLMConfig,
)
from groundlab.vp_mllm.modeling import (
    VisualPromptEncoder,
    VPMLLMForConditionalGeneration,
    align_to_locations,
    load_sam_prompt_encoder,
    random_boxes,
    region_mean,
    set_trainable,
)
from groundlab.vp_mllm.processing import (
    VP_TOKEN,
    VisualPrompts,
    VPCollator,
    encode_prompts,
    jitter_box,
    mask_to_box,
    scribble_to_box,
)

sys.path.insert(0, str(Path(__file__).parent))
from zero2_worker import tiny_vp_model  # noqa: E402


def _image(w=64, h=64, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# the prompt slots


def test_coordinates_are_normalised_on_the_padded_square():
    """A 100 x 50 image sits centred on a 100 x 100 square (25 px above and below): coordinates move
    with it and are divided by the side; points keep -1 in the last two entries; slots beyond the
    prompts are padding."""
    boxes = encode_prompts(VisualPrompts("box", [(10, 0, 60, 50)]), 100, 50, 10)
    torch.testing.assert_close(boxes["vp_coords"][0], torch.tensor([0.10, 0.25, 0.60, 0.75]))
    assert boxes["vp_valid"].tolist() == [True] + [False] * 9 and bool(boxes["vp_is_box"])
    points = encode_prompts(VisualPrompts("point", [(0, 0), (25, 50)]), 50, 100, 10)
    torch.testing.assert_close(points["vp_coords"][:2], torch.tensor([[0.25, 0.0, -1, -1], [0.5, 0.5, -1, -1]]))
    assert points["vp_valid"][:2].all() and not points["vp_valid"][2:].any() and not bool(points["vp_is_box"])
    assert (points["vp_coords"][2:, 2:] == -1).all()  # padding stays a point slot


def test_a_real_point_at_the_origin_is_not_padding():
    """The reference reads a slot of zeros as padding, so a click at (0, 0) vanished; here the slot's
    valid flag decides, and the valid and padding embeddings differ."""
    enc = VisualPromptEncoder(VisualPromptEncoderConfig(embed_dim=16))
    slots = encode_prompts(VisualPrompts("point", [(0, 0)]), 64, 64, 10)
    coords, valid, is_box = (slots[k][None] for k in ("vp_coords", "vp_valid", "vp_is_box"))
    tokens = enc(coords, valid, is_box[None].view(1))
    assert tokens.shape == (1, 10, 32)
    assert not torch.allclose(tokens[0, 0], tokens[0, 1])  # the valid origin click vs a padding slot


def test_encoder_features_and_the_half_pixel_flag():
    """A point token is ``up(PE(x, y) + valid embedding)``; a box token its two corners' ``PE + corner
    embedding`` side by side plus the valid box embedding; the flag adds 0.5 before the features."""
    torch.manual_seed(0)
    enc = VisualPromptEncoder(VisualPromptEncoderConfig(embed_dim=16))
    coords = torch.tensor([[[0.2, 0.3, 0.6, 0.9]] + [[0.0, 0.0, 0.0, 0.0]] * 9])
    valid = torch.tensor([[True] + [False] * 9])
    box = enc(coords, valid, torch.tensor([True]))
    pe = enc.pe_layer
    corners = torch.cat([pe(torch.tensor([0.2, 0.3])) + enc.box_embeddings[2].weight[0],
                         pe(torch.tensor([0.6, 0.9])) + enc.box_embeddings[3].weight[0]])
    torch.testing.assert_close(box[0, 0], corners + enc.box_embeddings[1].weight[0])
    point = enc(coords, valid, torch.tensor([False]))
    torch.testing.assert_close(point[0, 0], enc.up(pe(torch.tensor([0.2, 0.3])) + enc.point_embeddings[1].weight[0]))
    shifted = VisualPromptEncoder(VisualPromptEncoderConfig(embed_dim=16, half_pixel_offset=True))
    shifted.load_state_dict(enc.state_dict())
    torch.testing.assert_close(shifted(coords, valid, torch.tensor([False]))[0, 0],
                               enc.up(pe(torch.tensor([0.7, 0.8])) + enc.point_embeddings[1].weight[0]))
    # the Fourier matrix is frozen: a buffer, never a parameter an optimiser could see
    assert "pe_layer.positional_encoding_gaussian_matrix" in enc.state_dict()
    assert not any("gaussian" in n for n, _ in enc.named_parameters())


def test_bad_prompts_are_errors_that_say_what():
    with pytest.raises(ValueError, match="11 box prompts, more than the model's 10 slots"):
        encode_prompts(VisualPrompts("box", [(0, 0, 5, 5)] * 11), 64, 64, 10)
    with pytest.raises(ValueError, match="point 2"):
        encode_prompts(VisualPrompts("point", [(3, 3), (70, 3)]), 64, 64, 10)  # outside the image
    with pytest.raises(ValueError, match="both 'bbox' and 'points'"):
        VisualPrompts.from_record({"bbox": [[0, 0, 4, 4]], "points": [[1, 1]]}, "rec 0")
    with pytest.raises(ValueError, match="box 1: width and height must be positive"):
        VisualPrompts.from_record({"bbox": [[0, 0, 0, 4]]}, "rec 0")
    with pytest.raises(ValueError, match="expected 2 numbers"):
        VisualPrompts("point", [(1, 2, 3)])
    from groundlab.vp_mllm.inference import make_prompts

    with pytest.raises(ValueError, match="points cannot be mixed with boxes"):
        make_prompts(points=[(1, 1)], boxes=[(0, 0, 4, 4)])


def test_free_form_shapes_become_their_boxes_and_box_noise_stays_in_the_papers_bounds():
    assert scribble_to_box([(3, 9), (10, 2), (7, 5)]) == (3, 2, 10, 9)
    mask = np.zeros((16, 16), bool)
    mask[4:9, 2:12] = True
    assert mask_to_box(mask) == (2, 4, 12, 9)
    with pytest.raises(ValueError, match="empty"):
        mask_to_box(np.zeros((4, 4), bool))
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = jitter_box((10, 20, 50, 44), rng)  # w 40, h 24: shifts <= 5 / 3 px, sizes +-15 %
        assert abs(x0 - 10) <= 5 and abs(y0 - 20) <= 3
        assert 40 * 0.85 <= x1 - x0 <= 40 * 1.15 and 24 * 0.85 <= y1 - y0 <= 24 * 1.15


# ----------------------------------------------------------------------------------------------
# the model


def test_sequence_layout_and_token_counts():
    """[bos] USER: [image tokens][start_vp, K tokens, end_vp]\\n question ...: the processor writes the
    placeholders, the model fills them; only the answer is supervised."""
    model, processor = tiny_vp_model()
    cfg = model.config
    assert (cfg.n_image_tokens, cfg.n_vp_tokens) == (64, 12)
    s = processor.encode(_image(), [{"from": "human", "value": "<image>\nWhat is <Region 1>?"},
                                    {"from": "gpt", "value": "red circle"}], VisualPrompts("box", [(1, 1, 9, 9)]))
    ids, labels = s["input_ids"], s["labels"]
    img = ids.index(cfg.lmm_config.image_token_index)
    assert ids[img:img + 64] == [cfg.lmm_config.image_token_index] * 64
    assert ids[img + 64:img + 76] == [cfg.vp_token_index] * 12 and ids[img + 76] != cfg.vp_token_index
    assert processor.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100]).strip() == "red circle</s>"
    batch = VPCollator(processor.tokenizer.pad_token_id)([s])
    vp = model.prompt_tokens(batch["vp_coords"], batch["vp_valid"], batch["vp_is_box"])
    assert vp.shape == (1, 12, cfg.hidden_size)
    torch.testing.assert_close(vp[0, 0], model.start_vp[0, 0])
    torch.testing.assert_close(vp[0, -1], model.end_vp[0, 0])
    embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["vp_coords"], batch["vp_valid"],
                         batch["vp_is_box"])
    row = batch["input_ids"][0]
    torch.testing.assert_close(embeds[0, row == cfg.vp_token_index], vp[0])  # the block lands on its placeholders
    torch.testing.assert_close(embeds[0, row == cfg.lmm_config.image_token_index],
                               model.image_tokens(batch["pixel_values"])[0])
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)


def test_the_answer_depends_on_the_prompt_and_a_missing_block_is_an_error():
    model, processor = tiny_vp_model()
    conv = [{"from": "human", "value": "What is <Region 1>?"}, {"from": "gpt", "value": "red circle"}]
    a = processor.encode(_image(), conv, VisualPrompts("box", [(1, 1, 9, 9)]))
    b = processor.encode(_image(), conv, VisualPrompts("box", [(30, 30, 60, 60)]))
    batch = VPCollator(processor.tokenizer.pad_token_id)([a, b])
    logits = model(**batch).logits
    assert not torch.allclose(logits[0], logits[1])
    del batch["vp_coords"]
    with pytest.raises(ValueError, match="<vp> placeholders but no prompts"):
        model(**batch)


def test_multi_view_layout():
    """SPHINX-V's views: the global view and the four quadrants, each view's tokens between start_img
    / end_img."""
    model, processor = tiny_vp_model(views="multi")
    pv = processor.pixel_values(_image(64, 48))
    assert pv.shape == (5, 3, 64, 64)
    assert model.config.n_image_tokens == 5 * (64 + 2)
    tokens = model.image_tokens(pv[None])
    assert tokens.shape == (1, 330, model.config.hidden_size)
    torch.testing.assert_close(tokens[0, 0], model.start_img[0, 0])
    torch.testing.assert_close(tokens[0, 65], model.end_img[0, 0])
    s = processor.encode(_image(64, 48), [{"from": "human", "value": "What is <Mark 1>?"},
                                          {"from": "gpt", "value": "blue square"}], VisualPrompts("point", [(5, 5)]))
    assert torch.isfinite(model(**VPCollator(processor.tokenizer.pad_token_id)([s])).loss)


def test_region_mean_pools_the_patches_of_a_box_or_under_a_point():
    """A 4 x 4 grid whose token i is i: a box over the top-left 2 x 2 patches averages tokens 0, 1, 4,
    5; a box too small to hold a patch centre and a point both take the patch under them."""
    grid = torch.arange(16.0).view(1, 16, 1)
    coords = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.55, 0.55, 0.6, 0.6]]])
    torch.testing.assert_close(region_mean(grid, coords, torch.tensor([True]))[0, :, 0], torch.tensor([2.5, 10.0]))
    points = torch.tensor([[[0.9, 0.1, -1.0, -1.0], [0.3, 0.8, -1.0, -1.0]]])
    torch.testing.assert_close(region_mean(grid, points, torch.tensor([False]))[0, :, 0], torch.tensor([3.0, 13.0]))
    with pytest.raises(ValueError, match="square grid"):
        region_mean(torch.zeros(1, 15, 1), coords, torch.tensor([True]))


@pytest.mark.parametrize("views", ["single", "multi"])
def test_region_content_adds_the_regions_image_tokens_to_its_slot(views):
    """``region_content``: slot k's token is the encoder's token plus the mean image token of box k
    (of the global view in the multi-view layout); padded slots get nothing added."""
    model, processor = tiny_vp_model(views=views, region_content=True)
    plain, _ = tiny_vp_model(views=views)
    plain.load_state_dict(model.state_dict())
    s = processor.encode(_image(), [{"from": "human", "value": "What is <Region 1>?"},
                                    {"from": "gpt", "value": "red circle"}], VisualPrompts("box", [(0, 0, 32, 32)]))
    batch = VPCollator(processor.tokenizer.pad_token_id)([s])
    image = model.image_tokens(batch["pixel_values"])
    with_content = model.prompt_tokens(batch["vp_coords"], batch["vp_valid"], batch["vp_is_box"], image)
    without = plain.prompt_tokens(batch["vp_coords"], batch["vp_valid"], batch["vp_is_box"])
    grid = image[:, 1:65] if views == "multi" else image
    expected = grid[0].view(8, 8, -1)[:4, :4].reshape(16, -1).mean(0)  # the top-left quarter's 16 patches
    torch.testing.assert_close(with_content[0, 1] - without[0, 1], expected)
    torch.testing.assert_close(with_content[0, 2:], without[0, 2:])  # padding slots and end_vp unchanged
    embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["vp_coords"], batch["vp_valid"],
                         batch["vp_is_box"])
    torch.testing.assert_close(embeds[0, batch["input_ids"][0] == model.config.vp_token_index], with_content[0])
    with pytest.raises(ValueError, match="needs the image's tokens"):
        model.prompt_tokens(batch["vp_coords"], batch["vp_valid"], batch["vp_is_box"])


def test_every_attention_runs_through_the_shared_dispatch():
    model, _ = tiny_vp_model()
    assert attention_outside_the_shared_dispatch(model) == []


def test_compile_layers_finds_the_language_models_layers():
    """``TrainConfig.compile_layers`` compiles ``get_decoder().layers``: the LLaVA's language-model
    blocks (compiled lazily, at their first call; the shared test checks the losses it trains)."""
    from groundlab.shared.training import compile_decoder_layers, uncompile_layers

    model, _ = tiny_vp_model()
    layers = compile_decoder_layers(model)
    try:
        assert layers == list(model.lmm.model.language_model.layers) and len(layers) > 0
    finally:
        uncompile_layers(layers)


def test_trainable_sets_of_the_two_stages():
    model, _ = tiny_vp_model()
    one = set(set_trainable(model, "stage1"))
    assert any(n.startswith("vp_encoder.") for n in one) and "vp_proj.0.weight" in one and "start_vp" in one
    assert any("embed_tokens" in n for n in one) and any("multi_modal_projector" in n for n in one)
    assert any(n.startswith("lmm.lm_head") for n in one) and any(n.endswith("language_model.norm.weight") for n in one)
    assert not any(".layers." in n and "language_model" in n for n in one)  # the LLM's blocks frozen
    two = set(set_trainable(model, "stage2"))
    assert not any(n.startswith("vp_encoder.") for n in two) and "vp_proj.0.weight" in two
    assert any(".layers." in n and "language_model" in n for n in two)
    for names in (one, two):
        assert not any("vision_tower" in n for n in names)
    # an aligned vp_proj (and the encoder it was fitted on) held in stage 1; the rest of the set trains
    held = set(set_trainable(model, "stage1", aligned=True))
    assert held == {n for n in one if not n.startswith(("vp_encoder.", "vp_proj."))}
    assert set(set_trainable(model, "stage2", aligned=True)) == two
    with pytest.raises(ValueError, match="stage must be one of"):
        set_trainable(model, "stage3")


def test_the_prompt_encoder_starts_from_sams_prompt_encoder(tmp_path):
    from groundlab.shared.bases.sam import TinySamConfig, build_tiny_sam, save_sam_checkpoint

    sam = build_tiny_sam(TinySamConfig(prompt_dim=16))
    path = save_sam_checkpoint(sam, tmp_path / "sam.pth")
    enc = VisualPromptEncoder(VisualPromptEncoderConfig(embed_dim=16))
    loaded = load_sam_prompt_encoder(enc, path)
    assert len(loaded) == 5
    pe = sam.prompt_encoder
    torch.testing.assert_close(enc.pe_layer.positional_encoding_gaussian_matrix,
                               pe.pe_layer.positional_encoding_gaussian_matrix)
    for mine, theirs in [(enc.point_embeddings[0], 0), (enc.point_embeddings[1], 1), (enc.box_embeddings[2], 2),
                         (enc.box_embeddings[3], 3)]:
        torch.testing.assert_close(mine.weight, pe.point_embeddings[theirs].weight)
    with pytest.raises(FileNotFoundError):
        load_sam_prompt_encoder(enc, tmp_path / "missing.pth")
    torch.save({"image_encoder.x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(KeyError, match="prompt_encoder.pe_layer"):
        load_sam_prompt_encoder(enc, tmp_path / "other.pth")
    wide = VisualPromptEncoder(VisualPromptEncoderConfig(embed_dim=32))
    with pytest.raises(ValueError, match="prompt_embed_dim"):
        load_sam_prompt_encoder(wide, path)


def test_vp_proj_aligned_to_the_bases_location_tokens():
    """After the alignment a prompt's token is (nearly) the sum of its location tokens' embeddings: the
    language model reads it as the box written in location tokens."""
    model, _ = tiny_vp_model(embed_dim=256)  # SAM's prompt width: 128 random frequencies a corner
    bins, d = 32, model.config.hidden_size
    code = torch.arange(bins)[:, None] / (bins - 1) * torch.linspace(0.5, 4.0, d)[None]
    table = torch.sin(code + torch.arange(d)[None])  # a smooth ordinal code, as the base's location rows
    fit = align_to_locations(model, table, samples=8000)
    assert fit["r2/box"] > 0.8 and fit["r2/point"] > 0.8, fit

    boxes = random_boxes(40, torch.Generator().manual_seed(5))
    slots = torch.zeros(40, 10, 4)
    slots[:, 0] = boxes
    valid = torch.zeros(40, 10, dtype=torch.bool)
    valid[:, 0] = True
    with torch.no_grad():
        tokens = model.prompt_tokens(slots, valid, torch.ones(40, dtype=torch.bool))[:, 1]
    targets = table[(boxes * (bins - 1)).round().long()].sum(1)
    rel = (tokens - targets).norm(dim=-1) / targets.norm(dim=-1)
    assert float(rel.median()) < 0.35, rel
    nearest = torch.cdist(tokens, targets).argmin(1)  # a token is closest to its own box's target (chance 1/40)
    assert float((nearest == torch.arange(40)).float().mean()) >= 0.4

    points = torch.zeros(40, 10, 4) - 1
    points[:, 0, :2] = boxes[:, :2]
    with torch.no_grad():
        tokens = model.prompt_tokens(points, valid, torch.zeros(40, dtype=torch.bool))[:, 1]
    targets = 2 * table[(boxes[:, :2] * (bins - 1)).round().long()].sum(1)
    assert float((torch.cdist(tokens, targets).argmin(1) == torch.arange(40)).float().mean()) >= 0.4

    with pytest.raises(ValueError, match="wide"):
        align_to_locations(model, table[:, :8])
    with pytest.raises(ValueError, match="two location tokens"):
        align_to_locations(model, table[:1])


def test_sphinx_v_shards_convert_strictly(tmp_path):
    """Two tensor-parallel shards in the release's layout: the replicated prompt side comes out under
    this package's names and loads into a multi-view model; a shard that disagrees or lacks a key is
    an error."""
    from groundlab.vp_mllm.convert import SHARDS, convert_sphinx_v, load_converted

    model, _ = tiny_vp_model(views="multi")
    source, _ = tiny_vp_model(views="multi")
    for p in source.parameters():
        torch.nn.init.normal_(p.data)
    wanted = [k for k in source.state_dict() if k.startswith(("vp_encoder.", "vp_proj.")) or k in
              ("start_vp", "end_vp", "start_img", "end_img")]
    shared = {f"llma.{k}": source.state_dict()[k] for k in wanted}
    for rank, name in enumerate(SHARDS):  # the LLaMA blocks split, everything else replicated
        torch.save({"model": {**shared, "llma.layers.0.attention.wq.weight": torch.randn(4, 8) + rank}},
                   tmp_path / name)
    state = convert_sphinx_v(tmp_path)
    assert sorted(state) == sorted(wanted)
    load_converted(model, state)
    for k in wanted:
        torch.testing.assert_close(model.state_dict()[k], source.state_dict()[k])
    torch.save({"model": {**shared, "llma.start_vp": shared["llma.start_vp"] + 1}}, tmp_path / SHARDS[1])
    with pytest.raises(ValueError, match="llma.start_vp: the two shards differ"):
        convert_sphinx_v(tmp_path)
    torch.save({"model": {k: v for k, v in shared.items() if k != "llma.vp_encoder.up.bias"}}, tmp_path / SHARDS[1])
    with pytest.raises(KeyError, match="no llma.vp_encoder.up.bias"):
        convert_sphinx_v(tmp_path)
    (tmp_path / SHARDS[0]).unlink()
    with pytest.raises(FileNotFoundError, match="consolidated.00-of-02.model.pth"):
        convert_sphinx_v(tmp_path)
    single, _ = tiny_vp_model()
    with pytest.raises(KeyError, match="start_img"):
        load_converted(single, state)


@pytest.mark.parametrize("name,total", [("vp_llava_7b", 7_065_678_336), ("vp_llava_8b", 8_357_016_064),
                                        ("sphinx_v_13b_like", 13_353_323_008)])
def test_release_configs_build_on_meta(name, total):
    with torch.device("meta"):
        model = VPMLLMForConditionalGeneration(RELEASE_CONFIGS[name]())
    n = sum(p.numel() for p in model.parameters())
    assert n == total, n
    vp = sum(p.numel() for m in (model.vp_encoder, model.vp_proj) for p in m.parameters())
    assert vp < 0.01 * n  # the prompt side is a small addition


def test_misspelt_and_mismatched_config_values_are_errors():
    with pytest.raises(TypeError, match="VPMLLMConfig: unknown arguments \\['view'\\]"):
        VPMLLMConfig(view="multi")
    with pytest.raises(ValueError, match="views must be one of"):
        VPMLLMConfig(views="three")
    model, processor = tiny_vp_model()
    from groundlab.vp_mllm.processing import add_tokens

    cfg = VPMLLMConfig(lmm_config=model.config.lmm_config.to_dict(), vp_token_index=model.config.vp_token_index + 1)
    with pytest.raises(ValueError, match="special tokens"):
        add_tokens(processor.tokenizer, cfg)
    assert VP_TOKEN in processor.tokenizer.get_vocab()


def test_packed_and_padded_batches_give_the_same_loss_and_gradients():
    model, processor = tiny_vp_model()
    set_trainable(model, "stage2")
    convs = [[{"from": "human", "value": "What is <Region 1>?"}, {"from": "gpt", "value": "red circle"}],
             [{"from": "human", "value": "Describe <Region 2>."}, {"from": "gpt", "value": "a small blue square, a "
                                                                                          "large one"}]]
    samples = [processor.encode(_image(seed=i), c, VisualPrompts("box", [(1, 1, 9, 9), (20, 20, 40, 50)]))
               for i, c in enumerate(convs)]
    results = []
    for packed in (False, True):
        model.zero_grad()
        batch = VPCollator(processor.tokenizer.pad_token_id, packed=packed)(samples)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4)
