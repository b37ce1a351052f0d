"""Configuration of IVM (Instruction-Guided Visual Masking, arXiv 2405.19783, Section 3).

Three parts: a frozen SAM ViT image encoder (``vision_config``, a :class:`SamEncoderConfig`), an LMM
(``lmm_config``, a ``LlavaConfig``) with LoRA on the language model's q/v projections that turns the
(image, instruction) pair into one condition token, and a SAM-style conditioned mask generator. The
DWSL discriminator is the same LMM with its own LoRA adapter and an MLP head on the last token.
"""

from __future__ import annotations

from transformers import LlavaConfig, PretrainedConfig

from groundlab.shared.config import pretrained_config_kwargs
from groundlab.shared.vision import SamEncoderConfig  # noqa: F401 - the IVM config's vision part


class IVMConfig(PretrainedConfig):
    model_type = "groundlab_ivm"

    def __init__(
        self,
        vision_config: dict | SamEncoderConfig | None = None,
        lmm_config: dict | PretrainedConfig | None = None,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
        condition_hidden: int = 2048,
        decoder_depth: int = 2,
        decoder_mlp: int = 2048,
        decoder_heads: int = 8,
        num_mask_tokens: int = 1,
        discriminator_hidden: int = 1024,
        pixel_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        pixel_std: tuple[float, ...] = (0.229, 0.224, 0.225),
        **kwargs,
    ):
        """
        Args:
            vision_config: the SAM image encoder (:class:`SamEncoderConfig`); ViT-H by default.
            lmm_config: the LLaVA config (LLaVA-1.5-7B in the release).
            lora_r, lora_alpha, lora_dropout, lora_targets: LoRA of the language model (8 / 16 / 0.05 on
                q_proj and v_proj), one adapter for the generator and one for the discriminator.
            condition_hidden: the condition MLP's hidden width (LMM width -> 2048 -> ``out_chans``).
            decoder_depth, decoder_mlp, decoder_heads: the TwoWayTransformer (2 / 2048 / 8).
            num_mask_tokens: learned mask tokens, averaged after the transformer (1 in the release).
            discriminator_hidden: the discriminator head MLP (LMM width -> 1024 -> 1).
            pixel_mean, pixel_std: SAM's normalisation of [0, 1] pixels (ImageNet statistics).
        """
        if isinstance(vision_config, dict):
            vision_config = SamEncoderConfig(**vision_config)
        self.vision_config = vision_config or SamEncoderConfig()
        if isinstance(lmm_config, dict):
            lmm_config = LlavaConfig(**lmm_config)
        self.lmm_config = lmm_config or LlavaConfig()
        self.lora_r, self.lora_alpha, self.lora_dropout = lora_r, lora_alpha, lora_dropout
        self.lora_targets = tuple(lora_targets)
        self.condition_hidden = condition_hidden
        self.decoder_depth, self.decoder_mlp, self.decoder_heads = decoder_depth, decoder_mlp, decoder_heads
        self.num_mask_tokens = num_mask_tokens
        self.discriminator_hidden = discriminator_hidden
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        super().__init__(**pretrained_config_kwargs(type(self), kwargs))

    @property
    def embedding_grid(self) -> int:
        return self.vision_config.embedding_grid

    @property
    def n_image_tokens(self) -> int:
        """Tokens the LMM's vision tower gives one image (the ``<image>`` placeholder's expansion)."""
        v = self.lmm_config.vision_config
        return (v.image_size // v.patch_size) ** 2

    @property
    def lmm_hidden(self) -> int:
        return self.lmm_config.text_config.hidden_size

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["lmm_config"] = self.lmm_config.to_dict()
        return out


def llava15_7b() -> LlavaConfig:
    """LLaVA-1.5-7B (llava-hf layout): CLIP ViT-L/14-336, 2-layer MLP projector, Vicuna-7B."""
    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                         max_position_embeddings=4096, rms_norm_eps=1e-5),
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default")


def ivm_release() -> IVMConfig:
    """The released IVM: SAM ViT-H + LLaVA-1.5-7B, LoRA r=8 on q/v (4,194,304 parameters)."""
    return IVMConfig(vision_config=SamEncoderConfig(), lmm_config=llava15_7b())
