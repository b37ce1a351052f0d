"""The shared attention registered with transformers (``attn_implementation="groundlab"``) and packed
training batches, on the tiny LLaVA (Llama, causal) and PaliGemma (Gemma, prefix-LM) of the bases."""

from dataclasses import replace

import pytest
import torch

from groundlab.shared.attention import HF_ATTENTION
from groundlab.shared.bases import vlm
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.world import World, WorldConfig


def _setup(kind: str, attn: str, n_samples: int = 6):
    cfg = replace(vlm.TinyVLMConfig(kind=kind), attn_implementation=attn)
    tok = load_tokenizer()
    processor = vlm.build_processor(cfg, tok)
    torch.manual_seed(0)
    model = vlm.build_model(cfg, tok)
    data = vlm.WorldVLMDataset(World(WorldConfig(), seed=0), "train", 3, processor, cfg)
    samples = [data[i] for i in range(min(n_samples, len(data)))]
    assert len({len(s["input_ids"]) for s in samples}) > 1  # padding is really exercised
    return cfg, processor, model, samples


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_loss_and_grads(model, batch_a, batch_b, atol: float, rtol: float) -> None:
    """The two batches give the model the same loss (within ``atol``) and the same gradient of every
    parameter (``atol`` / ``rtol``)."""
    loss_a, grads_a = _loss_and_grads(model, batch_a)
    loss_b, grads_b = _loss_and_grads(model, batch_b)
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("kind", vlm.VLM_KINDS)
def test_groundlab_attention_equals_transformers_eager(kind):
    """Same weights, same padded batch: logits of every real token and greedy answers (left-padded
    generation with a KV cache) equal HF's own eager attention."""
    cfg, processor, model, samples = _setup(kind, HF_ATTENTION)
    batch = vlm.VLMCollator(processor)(samples)
    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits
        model.config._attn_implementation = "eager"  # the same model through transformers' kernel
        for sub in (model.config.text_config, model.config.vision_config):
            sub._attn_implementation = "eager"
        theirs = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)

    world = World(WorldConfig(), seed=0)
    scenes = list(world.scenes("val", 3))
    prompts = [vlm.CAPTION_PROMPT[kind], "answer en how many shapes are there?" if kind == "paligemma"
               else "How many shapes are there?", vlm.CAPTION_PROMPT[kind]]
    eager = vlm.generate(model, processor, cfg, [s.image for s in scenes], prompts, max_new_tokens=6)
    for sub in (model.config, model.config.text_config, model.config.vision_config):
        sub._attn_implementation = HF_ATTENTION
    assert vlm.generate(model, processor, cfg, [s.image for s in scenes], prompts, max_new_tokens=6) == eager


@pytest.mark.parametrize("kind", vlm.VLM_KINDS)
def test_packed_batches_give_the_padded_loss_and_gradients(kind):
    """One padding-free row (PaliGemma's prefix-LM through prefix_lens) == the padded batch."""
    _, processor, model, samples = _setup(kind, HF_ATTENTION)
    model.train()
    padded, packed = vlm.VLMCollator(processor)(samples), vlm.VLMCollator(processor, packed=True)(samples)
    n = sum(len(s["input_ids"]) for s in samples)  # filled to a multiple of 256 with an ignored sequence
    assert packed["input_ids"].shape == (1, -(-n // 256) * 256) and n % 256 != 0
    _assert_same_loss_and_grads(model, padded, packed, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", vlm.VLM_KINDS)
@pytest.mark.parametrize("packed", [False, True])
def test_logits_where_a_label_follows_give_the_full_loss_and_gradients(kind, packed):
    """``labeled_logits_only``: logits at the positions whose next label counts (rounded up with ignored
    ones) give the loss and gradients of the logits at every position."""
    _, processor, model, samples = _setup(kind, HF_ATTENTION)
    model.train()
    full = vlm.VLMCollator(processor, packed=packed)(samples)
    kept = vlm.VLMCollator(processor, packed=packed, labeled_logits_only=True)(samples)
    n_kept = int(kept["logits_to_keep"].sum())
    n_labels = int((full["labels"][:, 1:] != -100).sum())
    assert n_kept % 64 == 0 and n_labels <= n_kept < n_labels + 64 and n_kept < full["labels"].numel() / 2
    assert kept["shift_labels"].shape == (n_kept,) and int((kept["shift_labels"] != -100).sum()) == n_labels
    _assert_same_loss_and_grads(model, full, kept, atol=1e-6, rtol=1e-5)


def test_packed_paligemma_needs_its_prefix():
    """Without prefix_lens the packed PaliGemma row is plain causal: a different loss (the prefix
    mask is really what makes the two equal above)."""
    _, processor, model, samples = _setup("paligemma", HF_ATTENTION)
    packed = vlm.VLMCollator(processor, packed=True)(samples)
    with torch.no_grad():
        with_prefix = model(**packed).loss
        packed.pop("prefix_lens")
        causal_only = model(**packed).loss
    assert abs(float(with_prefix) - float(causal_only)) > 1e-4


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_additive_float_masks_equal_their_boolean_form_and_integer_masks_are_refused(kernel):
    """Models that build their own masks (Mllama's cross-attention, its vision encoder) hand over an
    additive bias: 0 where a key is seen, the dtype's minimum where not."""
    from groundlab.shared.attention import attention, hf_attention_forward

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    seen = torch.rand(2, 1, 5, 7) > 0.3
    seen[..., 0] = True
    bias = torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)
    want = attention(q, k, v, causal=False, attn_mask=seen, implementation=kernel)
    torch.testing.assert_close(attention(q, k, v, causal=False, attn_mask=bias, implementation=kernel), want)
    out, _ = hf_attention_forward(torch.nn.Module(), q, k, v, bias)
    torch.testing.assert_close(out, want.transpose(1, 2))
    with pytest.raises(ValueError, match="floating-point bias"):
        attention(q, k, v, causal=False, attn_mask=seen.long())


def test_packing_is_refused_for_implementations_that_ignore_the_bounds():
    from groundlab.shared.attention import require_packing_support

    _, _, model, _ = _setup("llava", "eager", n_samples=2)
    with pytest.raises(ValueError, match="packed batches need"):
        require_packing_support(model)
    for c in (model.config, model.config.text_config):
        c._attn_implementation = HF_ATTENTION
    require_packing_support(model)


def test_the_bases_run_through_the_shared_attention():
    from groundlab.shared.bases.sam import build_tiny_sam
    from groundlab.shared.testing import attention_outside_the_shared_dispatch

    for kind in vlm.VLM_KINDS:
        _, _, model, _ = _setup(kind, vlm.TinyVLMConfig().attn_implementation, n_samples=2)
        assert attention_outside_the_shared_dispatch(model) == []
    assert attention_outside_the_shared_dispatch(build_tiny_sam()) == []
    _, _, eager, _ = _setup("llava", "eager", n_samples=2)  # the check can fail
    assert "attn_implementation='eager'" in attention_outside_the_shared_dispatch(eager)[0]
    assert "MultiheadAttention" in attention_outside_the_shared_dispatch(torch.nn.MultiheadAttention(8, 2))[0]


def test_stray_tensors_on_meta_catches_a_tensor_made_without_a_device():
    import torch

    from groundlab.shared.testing import stray_tensors_on_meta

    x = torch.ones(3)
    with stray_tensors_on_meta():
        assert torch.equal(x + torch.zeros(3, device=x.device), x) and (x + x.new_zeros(3)).device == x.device
        with pytest.raises(RuntimeError, match="meta"):
            x + torch.zeros(3)
        with pytest.raises(RuntimeError, match="meta"):
            torch.arange(3).tolist()


@pytest.mark.slow
def test_compiled_layers_train_the_same_losses_and_are_undone_after_the_stage(tmp_path):
    """``TrainConfig.compile_layers``: the same per-step losses as the eager stage (fp32, packed, 4
    steps from the same weights); afterwards the layers run eager again (generation, evaluation)."""
    import copy

    from groundlab.shared.training import TrainConfig, train

    _, processor, model, samples = _setup("llava", HF_ATTENTION)
    twin = copy.deepcopy(model)
    collate = vlm.VLMCollator(processor, packed=True, labeled_logits_only=True)
    losses = {}
    for compiled, m in ((False, model), (True, twin)):
        cfg = TrainConfig(max_steps=4, batch_size=3, lr=1e-3, logging_steps=1, save_steps=4, progress_bar=False,
                          packed=True, compile_layers=compiled)
        trainer = train(m, samples, collate, cfg, tmp_path / str(compiled))
        losses[compiled] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses[True]) == 4 and losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert all(layer._compiled_call_impl is None for layer in twin.get_decoder().layers)
    with pytest.raises(ValueError, match="get_decoder"):
        train(torch.nn.Linear(2, 2), samples, collate, TrainConfig(max_steps=1, batch_size=1, lr=1e-3,
                                                                    compile_layers=True), tmp_path / "linear")


def test_cpu_kernel_switches_the_kernel_hf_models_run_on_the_cpu(monkeypatch):
    from groundlab.shared import attention as attn

    seen = []
    real = attn.attention
    monkeypatch.setattr(attn, "attention", lambda *a, **kw: seen.append(kw["implementation"]) or real(*a, **kw))
    _, processor, model, samples = _setup("paligemma", HF_ATTENTION, n_samples=2)
    batch = vlm.VLMCollator(processor)(samples)
    with torch.no_grad():
        model(**batch)
        with attn.cpu_kernel("eager"):
            model(**batch)
        model(**batch)
    third = len(seen) // 3
    assert seen == ["sdpa"] * third + ["eager"] * third + ["sdpa"] * third and third > 0
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        with attn.cpu_kernel("flash"):
            pass
