"""Loading the released IVM checkpoint (and SAM's) into :class:`groundlab.ivm.modeling.IVMModel`.

The release's ``.pth`` is the state dict of its IVM module, holding what IVM trained: the LLaVA LoRA
(wrapped by peft under ``prompt_encoder.model.base_model.model.``), the condition MLP
(``prompt_encoder.text_proj.fc1/fc2``) and the conditioned mask decoder (``mask_decoder.*``); it may
also hold the frozen parts (``image_encoder.*``, the LLaVA base weights). The release was loaded
non-strictly, so LoRA keys that newer transformers name differently (``language_model.model.layers``
became ``model.language_model.layers``) were silently skipped. Here every key is mapped explicitly;
a key that maps nowhere, a trained parameter the checkpoint lacks, or a shape mismatch is an error
that names the keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from groundlab.shared.loading import load_partial, torch_load

from .modeling import IVMModel

LMM_PREFIX = "prompt_encoder.model.base_model.model."

# llava-hf keys of transformers < 4.52 -> this version's LlavaForConditionalGeneration
_LLAVA_RENAMES = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
)

_DECODER_RENAMES = (
    (r"^mask_decoder\.output_hypernetworks_mlps\.", "generator.output_hypernetwork."),
    (r"^mask_decoder\.", "generator."),
)


def load_part(module: torch.nn.Module, state: dict[str, torch.Tensor], required: list[str], what: str) -> None:
    """Load ``state`` into part of ``module`` (see :func:`groundlab.shared.loading.load_partial`)."""
    load_partial(module, state, required, what)


def map_key(key: str) -> str | None:
    """The name of an official key in this model (None: not an IVM key)."""
    if key.startswith(LMM_PREFIX):
        rest = key[len(LMM_PREFIX):]
        for pattern, new in _LLAVA_RENAMES:
            rest = re.sub(pattern, new, rest)
        rest = re.sub(r"\.lora_([AB])\.default\.", r".lora_\1.generator.", rest)
        return "lmm." + rest
    if key.startswith("prompt_encoder.text_proj."):
        return "condition_proj." + key[len("prompt_encoder.text_proj."):]
    if key.startswith("mask_decoder."):
        for pattern, new in _DECODER_RENAMES:
            if re.match(pattern, key):
                return re.sub(pattern, new, key)
    if key.startswith("image_encoder."):
        return key
    return None


def trained_keys(model: IVMModel, role: str = "generator") -> list[str]:
    """The weights one role trains (what its checkpoint must provide): ``generator`` (its LoRA,
    ``condition_proj``, ``generator``) or ``discriminator`` (its LoRA, ``discriminator_head``)."""
    own = ("condition_proj.", "generator.") if role == "generator" else ("discriminator_head.",)
    return sorted(k for k in model.state_dict() if k.startswith(own) or f".lora_A.{role}." in k
                  or f".lora_B.{role}." in k)


def convert_official(state: dict[str, torch.Tensor], model: IVMModel) -> dict[str, torch.Tensor]:
    """An official-layout state dict in this model's names, checked strictly against ``model``."""
    own = model.state_dict()
    out, unknown, shapes = {}, [], []
    for key, value in state.items():
        new = map_key(key)
        if new is None or new not in own:
            unknown.append(key if new is None else f"{key} -> {new}")
            continue
        if tuple(value.shape) != tuple(own[new].shape):
            shapes.append(f"{key}: {tuple(value.shape)} vs {tuple(own[new].shape)}")
            continue
        out[new] = value
    missing = [k for k in trained_keys(model) if k not in out]
    if unknown or missing or shapes:
        raise ValueError(f"the checkpoint does not fit this IVM: {len(unknown)} unmapped keys {unknown[:6]}, "
                         f"{len(missing)} trained parameters missing {missing[:6]}, shape mismatches {shapes[:6]}")
    return out


def load_official(model: IVMModel, checkpoint: str | Path | dict, sam_checkpoint: str | Path | None = None) -> IVMModel:
    """Load the released IVM weights (and, with ``sam_checkpoint``, SAM's ``image_encoder.*`` keys from
    the official SAM checkpoint) into ``model``; strict as :func:`convert_official` says. The LLaVA
    base weights come from the model itself (build it from the pretrained LLaVA first) unless the
    checkpoint carries them."""
    if isinstance(checkpoint, dict):
        state = checkpoint
    else:
        state = torch_load(checkpoint, "IVM checkpoint")
        if "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    try:
        converted = convert_official(state, model)
    except ValueError as err:
        raise ValueError(f"{checkpoint if not isinstance(checkpoint, dict) else 'the IVM checkpoint'}: {err}") from None
    load_part(model, converted, trained_keys(model), "the IVM checkpoint")
    if sam_checkpoint is not None:
        from groundlab.shared.bases.sam import load_sam_checkpoint

        load_sam_checkpoint(model.image_encoder, sam_checkpoint, prefix="image_encoder.")
    return model


def to_official(model: IVMModel) -> dict[str, torch.Tensor]:
    """The trained part of ``model`` in the release's key names (the inverse of :func:`map_key`, used
    to write checkpoints the release's code can read, and by the tests)."""
    out = {}
    for key in trained_keys(model):
        value = model.state_dict()[key]
        if key.startswith("condition_proj."):
            out["prompt_encoder.text_proj." + key[len("condition_proj."):]] = value
        elif key.startswith("generator.output_hypernetwork."):
            out["mask_decoder.output_hypernetworks_mlps." + key[len("generator.output_hypernetwork."):]] = value
        elif key.startswith("generator."):
            out["mask_decoder." + key[len("generator."):]] = value
        else:  # lmm.model.language_model.layers.N...lora_A.generator.weight
            rest = key[len("lmm."):].replace(".generator.", ".default.")
            rest = re.sub(r"^model\.language_model\.", "language_model.model.", rest)
            out[LMM_PREFIX + rest] = value
    return out
