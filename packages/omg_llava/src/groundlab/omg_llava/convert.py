"""Official OMG-LLaVA checkpoints -> this model, with an explicit key map and a strict load.

The release ships its trained parts as one ``.pth`` (the xtuner model's reduced ``state_dict``):

- ``llm.base_model.model.model.tok_embeddings.weight`` and ``llm.base_model.model.output.weight`` (fully
  trained vocabulary and LM head, InternLM2 names);
- the LLM's LoRA: ``llm.base_model.model.<InternLM2 module>.lora_A.weight`` / ``lora_B.weight`` on every
  Linear (r 512, alpha 256);
- the projector: ``projector.model.query_proj``, ``projector.model.model.{0,2}`` (object-centric MLP),
  ``projector.model.model_feat.{0,2}`` (pixel-centric MLP), ``projector.model.seperate_embed``;
- ``projector_text2vision.model.{0,2}``.

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

from .modeling import IMAGE_TOKEN, OMGLlavaForCausalLM

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
    embed = official.pop("llm.base_model.model.model.tok_embeddings.weight", None)
    head = official.pop("llm.base_model.model.output.weight", None)
    if embed is None or head is None:
        raise KeyError("the checkpoint lacks the trained vocabulary (tok_embeddings) or LM head (output)")
    base = merge_lora(internlm2, official, lora_alpha / lora_r)
    if official:
        raise KeyError(f"official keys with no place in this model: {sorted(official)[:8]}")
    llm = internlm2_to_llama(base, text.num_attention_heads, text.num_key_value_heads)
    ids = {t: model.config.token_ids[t] for t in (*OFFICIAL_ADDED, "<mark>", IMAGE_TOKEN)}
    llm["model.embed_tokens.weight"], filled = move_vocab_rows(embed, ids, text.vocab_size)
    llm["lm_head.weight"], _ = move_vocab_rows(head, ids, text.vocab_size)
    out |= {f"llm.{k}": v for k, v in llm.items()}
    return out, filled


def load_official(model: OMGLlavaForCausalLM, official: str | Path | dict, internlm2: dict[str, torch.Tensor],
                  lora_r: int = 512, lora_alpha: int = 256) -> list[str]:
    """Convert and load strictly (the segmenter's weights are kept: they come from the OMG-Seg
    checkpoint). Returns the tokens whose rows were initialised here."""
    if not isinstance(official, dict):
        official = torch.load(official, map_location="cpu", weights_only=True)
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
    model.load_state_dict(full, strict=True)
    return filled
