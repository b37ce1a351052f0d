"""The official checkpoint converters on state dicts built in the release's layouts."""

import math

import pytest
import torch

from groundlab.omg_llava.configuration import OMGLlavaConfig
from groundlab.omg_llava.convert import INTERNLM2_VOCAB, load_official, load_omg_seg, split_wqkv
from groundlab.omg_llava.modeling import OMGLlavaForCausalLM
from groundlab.omg_llava.omg_seg import OMGSegConfig, OMGSegModel
from groundlab.omg_llava.processing import IMAGE_TOKEN, SPECIAL_TOKENS

SEG = dict(image_size=64, dims=(16, 32, 64, 32), depths=(1, 1, 1, 1), dim=16, mask_dim=16, encoder_layers=1,
           encoder_heads=2, encoder_points=2, encoder_ffn=32, groups=8, num_queries=6, decoder_layers=2,
           decoder_heads=2, decoder_ffn=32, num_classes=12, classifier="linear")
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


def release_unshuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """The release's pixel shuffle as a definition: (B, C, H, W) -> (B, H/r * W/r, r * r * C), channels
    ordered (block row, block column, channel)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // r, r, w // r, r).permute(0, 3, 5, 1, 2, 4).flatten(1, 3).flatten(2).transpose(1, 2)


def test_converted_pixel_projector_reads_this_models_unshuffle_as_the_release_reads_its_own():
    from groundlab.omg_llava.perception import pixel_unshuffle

    m = model()
    base, off, _ = official_layout()
    load_official(m, dict(off), base)
    torch.manual_seed(1)
    x, prior = torch.randn(1, 32, 4, 4), torch.randn(1, 4, 32)  # the tiny segmenter's stride-32 map; 2x2 shuffle
    w, bias = off["projector.model.model_feat.0.weight"], off["projector.model.model_feat.0.bias"]
    release = torch.cat([release_unshuffle(x, 2), prior], -1) @ w.T + bias
    ours = m.projector.pixel_mlp[0](torch.cat([pixel_unshuffle(x, 2), prior], -1))
    assert torch.allclose(ours, release, atol=1e-5)
    # without the permutation the two would differ: the orders are not the same
    assert not torch.allclose(pixel_unshuffle(x, 2), release_unshuffle(x, 2))


def test_lm_head_lora_of_the_release_is_merged_into_the_trained_head():
    base, off, _ = official_layout()
    p = "llm.base_model.model.output."
    torch.manual_seed(2)
    head = off.pop(p + "weight")
    a, b = torch.randn(8, HID), torch.randn(INTERNLM2_VOCAB + 4, 8)
    with_lora = off | {p + "base_layer.weight": head, p + "lora_A.weight": a, p + "lora_B.weight": b}
    m = model()
    load_official(m, dict(with_lora), base)
    merged = head + 256 / 512 * b @ a
    got = m.llm.get_output_embeddings().weight
    assert torch.allclose(got[:INTERNLM2_VOCAB], merged[:INTERNLM2_VOCAB], atol=1e-5)
    assert torch.allclose(got[m.config.token_ids["[SEG]"]], merged[INTERNLM2_VOCAB], atol=1e-5)
    with pytest.raises(KeyError, match="lora_B.weight is missing"):
        load_official(model(), {k: v for k, v in with_lora.items() if k != p + "lora_B.weight"}, base)
    with pytest.raises(KeyError, match="found neither"):
        load_official(model(), {k: v for k, v in with_lora.items() if k != p + "base_layer.weight"}, base)
    with pytest.raises(KeyError, match="must hold the trained LM head once"):
        load_official(model(), with_lora | {p + "weight": head}, base)


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


# ----------------------------------------------------------------------------------------------
# the OMG-Seg checkpoint (mmdet / open_clip names) and the CLIP class embeddings

CLIP_SEG = SEG | dict(classifier="clip", class_embed_dim=8, class_prototypes=2)


def official_seg_layout(cfg, seed=0):
    """A state dict named and shaped as the release's ``omg_seg_convl.pth``, written from its module
    layout (open_clip's ConvNeXt trunk as ``backbone.layerN``, mmdet's pixel decoder and decoder)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {}

    def lin(name, o, i):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = r(o, i), r(o)

    def norm(name, d):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = r(d), r(d)

    dims, depths, d, md = cfg["dims"], cfg["depths"], cfg["dim"], cfg["mask_dim"]
    sd["backbone.stem.0.weight"], sd["backbone.stem.0.bias"] = r(dims[0], 3, 4, 4), r(dims[0])
    norm("backbone.stem.1", dims[0])
    for i in range(4):
        stage = f"backbone.layer{i + 1}"
        if i:
            norm(f"{stage}.downsample.0", dims[i - 1])
            sd[f"{stage}.downsample.1.weight"], sd[f"{stage}.downsample.1.bias"] = r(dims[i], dims[i - 1], 2, 2), r(dims[i])
        for j in range(depths[i]):
            b, c = f"{stage}.blocks.{j}", dims[i]
            sd[f"{b}.conv_dw.weight"], sd[f"{b}.conv_dw.bias"] = r(c, 1, 7, 7), r(c)
            norm(f"{b}.norm", c)
            lin(f"{b}.mlp.fc1", 4 * c, c)
            lin(f"{b}.mlp.fc2", c, 4 * c)
            sd[f"{b}.gamma"] = r(c)
    norm("backbone.head.0.norm", dims[3])  # CLIP's image head: in the checkpoint, unused by OMG-LLaVA
    lin("backbone.head.1.mlp.fc1", 8, dims[3])
    pd = "panoptic_head.pixel_decoder"
    for i, c in enumerate(reversed(dims[1:])):
        sd[f"{pd}.input_convs.{i}.conv.weight"], sd[f"{pd}.input_convs.{i}.conv.bias"] = r(d, c, 1, 1), r(d)
        norm(f"{pd}.input_convs.{i}.gn", d)
    sd[f"{pd}.level_encoding.weight"] = r(3, d)
    heads, pts = cfg["encoder_heads"], cfg["encoder_points"]
    for i in range(cfg["encoder_layers"]):
        e = f"{pd}.encoder.layers.{i}"
        lin(f"{e}.self_attn.sampling_offsets", heads * 3 * pts * 2, d)
        lin(f"{e}.self_attn.attention_weights", heads * 3 * pts, d)
        lin(f"{e}.self_attn.value_proj", d, d)
        lin(f"{e}.self_attn.output_proj", d, d)
        lin(f"{e}.ffn.layers.0.0", cfg["encoder_ffn"], d)
        lin(f"{e}.ffn.layers.1", d, cfg["encoder_ffn"])
        norm(f"{e}.norms.0", d)
        norm(f"{e}.norms.1", d)
    sd[f"{pd}.lateral_convs.0.conv.weight"] = r(d, dims[0], 1, 1)
    norm(f"{pd}.lateral_convs.0.gn", d)
    sd[f"{pd}.output_convs.0.conv.weight"] = r(d, d, 3, 3)
    norm(f"{pd}.output_convs.0.gn", d)
    sd[f"{pd}.mask_feature.weight"], sd[f"{pd}.mask_feature.bias"] = r(md, d, 1, 1), r(md)
    td = "panoptic_head.transformer_decoder"
    for i in range(cfg["decoder_layers"]):
        for attn in ("self_attn", "cross_attn"):
            a = f"{td}.layers.{i}.{attn}.attn"
            sd[f"{a}.in_proj_weight"], sd[f"{a}.in_proj_bias"] = r(3 * d, d), r(3 * d)
            lin(f"{a}.out_proj", d, d)
        lin(f"{td}.layers.{i}.ffn.layers.0.0", cfg["decoder_ffn"], d)
        lin(f"{td}.layers.{i}.ffn.layers.1", d, cfg["decoder_ffn"])
        for k in range(3):
            norm(f"{td}.layers.{i}.norms.{k}", d)
    norm(f"{td}.post_norm", d)
    h = "panoptic_head"
    sd[f"{h}.query_feat.weight"], sd[f"{h}.query_embed.weight"] = r(cfg["num_queries"], d), r(cfg["num_queries"], d)
    sd[f"{h}.level_embed.weight"] = r(3, d)
    for name, out in (("mask_embed", md), ("iou_embed", 1), ("cls_proj", cfg["class_embed_dim"])):
        lin(f"{h}.{name}.0", d, d)
        lin(f"{h}.{name}.2", d, d)
        lin(f"{h}.{name}.4", out, d)
    norm(f"{h}.mask_pooling_proj.0", d)
    lin(f"{h}.mask_pooling_proj.1", d, d)
    sd[f"{h}.mask_tokens.weight"], sd[f"{h}.pb_embedding.weight"] = r(1, d), r(2, d)
    lin(f"{h}.pos_linear", d, 2 * d)
    text = torch.nn.functional.normalize(r(cfg["num_classes"], cfg["class_prototypes"], cfg["class_embed_dim"]), dim=-1)
    return sd, text


def coordinate_encoding_by_hand(cxcywh, feats):
    """The DETR-family encoding written out per coordinate: y, x, w, h blocks of interleaved sin / cos."""
    out = []
    for c in (1, 0, 2, 3):
        for k in range(feats):
            angle = cxcywh[c] * 2 * math.pi / 10000 ** (2 * (k // 2) / feats)
            out.append(math.sin(angle) if k % 2 == 0 else math.cos(angle))
    return torch.tensor(out)


def test_omg_seg_checkpoint_loads_strictly_and_computes_as_the_release():
    sd, text = official_seg_layout(CLIP_SEG)
    seg = OMGSegModel(OMGSegConfig(**CLIP_SEG)).eval()
    unused = load_omg_seg(seg, dict(sd), text)
    assert sorted(unused) == sorted(k for k in sd if k.startswith("backbone.head."))
    # spot checks of the renames: stage index shift, norm order, MLP indices, embeddings
    assert torch.equal(seg.backbone.stages[1].blocks[0].gamma, sd["backbone.layer2.blocks.0.gamma"])
    assert torch.equal(seg.pixel_decoder.layers[0].norm2.bias, sd["panoptic_head.pixel_decoder.encoder.layers.0.norms.1.bias"])
    assert torch.equal(seg.pixel_decoder.input_proj[2][1].weight, sd["panoptic_head.pixel_decoder.input_convs.2.gn.weight"])
    assert torch.equal(seg.decoder.layers[1].norm_ffn.weight, sd["panoptic_head.transformer_decoder.layers.1.norms.2.weight"])
    assert torch.equal(seg.decoder.mask_embed.layers[2].weight, sd["panoptic_head.mask_embed.4.weight"])
    assert torch.equal(seg.prompt_encoder.prompt_embed.weight, sd["panoptic_head.pb_embedding.weight"])
    assert torch.equal(seg.decoder.class_embeddings[:-1], text) and not seg.decoder.class_embeddings[-1].any()
    # the classifier as the release computes it: mask-pooled features + normed query -> cls_proj -> cosine
    # to the text embeddings, max over prototypes, x exp(4.6052); the background row scores 0
    with torch.no_grad():
        enc = seg.encode(torch.randn(1, 3, 64, 64))
        pred = seg.decode(enc)[-1]
        dec = seg.decoder
        normed = dec.decoder_norm(pred.query)
        m = (pred.mask_logits > 0).float()
        pooled = torch.einsum("bchw,bnhw->bnc", enc["mask_features"], m / (m.sum((-2, -1), keepdim=True) + 1e-8))
        emb = torch.nn.functional.normalize(dec.cls_proj(dec.mask_pooling_proj(pooled) + normed), dim=-1)
        want = math.exp(4.6052) * torch.stack([(emb @ text[:, p].T) for p in range(2)], -1).amax(-1)
        assert torch.allclose(pred.class_logits[..., :-1], want, atol=1e-3)
        assert torch.allclose(pred.class_logits[..., -1], torch.zeros(1), atol=1e-6)
        # a point prompt's positional query: pos_linear of the encoding of the +-3 px box's cxcywh
        _, pos = seg.prompt_queries("point", torch.tensor([[[10.0, 20.0]]]))
        enc_hand = coordinate_encoding_by_hand([10 / 64, 20 / 64, 6 / 64, 6 / 64], CLIP_SEG["dim"] // 2)
        want_pos = sd["panoptic_head.pos_linear.weight"] @ enc_hand + sd["panoptic_head.pos_linear.bias"]
        assert torch.allclose(pos[0, 0], want_pos, atol=1e-4)


def test_omg_seg_loader_refuses_what_does_not_fit():
    sd, text = official_seg_layout(CLIP_SEG)
    with pytest.raises(KeyError, match="class embeddings"):
        load_omg_seg(OMGSegModel(OMGSegConfig(**CLIP_SEG)), dict(sd))  # the clip classifier needs them
    with pytest.raises(KeyError, match="no place in this model"):
        load_omg_seg(OMGSegModel(OMGSegConfig(**CLIP_SEG)), sd | {"panoptic_head.adapter.weight": torch.zeros(1)}, text)
    with pytest.raises(KeyError, match="not in the checkpoint"):
        load_omg_seg(OMGSegModel(OMGSegConfig(**CLIP_SEG)),
                     {k: v for k, v in sd.items() if "layers.1.norms.2" not in k}, text)
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        load_omg_seg(OMGSegModel(OMGSegConfig(**(CLIP_SEG | dict(num_queries=5)))), dict(sd), text)
    with pytest.raises(ValueError, match="unit norm"):
        load_omg_seg(OMGSegModel(OMGSegConfig(**CLIP_SEG)), dict(sd), text * 2)
    # the same checkpoint nested under the LLaVA model's prefix, and an open_clip-named backbone
    nested = {f"visual_encoder.{k}": v for k, v in sd.items()}
    load_omg_seg(OMGSegModel(OMGSegConfig(**CLIP_SEG)), nested, text, prefix="visual_encoder.")
    renamed = {k.replace("backbone.layer2.", "visual.trunk.stages.1."): v for k, v in sd.items()}
    seg = OMGSegModel(OMGSegConfig(**CLIP_SEG))
    load_omg_seg(seg, renamed, text)
    assert torch.equal(seg.backbone.stages[1].blocks[0].conv_dw.weight, sd["backbone.layer2.blocks.0.conv_dw.weight"])


def test_omg_seg_directory_round_trip(tmp_path):
    from groundlab.omg_llava.convert import convert_omg_seg_to_dir

    sd, text = official_seg_layout(CLIP_SEG)
    torch.save({"state_dict": sd}, tmp_path / "omg_seg.pth")
    torch.save(text, tmp_path / "text.pth")
    cfg = OMGSegConfig(**(CLIP_SEG | dict(class_prototypes=1, class_embed_dim=4)))  # taken from the file instead
    out = convert_omg_seg_to_dir(tmp_path / "omg_seg.pth", tmp_path / "text.pth", tmp_path / "seg", config=cfg)
    seg = OMGSegModel.from_pretrained(out)
    assert seg.config.class_prototypes == 2 and seg.config.class_embed_dim == 8
    assert torch.equal(seg.decoder.class_embeddings[:-1], text)
    assert torch.equal(seg.pixel_decoder.mask_features.weight, sd["panoptic_head.pixel_decoder.mask_feature.weight"])
