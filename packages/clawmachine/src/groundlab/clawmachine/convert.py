"""The release's weights in this package's layout.

ClawMachine ships two parts: LaVIT's visual tokenizer (one state dict: ``encoder.*`` (EVA-CLIP),
``token_predictor.*``, ``causal_encoder.*``, ``encode_task_layer.*``, ``quantize.embedding.weight``,
and pre-training / generation parts this model does not use: ``decoder.*``, ``decode_task_layer.*``,
``vit_proj.*``) and the LLM in LLaVA's layout (``model.embed_tokens``, ``model.layers.N...``,
``model.norm``, ``lm_head``; ``model.mm_projector.{0,2}`` when trained with the hybrid path; the
vision tower's own copy of the tokenizer under ``model.vision_tower.*``). :func:`convert_release`
maps both onto :class:`groundlab.clawmachine.modeling.ClawMachineForCausalLM`'s names (a key it does
not know is an error; the unused parts are reported, not loaded); :func:`load_release` loads the
result strictly: every weight of the model must be there, with its shape.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from groundlab.shared.loading import load_state, torch_load

logger = logging.getLogger("groundlab")

TOKENIZER_PARTS = ("encoder.", "token_predictor.", "causal_encoder.", "encode_task_layer.", "quantize.")
TOKENIZER_UNUSED = ("decoder.", "decode_task_layer.", "vit_proj.")
TOKENIZER_PREFIXES = ("model.vision_tower.vision_tower.visual_tokenizer.", "visual_tokenizer.", "module.")


def _load(source, what: str) -> dict[str, torch.Tensor]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no such file {path}")
        from safetensors.torch import load_file

        return load_file(path)
    return torch_load(path, what)


def convert_tokenizer(source, what: str = "LaVIT tokenizer") -> dict[str, torch.Tensor]:
    """LaVIT's tokenizer state dict (a path or the dict) -> ``visual_tokenizer.*`` tensors."""
    state = _load(source, what)
    out, unused = {}, []
    for key, value in state.items():
        for prefix in TOKENIZER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith(TOKENIZER_PARTS):
            out[f"visual_tokenizer.{key}"] = value
        elif key.startswith(TOKENIZER_UNUSED):
            unused.append(key)
        else:
            raise KeyError(f"{what}: unknown key {key!r} (expected {TOKENIZER_PARTS} or the unused {TOKENIZER_UNUSED})")
    if not out:
        raise ValueError(f"{what}: no tokenizer weights found (is this LaVIT's visual tokenizer?)")
    if "visual_tokenizer.feature_mean" not in out:  # the release reads the ViT's features as they are
        width = out["visual_tokenizer.encode_task_layer.0.weight"].shape[1]
        out["visual_tokenizer.feature_mean"] = torch.zeros(width)
        out["visual_tokenizer.feature_std"] = torch.ones(width)
    if unused:
        logger.info("%s: %d tensors of parts this model does not use (%s...) left out", what, len(unused), unused[0])
    return out


def convert_llm(source, what: str = "ClawMachine LLM") -> dict[str, torch.Tensor]:
    """The LLaVA-layout LLM state dict -> ``language_model.*`` (and ``mm_projector.*``) tensors; the
    vision tower's keys are skipped (the tokenizer comes from its own file)."""
    state = _load(source, what)
    out = {}
    for key, value in state.items():
        if key.startswith("model.vision_tower."):
            continue
        if key.startswith("model.mm_projector."):
            out["mm_projector." + key[len("model.mm_projector."):]] = value
        elif key.startswith(("model.", "lm_head.")):
            out["language_model." + key] = value
        else:
            raise KeyError(f"{what}: unknown key {key!r} (expected model.*, lm_head.* or model.mm_projector.*)")
    if "language_model.lm_head.weight" not in out:
        raise ValueError(f"{what}: no lm_head.weight (not a causal LM checkpoint?)")
    return out


def convert_release(tokenizer, llm=None) -> dict[str, torch.Tensor]:
    """Both parts (``llm`` optional: the tokenizer alone for tokenizer-only use)."""
    state = convert_tokenizer(tokenizer)
    return state | (convert_llm(llm) if llm is not None else {})


def load_release(model, state: dict[str, torch.Tensor], what: str = "converted ClawMachine weights") -> None:
    """Load :func:`convert_release`'s tensors into ``model`` strictly (tokenizer and LLM both given)."""
    load_state(model, state, what)


def save_converted(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the directory {path.parent} does not exist")
    torch.save(state, path)
    return path
