"""Configuration of the TLDR reward model (arXiv 2410.04734, Section 3, Eq. 6).

The backbone is a VLM config (``PaliGemmaConfig`` or ``MllamaConfig``); the model adds one
``reward_head`` Linear(D, 1). ``head="token"`` scores every response token at its own position (TLDR);
``head="last"`` is the naive binary reward model that is trained on the last response token only.
"""

from __future__ import annotations

from transformers import MllamaConfig, PaliGemmaConfig, PretrainedConfig

from groundlab.shared.config import pretrained_config_kwargs

BACKBONE_CONFIGS = {"paligemma": PaliGemmaConfig, "mllama": MllamaConfig}


class TldrConfig(PretrainedConfig):
    model_type = "groundlab_tldr"

    def __init__(
        self,
        backbone_type: str = "paligemma",
        backbone_config: dict | PretrainedConfig | None = None,
        head: str = "token",
        lora_r: int = 512,
        lora_alpha: int = 128,
        lora_dropout: float = 0.1,
        lora_projector: bool = True,
        lora_decoder: bool = True,
        threshold: float = 0.5,
        **kwargs,
    ):
        """
        Args:
            backbone_type: ``paligemma`` (PaliGemma-3B-mix-448 in the paper) or ``mllama``
                (Llama-3.2-11B-Vision).
            head: ``token`` (TLDR) or ``last`` (the naive binary RM baseline, Table 1).
            lora_r, lora_alpha, lora_dropout: Section 5 / Appendix: r=512, alpha=128, dropout 0.1;
                tiny configs keep alpha / r = 0.25.
            lora_projector, lora_decoder: where LoRA goes (Table 2's ablation: both is best).
            threshold: a token is predicted good when its probability exceeds this (0.5).
        """
        if backbone_type not in BACKBONE_CONFIGS:
            raise ValueError(f"backbone_type must be one of {tuple(BACKBONE_CONFIGS)}, got {backbone_type!r}")
        if head not in ("token", "last"):
            raise ValueError(f"head must be 'token' or 'last', got {head!r}")
        if isinstance(backbone_config, dict):
            backbone_config = BACKBONE_CONFIGS[backbone_type](**backbone_config)
        self.backbone_type = backbone_type
        self.backbone_config = backbone_config or BACKBONE_CONFIGS[backbone_type]()
        self.head = head
        self.lora_r, self.lora_alpha, self.lora_dropout = lora_r, lora_alpha, lora_dropout
        self.lora_projector, self.lora_decoder = lora_projector, lora_decoder
        self.threshold = threshold
        super().__init__(**pretrained_config_kwargs(type(self), kwargs))

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.text_config.hidden_size

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["backbone_config"] = self.backbone_config.to_dict()
        return out


def paligemma_3b_448() -> PaliGemmaConfig:
    """PaliGemma-3B-mix-448: SigLIP-So400m/14 at 448 px (1024 image tokens) + Gemma-2B."""
    return PaliGemmaConfig(
        vision_config={"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                       "num_attention_heads": 16, "patch_size": 14, "image_size": 448, "vision_use_head": False,
                       "projection_dim": 2048},
        text_config={"hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
                     "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 257216},
        projection_dim=2048, image_token_index=257152,
    )


def llama32_11b_vision() -> MllamaConfig:
    """Llama-3.2-11B-Vision: transformers' MllamaConfig defaults are this model's sizes."""
    return MllamaConfig()
