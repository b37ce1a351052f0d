import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from groundlab.shared.bases import ensure_base, smoke_spec
from groundlab.shared.bases.vlm import TinyVLMConfig, build_model, build_processor
from groundlab.shared.lora import lora_parameter_count, trainable_report
from groundlab.shared.testing import attention_outside_the_shared_dispatch
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.world import World, WorldConfig
from groundlab.tldr.configuration import TldrConfig, llama32_11b_vision, paligemma_3b_448
from groundlab.tldr.data import export_world, make_record, read_jsonl
from groundlab.tldr.downstream import highlight_html, restore_generator, self_correction_prompt
from groundlab.tldr.modeling import TldrRewardModel, with_lora
from groundlab.tldr.perturb import TAXONOMIES
from groundlab.tldr.processing import Layout, encode_record
from groundlab.tldr.train import RunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _tiny(head="token"):
    tok = load_tokenizer()
    cfg = TinyVLMConfig(kind="paligemma", text_kv_heads=1)
    vlm = build_model(cfg, tok)
    model = TldrRewardModel(TldrConfig(backbone_config=vlm.config.to_dict(), head=head, lora_r=4, lora_alpha=1))
    return model, build_processor(cfg, tok), cfg


def test_configs_parse_and_reject_unknown_keys(tmp_path):
    tiny = RunConfig.from_yaml(CONFIGS / "tiny.yaml")
    assert tiny.train.lr == 4e-3 and tiny.train.max_steps == 3000 and tiny.model.config["lora_alpha"] / tiny.model.config["lora_r"] == 0.25
    assert (tiny.model.config["lora_r"], tiny.model.config["lora_dropout"]) == (32, 0.0)
    assert tiny.data.tasks == ("description", "caption", "vqa")
    paper = RunConfig.from_yaml(CONFIGS / "paligemma_3b.yaml")
    release = TldrConfig(**paper.model.config)  # the paper's LoRA, TldrConfig's defaults
    assert (release.lora_r, release.lora_alpha, release.lora_dropout, paper.train.grad_accum) == (512, 128, 0.1, 8)
    with pytest.raises(ValueError, match=r"unknown TldrConfig arguments \['lora_rank'\]"):
        RunConfig.from_yaml(CONFIGS / "tiny.yaml", {"model.config.lora_rank": 8})
    with pytest.raises(ValueError, match="LoRA on neither"):
        RunConfig.from_yaml(CONFIGS / "tiny.yaml", {"model.config.lora_projector": False,
                                                    "model.config.lora_decoder": False})
    assert paper.train.deepspeed == "zero2"
    over = RunConfig.from_yaml(CONFIGS / "tiny.yaml", {"train.max_steps": 7, "data.train_scenes": 3})
    assert over.train.max_steps == 7 and over.data.train_scenes == 3
    assert (tiny.correction.train.max_steps, tiny.correction.train_scenes) == (400, 1200)
    assert RunConfig.from_yaml(CONFIGS / "tiny.yaml", {"correction.train.lr": 1e-4}).correction.train.lr == 1e-4
    with pytest.raises(ValueError, match="n_scenes"):
        RunConfig.from_yaml(CONFIGS / "tiny.yaml", {"correction.n_scenes": 0})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ValueError, match="max_stepz"):
        RunConfig.from_yaml(bad)


@pytest.mark.parametrize("name,build,total,lora", [
    ("paligemma", paligemma_3b_448, 2_924_353_265, 629_211_136),
    ("mllama", llama32_11b_vision, 10_117_608_996, 1_683_750_912),
])
def test_real_configs_build_on_meta_with_the_papers_sizes(name, build, total, lora):
    with torch.device("meta"):
        model = TldrRewardModel(TldrConfig(backbone_type=name, backbone_config=build().to_dict()))
        assert sum(p.numel() for p in model.parameters()) == total
        peft = with_lora(model)
    assert lora_parameter_count(peft) == lora
    # trainable = LoRA + the reward head (D + 1); nothing of the vision encoder
    d = model.config.hidden_size
    assert trainable_report(peft).trainable == lora + d + 1
    assert not any(p.requires_grad for n, p in peft.named_parameters() if "vision" in n)


def test_forward_backward_only_lora_and_head_get_gradients():
    model, processor, cfg = _tiny()
    peft = with_lora(model)
    tok = processor.tokenizer
    layout = Layout(tok.convert_tokens_to_ids("<image>"), cfg.n_image_tokens)
    rec = make_record(tok, "x", "img", "caption en", "a small blue circle.", "caption", "a small red circle.", "visual_attribute")
    enc = encode_record(tok, rec, layout)
    ids = torch.tensor([enc["input_ids"]])
    out = peft(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64), attention_mask=torch.ones_like(ids),
               token_type_ids=torch.tensor([enc["token_type_ids"]]), labels=torch.tensor([enc["labels"]]))
    assert out.logits.shape == ids.shape and torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = {n for n, p in peft.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in n or "reward_head" in n for n in with_grad)
    assert any("multi_modal_projector" in n for n in with_grad) and any("mlp.down_proj" in n for n in with_grad)


def _scored(model, processor, cfg):
    tok = processor.tokenizer
    layout = Layout(tok.convert_tokens_to_ids("<image>"), cfg.n_image_tokens)
    rec = make_record(tok, "x", "img", "caption en", "a small blue circle.", "caption", "a small red circle.", "visual_attribute")
    enc = encode_record(tok, rec, layout)
    ids = torch.tensor([enc["input_ids"]])
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                     token_type_ids=torch.tensor([enc["token_type_ids"]])).logits


def test_adapter_and_model_reload_to_the_same_scores_and_a_foreign_adapter_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from groundlab.shared.loading import load_pretrained
    from groundlab.shared.lora import load_adapter, save_adapter

    model, processor, cfg = _tiny()
    backbone_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft = with_lora(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:  # LoRA B and the head start at zero: give them values of their own
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft.eval()
    before = _scored(peft, processor, cfg)
    save_adapter(peft, tmp_path / "adapter")
    base = TldrRewardModel(model.config)
    base.load_state_dict(backbone_state)  # the backbone as from_backbone loads it; the adapter adds the rest
    torch.testing.assert_close(_scored(load_adapter(base, tmp_path / "adapter"), processor, cfg), before)
    # the whole reward model through save_pretrained / from_pretrained, LoRA merged
    merged = peft.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_scored(load_pretrained(TldrRewardModel, tmp_path / "merged").eval(), processor, cfg),
                               before, atol=1e-5, rtol=1e-5)
    # an adapter with a weight too many, or one too few, is refused (peft alone would warn or ignore)
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    dropped = sorted(weights)[0]
    for name, state, match in (("extra", weights | {"base_model.model.mystery.lora_A.weight": torch.zeros(1)}, "unexpected"),
                               ("short", {k: v for k, v in weights.items() if k != dropped}, "missing")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
        save_file(state, tmp_path / name / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=match) as err:
            load_adapter(TldrRewardModel(model.config), tmp_path / name)
        assert str(tmp_path / name) in str(err.value)


def test_response_layout_golden():
    tok = load_tokenizer()
    layout = Layout(tok.convert_tokens_to_ids("<image>"), 4)
    rec = make_record(tok, "x", "img", "caption en", "a small blue circle.", "caption", "a small red circle.", "visual_attribute")
    assert rec["labels"] == [1, 1, 0, 1, 1] and rec["tokens"][2] == "Ġblue"
    enc = encode_record(tok, rec, layout)
    n_prefix = 4 + 1 + len(tok("caption en\n", add_special_tokens=False)["input_ids"])
    assert enc["response_start"] == n_prefix and enc["input_ids"][-1] == tok.eos_token_id
    assert enc["labels"] == [-100] * n_prefix + [1, 1, 0, 1, 1] + [-100]  # EOS not scored
    assert enc["token_type_ids"] == [0] * n_prefix + [1] * 6
    naive = encode_record(tok, rec, replace(layout, head="last"))
    assert naive["labels"] == [-100] * (n_prefix + 4) + [0, -100]  # the response label, at its last token


def test_world_export_and_validated_reading(tmp_path):
    tok = load_tokenizer()
    world = World(WorldConfig(glyph_prob=0.5), seed=0)
    path, counts = export_world(world, "train", 12, tmp_path, tok)
    records = read_jsonl(path, tok)
    negs = [r for r in records if r["taxonomy"] != "original"]
    assert {r["taxonomy"] for r in negs} == set(TAXONOMIES)
    assert all(0 in r["labels"] for r in negs) and all(all(r["labels"]) for r in records if r["taxonomy"] == "original")
    assert counts["description/original"] == counts["caption/original"] == counts["vqa/original"] == 12
    assert (tmp_path / records[0]["image"]).is_file()
    # a file written with another tokenizer is refused, naming the line
    other = load_tokenizer(["circle."])  # splits "circle." differently
    with pytest.raises(ValueError, match=r"tldr_train.jsonl:\d+: the tokenizer splits"):
        read_jsonl(path, other)
    lines = path.read_text().splitlines()
    bad = json.loads(next(line for line in lines if '"taxonomy": "counting"' in line))
    bad["labels"] = [1] * len(bad["labels"])
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="every token labelled good"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not JSON"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_restore_generator_merges_lora_at_tau_and_ties_the_lm_head():
    model, _, _ = _tiny()
    peft = with_lora(model)
    layer = peft.base_model.model.backbone.language_model.layers[0].mlp.down_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # a non-zero adapter
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (1 / 4)  # alpha / r
    gen = restore_generator(peft, tau=0.25)
    torch.testing.assert_close(gen.model.language_model.layers[0].mlp.down_proj.weight, w0 + 0.25 * delta)
    assert gen.lm_head.weight.data_ptr() == gen.model.language_model.embed_tokens.weight.data_ptr()


def test_highlighting_and_self_correction_prompt():
    tokens, probs = ["there", "Ġis", "Ġa", "Ġblue", "Ġcircle", "."], [0.9, 0.9, 0.9, 0.2, 0.8, 0.9]
    html = highlight_html(tokens, probs)
    assert html.count("background") == 1 and "P(good)=0.200" in html and " blue" in html
    prompt = self_correction_prompt("there is a blue circle.", tokens, probs)
    assert "\"there is a blue circle.\": 'blue'" in prompt
    assert "no flagged word" in self_correction_prompt("x.", ["x", "."], [0.9, 0.9])
    # sentences end at '?' too, never at a decimal point
    tokens, probs = ["is", "Ġit", "Ġ3", ".", "5", "?", "Ġno", "."], [0.9, 0.9, 0.2, 0.9, 0.9, 0.9, 0.1, 0.9]
    prompt = self_correction_prompt("is it 3.5? no.", tokens, probs)
    assert "- \"is it 3.5?\": '3'\n- \"no.\": 'no'\n" in prompt


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_micro_config(tmp_path, monkeypatch):
    from groundlab.tldr.train import run

    monkeypatch.setenv("GROUNDLAB_RUNS", str(tmp_path / "runs"))
    pali = ensure_base(smoke_spec("paligemma", steps=4, train_scenes=16, eval_scenes=4))
    cfg = RunConfig.from_yaml(CONFIGS / "tiny.yaml", {
        "name": "micro", "model.backbone": str(pali), "data.train_scenes": 6, "data.eval_scenes": 4,
        "train.max_steps": 6, "train.save_steps": 3, "train.progress_bar": False,
        "captioners.weak_steps": 2, "captioners.strong_steps": 4, "captioners.train_scenes": 16, "captioners.eval_scenes": 4,
        "captioners.smoke": True,
        "captioners.n_scenes": 4, "likelihood.n_scenes": 4, "likelihood.taus": [0.0, 1.0],
        "correction.train_scenes": 4, "correction.n_scenes": 4, "correction.train.max_steps": 2,
        "correction.train.save_steps": 1, "correction.train.progress_bar": False})
    path = run(cfg)
    m = json.loads(Path(path).read_text())
    run_dir = Path(path).parent
    # metrics.json holds the scores of the predictions files the run wrote ...
    from groundlab.tldr.evaluation import read_predictions, score_naive, score_tldr

    preds = read_predictions(run_dir / "predictions_tldr.jsonl")
    assert {k: m[f"tldr/{k}"] for k in score_tldr(preds)} == score_tldr(preds)
    assert {k: m[f"naive/{k}"] for k in ("A_R", "n_responses")} == {
        k: score_naive(read_predictions(run_dir / "predictions_naive.jsonl"))[k] for k in ("A_R", "n_responses")}
    # ... and the all-good baseline is the labels' own share of good tokens / good responses
    assert m["baseline/all_good/A_R"] == pytest.approx(sum(all(p["labels"]) for p in preds) / len(preds))
    assert m["baseline/all_good/A_T"] == pytest.approx(sum(sum(p["labels"]) / len(p["labels"]) for p in preds) / len(preds))
    assert m["baseline/all_good/A_T"] > 0.5  # most tokens are good
    # the generator's own token probabilities: scored from their file like TLDR's
    gen_preds = read_predictions(run_dir / "predictions_generator.jsonl")
    assert [p["id"] for p in gen_preds] == [p["id"] for p in preds]
    assert {k: m[f"baseline/generator/{k}"] for k in score_tldr(gen_preds)} == score_tldr(gen_preds)
    for key in ("captioner_weak/token", "captioner_strong/true_error"):  # four captions each: any rate is possible
        assert 0.0 <= m[key] <= 1.0, key
    # Table 6's stage: tau = 0 is the base generator itself, caption for caption
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    from groundlab.tldr.downstream import tiny_captions

    lines = [json.loads(x) for x in (Path(path).parent / "likelihood_captions.jsonl").read_text().splitlines()]
    assert [x["tau"] for x in lines] == [0.0] * 4 + [1.0] * 4
    scenes = World(WorldConfig(), seed=0).scenes("test", 4)
    base = tiny_captions(PaliGemmaForConditionalGeneration.from_pretrained(pali), AutoProcessor.from_pretrained(pali), scenes)
    assert [x["caption"] for x in lines[:4]] == base
    from groundlab.tldr.perturb import check_caption

    for tau, rows in ((0.0, lines[:4]), (1.0, lines[4:])):  # the true error is the written captions' own
        wrong = [not check_caption(x["caption"], s) for x, s in zip(rows, scenes)]
        assert m[f"likelihood/tau_{tau:g}/true_error"] == pytest.approx(sum(wrong) / 4)
    # Table 3's correlation runs over the two captioners and the generator at both taus
    from groundlab.tldr.metrics import rate_correlation

    rated = {p: {r: m[f"{p}/{r}"] for r in ("token", "sentence", "response", "true_error")}
             for p in ("captioner_weak", "captioner_strong", "likelihood/tau_0", "likelihood/tau_1")}
    assert {k[len("correlation/"):]: v for k, v in m.items() if k.startswith("correlation/")} == rate_correlation(rated)
    # Table 4's stage rewrites the same base captions of the same scenes: the same error before
    assert m["correction/before/true_error"] == m["likelihood/tau_0/true_error"]
    rows = [json.loads(x) for x in (run_dir / "self_correction.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == base and all(r["oracle"]["rewrite"] for r in rows)
    for mode in ("none", "tldr", "oracle"):
        wrong = [not check_caption(r[mode]["rewrite"], s) for r, s in zip(rows, scenes)]
        assert m[f"correction/{mode}/true_error"] == pytest.approx(sum(wrong) / 4)
    preds = (Path(path).parent / "predictions_tldr.jsonl").read_text().splitlines()
    assert len(preds) == m["data/eval_records"]
    # the CLI scores a response with the trained model and writes the HTML highlighting
    from groundlab.tldr.cli import main as cli

    image = next((Path(path).parent).glob("data-*/images/*.jpg"))
    cli(["score", "--image", str(image), "--text", "a small red circle.", "--run", "micro",
         "--html", str(tmp_path / "flagged.html")])
    assert "P(good)=" in (tmp_path / "flagged.html").read_text()
    html = (tmp_path / "flagged.html").read_text()
    # a second run reuses data and models (nothing retrained), and the reloaded models score the same
    adapters = sorted(Path(path).parent.glob("*/adapter/adapter_model.safetensors"))
    before = [p.stat().st_mtime_ns for p in adapters]
    again = json.loads(Path(run(cfg)).read_text())
    assert [p.stat().st_mtime_ns for p in adapters] == before
    scores = [k for k in m if k.startswith(("tldr/", "naive/", "captioner_", "likelihood/", "baseline/"))]
    assert len(scores) > 20 and {k: again[k] for k in scores} == {k: m[k] for k in scores}
    # Table 2's ablation over two seeds: seed 0 of the default arm and of the naive RM are the run's models
    from groundlab.tldr.train import ablation

    ab = json.loads(Path(ablation(cfg, seeds=(0, 1))).read_text())
    assert [p.stat().st_mtime_ns for p in adapters] == before  # reused, not retrained
    assert ab["projector_decoder/seed_0/A_R"] == m["tldr/A_R"] and ab["naive/seed_0/A_R"] == m["naive/A_R"]
    for arm in ("projector_decoder", "projector", "decoder", "naive"):
        runs = [ab[f"{arm}/seed_{s}/A_R"] for s in (0, 1)]
        assert ab[f"{arm}/mean/A_R"] == pytest.approx(sum(runs) / 2)
        assert ab[f"{arm}/std/A_R"] == pytest.approx(abs(runs[0] - runs[1]) / 2 ** 0.5)
    trained = sorted(Path(path).parent.glob("tldr-*/adapter/adapter_config.json"))
    assert len(trained) == 6  # three arms x two seeds, each its own stage
    assert len({json.loads(p.read_text())["target_modules"] for p in trained}) == 3  # three LoRA placements
    # a subset of arms: only those are scored (the cached models reloaded, the same figures)
    sub = json.loads(Path(ablation(cfg, seeds=(0, 1), arms=("naive",))).read_text())
    assert {k for k in sub if "/seed_" in k} == {k for k in ab if k.startswith("naive/seed_")}
    assert sub["naive/mean/A_R"] == ab["naive/mean/A_R"]
    with pytest.raises(ValueError, match="subset"):
        ablation(cfg, seeds=(0, 1), arms=("lora_everywhere",))
    # `score` still loads the run's own TLDR model, not the newest of the ablation's stages
    from groundlab.tldr.cli import _find_model

    newest = max(trained, key=lambda p: p.stat().st_mtime_ns).parent.parent
    assert _find_model("micro", None) == Path(path).parent / (Path(path).parent / "MODEL").read_text().strip()
    assert _find_model("micro", None) != newest
    cli(["score", "--image", str(image), "--text", "a small red circle.", "--run", "micro",
         "--html", str(tmp_path / "again.html")])
    assert (tmp_path / "again.html").read_text() == html


def _tiny_mllama_dir(tmp_path) -> Path:
    """A saved tiny Llama-3.2-Vision (Mllama) with its processor: the fixture tokenizer plus <|image|>."""
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
    )

    tok = load_tokenizer(extra_special_tokens=["<|image|>"])
    image_id = tok.convert_tokens_to_ids("<|image|>")
    cfg = MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, intermediate_layers_indices=[0],
                           attention_heads=4, intermediate_size=64, image_size=32, patch_size=8, max_num_tiles=2,
                           vision_output_dim=64, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(hidden_size=64, num_hidden_layers=2, cross_attention_layers=[1], num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=len(tok) + 8,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         rope_scaling={"rope_type": "default"}),
        image_token_index=image_id)
    torch.manual_seed(0)
    vlm = MllamaForConditionalGeneration(cfg)
    for name, p in vlm.named_parameters():  # a pretrained Mllama's tanh gates are open; random init closes them
        if "gate" in name and p.numel() == 1:
            torch.nn.init.constant_(p, 1.0)
    out = tmp_path / "mllama"
    vlm.save_pretrained(out)
    ip = MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=2)
    MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template="{{ messages }}").save_pretrained(out)
    return out


def test_mllama_layout_collator_training_and_restore(tmp_path):
    """The Llama-3.2-Vision path end to end: <|image|> in the text, tiles and cross-attention mask from
    the collator, response tokens scored in the text sequence, LoRA on cross-attention, the generator
    restored with the original LM head."""
    import numpy as np
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from groundlab.tldr.evaluation import predict, read_predictions
    from groundlab.tldr.processing import collator_for, layout_for

    path = _tiny_mllama_dir(tmp_path)
    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    layout = layout_for(processor)
    assert (layout.backbone, layout.n_image_tokens) == ("mllama", 1)
    model = TldrRewardModel.from_backbone(str(path), lora_r=4, lora_alpha=1)
    assert model.config.backbone_type == "mllama"

    neg = make_record(tok, "n", "x.jpg", "caption en", "a large blue circle.", "caption",
                      original="a small blue circle.", taxonomy="visual_attribute")
    pos = make_record(tok, "p", "y.jpg", "describe en", "there is one shape. it is a small blue circle.", "description")
    encs = [encode_record(tok, r, layout) for r in (neg, pos)]
    for enc, rec in zip(encs, (neg, pos)):
        assert enc["input_ids"][:2] == [tok.bos_token_id, layout.image_token_id]  # one image token, no image run
        s, n = enc["response_start"], enc["response_len"]
        assert enc["labels"][s : s + n] == rec["labels"] and enc["input_ids"][s + n] == tok.eos_token_id
        assert set(enc["labels"][:s] + enc["labels"][s + n :]) == {-100}
    wide = np.zeros((32, 64, 3), np.uint8)  # 1:2 aspect -> two tiles; the square one -> one tile
    square = np.full((64, 64, 3), 200, np.uint8)
    samples = [{**e, "image": im} for e, im in zip(encs, (square, wide))]
    batch = collator_for(processor, layout)(samples)
    assert batch["pixel_values"].shape[:3] == (2, 1, 2)
    xm = batch["cross_attention_mask"]
    assert xm.shape == (2, batch["input_ids"].shape[1], 1, 2)
    n0 = len(encs[0]["input_ids"])  # the shorter row is right-padded
    assert n0 < batch["input_ids"].shape[1]
    assert xm[0, 0].sum() == 0 and xm[0, 1:n0, 0, 0].all() and xm[0, :, 0, 1].sum() == 0 and xm[0, n0:].sum() == 0
    assert xm[1, 1:, 0].all()  # the wide image has two valid tiles

    peft = with_lora(model)
    out = peft(**batch)
    assert out.logits.shape == batch["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n for n, p in peft.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all("lora_" in n or "reward_head" in n for n in grads)
    assert any("cross_attn" in n for n in grads) and any("multi_modal_projector" in n for n in grads)

    from PIL import Image

    from groundlab.tldr.data import TldrDataset

    Image.fromarray(square).save(tmp_path / "x.jpg")
    Image.fromarray(wide).save(tmp_path / "y.jpg")
    ds = TldrDataset([neg, pos], tmp_path, tok, layout)
    preds = read_predictions(predict(peft, ds, processor, tmp_path / "preds.jsonl"))
    assert [len(p["probs"]) for p in preds] == [len(neg["labels"]), len(pos["labels"])]
    # the prediction of each response token is the model's probability at that token's own position
    probs = torch.sigmoid(peft(**{k: v for k, v in batch.items() if k != "labels"}).logits)
    s, n = encs[1]["response_start"], encs[1]["response_len"]
    assert torch.allclose(torch.tensor(preds[1]["probs"]), probs[1, s : s + n], atol=1e-5)

    # tau = 0 gives back the original generator exactly, LM head included (Mllama's is untied)
    with pytest.raises(ValueError, match="original"):
        restore_generator(with_lora(TldrRewardModel.from_backbone(str(path), lora_r=4, lora_alpha=1)), tau=0.0)
    gen = restore_generator(with_lora(TldrRewardModel.from_backbone(str(path), lora_r=4, lora_alpha=1)), tau=0.0,
                            original=path)
    ref = MllamaForConditionalGeneration.from_pretrained(path).eval()
    assert attention_outside_the_shared_dispatch(gen) == attention_outside_the_shared_dispatch(peft) == []
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(gen.eval()(**inputs).logits, ref(**inputs).logits, atol=1e-5)


def test_predictions_do_not_depend_on_the_batch_size(tmp_path):
    """The same token probabilities scored one record at a time and eight at a time (right padding)."""
    from groundlab.tldr.data import TldrDataset
    from groundlab.tldr.evaluation import predict, read_predictions
    from groundlab.tldr.processing import layout_for

    model, processor, _ = _tiny()
    peft = with_lora(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:  # LoRA B and the head start at zero: scores that vary
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    tok = processor.tokenizer
    path, _ = export_world(World(WorldConfig(), seed=0), "val", 3, tmp_path, tok)
    records = read_jsonl(path, tok)[:11]
    assert len({len(r["tokens"]) for r in records}) > 1  # the batches are really padded
    ds = TldrDataset(records, tmp_path, tok, layout_for(processor))
    one = read_predictions(predict(peft, ds, processor, tmp_path / "bs1.jsonl", batch_size=1))
    eight = read_predictions(predict(peft, ds, processor, tmp_path / "bs8.jsonl", batch_size=8))
    assert [r["id"] for r in one] == [r["id"] for r in eight] == [r["id"] for r in records]
    assert max(abs(p - 0.5) for r in one for p in r["probs"]) > 0.01
    for a, b in zip(one, eight):
        torch.testing.assert_close(torch.tensor(a["probs"]), torch.tensor(b["probs"]), atol=1e-5, rtol=1e-5)


def test_generator_baseline_scores_each_token_by_the_generators_own_probability(tmp_path):
    """The untrained baseline: P(good) of a response token is the generator's probability of it given
    what precedes it, batched with padding as for TLDR and equal to one record run alone."""
    from groundlab.tldr.data import TldrDataset
    from groundlab.tldr.evaluation import predict_generator, read_predictions
    from groundlab.tldr.processing import collator_for, layout_for

    tok = load_tokenizer()
    cfg = TinyVLMConfig(kind="paligemma", text_kv_heads=1)
    torch.manual_seed(0)
    generator, processor = build_model(cfg, tok).eval(), build_processor(cfg, tok)
    path, _ = export_world(World(WorldConfig(), seed=0), "val", 2, tmp_path, tok)
    records = read_jsonl(path, tok)[:7]
    ds = TldrDataset(records, tmp_path, tok, layout_for(processor))
    preds = read_predictions(predict_generator(generator, ds, processor, tmp_path / "gen.jsonl", batch_size=4))
    assert [p["id"] for p in preds] == [r["id"] for r in records]
    for i in (0, 6):  # the first and the last record, each alone and unpadded
        batch = collator_for(processor, ds.layout)([ds[i]])
        batch.pop("labels")
        with torch.no_grad():
            probs = generator(**batch).logits[0].float().softmax(-1)
        enc = ds.encoded[i]
        s, n = enc["response_start"], enc["response_len"]
        expected = [float(probs[s - 1 + k, enc["input_ids"][s + k]]) for k in range(n)]
        assert len(preds[i]["probs"]) == len(records[i]["labels"]) == n
        torch.testing.assert_close(torch.tensor(preds[i]["probs"]), torch.tensor(expected), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="'token' layout"):
        predict_generator(generator, TldrDataset(records, tmp_path, tok, layout_for(processor, "last")), processor,
                          tmp_path / "x.jsonl")


@pytest.mark.slow
def test_reward_model_training_under_torchrun_zero2_matches_one_process(tmp_path):
    """The multi-GPU path users take: 2 processes (torchrun, gloo) with the shared ZeRO-2 config give
    the single process's per-step losses over the same global batches."""
    from groundlab.shared.testing import losses_one_and_two_processes

    export_world(World(WorldConfig(), seed=0), "train", 6, tmp_path / "data", load_tokenizer())
    losses = losses_one_and_two_processes(Path(__file__).with_name("zero2_worker.py"),
                                          ["--data", str(tmp_path / "data")], tmp_path)
    assert len(losses[1]) == 4 and losses[1][-1] < losses[1][0]
    # per-rank means averaged, or the loss scaled by the process count, would miss by 5e-3 to 0.6
    torch.testing.assert_close(torch.tensor(losses[2]), torch.tensor(losses[1]), atol=5e-4, rtol=0)


@pytest.mark.parametrize("backbone", ["paligemma", "mllama"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(backbone, tmp_path):
    """``train.packed``: one padding-free row per batch. PaliGemma's prefix-LM goes in as ``prefix_lens``;
    Mllama's images become the row's images, each token cross-attending to its own sample's only."""
    import numpy as np
    from transformers import AutoProcessor

    from groundlab.tldr.processing import collator_for, layout_for

    if backbone == "mllama":
        path = _tiny_mllama_dir(tmp_path)
        processor = AutoProcessor.from_pretrained(path)
        model = TldrRewardModel.from_backbone(str(path), lora_r=4, lora_alpha=1)
    else:
        model, processor, _ = _tiny()
    tok, layout = processor.tokenizer, layout_for(processor)
    records = [make_record(tok, "a", "a.jpg", "caption en", "a large blue circle.", "caption",
                           original="a small blue circle.", taxonomy="visual_attribute"),
               make_record(tok, "b", "b.jpg", "describe en", "there are two shapes. a red square and a star.",
                           "description"),
               make_record(tok, "c", "c.jpg", "caption en", "a green star.", "caption")]
    images = [np.full((64, 64, 3), 200, np.uint8), np.zeros((32, 64, 3), np.uint8), np.full((64, 32, 3), 90, np.uint8)]
    samples = [{**encode_record(tok, r, layout), "image": im} for r, im in zip(records, images)]
    peft = with_lora(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:  # LoRA B and the head start at zero: values of their own
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    for m in peft.modules():  # LoRA dropout would draw other masks for the other layout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    results = []
    for packed in (False, True):
        batch = collator_for(processor, layout, packed=packed)(samples)
        assert batch["input_ids"].shape[0] == (1 if packed else 3)
        peft.zero_grad()
        loss = peft(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_p, grads_p) = results
    assert grads and grads.keys() == grads_p.keys()
    torch.testing.assert_close(loss_p, loss, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(grads_p[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_evaluation_under_two_processes_predicts_what_one_process_does(tmp_path):
    """torchrun with 2 processes: each scores its share, the first writes the file one process writes."""
    from groundlab.shared.testing import outputs_one_and_two_processes
    from groundlab.tldr.evaluation import read_predictions

    export_world(World(WorldConfig(), seed=0), "val", 2, tmp_path / "data", load_tokenizer())
    dirs = outputs_one_and_two_processes(Path(__file__).with_name("eval_worker.py"), ["--data", str(tmp_path / "data")],
                                         tmp_path)
    one, two = (read_predictions(dirs[n] / "predictions.jsonl") for n in (1, 2))
    assert len(one) == 13 and [r["id"] for r in two] == [r["id"] for r in one]
    assert max(abs(p - 0.5) for r in one for p in r["probs"]) > 0.01
    for a, b in zip(one, two):
        torch.testing.assert_close(torch.tensor(b["probs"]), torch.tensor(a["probs"]), atol=1e-5, rtol=1e-5)
