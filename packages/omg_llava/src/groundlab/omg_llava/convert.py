"""Official OMG-LLaVA checkpoints -> this model, with an explicit key map and a strict load.

The release ships its trained parts as one ``.pth`` (the xtuner model's reduced ``state_dict``):

- ``llm.base_model.model.model.tok_embeddings.weight`` and ``llm.base_model.model.output.weight`` (fully
  trained vocabulary and LM head, InternLM2 names);
- the LLM's LoRA: ``llm.base_model.model.<InternLM2 module>.lora_A.weight`` / ``lora_B.weight`` on every
  Linear (r 512, alpha 256);
- the projector: ``projector.model.query_proj``, ``projector.model.model.{0,2}`` (object-centric MLP),
  ``projector.model.model_feat.{0,2}`` (pixel-centric MLP), ``projector.model.seperate_embed``;
- ``projector_text2vision.model.{0,2}``.

Two layouts differ from this model's and are rearranged, not just renamed:

- **the pixel-unshuffle channel order**: the release folds each r x r block of the stride-32 features
  into channels with a reshape / permute that orders them (i, j, c) (block row, block column,
  channel); ``F.pixel_unshuffle`` here orders them (c, i, j). The first ``C * r * r`` input columns of
  the pixel-centric MLP's first layer are permuted accordingly (:func:`unshuffle_columns`; the
  perception prior's columns after them keep their order).
- **the LM head's LoRA**: the release picks LoRA targets by searching every Linear and skipping
  ``lm_head`` / ``output_layer``, names InternLM2's head does not have, so its ``output`` carries a
  LoRA too. The trained head is then saved as ``output.base_layer.weight`` (or ``output.weight`` with an
  older peft) beside ``output.lora_A`` / ``lora_B``; both forms are read, and the head's LoRA is merged
  into the trained head (not into the InternLM2 base's, which lacks the added tokens' rows).

The frozen InternLM2 base comes from its own checkpoint (HF names ``model.tok_embeddings``,
``model.layers.N.attention.wqkv`` ...). InternLM2 is described here by an equivalent Llama config, so
its fused ``wqkv`` is split into ``q_proj`` / ``k_proj`` / ``v_proj`` (grouped layout: per key-value
head, its query heads, then its key, then its value), and the LoRA deltas are merged into the base
weights before the split (``W + alpha / r * B @ A``).

Vocabulary: the release adds ``[SEG]``, ``<p>``, ``</p>``, ``<region>`` after InternLM2's 92,544 tokens
and resizes, then adds ``<mark>`` without resizing again (so ``<mark>`` has no row there). Rows are
moved to this tokenizer's ids (``config.token_ids``); ``<mark>`` and ``<image>`` (a placeholder the
release never embeds) start at the mean of the base rows, which is reported.

Every key of the inputs is consumed or the conversion raises; the result loads with ``strict=True``
(the segmenter comes from its own checkpoint, see ``OMGSegModel.from_pretrained``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from groundlab.shared.loading import load_state, torch_load

from .modeling import OMGLlavaForCausalLM
from .processing import IMAGE_TOKEN

OFFICIAL_ADDED = ("[SEG]", "<p>", "</p>", "<region>")  # in the order the release adds them
INTERNLM2_VOCAB = 92544

PROJECTOR_MAP = {
    r"projector\.model\.query_proj\.(weight|bias)": r"projector.query_proj.\1",
    r"projector\.model\.model\.(0|2)\.(weight|bias)": r"projector.object_mlp.\1.\2",
    r"projector\.model\.model_feat\.(0|2)\.(weight|bias)": r"projector.pixel_mlp.\1.\2",
    r"projector\.model\.seperate_embed\.weight": r"projector.separator.weight",
    r"projector_text2vision\.model\.(0|2)\.(weight|bias)": r"text2vision.\1.\2",
}

LAYER_MAP = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def split_wqkv(w: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's fused (kv_heads * (groups + 2) * head_dim, in) weight -> q, k, v weights."""
    groups = num_heads // num_kv_heads
    head_dim = w.shape[0] // (num_kv_heads * (groups + 2))
    if head_dim * num_kv_heads * (groups + 2) != w.shape[0]:
        raise ValueError(f"wqkv has {w.shape[0]} rows, not a multiple of {num_kv_heads} x ({groups} + 2) heads")
    g = w.reshape(num_kv_heads, groups + 2, head_dim, w.shape[1])
    q = g[:, :groups].reshape(num_heads * head_dim, -1)
    return q, g[:, -2].reshape(num_kv_heads * head_dim, -1), g[:, -1].reshape(num_kv_heads * head_dim, -1)


def internlm2_to_llama(base: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """An InternLM2 HF state dict (``model.*``, ``output.weight``) -> Llama names, every key consumed."""
    out, left = {}, dict(base)
    for key in list(left):
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
        if m:
            i, name = m.groups()
            w = left.pop(key)
            if name == "attention.wqkv":
                q, k, v = split_wqkv(w, num_heads, num_kv_heads)
                out |= {f"model.layers.{i}.self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))}
            elif name in LAYER_MAP:
                out[f"model.layers.{i}.{LAYER_MAP[name]}.weight"] = w
            else:
                raise KeyError(f"InternLM2 weight {key} has no Llama counterpart")
    for src, dst in (("model.tok_embeddings.weight", "model.embed_tokens.weight"), ("model.norm.weight", "model.norm.weight"),
                     ("output.weight", "lm_head.weight")):
        if src not in left:
            raise KeyError(f"InternLM2 checkpoint lacks {src}")
        out[dst] = left.pop(src)
    if left:
        raise KeyError(f"InternLM2 weights not converted: {sorted(left)[:5]}")
    return out


def merge_lora(base: dict[str, torch.Tensor], official: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold the release's LoRA (``llm.base_model.model.<name>.lora_{A,B}.weight``) into the InternLM2 base
    (HF names); consumes the LoRA keys from ``official``."""
    merged = dict(base)
    prefix = "llm.base_model.model."
    for key in [k for k in official if k.endswith(".lora_A.weight")]:
        name = key[len(prefix):-len(".lora_A.weight")]
        b_key = f"{prefix}{name}.lora_B.weight"
        if b_key not in official:
            raise KeyError(f"{key} has no matching {b_key}")
        if f"{name}.weight" not in merged:
            raise KeyError(f"LoRA {key} targets {name}.weight, absent from the InternLM2 base")
        a, b = official.pop(key).float(), official.pop(b_key).float()
        w = merged[f"{name}.weight"]
        merged[f"{name}.weight"] = (w.float() + scale * (b @ a)).to(w.dtype)
    stray = [k for k in official if ".lora_" in k]
    if stray:
        raise KeyError(f"LoRA weights without a pair: {stray[:5]}")
    return merged


def unshuffle_columns(weight: torch.Tensor, channels: int, factor: int) -> torch.Tensor:
    """A Linear's weight whose first ``channels * factor**2`` input columns read the release's
    pixel-unshuffled features ((i, j, c) order) -> the same map on ``F.pixel_unshuffle``'s (c, i, j)
    order; the columns after them are kept."""
    n = channels * factor * factor
    if weight.shape[1] < n:
        raise ValueError(f"a weight of {weight.shape[1]} input columns cannot read {channels} x {factor}^2 "
                         f"unshuffled channels")
    k = torch.arange(n)
    c, i, j = k // (factor * factor), (k // factor) % factor, k % factor
    release = (i * factor + j) * channels + c  # where the release keeps what column k of this model reads
    return torch.cat([weight[:, release], weight[:, n:]], 1)


def move_vocab_rows(rows: torch.Tensor, token_ids: dict[str, int], vocab: int) -> tuple[torch.Tensor, list[str]]:
    """The release's (92548, D) rows -> (vocab, D) rows at this tokenizer's ids; tokens the release has no
    row for start at the mean of the base rows (returned by name)."""
    n_official = INTERNLM2_VOCAB + len(OFFICIAL_ADDED)
    if rows.shape[0] != n_official:
        raise ValueError(f"the release's vocabulary has {n_official} rows, this checkpoint {rows.shape[0]}")
    if any(not INTERNLM2_VOCAB <= i < vocab for i in token_ids.values()):
        raise ValueError(f"special token ids {token_ids} must follow InternLM2's {INTERNLM2_VOCAB} tokens, "
                         f"within the {vocab} rows")
    out = rows[:INTERNLM2_VOCAB].mean(0, keepdim=True).repeat(vocab, 1)
    out[:INTERNLM2_VOCAB] = rows[:INTERNLM2_VOCAB]
    for i, tok in enumerate(OFFICIAL_ADDED):
        out[token_ids[tok]] = rows[INTERNLM2_VOCAB + i]
    return out, [t for t in token_ids if t not in OFFICIAL_ADDED]


def convert_official(official: dict[str, torch.Tensor], internlm2: dict[str, torch.Tensor], model: OMGLlavaForCausalLM,
                     lora_r: int = 512, lora_alpha: int = 256) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The release's ``.pth`` + the InternLM2 base -> this model's ``llm.*``, ``projector.*`` and
    ``text2vision.*`` weights. Returns (state dict, tokens whose rows were initialised here)."""
    official = dict(official)
    text = model.config.text_config
    out = {}
    for key in list(official):
        for pattern, repl in PROJECTOR_MAP.items():
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = official.pop(key)
                break
    pixel = "projector.pixel_mlp.0.weight"
    if pixel in out:
        prior = model.config.query_dim
        out[pixel] = unshuffle_columns(out[pixel], (out[pixel].shape[1] - prior) // model.config.shuffle**2,
                                       model.config.shuffle)
    embed = official.pop("llm.base_model.model.model.tok_embeddings.weight", None)
    head = _trained_head(official, lora_alpha / lora_r)
    if embed is None:
        raise KeyError("the checkpoint lacks the trained vocabulary (llm.base_model.model.model.tok_embeddings.weight)")
    base = merge_lora(internlm2, official, lora_alpha / lora_r)
    if official:
        raise KeyError(f"official keys with no place in this model: {sorted(official)[:8]}")
    llm = internlm2_to_llama(base, text.num_attention_heads, text.num_key_value_heads)
    ids = {t: model.config.token_ids[t] for t in (*OFFICIAL_ADDED, "<mark>", IMAGE_TOKEN)}
    llm["model.embed_tokens.weight"], filled = move_vocab_rows(embed, ids, text.vocab_size)
    llm["lm_head.weight"], _ = move_vocab_rows(head, ids, text.vocab_size)
    out |= {f"llm.{k}": v for k, v in llm.items()}
    return out, filled


def _trained_head(official: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """The release's trained LM head (``output.weight`` or peft's ``output.base_layer.weight``) with its
    own LoRA merged when it has one; consumes those keys."""
    p = "llm.base_model.model.output."
    found = [k for k in (p + "weight", p + "base_layer.weight") if k in official]
    if len(found) != 1:
        raise KeyError(f"the checkpoint must hold the trained LM head once, as {p}weight or "
                       f"{p}base_layer.weight; found {found or 'neither'}")
    head = official.pop(found[0])
    lora = [k in official for k in (p + "lora_A.weight", p + "lora_B.weight")]
    if any(lora) and not all(lora):
        raise KeyError(f"the LM head's LoRA is incomplete: {p}lora_{'AB'[lora.index(False)]}.weight is missing")
    if all(lora):
        a, b = official.pop(p + "lora_A.weight").float(), official.pop(p + "lora_B.weight").float()
        if b.shape[0] != head.shape[0] or a.shape[1] != head.shape[1]:
            raise ValueError(f"the LM head's LoRA {tuple(b.shape)} @ {tuple(a.shape)} does not fit the head "
                             f"{tuple(head.shape)}")
        head = (head.float() + scale * (b @ a)).to(head.dtype)
    return head


def load_official(model: OMGLlavaForCausalLM, official: str | Path | dict, internlm2: dict[str, torch.Tensor],
                  lora_r: int = 512, lora_alpha: int = 256) -> list[str]:
    """Convert and load strictly (the segmenter's weights are kept: they come from the OMG-Seg
    checkpoint). Returns the tokens whose rows were initialised here."""
    if not isinstance(official, dict):
        official = torch_load(official, "OMG-LLaVA checkpoint")
        official = official.get("state_dict", official)
    converted, filled = convert_official(official, internlm2, model, lora_r, lora_alpha)
    own = model.state_dict()
    full = {k: v for k, v in own.items() if k.startswith("segmenter.")}
    for k, v in converted.items():
        if k not in own:
            raise KeyError(f"converted key {k} is not a parameter of this model")
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: converted {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        full[k] = v
    load_state(model, full, "the converted OMG-LLaVA checkpoint")
    return filled


# ----------------------------------------------------------------------------------------------
# the segmenter: the release's OMG-Seg checkpoint (mmdet names) + its CLIP class embeddings

# ``omg_seg_convl.pth`` (``state_dict``): ``backbone.*`` (open_clip's ConvNeXt-L trunk: ``stem``, stages
# as ``layer1``..``layer4``, and the CLIP image head ``head.*``) and ``panoptic_head.*`` (mmdet's
# MSDeformAttnPixelDecoder and Mask2Former decoder, the open-vocabulary classifier, the prompt
# embeddings). A backbone saved by open_clip itself (``visual.trunk.stem``, ``visual.trunk.stages.N``)
# is accepted too. ``(pattern, replacement)``, matched in full, first match wins.
_PD = r"panoptic_head\.pixel_decoder\."
_TD = r"panoptic_head\.transformer_decoder\."
_W = r"(weight|bias)"
SEG_KEY_MAP = [
    (r"(?:backbone|visual\.trunk)\.stem\.([01])\." + _W, r"backbone.stem.\1.\2"),
    (r"backbone\.layer([1-4])\.(.+)", lambda m: f"backbone.stages.{int(m[1]) - 1}.{m[2]}"),
    (r"visual\.trunk\.stages\.([0-3])\.(.+)", r"backbone.stages.\1.\2"),
    (_PD + r"input_convs\.(\d)\.conv\." + _W, r"pixel_decoder.input_proj.\1.0.\2"),
    (_PD + r"input_convs\.(\d)\.gn\." + _W, r"pixel_decoder.input_proj.\1.1.\2"),
    (_PD + r"level_encoding\.weight", r"pixel_decoder.level_embed"),
    (_PD + r"encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\." + _W,
     r"pixel_decoder.layers.\1.self_attn.\2.\3"),
    (_PD + r"encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\." + _W, r"pixel_decoder.layers.\1.linear1.\2"),
    (_PD + r"encoder\.layers\.(\d+)\.ffn\.layers\.1\." + _W, r"pixel_decoder.layers.\1.linear2.\2"),
    (_PD + r"encoder\.layers\.(\d+)\.norms\.([01])\." + _W, lambda m: f"pixel_decoder.layers.{m[1]}.norm{int(m[2]) + 1}.{m[3]}"),
    (_PD + r"lateral_convs\.0\.conv\.weight", r"pixel_decoder.lateral_conv.0.weight"),
    (_PD + r"lateral_convs\.0\.gn\." + _W, r"pixel_decoder.lateral_conv.1.\1"),
    (_PD + r"output_convs\.0\.conv\.weight", r"pixel_decoder.output_conv.0.weight"),
    (_PD + r"output_convs\.0\.gn\." + _W, r"pixel_decoder.output_conv.1.\1"),
    (_PD + r"mask_feature\." + _W, r"pixel_decoder.mask_features.\1"),
    (_TD + r"layers\.(\d+)\.(self_attn|cross_attn)\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     r"decoder.layers.\1.\2.\3"),
    (_TD + r"layers\.(\d+)\.ffn\.layers\.0\.0\." + _W, r"decoder.layers.\1.linear1.\2"),
    (_TD + r"layers\.(\d+)\.ffn\.layers\.1\." + _W, r"decoder.layers.\1.linear2.\2"),
    (_TD + r"layers\.(\d+)\.norms\.([012])\." + _W,
     lambda m: f"decoder.layers.{m[1]}.{('norm_cross', 'norm_self', 'norm_ffn')[int(m[2])]}.{m[3]}"),
    (_TD + r"post_norm\." + _W, r"decoder.decoder_norm.\1"),
    (r"panoptic_head\.(query_feat|query_embed|level_embed)\.weight", r"decoder.\1.weight"),
    (r"panoptic_head\.(mask_embed|iou_embed|cls_proj)\.([024])\." + _W,
     lambda m: f"decoder.{m[1]}.layers.{int(m[2]) // 2}.{m[3]}"),
    (r"panoptic_head\.mask_pooling_proj\.([01])\." + _W, r"decoder.mask_pooling_proj.\1.\2"),
    (r"panoptic_head\.mask_tokens\.weight", r"prompt_encoder.mask_token.weight"),
    (r"panoptic_head\.pb_embedding\.weight", r"prompt_encoder.prompt_embed.weight"),
    (r"panoptic_head\.pos_linear\." + _W, r"prompt_encoder.pos_proj.\1"),
]
# in the checkpoint, not in this model, on purpose: CLIP's image-embedding head (global pool, norm, MLP
# into the joint space) - OMG-LLaVA uses the stage features only; open_clip's text tower and logit scale
SEG_UNUSED = (r"backbone\.head\..+", r"visual\.trunk\.head\..+", r"visual\.head\..+", r"(text|transformer|token_embedding|"
              r"positional_embedding|ln_final|text_projection|logit_scale).*")


def convert_omg_seg(checkpoint: dict[str, torch.Tensor], class_embeddings: torch.Tensor | None = None,
                    prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """The release's OMG-Seg ``state_dict`` (optionally under ``prefix``, e.g. ``"visual_encoder."``) ->
    ``OMGSegModel`` keys. ``class_embeddings``: the release's CLIP text embeddings of the class names
    (``convnext_large_d_320_CocoPanopticOVDataset.pth``: (classes, prototypes, E), unit norm); a zero
    background row is appended, as the release does. Returns (state dict, the keys left out on purpose).
    A key that matches neither the map nor ``SEG_UNUSED`` raises."""
    out, unused, unknown = {}, [], []
    for key, value in checkpoint.items():
        if prefix:
            if not key.startswith(prefix):
                unknown.append(key)
                continue
            key = key[len(prefix):]
        for pattern, repl in SEG_KEY_MAP:
            m = re.fullmatch(pattern, key)
            if m:
                out[m.expand(repl) if isinstance(repl, str) else repl(m)] = value
                break
        else:
            (unused if any(re.fullmatch(p, key) for p in SEG_UNUSED) else unknown).append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} OMG-Seg checkpoint keys have no place in this model, e.g. {sorted(unknown)[:6]}")
    if class_embeddings is not None:
        if class_embeddings.dim() != 3:
            raise ValueError(f"class embeddings must be (classes, prototypes, dim), got {tuple(class_embeddings.shape)}")
        norms = class_embeddings.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise ValueError("class embeddings must have unit norm (the release's text embeddings do)")
        background = class_embeddings.new_zeros(1, *class_embeddings.shape[1:])
        out["decoder.class_embeddings"] = torch.cat([class_embeddings, background]).float()
    return out, unused


def load_omg_seg(model, checkpoint: str | Path | dict, class_embeddings: str | Path | torch.Tensor | None = None,
                 prefix: str = "") -> list[str]:
    """Convert the release's OMG-Seg checkpoint and load it into ``model`` (an ``OMGSegModel``) with
    ``strict=True``: every parameter and buffer of the model must come from the checkpoint (the class
    embeddings too, when its classifier is ``"clip"``). Returns the checkpoint keys left out on purpose."""
    if not isinstance(checkpoint, dict):
        checkpoint = torch_load(checkpoint, "OMG-Seg checkpoint")
        checkpoint = checkpoint.get("state_dict", checkpoint)
    if class_embeddings is not None and not isinstance(class_embeddings, torch.Tensor):
        class_embeddings = torch_load(class_embeddings, "class embeddings file", expect=torch.Tensor)
    converted, unused = convert_omg_seg(checkpoint, class_embeddings, prefix)
    own = model.state_dict()
    for k, v in converted.items():
        if k not in own:
            raise KeyError(f"converted key {k} is not in this segmenter (its config does not match the checkpoint)")
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}: the segmenter config "
                             "does not match the checkpoint")
    missing = sorted(set(own) - set(converted))
    if missing:
        raise KeyError(f"{len(missing)} segmenter weights are not in the checkpoint, e.g. {missing[:6]}"
                       + (" (pass the class embeddings file)" if "decoder.class_embeddings" in missing else ""))
    load_state(model, converted, "the converted OMG-Seg checkpoint")
    return unused


def convert_omg_seg_to_dir(checkpoint: str | Path | dict, class_embeddings: str | Path | torch.Tensor, out: str | Path,
                           config=None, prefix: str = "") -> Path:
    """The release's OMG-Seg checkpoint + class embeddings -> an ``OMGSegModel`` directory (what
    ``segmenter.pretrained`` of a run config names). ``config``: an ``OMGSegConfig`` (the release's by
    default; its number of prototypes is taken from the embeddings)."""
    from .omg_seg import OMGSegConfig, OMGSegModel

    if not isinstance(class_embeddings, torch.Tensor):
        class_embeddings = torch_load(class_embeddings, "class embeddings file", expect=torch.Tensor)
    config = config or OMGSegConfig()
    if class_embeddings.dim() == 3:
        config.num_classes, config.class_prototypes, config.class_embed_dim = class_embeddings.shape
    model = OMGSegModel(config)
    unused = load_omg_seg(model, checkpoint, class_embeddings, prefix)
    model.save_pretrained(out)
    print(f"OMG-Seg -> {out} ({len(unused)} checkpoint keys not used: CLIP's image head)")
    return Path(out)
