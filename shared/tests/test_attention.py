import pytest
import torch

from groundlab.shared.attention import (
    attention,
    choose_attn_implementation,
    cu_seqlens_from_position_ids,
    flash_attn_available,
    packed_mask,
)

LENGTHS = [5, 1, 9, 3]


def _packed_inputs(hq=4, hkv=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    q = torch.randn(n, hq, d, generator=g)
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    cu = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu


def _alone(q, k, v, cu, causal, impl):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        # one sequence at a time, padded layout (1, H, T, D)
        o = attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                      causal=causal, implementation=impl)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hkv", [4, 2])
def test_packed_equals_each_sequence_alone(impl, causal, hkv):
    q, k, v, cu = _packed_inputs(hkv=hkv)
    packed = attention(q, k, v, causal=causal, cu_seqlens=cu, implementation=impl)
    torch.testing.assert_close(packed, _alone(q, k, v, cu, causal, impl), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_position_ids_give_the_same_result_as_cu_seqlens(impl):
    q, k, v, cu = _packed_inputs()
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    a = attention(q, k, v, cu_seqlens=cu, implementation=impl)
    b = attention(q, k, v, position_ids=pos, implementation=impl)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_eager_matches_sdpa_and_a_hand_computed_value():
    q, k, v, cu = _packed_inputs(seed=3)
    torch.testing.assert_close(attention(q, k, v, cu_seqlens=cu, implementation="eager"),
                               attention(q, k, v, cu_seqlens=cu, implementation="sdpa"), atol=1e-5, rtol=1e-5)
    # A single causal query attending to itself only returns its own value row.
    out = attention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 1], dtype=torch.int32))
    torch.testing.assert_close(out, v[:1])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_prefix_lm_equals_each_sequence_with_its_own_mask(impl):
    """prefix_lengths: the first P tokens of a sequence see each other both ways, the rest causally
    (PaliGemma's prefix-LM), each sequence alone; many sequences of mixed length cross the groups."""
    lengths, prefix = [7, 2, 5, 9, 1, 4, 6, 3, 8], [3, 2, 0, 9, 1, 2, 5, 1, 4]
    g = torch.Generator().manual_seed(4)
    n = sum(lengths)
    q, k, v = (torch.randn(n, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    out = attention(q, k, v, cu_seqlens=cu, prefix_lengths=torch.tensor(prefix), implementation=impl)
    for (a, b), p in zip(zip(cu[:-1].tolist(), cu[1:].tolist()), prefix):
        idx = torch.arange(b - a)
        mask = (idx[:, None] >= idx[None, :]) | ((idx[:, None] < p) & (idx[None, :] < p))
        ref = attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                        causal=False, attn_mask=mask, implementation=impl)[0].transpose(0, 1)
        torch.testing.assert_close(out[a:b], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prefix_lengths for 9"):
        attention(q, k, v, cu_seqlens=cu, prefix_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="packed calls"):
        attention(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                  prefix_lengths=torch.tensor([1]))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_gradients_equal_each_sequence_alone(impl):
    q, k, v, cu = _packed_inputs(hkv=2, seed=5)
    for t in (q, k, v):
        t.requires_grad_(True)
    (attention(q, k, v, cu_seqlens=cu, implementation=impl) ** 2).sum().backward()
    packed = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (_alone(q, k, v, cu, True, "eager") ** 2).sum().backward()
    for a, b in zip(packed, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", [False, True])
def test_cpu_sdpa_runs_in_fp32_under_bf16_autocast_and_returns_the_inputs_dtype(prefix):
    # the CPU SDPA path computes in fp32 (autocast off inside): bf16 inputs under autocast give the fp32
    # eager result rounded to bf16, packed (causal groups without a mask; prefix-LM groups with one)
    q, k, v, cu = _packed_inputs(hkv=2, seed=7)
    prefixes = torch.tensor([2, 1, 4, 0]) if prefix else None
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q16, k16, v16, cu_seqlens=cu, prefix_lengths=prefixes, implementation="sdpa")
    ref = attention(q16.float(), k16.float(), v16.float(), cu_seqlens=cu, prefix_lengths=prefixes,
                    implementation="eager")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16(), atol=0, rtol=0)


def test_padded_causal_without_a_mask_equals_the_explicit_causal_mask():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    tril = torch.ones(7, 7, dtype=torch.bool).tril()
    for impl in ("sdpa", "eager"):
        torch.testing.assert_close(attention(q, k, v, causal=True, implementation=impl),
                                   attention(q, k, v, causal=False, attn_mask=tril, implementation="eager"),
                                   atol=1e-5, rtol=1e-5)


def test_padded_mask_matches_unpadded_rows_and_zeroes_rows_without_keys():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, :, :, 4:] = False  # sample 1 has 4 real keys
    mask[1, :, 5, :] = False  # and its last query sees nothing
    for impl in ("sdpa", "eager"):
        out = attention(q, k, v, causal=False, attn_mask=mask, implementation=impl)
        ref = attention(q[1:, :, :5], k[1:, :, :4], v[1:, :, :4], causal=False, implementation=impl)
        torch.testing.assert_close(out[1:, :, :5], ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(out[1, :, 5], torch.zeros_like(out[1, :, 5]))


def test_cu_seqlens_from_position_ids_and_mask():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 4, 6]
    m = packed_mask(torch.tensor([0, 2, 3], dtype=torch.int32), causal=True)
    assert m.int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_bad_inputs_raise_clear_errors():
    q, k, v, cu = _packed_inputs()
    with pytest.raises(ValueError, match="end at the packed length"):
        attention(q, k, v, cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="must start at 0"):
        cu_seqlens_from_position_ids(torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k[:, :3], v[:, :3], cu_seqlens=cu)
    with pytest.raises(ValueError, match="padded"):
        attention(q, k, v)  # 3-D tensors without packing information
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, v, cu_seqlens=cu, implementation="xformers")


def test_hf_chooser_falls_back_without_flash_attn():
    if flash_attn_available():
        assert choose_attn_implementation() == "flash_attention_2"
    else:
        assert choose_attn_implementation() == "sdpa"
        assert choose_attn_implementation("flash_attention_2") == "sdpa"
    assert choose_attn_implementation("eager") == "eager"
    with pytest.raises(ValueError):
        choose_attn_implementation("fast")


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_available(), reason="needs flash-attn and CUDA")
def test_flash_packed_matches_sdpa_on_gpu():
    q, k, v, cu = (t.cuda() for t in _packed_inputs())
    qh, kh, vh = (t.to(torch.bfloat16) for t in (q, k, v))
    flash = attention(qh, kh, vh, cu_seqlens=cu, implementation="flash").float()
    ref = attention(q, k, v, cu_seqlens=cu, implementation="sdpa")
    torch.testing.assert_close(flash, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_padded_and_prefix_attention_on_the_gpu_match_the_cpu(dtype, causal):
    """What the models run on a GPU (flash-attn where installed, else SDPA on CUDA): packed rows, packed
    rows with a prefix-LM part, and a padded batch with a key mask, against the CPU's fp32 SDPA."""
    q, k, v, cu = _packed_inputs(hkv=2)
    prefix = torch.tensor([2, 0, 5, 1])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    gpu = [t.cuda().to(dtype) for t in (q, k, v)]
    torch.testing.assert_close(attention(*gpu, cu_seqlens=cu.cuda(), causal=causal).float().cpu(),
                               attention(q, k, v, cu_seqlens=cu, causal=causal, implementation="sdpa"), **tol)
    if causal:
        got = attention(*gpu, cu_seqlens=cu.cuda(), prefix_lengths=prefix.cuda(), implementation="sdpa")
        want = attention(q, k, v, cu_seqlens=cu, prefix_lengths=prefix, implementation="sdpa")
        torch.testing.assert_close(got.float().cpu(), want, **tol)
    qp, kp, vp = (t[None].transpose(1, 2) for t in (q[:12], k[:12], v[:12]))  # (1, H, 12, D)
    key_mask = torch.ones(1, 1, 12, 12, dtype=torch.bool)
    key_mask[..., :3] = False  # left padding
    got = attention(*(t.cuda().to(dtype) for t in (qp, kp, vp)), attn_mask=key_mask.cuda(), causal=causal)
    want = attention(qp, kp, vp, attn_mask=key_mask, causal=causal, implementation="sdpa")
    torch.testing.assert_close(got.float().cpu(), want, **tol)


def test_multihead_attention_is_torch_s_with_the_same_parameters_initialisation_and_function():
    from torch import nn

    from groundlab.shared.attention import MultiheadAttention

    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(32, 4, batch_first=True)
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 4)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    blocked = torch.rand(2, 5, 7) > 0.5  # torch's convention: True = may not attend
    blocked[..., 0] = False
    want = theirs(q, kv, kv, attn_mask=blocked.repeat_interleave(4, 0), need_weights=False)[0]
    torch.testing.assert_close(ours(q, kv, kv, ~blocked[:, None]), want)
    torch.testing.assert_close(ours(q, kv, kv), theirs(q, kv, kv, need_weights=False)[0])


def test_segment_anything_modules_run_through_the_shared_attention_with_the_same_function():
    import copy

    from segment_anything.modeling import image_encoder
    from segment_anything.modeling import transformer as two_way

    from groundlab.shared.bases import sam as tiny_sam

    torch.manual_seed(0)
    model = tiny_sam.build_tiny_sam(tiny_sam.TinySamConfig())
    kinds = [type(m) for m in model.modules()]
    assert image_encoder.Attention not in kinds and two_way.Attention not in kinds  # every one re-routed
    for m in model.modules():  # non-zero relative positions, so the bias path is exercised
        if hasattr(m, "rel_pos_h"):
            torch.nn.init.normal_(m.rel_pos_h)
            torch.nn.init.normal_(m.rel_pos_w)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        m.__class__ = {tiny_sam._EncoderAttention: image_encoder.Attention,
                       tiny_sam._DecoderAttention: two_way.Attention}.get(type(m), type(m))
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model.image_encoder(image), plain.image_encoder(image)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        sparse, dense = model.prompt_encoder(points=(torch.rand(1, 1, 2) * 64, torch.ones(1, 1)), boxes=None, masks=None)
        pe = model.prompt_encoder.get_dense_pe()
        torch.testing.assert_close(model.mask_decoder(ours[:1], pe, sparse, dense, False)[0],
                                   plain.mask_decoder(ours[:1], pe, sparse, dense, False)[0], atol=1e-5, rtol=1e-5)
