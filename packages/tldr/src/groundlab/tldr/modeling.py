"""TLDR: Token-Level Detective Reward model (Fu et al., ICLR 2025, arXiv 2410.04734, Eq. 6).

A VLM backbone without its LM head, and one ``reward_head`` Linear(D, 1) applied to the last hidden
state at each response token's own position:

    P(token k is good) = sigmoid(h(H[|image| + |prompt| + k]))

Image and prompt tokens are not scored (their labels are -100). Training is token-level BCE over the
response tokens. With ``config.head == "last"`` the same model is the naive binary reward model: its
labels carry one value, at the last response token. There is no official code; every open choice is
written where it is made.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import nn
from transformers import (
    MllamaForConditionalGeneration,
    MllamaModel,
    PaliGemmaForConditionalGeneration,
    PaliGemmaModel,
    PreTrainedModel,
)
from transformers.modeling_outputs import TokenClassifierOutput

from groundlab.shared.attention import HF_ATTENTION
from groundlab.shared.config import read_json
from groundlab.shared.loading import load_pretrained, load_state
from groundlab.shared.lora import apply_lora
from groundlab.shared.multimodal import IGNORE_INDEX

from .configuration import TldrConfig

BACKBONES = {"paligemma": PaliGemmaModel, "mllama": MllamaModel}
GENERATORS = {"paligemma": PaliGemmaForConditionalGeneration, "mllama": MllamaForConditionalGeneration}


def backbone_kind(path: str | Path) -> str:
    """The ``model_type`` of a pretrained VLM directory (``from_pretrained`` layout), checked to be a
    TLDR backbone (a key of :data:`GENERATORS`)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no pretrained VLM at {path} (expected a from_pretrained directory with config.json)")
    raw = read_json(config_file, "backbone config")
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in GENERATORS:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not a TLDR backbone ({sorted(GENERATORS)})")
    return model_type


class TldrRewardModel(PreTrainedModel):
    config_class = TldrConfig
    base_model_prefix = "tldr"
    supports_gradient_checkpointing = True

    def __init__(self, config: TldrConfig):
        super().__init__(config)
        self.backbone = BACKBONES[config.backbone_type](config.backbone_config)
        self.backbone.set_attn_implementation(HF_ATTENTION)  # every attention layer through the shared dispatch
        # "reward_head", not "head": SigLIP has a vision_tower.head that peft's modules_to_save would also catch
        self.reward_head = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def _init_weights(self, module):
        if module is getattr(self, "reward_head", None):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    @classmethod
    def from_backbone(cls, path: str, **config_kwargs) -> TldrRewardModel:
        """Build from a pretrained PaliGemma or Mllama directory (``from_pretrained`` layout), dropping
        its LM head (kept on disk: :func:`groundlab.tldr.downstream.restore_generator` puts it back)."""
        model_type = backbone_kind(path)
        vlm = load_pretrained(GENERATORS[model_type], path, f"the {model_type} backbone")
        config = TldrConfig(backbone_type=model_type, backbone_config=vlm.config.to_dict(), **config_kwargs)
        model = cls(config)
        load_state(model.backbone, vlm.model.state_dict(), f"{path}: the backbone")
        return model

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None, token_type_ids=None,
                num_items_in_batch=None, **backbone_kwargs) -> TokenClassifierOutput:
        """``labels`` (B, T): 1 good / 0 hallucinated at scored positions, -100 elsewhere.
        Returns ``logits`` (B, T) of P(good) at every position and the mean BCE over scored ones:
        over the ``num_items_in_batch`` scored tokens of the whole step when the Trainer passes it (every
        process and accumulated micro-batch; it then scales the loss by the process count, so several
        processes train exactly as one), else over this batch's."""
        if self.config.backbone_type == "paligemma" and token_type_ids is not None:
            backbone_kwargs["token_type_ids"] = token_type_ids
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            use_cache=False, **backbone_kwargs)
        hidden = out.last_hidden_state  # (B, T, D)
        logits = self.reward_head(hidden).squeeze(-1).float()  # (B, T)
        loss = None
        if labels is not None:
            scored = labels != IGNORE_INDEX
            if not bool(scored.any()):
                raise ValueError("no scored token in the batch (every label is -100)")
            bce = F.binary_cross_entropy_with_logits(logits[scored], labels[scored].float(), reduction="sum")
            loss = bce / (num_items_in_batch if num_items_in_batch is not None else scored.sum())
        return TokenClassifierOutput(loss=loss, logits=logits)


LORA_DECODER = r"backbone\.language_model\.layers\.\d+\.(?:self_attn|cross_attn)\.(?:q_proj|k_proj|v_proj|o_proj)" \
               r"|backbone\.language_model\.layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj)"
# The projector's Linear: PaliGemma wraps it (``multi_modal_projector.linear``), Mllama's is the Linear.
LORA_PROJECTOR = {"paligemma": r"backbone\.multi_modal_projector\.linear", "mllama": r"backbone\.multi_modal_projector"}


def lora_targets(config: TldrConfig) -> str:
    parts = ([LORA_PROJECTOR[config.backbone_type]] if config.lora_projector else []) + ([LORA_DECODER] if config.lora_decoder else [])
    if not parts:
        raise ValueError("LoRA needs the projector, the decoder or both")
    return "^(?:" + "|".join(parts) + ")$"


def with_lora(model: TldrRewardModel):
    """TLDR's trainable set: LoRA on the projector and every decoder Linear, the reward head in full;
    the vision encoder and everything else frozen."""
    c = model.config
    return apply_lora(model, lora_targets(c), r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout,
                      modules_to_save=["reward_head"])

