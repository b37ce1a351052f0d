"""The official checkpoint converter on state dicts built in the release's layout."""

import pytest
import torch

from groundlab.omg_llava.convert import INTERNLM2_VOCAB, load_official, split_wqkv
from groundlab.omg_llava.modeling import IMAGE_TOKEN, SPECIAL_TOKENS, OMGLlavaConfig, OMGLlavaForCausalLM

SEG = dict(image_size=64, dims=(16, 32, 64, 32), depths=(1, 1, 1, 1), dim=16, mask_dim=16, encoder_layers=1,
           encoder_heads=2, encoder_points=2, encoder_ffn=32, groups=8, num_queries=6, decoder_layers=2,
           decoder_heads=2, decoder_ffn=32, num_classes=12)
H, KV, D, HID = 4, 2, 4, 16  # heads, kv heads, head dim, hidden


def model():
    ids = {t: INTERNLM2_VOCAB + i for i, t in enumerate((*SPECIAL_TOKENS[:4], IMAGE_TOKEN, "<mark>"))}
    text = dict(model_type="llama", vocab_size=INTERNLM2_VOCAB + 6, hidden_size=HID, intermediate_size=24,
                num_hidden_layers=1, num_attention_heads=H, num_key_value_heads=KV, head_dim=D)
    return OMGLlavaForCausalLM(OMGLlavaConfig(seg_config=SEG, text_config=text, token_ids=ids))


def fuse(q, k, v):
    """q (H*D, in), k / v (KV*D, in) -> InternLM2's wqkv: per kv head, its H/KV query heads, its key, its value."""
    g = H // KV
    rows = []
    for h in range(KV):
        rows += [q[(h * g + j) * D:(h * g + j + 1) * D] for j in range(g)]
        rows += [k[h * D:(h + 1) * D], v[h * D:(h + 1) * D]]
    return torch.cat(rows)


def official_layout(seed=0):
    torch.manual_seed(seed)
    r = lambda *s: torch.randn(*s)  # noqa: E731
    q, k, v = r(H * D, HID), r(KV * D, HID), r(KV * D, HID)
    base = {"model.tok_embeddings.weight": r(INTERNLM2_VOCAB, HID), "model.norm.weight": r(HID),
            "output.weight": r(INTERNLM2_VOCAB, HID), "model.layers.0.attention.wqkv.weight": fuse(q, k, v),
            "model.layers.0.attention.wo.weight": r(HID, H * D), "model.layers.0.feed_forward.w1.weight": r(24, HID),
            "model.layers.0.feed_forward.w3.weight": r(24, HID), "model.layers.0.feed_forward.w2.weight": r(HID, 24),
            "model.layers.0.attention_norm.weight": r(HID), "model.layers.0.ffn_norm.weight": r(HID)}
    p = "llm.base_model.model."
    off = {f"{p}model.tok_embeddings.weight": r(INTERNLM2_VOCAB + 4, HID), f"{p}output.weight": r(INTERNLM2_VOCAB + 4, HID)}
    for name, (o, i) in {"attention.wqkv": ((H + 2 * KV) * D, HID), "attention.wo": (HID, H * D),
                         "feed_forward.w1": (24, HID), "feed_forward.w2": (HID, 24), "feed_forward.w3": (24, HID)}.items():
        off[f"{p}model.layers.0.{name}.lora_A.weight"] = r(8, i)
        off[f"{p}model.layers.0.{name}.lora_B.weight"] = r(o, 8)
    clip, qd = 128, 32  # the tiny segmenter: stride-32 channels 32 x 2x2 shuffle; 2 * dim
    for name, shape in {"query_proj": (clip, qd), "model.0": (HID, clip), "model.2": (HID, HID),
                        "model_feat.0": (HID, clip + qd), "model_feat.2": (HID, HID)}.items():
        off[f"projector.model.{name}.weight"], off[f"projector.model.{name}.bias"] = r(*shape), r(shape[0])
    off["projector.model.seperate_embed.weight"] = r(1, HID)
    for name, shape in {"0": (qd, HID), "2": (qd, qd)}.items():
        off[f"projector_text2vision.model.{name}.weight"], off[f"projector_text2vision.model.{name}.bias"] = r(*shape), r(shape[0])
    return base, off, (q, k, v)


def test_split_wqkv_inverts_the_grouped_layout():
    q, k, v = torch.randn(H * D, 3), torch.randn(KV * D, 3), torch.randn(KV * D, 3)
    for a, b in zip(split_wqkv(fuse(q, k, v), H, KV), (q, k, v)):
        assert torch.equal(a, b)


def test_official_checkpoint_loads_strictly_with_lora_merged():
    m = model()
    base, off, (q, k, v) = official_layout()
    seg_before = {k_: t.clone() for k_, t in m.state_dict().items() if k_.startswith("segmenter.")}
    p = "llm.base_model.model.model.layers.0."
    wqkv = fuse(q, k, v) + 256 / 512 * off[p + "attention.wqkv.lora_B.weight"] @ off[p + "attention.wqkv.lora_A.weight"]
    wo = base["model.layers.0.attention.wo.weight"] + 0.5 * off[p + "attention.wo.lora_B.weight"] @ off[p + "attention.wo.lora_A.weight"]
    filled = load_official(m, dict(off), base)
    assert sorted(filled) == sorted(["<mark>", IMAGE_TOKEN])
    attn = m.llm.model.layers[0].self_attn
    for got, want in zip((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight), split_wqkv(wqkv, H, KV)):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(attn.o_proj.weight, wo, atol=1e-5)
    emb = m.llm.get_input_embeddings().weight
    ids = m.config.token_ids
    assert torch.equal(emb[:INTERNLM2_VOCAB], off["llm.base_model.model.model.tok_embeddings.weight"][:INTERNLM2_VOCAB])
    assert torch.equal(emb[ids["</p>"]], off["llm.base_model.model.model.tok_embeddings.weight"][INTERNLM2_VOCAB + 2])
    assert torch.allclose(emb[ids["<mark>"]], emb[:INTERNLM2_VOCAB].mean(0), atol=1e-5)
    assert torch.equal(m.projector.object_mlp[2].bias, off["projector.model.model.2.bias"])
    assert torch.equal(m.projector.separator.weight, off["projector.model.seperate_embed.weight"])
    assert torch.equal(m.text2vision[0].weight, off["projector_text2vision.model.0.weight"])
    assert all(torch.equal(t, m.state_dict()[k_]) for k_, t in seg_before.items())


def test_converter_refuses_unknown_missing_and_unpaired_keys():
    base, off, _ = official_layout()
    with pytest.raises(KeyError, match="no place in this model"):
        load_official(model(), off | {"visual_encoder.adapter_proj.weight": torch.zeros(1)}, base)
    broken = dict(off)
    del broken["llm.base_model.model.model.layers.0.feed_forward.w2.lora_B.weight"]
    with pytest.raises(KeyError, match="no matching"):
        load_official(model(), broken, base)
    with pytest.raises(KeyError, match="lacks model.norm.weight"):
        load_official(model(), dict(off), {k: v for k, v in base.items() if k != "model.norm.weight"})
    short = dict(off)
    short["llm.base_model.model.output.weight"] = short["llm.base_model.model.output.weight"][:-1]
    with pytest.raises(ValueError, match="vocabulary has"):
        load_official(model(), short, base)
