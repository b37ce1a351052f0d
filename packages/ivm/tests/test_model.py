import pytest
import torch

from groundlab.ivm.checkpoint import convert_official, load_official, map_key, to_official, trained_keys
from groundlab.ivm.configuration import IVMConfig, ivm_release
from groundlab.ivm.modeling import (
    DiscriminatorForTraining,
    IVMModel,
    dwsl_weights,
    label_weights,
    last_token_index,
    sigmoid_bce,
    soft_dice,
)
from groundlab.ivm.processing import POLICY_PROMPT, encode_prompt
from groundlab.ivm.train import GeneratorForTraining, load_llava_into
from groundlab.shared.bases.vlm import TinyVLMConfig, build_model, build_processor
from groundlab.shared.testing import attention_outside_the_shared_dispatch
from groundlab.shared.tokenizer import load_tokenizer

TINY_SAM = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                global_attn_indexes=(1,), out_chans=32)


def tiny_ivm(seed=0):
    tok = load_tokenizer()
    vcfg = TinyVLMConfig(kind="llava")
    torch.manual_seed(seed)
    llava = build_model(vcfg, tok)
    cfg = IVMConfig(vision_config=TINY_SAM, lmm_config=llava.config.to_dict(), condition_hidden=64, decoder_mlp=64,
                    decoder_heads=2, discriminator_hidden=32)
    model = IVMModel(cfg)
    load_llava_into(model, llava)
    return model, build_processor(vcfg, tok), vcfg


def batch_for(model, processor, vcfg, instructions, padding="left", images=None):
    tok = processor.tokenizer
    ids = [encode_prompt(tok, POLICY_PROMPT.format(instruction=x), vcfg.n_image_tokens) for x in instructions]
    n = max(map(len, ids))
    pad = tok.pad_token_id
    if padding == "left":
        input_ids = torch.tensor([[pad] * (n - len(x)) + x for x in ids])
        att = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids])
    else:
        input_ids = torch.tensor([x + [pad] * (n - len(x)) for x in ids])
        att = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
    if images is None:
        g = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (len(ids), 3, 64, 64), dtype=torch.uint8, generator=g)
    pixels = processor.image_processor([im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt")["pixel_values"]
    return dict(input_ids=input_ids, attention_mask=att, pixel_values=pixels, images=images)


def test_release_config_builds_on_meta_with_the_papers_lora_count():
    with torch.device("meta"):
        model = IVMModel(ivm_release())
    gen_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n and ".generator." in n)
    assert gen_lora == 4_194_304  # r=8 on q/v of 32 Vicuna-7B layers
    disc_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n and ".discriminator." in n)
    assert disc_lora == 4_194_304
    assert not any(".lora_" in n for n, _ in model.named_parameters() if "vision_tower" in n)
    enc = model.image_encoder
    assert (enc.img_size, len(enc.blocks), enc.blocks[0].attn.num_heads) == (1024, 32, 16)
    assert model.condition_proj.fc1.weight.shape == (2048, 4096) and model.condition_proj.fc2.weight.shape == (256, 2048)
    assert model.discriminator_head.fc1.weight.shape == (1024, 4096)
    assert model.generator.output_hypernetwork.layers[-1].weight.shape == (32, 256)


def test_set_trainable_roles_and_gradients():
    model, processor, vcfg = tiny_ivm()
    model.set_trainable("generator")
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train and all(n.startswith(("condition_proj.", "generator.")) or ".generator.weight" in n for n in train)
    assert not any(n.startswith("image_encoder.") for n in train)
    b = batch_for(model, processor, vcfg, ["find the red circle.", "what colour is the large square?"])
    masks = torch.zeros(2, 64, 64)
    masks[:, 10:30, 10:30] = 1
    out = model(**b, masks=masks)
    assert out.logits.shape == (2, 64, 64) and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".lora_B.generator." in n for n in grads) and any(n.startswith("generator.") for n in grads)
    assert not any("discriminator" in n for n in grads)

    model.zero_grad()
    model.set_trainable("discriminator")
    logits = model.discriminate(b["input_ids"], b["attention_mask"], b["pixel_values"])
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0])).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".discriminator." in n or n.startswith("discriminator_head.") for n in grads)
    assert any(".lora_B.discriminator." not in n for n in grads)  # the head trains too
    # the generator adapter is active again, and the trainable set was not touched by switching
    assert all(layer.active_adapters == ["generator"] for layer in model.lora_layers())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A.generator." in n)


def test_condition_token_is_found_by_attention_mask_not_by_index():
    model, processor, vcfg = tiny_ivm()
    for layer in model.lora_layers():  # a non-zero LoRA, so the adapter matters
        for name in ("generator", "discriminator"):
            torch.nn.init.normal_(layer.lora_B[name].weight, std=0.5)
    model.eval()
    ins = ["find the red circle.", "what colour is the small blue square on the left?"]
    left = batch_for(model, processor, vcfg, ins, "left")
    right = batch_for(model, processor, vcfg, ins, "right")
    alone = [batch_for(model, processor, vcfg, [x], images=left["images"][i : i + 1]) for i, x in enumerate(ins)]
    with torch.no_grad():
        c_left = model.condition(left["input_ids"], left["attention_mask"], left["pixel_values"])
        c_right = model.condition(right["input_ids"], right["attention_mask"], right["pixel_values"])
        c_alone = torch.cat([model.condition(a["input_ids"], a["attention_mask"], a["pixel_values"]) for a in alone])
        d_gen = model.condition(alone[0]["input_ids"], alone[0]["attention_mask"], alone[0]["pixel_values"])
    assert torch.allclose(c_left, c_alone, atol=1e-4) and torch.allclose(c_right, c_alone, atol=1e-4)
    # the discriminator adapter really is another function of the input
    model.use_adapter("discriminator")
    with torch.no_grad():
        h_disc = model._lmm_hidden(alone[0]["input_ids"], alone[0]["attention_mask"], alone[0]["pixel_values"])
    model.use_adapter("generator")
    with torch.no_grad():
        h_gen = model._lmm_hidden(alone[0]["input_ids"], alone[0]["attention_mask"], alone[0]["pixel_values"])
    assert not torch.allclose(h_disc, h_gen, atol=1e-3)
    assert torch.allclose(model.condition_proj(h_gen[:, -2]).unsqueeze(1), d_gen, atol=1e-5)
    assert last_token_index(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])).tolist() == [3, 2]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[0, 0]]))


def test_losses_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 8, generator=g)
    target = torch.rand(3, 8, 8, generator=g)  # soft targets
    p = torch.sigmoid(logits)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean(dim=(1, 2))
    assert torch.allclose(sigmoid_bce(logits, target), bce, atol=1e-5)
    inter = (p * target).sum(dim=(1, 2)) / 1000
    dice = 1 - (2 * inter + 1e-6) / (p.sum(dim=(1, 2)) / 1000 + target.sum(dim=(1, 2)) / 1000 + 1e-6)
    assert torch.allclose(soft_dice(logits, target), dice, atol=1e-6)
    assert soft_dice(torch.full((1, 4, 4), 30.0), torch.ones(1, 4, 4)).item() < 1e-4  # perfect -> 0
    assert dwsl_weights(torch.tensor([-10.0, 0.0, 10.0])).tolist() == pytest.approx([0.1, 0.5, 0.9])
    assert label_weights(torch.tensor([1.0, 0.0])).tolist() == pytest.approx([1.0, 0.2])


def test_weights_scale_each_samples_loss():
    model, processor, vcfg = tiny_ivm()
    model.eval()
    b = batch_for(model, processor, vcfg, ["find the red circle.", "find the blue square."])
    masks = torch.rand(2, 64, 64)
    with torch.no_grad():
        plain = model(**b, masks=masks)
        weighted = model(**b, masks=masks, weights=torch.tensor([0.1, 0.9]))
    per = plain.bce + plain.dice
    assert torch.isclose(plain.loss, per.mean(), atol=1e-6)
    assert torch.isclose(weighted.loss, (torch.tensor([0.1, 0.9]) * per).mean(), atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        model(**b, masks=torch.rand(2, 32, 32))


def _loss_and_grads(module, batch):
    module.zero_grad()
    loss = module(**batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("role", ["generator", "discriminator"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(role):
    """``train.packed``: the LMM runs on one padding-free row; the generator's condition token and the
    discriminator's last token are read back at their places."""
    model, processor, vcfg = tiny_ivm()
    _randomise(model, 3)
    for m in model.modules():  # LoRA dropout would draw other masks for the other layout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    b = batch_for(model, processor, vcfg, ["the red circle", "what colour is the big square?", "the star"])
    assert len(set(b["attention_mask"].sum(1).tolist())) > 1  # padding is really there
    if role == "generator":
        b |= {"masks": torch.rand(3, 64, 64), "is_human": torch.tensor([1, 0, 1]), "index": torch.tensor([0, 1, 2])}
        padded, packed = GeneratorForTraining(model, "label"), GeneratorForTraining(model, "label", packed=True)
    else:
        b = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")} | {"is_human": torch.tensor([1, 0, 1])}
        padded, packed = DiscriminatorForTraining(model), DiscriminatorForTraining(model, packed=True)
    loss, grads = _loss_and_grads(padded, b)
    loss_p, grads_p = _loss_and_grads(packed, b)
    assert any(".lora_" in n for n in grads) and grads.keys() == grads_p.keys()
    torch.testing.assert_close(loss_p, loss, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(grads_p[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_official_checkpoint_layout_loads_strictly():
    model, _, _ = tiny_ivm(seed=0)
    donor, _, _ = tiny_ivm(seed=1)
    for p in donor.parameters():  # make every trained tensor distinguishable
        torch.nn.init.normal_(p, std=0.1) if p.ndim else None
    official = to_official(donor)
    # the release's names: peft-wrapped old llava-hf keys, timm Mlp, SAM-decoder names
    assert "prompt_encoder.model.base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in official
    assert "prompt_encoder.text_proj.fc1.weight" in official and "mask_decoder.mask_tokens.weight" in official
    assert "mask_decoder.output_hypernetworks_mlps.layers.2.weight" in official
    assert "mask_decoder.pe_layer.positional_encoding_gaussian_matrix" in official
    assert len(official) == len(trained_keys(model))
    load_official(model, official)
    mine, theirs = model.state_dict(), donor.state_dict()
    for k in trained_keys(model):
        assert torch.equal(mine[k], theirs[k]), k
    # a frozen LLaVA base weight in the checkpoint is mapped too
    extra = dict(official)
    extra["prompt_encoder.model.base_model.model.language_model.model.layers.0.self_attn.q_proj.base_layer.weight"] = \
        theirs["lmm.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert map_key(next(iter(extra))) is not None
    load_official(model, extra)
    # strictness: an unknown key, a missing trained key, a wrong shape
    with pytest.raises(ValueError, match="unmapped"):
        convert_official({**official, "prompt_encoder.mystery.weight": torch.zeros(1)}, model)
    partial = {k: v for k, v in official.items() if "lora_B" not in k}
    with pytest.raises(ValueError, match="trained parameters missing"):
        convert_official(partial, model)
    bad = dict(official)
    bad["mask_decoder.mask_tokens.weight"] = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="shape"):
        convert_official(bad, model)


def test_sam_encoder_loads_from_an_official_sam_checkpoint(tmp_path):
    from groundlab.shared.bases.sam import TinySamConfig, build_tiny_sam, save_sam_checkpoint

    sam_cfg = TinySamConfig(image_size=64, patch_size=8, encoder_dim=32, encoder_depth=2, encoder_heads=2,
                            window_size=4, global_attn_indexes=(1,), prompt_dim=32)
    sam = build_tiny_sam(sam_cfg)
    path = save_sam_checkpoint(sam, tmp_path / "sam.pth")
    model, _, _ = tiny_ivm()
    load_official(model, to_official(model), sam_checkpoint=path)
    for k, v in sam.image_encoder.state_dict().items():
        assert torch.equal(model.image_encoder.state_dict()[k], v)


def test_partial_loads_are_checked():
    from groundlab.ivm.checkpoint import load_part

    model, _, _ = tiny_ivm()
    disc = trained_keys(model, "discriminator")
    assert disc and all(".discriminator." in k or k.startswith("discriminator_head.") for k in disc)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if k in disc}
    load_part(model, state, disc, "disc")
    assert all(model.state_dict()[k].abs().sum() == 0 for k in disc)
    with pytest.raises(ValueError, match="missing"):
        load_part(model, {k: v for k, v in state.items() if "lora_B" not in k}, disc, "disc")
    with pytest.raises(ValueError, match="unexpected"):
        load_part(model, {**state, "discriminator_head.fc3.weight": torch.zeros(1)}, disc, "disc")


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # LoRA B starts at zero: give every weight a value of its own
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_saved_model_reloads_to_the_same_heatmaps_both_ways(tmp_path):
    """save_pretrained -> from_pretrained, and the release's .pth layout -> load_official, give the same
    heatmap logits (the SAM normalisation included: it used to come back as uninitialised memory)."""
    from groundlab.shared.loading import load_pretrained

    model, processor, vcfg = tiny_ivm(seed=0)
    _randomise(model, 3)
    model.eval()
    b = batch_for(model, processor, vcfg, ["the red circle", "what colour is the square?"])
    with torch.no_grad():
        before = model(**b).logits
    model.save_pretrained(tmp_path / "hf")
    back = load_pretrained(IVMModel, tmp_path / "hf").eval()
    assert attention_outside_the_shared_dispatch(model) == attention_outside_the_shared_dispatch(back) == []
    with torch.no_grad():
        torch.testing.assert_close(back.preprocess(b["images"]), model.preprocess(b["images"]))
        torch.testing.assert_close(back(**b).logits, before)
    torch.save(to_official(model), tmp_path / "ivm.pth")
    fresh, _, _ = tiny_ivm(seed=0)  # the same bases, the trained part from the release layout
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if name not in trained_keys(fresh):
                p.copy_(model.state_dict()[name])
    load_official(fresh, tmp_path / "ivm.pth")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**b).logits, before)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_official(fresh, tmp_path / "bad.pth")


def test_heatmaps_do_not_depend_on_the_batch_size():
    """The same heatmaps computed one instruction at a time and eight at a time (left padding)."""
    from groundlab.ivm.evaluation import grounding_samples
    from groundlab.ivm.masking import heatmaps
    from groundlab.shared.world import World, WorldConfig

    model, processor, _ = tiny_ivm(seed=0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a condition MLP that carries the instruction well into the heatmap
        for p in model.condition_proj.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    samples = grounding_samples(World(WorldConfig(), seed=0).scenes("val", 6))[:11]
    assert len({len(s.instruction) for s in samples}) > 1  # the batches are really padded
    images, instructions = [s.image for s in samples], [s.instruction for s in samples]
    one = heatmaps(model, processor, images, instructions, batch_size=1)
    eight = heatmaps(model, processor, images, instructions, batch_size=8)
    for a, b in zip(one, eight):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the comparison can fail: another instruction for the same image changes its heatmap
    swapped = heatmaps(model, processor, images, instructions[1:] + instructions[:1], batch_size=8)
    assert min(float((a - b).abs().max()) for a, b in zip(one, swapped)) > 1e-4


@pytest.mark.slow
def test_generator_training_under_torchrun_zero2_matches_one_process(tmp_path):
    """The multi-GPU path users take: 2 processes (torchrun, gloo) with the shared ZeRO-2 config give
    the single process's per-step losses over the same global batches."""
    from pathlib import Path

    from groundlab.ivm.data import export_world
    from groundlab.shared.testing import losses_one_and_two_processes
    from groundlab.shared.world import World, WorldConfig

    export_world(World(WorldConfig(), seed=0), tmp_path / "data", 8, 0, 0.5, seed=0)
    losses = losses_one_and_two_processes(Path(__file__).with_name("zero2_worker.py"),
                                          ["--data", str(tmp_path / "data")], tmp_path)
    assert len(losses[1]) == 4 and losses[1][-1] < losses[1][0]
    torch.testing.assert_close(torch.tensor(losses[2]), torch.tensor(losses[1]), atol=5e-4, rtol=0)


@pytest.mark.slow
def test_evaluation_under_two_processes_predicts_what_one_process_does(tmp_path):
    """torchrun with 2 processes: each predicts its share, the first writes the file one process writes."""
    from pathlib import Path

    from groundlab.ivm.evaluation import grounding_samples, read_heatmaps
    from groundlab.shared.testing import outputs_one_and_two_processes
    from groundlab.shared.world import World, WorldConfig

    samples = grounding_samples(World(WorldConfig(), seed=0).scenes("val", 4))
    assert len(samples) > 4  # more samples than processes, unevenly shared
    dirs = outputs_one_and_two_processes(Path(__file__).with_name("eval_worker.py"), [], tmp_path)
    one, two = (read_heatmaps(dirs[n] / "predictions.jsonl", samples) for n in (1, 2))
    # the comparison can fail: the heatmaps differ from one instruction to the next
    assert min(float(abs(a - b).max()) for a, b in zip(one, one[1:])) > 1e-4
    for a, b in zip(one, two):
        torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), atol=1e-6, rtol=1e-5)
    assert (dirs[1] / "predictions.jsonl").read_text() == (dirs[2] / "predictions.jsonl").read_text()
