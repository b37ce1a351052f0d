import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from groundlab.omg_llava.configuration import OMGLlavaConfig
from groundlab.omg_llava.inference import OMGLlavaPipeline
from groundlab.omg_llava.modeling import OMGLlavaForCausalLM
from groundlab.omg_llava.omg_seg import OMGSegConfig, OMGSegModel
from groundlab.omg_llava.processing import IMAGE_TOKEN, SPECIAL_TOKENS
from groundlab.shared.loading import load_pretrained
from groundlab.shared.multimodal import expand_token
from groundlab.shared.testing import attention_outside_the_shared_dispatch
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.world import World, WorldConfig

SEG = dict(image_size=64, dims=(16, 32, 64, 32), depths=(1, 1, 1, 1), dim=16, mask_dim=16, encoder_layers=1,
           encoder_heads=2, encoder_points=2, encoder_ffn=32, groups=8, num_queries=6, decoder_layers=2,
           decoder_heads=2, decoder_ffn=32, num_classes=12, classifier="linear")


def tiny(seg=None, **kw):
    tok = load_tokenizer(extra_special_tokens=list(SPECIAL_TOKENS))
    ids = {t: tok.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, *SPECIAL_TOKENS)}
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    cfg = OMGLlavaConfig(seg_config=SEG | (seg or {}), text_config=text, token_ids=ids, seg_points=256, **kw)
    # the 64 px image: stride-32 features 2x2 -> shuffled to a 1x1 grid
    return OMGLlavaForCausalLM(cfg), tok


def sample(tok, model, p, answer):
    prompt = [tok.bos_token_id] + tok(f"{IMAGE_TOKEN}\nPlease segment the red circle in this image.",
                                      add_special_tokens=False)["input_ids"]
    ans = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = expand_token({"input_ids": prompt + ans, "labels": [-100] * len(prompt) + ans},
                       model.config.token_ids[IMAGE_TOKEN], p.num_tokens(model.config.use_object_tokens))
    return ids


def batch(tok, model, answers):
    torch.manual_seed(1)
    perception = model.perceive(torch.randn(len(answers), 3, 64, 64))
    rows = [sample(tok, model, p, a) for p, a in zip(perception, answers)]
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [tok.pad_token_id] * (n - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in rows])
    att = (torch.arange(n)[None] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
    return perception, ids, labels, att


def test_forward_backward_reaches_llm_projector_and_text2vision_not_the_segmenter():
    model, tok = tiny()
    model.check_tokenizer(tok)
    perception, ids, labels, att = batch(tok, model, ["It is [SEG].", "Sure, [SEG] and [SEG]."])
    masks = [torch.zeros(1, 64, 64), torch.zeros(2, 64, 64)]
    masks[0][0, :32] = 1
    out = model(ids, att, labels, perception=perception, seg_masks=masks)
    assert torch.isfinite(out.loss) and out.seg_loss is not None and out.seg_mismatched == 0
    assert [m.shape for m in out.seg_masks] == [(1, 16, 16), (2, 16, 16)]
    out.loss.backward()
    grads = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"llm", "projector", "text2vision"} <= grads and "segmenter" not in grads


def test_the_seg_loss_weighs_bce_and_dice_as_the_config_says():
    """seg_loss = seg_bce_weight * BCE + seg_dice_weight * Dice, each weight read from the config (the
    BCE weight was once dropped, the loss's own default used whatever the config said)."""
    model, tok = tiny()
    perception, ids, labels, att = batch(tok, model, ["It is [SEG].", "Sure, [SEG] and [SEG]."])
    masks = [torch.zeros(1, 64, 64), torch.zeros(2, 64, 64)]
    masks[0][0, :32] = 1
    masks[1][1, :, 40:] = 1

    def seg_loss(bce, dice):
        model.config.seg_bce_weight, model.config.seg_dice_weight = bce, dice
        out = model(ids, att, labels, perception=perception, seg_masks=masks, point_seeds=[0, 1])
        return float(out.seg_loss.detach())

    bce, dice = seg_loss(1.0, 0.0), seg_loss(0.0, 1.0)
    assert bce > 0 and dice > 0
    assert seg_loss(3.0, 0.5) == pytest.approx(3.0 * bce + 0.5 * dice, rel=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(stage):
    """``train.packed``: the LLM runs on one padding-free row; logits, CE, the ``[SEG]`` hidden states
    and the mask loss come back as from the padded batch."""
    from groundlab.omg_llava.train import Stage1, Stage2

    model, tok = tiny()
    perception, ids, labels, att = batch(tok, model, ["It is [SEG].", "Sure, [SEG] and [SEG].", "No."])
    assert len(set(att.sum(1).tolist())) > 1  # padding is really there
    masks = [torch.rand(1, 64, 64).round(), torch.rand(2, 64, 64).round(), torch.zeros(0, 64, 64)]
    wrap = Stage1 if stage == 1 else (lambda m, packed: Stage2(m, r=4, alpha=8, dropout=0.0, packed=packed))
    results = []
    for packed in (False, True):
        torch.manual_seed(4)  # the same LoRA initialisation
        module = wrap(model, packed=packed)
        module.zero_grad()
        torch.manual_seed(5)  # the same sampled points for the mask loss
        loss = module(ids, att, labels, perception, [None] * 3, masks)["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
        if stage == 2:
            model.llm = model.llm.unload()  # the next wrapper puts a fresh (zero-B) LoRA on the plain LLM
    (loss, grads), (loss_p, grads_p) = results
    assert grads and grads.keys() == grads_p.keys()
    torch.testing.assert_close(loss_p, loss, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(grads_p[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attend", [False, True])
def test_batched_seg_decoding_equals_one_image_at_a_time(attend):
    """Images with different [SEG] counts decode in one padded batch; padding stays out of self-attention."""
    model, _ = tiny(seg_queries_attend=attend)
    torch.manual_seed(2)
    perception = model.perceive(torch.randn(3, 3, 64, 64))
    hiddens = [torch.randn(n, 32) for n in (1, 3, 2)]
    with torch.no_grad():
        batched, counts = model.decode_segs(hiddens, perception)
        assert counts == [1, 3, 2] and len(batched) == model.config.seg_config.decoder_layers + 1
        for i, (h, p) in enumerate(zip(hiddens, perception)):
            alone = model.decode_seg(h, p)
            for layer, pred in enumerate(alone):
                assert torch.allclose(batched[layer][i, : counts[i]], pred.mask_logits[0], atol=1e-4)
        # the release's decoding (the default): each [SEG] as if it were the answer's only one
        each = [model.decode_seg(h[k : k + 1], perception[1])[-1].mask_logits[0, 0] for h in hiddens[1:2] for k in range(3)]
        same = all(torch.allclose(batched[-1][1, k], each[k], atol=1e-4) for k in range(3))
        assert same is (not attend)


def test_seg_mask_mismatch_is_counted_and_skipped_not_zeroed():
    model, tok = tiny()
    perception, ids, labels, att = batch(tok, model, ["It is [SEG].", "It is [SEG]."])
    out = model(ids, att, labels, perception=perception, seg_masks=[torch.zeros(0, 64, 64), torch.ones(1, 64, 64)])
    assert out.seg_mismatched == 1 and len(out.seg_masks) == 1 and out.seg_loss > 0


def test_pixel_tokens_from_another_backbone_level():
    model, _ = tiny(feature_stride=16, shuffle=1)  # 64 px: the stride-16 level's 4x4 map, one token a cell
    assert model.config.grid == 4 and model.config.clip_dim == SEG["dims"][2]
    p = model.perceive(torch.randn(1, 3, 64, 64))[0]
    assert p.pixels.shape == (16, SEG["dims"][2]) and p.prior.shape == (16, 2 * SEG["dim"])
    with pytest.raises(ValueError, match=r"feature_stride must be one of \(4, 8, 16, 32\)"):
        tiny(feature_stride=64)


def test_object_tokens_and_prior_ablations_change_the_visual_tokens():
    model, tok = tiny()
    p = model.perceive(torch.randn(1, 3, 64, 64))[0]
    assert p.objects.shape[0] >= 1 and p.pixels.shape == (1, 32 * 4) and p.prior.shape == (1, 32)
    assert model.visual_embeds([p])[0].shape[0] == 1 + 1 + p.objects.shape[0]
    no_obj, _ = tiny(use_object_tokens=False)
    assert no_obj.visual_embeds(no_obj.perceive(torch.randn(1, 3, 64, 64)))[0].shape[0] == 2
    no_prior, _ = tiny(use_prior=False)
    no_prior.load_state_dict(model.state_dict())
    q = no_prior.perceive(torch.randn(1, 3, 64, 64))[0]
    assert q.prior.abs().sum() > 0  # the perception is the same for every arm: one cache serves them all
    zeroed = model.projector(q.pixels, torch.zeros_like(q.prior), q.objects)
    assert torch.equal(no_prior.visual_embeds([q])[0], zeroed)
    assert not torch.allclose(model.visual_embeds([q])[0], zeroed)


def test_token_checks_and_count_errors():
    model, tok = tiny()
    perception, ids, labels, att = batch(tok, model, ["It is [SEG]."])
    bad = ids.clone()
    bad[0, 1] = tok.pad_token_id  # one image token fewer than visual tokens
    with pytest.raises(ValueError, match="<image> tokens"):
        model(bad, att, labels, perception=perception)
    small, _ = tiny()
    small.llm.resize_token_embeddings(len(tok) - 2)  # <region> / <mark> would have no embedding row
    with pytest.raises(ValueError, match="embedding rows"):
        small.check_tokenizer(tok)


def test_reconstruction_loss_of_stage_one():
    model, _ = tiny()
    p = model.perceive(torch.randn(2, 3, 64, 64))
    loss = model.reconstruction_loss(p)
    loss.backward()
    assert loss > 0 and model.text2vision[0].weight.grad is not None and model.projector.query_proj.weight.grad is not None


@pytest.mark.parametrize("llm,total,llm_params", [
    ("internlm2_7b", 8_046_511_233, 7_737_757_696),
    ("phi3_mini", 4_101_553_281, 3_821_116_416),
    ("qwen2_7b", 7_909_730_433, 7_615_659_520),
])
def test_release_configs_build_on_meta(llm, total, llm_params):
    from groundlab.omg_llava.configuration import release

    with torch.device("meta"):
        model = OMGLlavaForCausalLM(release(llm))
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.llm.parameters()) == llm_params
    assert model.projector.pixel_mlp[0].in_features == 6144 + 512
    assert model.projector.query_proj.weight.shape == (6144, 512) and model.config.grid == 16


def test_visual_prompts_fill_their_placeholders_and_counts_must_match():
    model, tok = tiny()
    p = model.perceive(torch.randn(1, 3, 64, 64))
    text = f"{IMAGE_TOKEN}\nPlease give me a short description of region1 <region>. And Mark 1 <mark>?"
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([expand_token({"input_ids": ids}, model.config.token_ids[IMAGE_TOKEN],
                                     p[0].num_tokens())["input_ids"]])
    region = torch.zeros(1, 64, 64, dtype=torch.bool)
    region[0, 10:30, 20:40] = True
    point = torch.tensor([[12.0, 40.0]])
    embeds = model.embed(ids, p, [{"<region>": region, "<mark>": point}])
    r_pos = (ids[0] == model.config.token_ids["<region>"]).nonzero().item()
    m_pos = (ids[0] == model.config.token_ids["<mark>"]).nonzero().item()
    expected_r = model.projector.objects(model.prompt_queries(p[0], "mask", region))
    expected_m = model.projector.objects(model.prompt_queries(p[0], "point", point))
    assert torch.allclose(embeds[0, r_pos], expected_r[0]) and torch.allclose(embeds[0, m_pos], expected_m[0])
    assert not torch.allclose(expected_r, expected_m)
    # text tokens keep their own rows
    plain = model.llm.get_input_embeddings()(ids[0, :1])
    assert torch.equal(embeds[0, :1], plain)
    with pytest.raises(ValueError, match="1 <mark> tokens but 0 point prompts"):
        model.embed(ids, p, [{"<region>": region}])
    with pytest.raises(ValueError, match="1 <region> tokens but 2 mask prompts"):
        model.embed(ids, p, [{"<region>": region.repeat(2, 1, 1), "<mark>": point}])


@pytest.mark.parametrize("prompt_features", [False, True])
def test_prompts_of_several_images_batched_equal_one_image_at_a_time(prompt_features):
    model, _ = tiny(seg={"prompt_features": prompt_features})
    model.eval()
    torch.manual_seed(1)
    p = model.perceive(torch.randn(3, 3, 64, 64))
    regions = [torch.zeros(n, 64, 64, dtype=torch.bool) for n in (1, 3, 2)]
    for i, r in enumerate(regions):
        for j in range(len(r)):
            r[j, 5 + 10 * j : 20 + 10 * j, 8 * i : 8 * i + 20] = True
    points = [torch.tensor([[12.0, 40.0], [50.0, 9.0]]), torch.tensor([[30.0, 30.0]]), torch.tensor([[1.0, 60.0]])]
    for kind, prompts in (("mask", regions), ("point", points)):
        batched = model.batch_prompt_queries(p, kind, prompts)
        alone = [model.prompt_queries(pi, kind, x) for pi, x in zip(p, prompts)]
        assert [b.shape for b in batched] == [a.shape for a in alone]
        for b, a in zip(batched, alone):
            assert torch.allclose(b, a, atol=1e-5)
        # the prompts of one image attend to each other: its first query changes with the second prompt
        if len(prompts[0]) > 1:
            assert not torch.allclose(alone[0][0], model.prompt_queries(p[0], kind, prompts[0][:1])[0], atol=1e-4)


def test_generation_returns_answer_ids_and_one_mask_per_seg_token():
    model, tok = tiny()
    seg_id = model.config.token_ids["[SEG]"]
    # make the LM answer [SEG] at every step
    model.llm.lm_head.register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor([seg_id]), 100.0))
    perception, ids, _, att = batch(tok, model, ["It is [SEG]."])
    out = model.generate_with_masks(ids, att, perception, max_new_tokens=3, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
    (answer, masks), = out
    assert answer == [seg_id] * 3 and masks.shape == (3, 16, 16)
    # the masks are the decoder's last prediction for the [SEG] hidden states of one pass over prompt + answer
    full = torch.cat([ids, torch.tensor([answer])], 1)
    hidden = model.llm(inputs_embeds=model.embed(full, perception), attention_mask=torch.ones_like(full),
                       output_hidden_states=True).hidden_states[-1][0, ids.shape[1]:]
    assert torch.allclose(masks, model.decode_seg(hidden, perception[0])[-1].mask_logits[0], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# a saved model reloads to the same outputs; a damaged save is refused


def _scene_image():
    return World(WorldConfig(), seed=0).scene("val", 0).image


def test_segmenter_reloads_to_the_same_features_and_masks(tmp_path):
    torch.manual_seed(0)
    seg = OMGSegModel(OMGSegConfig(**SEG)).eval()
    seg.save_pretrained(tmp_path)
    back = load_pretrained(OMGSegModel, tmp_path).eval()
    image = _scene_image()
    x, y = seg.preprocess([image]), back.preprocess([image])
    # the normalisation comes from the config, not from buffers left uninitialised by from_pretrained
    torch.testing.assert_close(x, y)
    assert float(x.abs().max()) < 5
    with torch.no_grad():
        a, b = seg(x)[-1], back(y)[-1]
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    torch.testing.assert_close(a.class_logits, b.class_logits)


def test_omg_llava_pipeline_reloads_to_the_same_answer_and_masks(tmp_path):
    model, tok = tiny()
    model.eval()
    image = _scene_image()
    before = OMGLlavaPipeline(model, tok)(image, "Please segment the red circle in this image.", max_new_tokens=6)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    pipe = OMGLlavaPipeline.from_pretrained(tmp_path)
    assert attention_outside_the_shared_dispatch(model) == attention_outside_the_shared_dispatch(pipe.model) == []
    p = pipe.model.perceive(pipe.model.segmenter.preprocess([image]))[0]
    assert torch.isfinite(p.pixels).all() and torch.isfinite(p.mask_features).all()
    after = pipe(image, "Please segment the red circle in this image.", max_new_tokens=6)
    assert after.text == before.text
    np.testing.assert_array_equal(after.masks, before.masks)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(pipe.model.state_dict()[name], value, msg=name)


def _damage(path, drop=None, add=None):
    state = load_file(path / "model.safetensors")
    meta = {"format": "pt"}
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    save_file(state, path / "model.safetensors", metadata=meta)


@pytest.mark.parametrize("damage", ["drop", "add", "truncate"])
def test_a_damaged_save_is_refused_naming_the_directory_and_keys(tmp_path, damage):
    torch.manual_seed(0)
    seg = OMGSegModel(OMGSegConfig(**SEG))
    seg.save_pretrained(tmp_path)
    key = sorted(seg.state_dict())[0]
    if damage == "drop":
        _damage(tmp_path, drop=key)
        match = f"missing {key}"
    elif damage == "add":
        _damage(tmp_path, add="decoder.not_a_weight")
        match = "unexpected decoder.not_a_weight"
    else:
        data = (tmp_path / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
        match = "cannot load"
    with pytest.raises(ValueError, match=match) as err:
        load_pretrained(OMGSegModel, tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_pretrained(OMGSegModel, tmp_path / "nowhere")


def test_predictions_do_not_depend_on_the_batch_size(tmp_path):
    """Greedy answers and [SEG] masks of RES, region and point samples, one at a time and eight at a
    time (left padding, KV cache): the same answers, the same masks."""
    from groundlab.omg_llava.data import export_world, load_world_export
    from groundlab.omg_llava.dataset import OMGDataset, PerceptionCache, image_paths
    from groundlab.omg_llava.evaluation import predict, read_predictions
    from groundlab.omg_llava.processing import TEMPLATES

    model, tok = tiny()
    seg_id = model.config.token_ids["[SEG]"]
    # answer [SEG] early so every sample has masks to compare, but not at every step
    model.llm.lm_head.register_forward_hook(lambda m, i, o: o.index_add(
        -1, torch.tensor([seg_id]), o.std(-1, keepdim=True) * 2.5))
    export_world(World(WorldConfig(), seed=0), tmp_path, 4, 4)
    samples = load_world_export(tmp_path, "val", ("res", "region", "point"))[:11]
    ds = OMGDataset(samples, tok, TEMPLATES["vicuna"], model, PerceptionCache(model, image_paths(samples)))
    assert len({len(ds.prompt(i)["input_ids"]) for i in range(len(ds))}) > 1  # the batches are really padded
    one = read_predictions(predict(model, ds, tok, tmp_path / "bs1.jsonl", batch_size=1, max_new_tokens=6), samples)
    eight = read_predictions(predict(model, ds, tok, tmp_path / "bs8.jsonl", batch_size=8, max_new_tokens=6), samples)
    assert sum(len(r["masks"]) for r in one) >= 8 and len({r["answer"] for r in one}) > 1
    for a, b in zip(one, eight):
        assert a["answer"] == b["answer"] and len(a["masks"]) == len(b["masks"])
        for ma, mb in zip(a["masks"], b["masks"]):
            assert (ma != mb).mean() < 0.01


@pytest.mark.slow
def test_evaluation_under_two_processes_predicts_what_one_process_does(tmp_path):
    """torchrun with 2 processes: each predicts its share, the first writes the file one process writes."""
    from pathlib import Path

    from groundlab.omg_llava.data import export_world, load_world_export
    from groundlab.omg_llava.evaluation import read_predictions
    from groundlab.shared.testing import outputs_one_and_two_processes

    export_world(World(WorldConfig(), seed=0), tmp_path / "data", 2, 4)
    samples = load_world_export(tmp_path / "data", "val", ("res", "region", "point"))[:7]
    dirs = outputs_one_and_two_processes(Path(__file__).with_name("eval_worker.py"), ["--data", str(tmp_path / "data")],
                                         tmp_path)
    one, two = (read_predictions(dirs[n] / "predictions.jsonl", samples) for n in (1, 2))
    assert sum(len(r["masks"]) for r in one) >= 4
    for a, b in zip(one, two):
        assert a["answer"] == b["answer"] and len(a["masks"]) == len(b["masks"])
        for ma, mb in zip(a["masks"], b["masks"]):
            assert (ma != mb).mean() < 0.01


@pytest.mark.slow
def test_stage2_training_under_torchrun_zero2_matches_one_process(tmp_path):
    """The multi-GPU path users take: 2 processes (torchrun, gloo) with the shared ZeRO-2 config give the
    single process's per-step losses over the same global batches: the CE over the step's tokens, the
    mask loss a mean over the step's samples, its random points drawn per sample."""
    from pathlib import Path

    from groundlab.omg_llava.data import export_world
    from groundlab.shared.testing import losses_one_and_two_processes

    export_world(World(WorldConfig(), seed=0), tmp_path / "data", 8, 2)
    losses = losses_one_and_two_processes(Path(__file__).with_name("zero2_worker.py"),
                                          ["--data", str(tmp_path / "data")], tmp_path)
    assert len(losses[1]) == 4 and losses[1][-1] < losses[1][0]
    torch.testing.assert_close(torch.tensor(losses[2]), torch.tensor(losses[1]), atol=5e-4, rtol=0)


def test_mask_loss_points_follow_each_samples_seed_not_the_batch():
    """With point seeds, a sample's mask loss is the same alone and batched with others."""
    model, tok = tiny()
    perception, ids, labels, att = batch(tok, model, ["It is [SEG].", "Sure, [SEG] and [SEG]."])
    masks = [torch.rand(1, 64, 64).round(), torch.rand(2, 64, 64).round()]
    with torch.no_grad():
        both = model(ids, att, labels, perception=perception, seg_masks=masks, point_seeds=[11, 12])
        alone = []
        for i in range(2):
            n = int(att[i].sum())
            alone.append(model(ids[i : i + 1, :n], att[i : i + 1, :n], labels[i : i + 1, :n], perception=perception[i : i + 1],
                               seg_masks=masks[i : i + 1], point_seeds=[11 + i]).seg_loss)
        torch.testing.assert_close(both.seg_loss, (alone[0] + alone[1]) / 2, atol=1e-5, rtol=1e-5)
        other = model(ids, att, labels, perception=perception, seg_masks=masks, point_seeds=[13, 14])
    assert abs(float(other.seg_loss) - float(both.seg_loss)) > 1e-6  # the seeds do choose the points


def test_the_oracle_query_picks_the_segmenters_best_mask_for_each_target(tmp_path):
    """RES's upper bound through the frozen segmenter: per sample, its best-overlapping query mask."""
    from types import SimpleNamespace

    from PIL import Image

    from groundlab.omg_llava.data import Sample
    from groundlab.omg_llava.evaluation import oracle_query_predictions, read_predictions

    h, w = 48, 64  # a wide image: the segmenter's square frame pads the bottom
    quads = np.zeros((3, h, w), bool)
    quads[0, :24, :32], quads[1, 24:, 32:], quads[2, :, :] = True, True, True

    class Segmenter:  # its three queries' masks are the two quadrants and the whole image
        def preprocess(self, images):
            return torch.zeros(len(images), 3, 64, 64)

        def __call__(self, pixel_values):
            frame = torch.full((3, 64, 64), -10.0)
            frame[:, :h, :w] = torch.from_numpy(quads).float() * 20 - 10
            return [SimpleNamespace(mask_logits=frame[None].expand(len(pixel_values), -1, -1, -1))]

    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "a.png")
    target = np.zeros((h, w), bool)
    target[26:, 30:] = True  # mostly the bottom-right quadrant
    samples = [Sample("s0", tmp_path / "a.png", [], seg_masks=[target], task="res"),
               Sample("s1", tmp_path / "a.png", [], seg_masks=[np.ones((h, w), bool)], task="res")]
    got = read_predictions(oracle_query_predictions(Segmenter(), samples, tmp_path / "oracle.jsonl"), samples)
    np.testing.assert_array_equal(got[0]["masks"][0], quads[1])
    np.testing.assert_array_equal(got[1]["masks"][0], quads[2])


def test_every_tensor_is_made_on_the_inputs_device():
    """What a GPU run needs, checked on the CPU: with tensors made without a device sent to ``meta``
    (``stray_tensors_on_meta``), perception, the training forward and backward with ``[SEG]`` masks and
    region / point prompts of several images, greedy generation with masks, the pipeline, and the
    segmenter's pre-training loss all run."""
    from groundlab.omg_llava.seg_pretrain import PanopticCollator, SegmenterForTraining, WorldPanopticDataset
    from groundlab.shared.testing import stray_tensors_on_meta

    model, tok = tiny()
    world = World(WorldConfig(), seed=0)
    images = torch.randn(2, 3, 64, 64)
    text = f"{IMAGE_TOKEN}\nPlease give me a short description of region1 <region>. And Mark 1 <mark>?"
    regions = [torch.zeros(n, 64, 64, dtype=torch.bool) for n in (1, 2)]
    for r in regions:
        r[:, 10:30, 20:40] = True
    points = [torch.tensor([[12.0, 40.0]]), torch.tensor([[30.0, 30.0], [5.0, 50.0]])]
    pipe = OMGLlavaPipeline(model, tok)
    seg_wrapper = SegmenterForTraining(model.segmenter, num_points=64)
    panoptic = PanopticCollator(model.segmenter, seed=0)([WorldPanopticDataset(world, "train", 2)[i] for i in range(2)])
    with stray_tensors_on_meta():
        p = model.perceive(images)
        rows = []
        for n, pi in zip((1, 2), p):
            ids = [tok.bos_token_id] + tok(text + " Also region2 <region> and Mark 2 <mark>?" * (n - 1),
                                           add_special_tokens=False)["input_ids"]
            answer = tok(" It is [SEG] and [SEG].", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append(expand_token({"input_ids": ids + answer, "labels": [-100] * len(ids) + answer},
                                     model.config.token_ids[IMAGE_TOKEN], pi.num_tokens()))
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [tok.pad_token_id] * (width - len(r["input_ids"])) for r in rows],
                           device=images.device)
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows], device=images.device)
        att = (ids != tok.pad_token_id).long()
        n_seg = [int((x == model.config.token_ids["[SEG]"]).sum()) for x in ids]
        masks = [torch.ones(n, 64, 64, device=images.device) for n in n_seg]
        prompts = [{"<region>": r, "<mark>": q} for r, q in zip(regions, points)]
        out = model(ids, att, labels, perception=p, seg_masks=masks, prompts=prompts)
        out.loss.backward()
        (answer, seg), = model.generate_with_masks(ids[:1, :8], att[:1, :8], p[:1], max_new_tokens=3,
                                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        result = pipe(_scene_image(), "Please segment the red circle in this image.", max_new_tokens=4)
        seg_loss = seg_wrapper(**panoptic)["loss"]
    assert torch.isfinite(out.loss) and out.loss.device.type == "cpu" and n_seg == [2, 2]
    assert seg.device.type == "cpu" and len(answer) <= 3 and isinstance(result.text, str)
    assert torch.isfinite(seg_loss) and seg_loss.device.type == "cpu"


def test_a_few_steps_lower_the_loss():
    """Training what stage 2 trains (everything but the frozen segmenter) on one batch lowers the loss.
    (The ``[SEG]`` masks are not checked here: through this random segmenter even a free query
    optimised for a mask barely moves the mask loss; the run test's segmenter is trained.)"""
    model, tok = tiny()
    perception, ids, labels, att = batch(tok, model, ["It is [SEG].", "Sure, [SEG] and [SEG]."])
    masks = [torch.zeros(1, 64, 64), torch.zeros(2, 64, 64)]
    masks[0][0, :32] = 1
    masks[1][0, :, :24] = 1
    masks[1][1, 40:, 40:] = 1
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and not any(p.requires_grad for p in model.segmenter.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses, ces = [], []
    for _ in range(40):
        out = model(ids, att, labels, perception=perception, seg_masks=masks)
        losses.append(out.loss.item())
        ces.append(out.ce_loss.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < 0.6 * losses[0] and ces[-1] < 0.25 * ces[0], (losses, ces)
