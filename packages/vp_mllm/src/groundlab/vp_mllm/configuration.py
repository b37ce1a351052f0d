"""Configuration of a visual-prompt MLLM (Draw-and-Understand, arXiv 2403.20271, Section 3).

Two parts: a LLaVA-style MLLM (``lmm_config``, a ``LlavaConfig``: vision tower + projector + any HF
causal LM) and the SAM-style visual prompt encoder (``vp_config``) whose K tokens sit between the
image tokens and the text. ``views`` chooses the image side: ``single`` (VP-LLaVA: the tower's tokens
of one square image) or ``multi`` (SPHINX-V: a global view and the four quadrants of the image at
twice the tower's size, each view's tokens between learned ``start_img`` / ``end_img`` embeddings).
"""

from __future__ import annotations

from transformers import AutoConfig, LlavaConfig, PretrainedConfig

from groundlab.shared.config import pretrained_config_kwargs

VIEWS = ("single", "multi")


class VisualPromptEncoderConfig(PretrainedConfig):
    """The visual prompt encoder (SAM's prompt encoder, re-purposed: one token per prompt)."""

    model_type = "groundlab_vp_encoder"

    def __init__(self, embed_dim: int = 256, num_slots: int = 10, half_pixel_offset: bool = False, **kwargs):
        """
        Args:
            embed_dim: SAM's ``prompt_embed_dim`` (256 in the release); a prompt token is twice as wide
                before ``vp_proj`` (a point through ``up``, a box as its two corners side by side).
            num_slots: K, the prompts one sample holds (10 in the paper); fewer are padded, more are an error.
            half_pixel_offset: add 0.5 to the [0, 1]-normalised coordinates before the Fourier features,
                as the reference implementation does (SAM's pixel-centre shift, applied after
                normalisation, where it moves every prompt by half the image). Off by default; on for
                weights trained that way (the SPHINX-V release).
        """
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"embed_dim must be a positive even number, got {embed_dim}")
        self.embed_dim, self.num_slots, self.half_pixel_offset = embed_dim, num_slots, half_pixel_offset
        super().__init__(**pretrained_config_kwargs(type(self), kwargs))


class VPMLLMConfig(PretrainedConfig):
    model_type = "groundlab_vp_mllm"

    def __init__(self, vp_config: dict | VisualPromptEncoderConfig | None = None,
                 lmm_config: dict | PretrainedConfig | None = None, views: str = "single",
                 vp_token_index: int = -1, slot_embeddings: bool = False, region_content: bool = False, **kwargs):
        """
        Args:
            vp_config: the visual prompt encoder (:class:`VisualPromptEncoderConfig`).
            lmm_config: the LLaVA config (LLaVA-1.5-7B by default).
            views: ``single`` (VP-LLaVA) or ``multi`` (SPHINX-V's global view + 4 quadrants).
            vp_token_index: the id of the ``<vp>`` placeholder the processor writes K + 2 times where the
                prompt tokens go (-1: not set yet; :func:`groundlab.vp_mllm.processing.add_tokens` sets it).
            slot_embeddings: add a learned embedding per slot to the K prompt tokens (not in the paper,
                whose LLM tells its K ordered tokens apart by their order; see the README).
            region_content: add to each prompt token the mean of the image tokens (as the LLM receives
                them; the global view's in the multi-view layout) whose patch centre lies in the
                prompt's box, or of the patch under a point (not in the paper, whose token carries the
                geometry alone and whose 7-13B LLMs, pre-trained on grounding, go from a location to the
                image there themselves; the tiny LLM does not: README).
        """
        if views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
        if isinstance(vp_config, dict):
            vp_config = VisualPromptEncoderConfig(**vp_config)
        self.vp_config = vp_config or VisualPromptEncoderConfig()
        if isinstance(lmm_config, dict):
            lmm_config = LlavaConfig(**lmm_config)
        self.lmm_config = lmm_config or LlavaConfig()
        self.views, self.vp_token_index, self.slot_embeddings = views, vp_token_index, slot_embeddings
        self.region_content = region_content
        super().__init__(**pretrained_config_kwargs(type(self), kwargs))

    @property
    def num_views(self) -> int:
        return 5 if self.views == "multi" else 1

    @property
    def tokens_per_view(self) -> int:
        """The tower's tokens of one view (CLS dropped by LLaVA's ``default`` strategy), plus the two
        view tags of the multi-view layout."""
        v = self.lmm_config.vision_config
        n = (v.image_size // v.patch_size) ** 2
        if self.lmm_config.vision_feature_select_strategy == "full":
            n += 1
        return n + (2 if self.views == "multi" else 0)

    @property
    def n_image_tokens(self) -> int:
        """How many times the processor writes ``<image>``: every view's tokens."""
        return self.num_views * self.tokens_per_view

    @property
    def n_vp_tokens(self) -> int:
        """``start_vp``, the K prompt tokens, ``end_vp``."""
        return self.vp_config.num_slots + 2

    @property
    def hidden_size(self) -> int:
        return self.lmm_config.text_config.hidden_size

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["vp_config"] = self.vp_config.to_dict()
        out["lmm_config"] = self.lmm_config.to_dict()
        return out


# ----------------------------------------------------------------------------------------------
# the papers' setups (build on the meta device; parameter counts in the README)

# known to AutoConfig, so that loading a saved model's tokenizer (which reads its config.json) finds it
AutoConfig.register(VisualPromptEncoderConfig.model_type, VisualPromptEncoderConfig, exist_ok=True)
AutoConfig.register(VPMLLMConfig.model_type, VPMLLMConfig, exist_ok=True)

CLIP_L14_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)


def vp_llava_7b() -> VPMLLMConfig:
    """VP-LLaVA on LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 tokens), 2-layer MLP projector, Vicuna-7B."""
    lmm = LlavaConfig(
        vision_config=CLIP_L14_336,
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                         max_position_embeddings=4096, rms_norm_eps=1e-5),
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    return VPMLLMConfig(lmm_config=lmm, views="single", vp_token_index=32001)


def vp_llava_8b() -> VPMLLMConfig:
    """VP-LLaVA-8B: the same vision side on LLaMA-3-8B (grouped-query attention, 128k vocabulary)."""
    lmm = LlavaConfig(
        vision_config=CLIP_L14_336,
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128258,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
        image_token_index=128256, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    return VPMLLMConfig(lmm_config=lmm, views="single", vp_token_index=128257)


def sphinx_v_13b_like() -> VPMLLMConfig:
    """SPHINX-V-13B's layout on one CLIP ViT-L/14 at 224 px per view (the release ensembles CLIP,
    ConvNeXt-XXL, DINOv2-g and a Q-Former: 289 tokens a view; here 256 + the two view tags): 5 views
    (global + 4 quadrants of the 448-px image) and LLaMA-2-13B."""
    lmm = LlavaConfig(
        vision_config=dict(CLIP_L14_336, image_size=224),
        text_config=dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                         num_attention_heads=40, num_key_value_heads=40, vocab_size=32002,
                         max_position_embeddings=4096, rms_norm_eps=1e-5),
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    return VPMLLMConfig(lmm_config=lmm, views="multi", vp_token_index=32001,
                        vp_config=VisualPromptEncoderConfig(half_pixel_offset=True))


RELEASE_CONFIGS = {"vp_llava_7b": vp_llava_7b, "vp_llava_8b": vp_llava_8b, "sphinx_v_13b_like": sphinx_v_13b_like}
