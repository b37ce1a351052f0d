"""Configuration of ClawMachine (arXiv 2406.11327, Section 3): a frozen ViT, LaVIT's dynamic visual
tokenizer on its patch features, and a causal LM over one joint vocabulary.

- ``tokenizer_config`` (:class:`VisualTokenizerConfig`): the ViT (``vision_config``: SAM's image
  encoder for the CPU default, EVA-CLIP g/14 for the release), the token selector, the token
  merger, the quantiser (codebook size and width) and, for pre-training only, the feature decoder.
- ``text_config``: the LLM (a Llama config; Llama-2-7B in the release).
- the joint vocabulary: text ids, then ``[IMG]`` (``image_start_token_id``) and ``[/IMG]``
  (``image_end_token_id``), then one id per code: ``code_offset + code``. None of them is fixed in the
  code: the processor writes them from here, and a tokenizer that disagrees is an error.
"""

from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig

from groundlab.shared.config import pretrained_config_kwargs
from groundlab.shared.vision import SamEncoderConfig

from .eva import EvaVitConfig

VISION_TYPES = {"groundlab_sam_encoder": SamEncoderConfig, "groundlab_eva_vit": EvaVitConfig}


def _vision(config: dict | PretrainedConfig | None) -> PretrainedConfig:
    if config is None:
        return SamEncoderConfig()
    if isinstance(config, PretrainedConfig):
        if config.model_type not in VISION_TYPES:
            raise ValueError(f"vision_config must be one of {sorted(VISION_TYPES)}, got {config.model_type!r}")
        return config
    kind = config.get("model_type", "groundlab_sam_encoder")
    if kind not in VISION_TYPES:
        raise ValueError(f"vision_config.model_type must be one of {sorted(VISION_TYPES)}, got {kind!r}")
    return VISION_TYPES[kind](**{k: v for k, v in config.items() if k != "model_type"})


class VisualTokenizerConfig(PretrainedConfig):
    """LaVIT's dynamic visual tokenizer over a frozen ViT."""

    model_type = "groundlab_claw_tokenizer"

    def __init__(self, vision_config: dict | PretrainedConfig | None = None, merger_depth: int = 12,
                 merger_heads: int = 16, mlp_ratio: float = 4.3637, codebook_size: int = 16384, code_dim: int = 32,
                 keep_ratio: float = 0.35, decoder_depth: int = 12, deterministic: bool = True,
                 colour_channels: int = 0, pixel_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
                 pixel_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711), **kwargs):
        """
        Args:
            vision_config: the frozen ViT: a :class:`SamEncoderConfig` (its image embedding, one feature
                per cell) or an :class:`EvaVitConfig` (its last block's output without the class token).
            merger_depth, merger_heads, mlp_ratio: the token merger's blocks (12 / 16 / 4.3637 in LaVIT).
            codebook_size, code_dim: the quantiser (16384 codes of 32 dimensions, l2-normalised).
            keep_ratio: the share of patches the selector is trained to keep on average (pre-training).
            decoder_depth: the feature decoder's blocks (pre-training only; not part of the saved model).
            deterministic: keep a patch when its keep probability wins (argmax) instead of sampling the
                Gumbel-softmax outside training (the release samples at inference too, so the same
                image gives a different number of tokens on each call).
            colour_channels: 0 (the release): the tokenizer reads the ViT's features alone. n > 0 (a
                multiple of 3): each patch's mean colour (its normalised pixels averaged) is appended to
                its feature, each of the three channels repeated n / 3 times (the repeat weighs colour
                in the reconstruction's cosine). For a frozen ViT that does not keep colour, as the
                tiny SAM base's encoder, trained only for masks: the release's EVA-CLIP knows colours.
            pixel_mean, pixel_std: the normalisation of [0, 1] pixels (CLIP's by default).
        """
        self.vision_config = _vision(vision_config)
        if colour_channels < 0 or colour_channels % 3:
            raise ValueError(f"colour_channels must be a non-negative multiple of 3, got {colour_channels}")
        self.colour_channels = colour_channels
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if codebook_size < 2 or code_dim < 1:
            raise ValueError(f"need codebook_size >= 2 and code_dim >= 1, got {codebook_size}, {code_dim}")
        if self.width % merger_heads:
            raise ValueError(f"the ViT width {self.width} is not a multiple of merger_heads {merger_heads}")
        self.merger_depth, self.merger_heads, self.mlp_ratio = merger_depth, merger_heads, mlp_ratio
        self.codebook_size, self.code_dim, self.keep_ratio = codebook_size, code_dim, keep_ratio
        self.decoder_depth, self.deterministic = decoder_depth, deterministic
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        super().__init__(**pretrained_config_kwargs(type(self), kwargs))

    @property
    def image_size(self) -> int:
        v = self.vision_config
        return v.img_size if isinstance(v, SamEncoderConfig) else v.image_size

    @property
    def grid(self) -> int:
        """G: the ViT's patches per side (16 for EVA-CLIP g/14 at 224 px)."""
        v = self.vision_config
        return v.embedding_grid if isinstance(v, SamEncoderConfig) else v.grid

    @property
    def width(self) -> int:
        """The tokenizer's width: the ViT's feature size plus ``colour_channels``."""
        return self.vit_width + self.colour_channels

    @property
    def vit_width(self) -> int:
        v = self.vision_config
        return v.out_chans if isinstance(v, SamEncoderConfig) else v.hidden_size

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        return out


HYBRID_MODES = ("replace", "add")


class ClawMachineConfig(PretrainedConfig):
    model_type = "groundlab_clawmachine"

    def __init__(self, tokenizer_config: dict | VisualTokenizerConfig | None = None,
                 text_config: dict | PretrainedConfig | None = None, image_start_token_id: int = -1,
                 image_end_token_id: int = -1, code_offset: int = -1, hybrid: bool = False,
                 hybrid_mode: str = "replace", scene_positions: bool = False, first_code_weight: float = 1.0,
                 tie_code_rows: bool = False, **kwargs):
        """
        Args:
            tokenizer_config: the visual tokenizer (:class:`VisualTokenizerConfig`).
            text_config: the LLM, a ``LlamaConfig``; its ``vocab_size`` must hold the codes.
            image_start_token_id, image_end_token_id: ``[IMG]`` and ``[/IMG]``.
            code_offset: the id of code 0 (code ``c`` is ``code_offset + c``).
            hybrid: the scene also enters as continuous features (the kept tokens' merged features
                through a 2-layer GELU projector); regions stay discrete (off in the release).
            hybrid_mode: how the features enter the scene's span: ``replace`` its code embeddings, or
                ``add`` to them (the codes stay visible to the LLM, which must copy them when grounding).
            scene_positions: each code of the scene's span also carries its cell's row and column
                (learned embeddings added to its code embedding, zero at the start); off in the
                release, whose LLM sees the scene as a plain 1-D sequence. Regions stay plain codes:
                a generated code's cell is only known once it is decoded.
            first_code_weight: the training loss's weight on the first code of each region in an
                answer (the code that says where the object is; the rest continue from it), every
                other answer token weighing 1. 1: the plain causal-LM loss (the release's).
            tie_code_rows: the LM head scores the codes with the input embedding's code rows (its own
                code rows go unused), so writing a code the model has read is an identity map; text
                rows stay untied. Off in the release (Llama-2's head is untied).
        The three ids are -1 until :func:`groundlab.clawmachine.processing.add_tokens` sets them.
        """
        if isinstance(tokenizer_config, dict):
            tokenizer_config = VisualTokenizerConfig(**tokenizer_config)
        self.tokenizer_config = tokenizer_config or VisualTokenizerConfig()
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            kind = text_config.pop("model_type", "llama")
            if kind != "llama":  # the model builds a LlamaForCausalLM (the release's Llama-2)
                raise ValueError(f"text_config must be a Llama config, got model_type {kind!r}")
            text_config = LlamaConfig(**text_config)
        self.text_config = text_config or LlamaConfig()
        self.image_start_token_id, self.image_end_token_id = image_start_token_id, image_end_token_id
        self.code_offset, self.hybrid = code_offset, hybrid
        if hybrid_mode not in HYBRID_MODES:
            raise ValueError(f"hybrid_mode must be one of {HYBRID_MODES}, got {hybrid_mode!r}")
        self.hybrid_mode = hybrid_mode
        self.scene_positions = scene_positions
        if not first_code_weight > 0:
            raise ValueError(f"first_code_weight must be > 0, got {first_code_weight}")
        self.first_code_weight = float(first_code_weight)
        self.tie_code_rows = bool(tie_code_rows)
        if code_offset >= 0 and code_offset + self.codebook_size > self.text_config.vocab_size:
            raise ValueError(f"the LLM's vocabulary ({self.text_config.vocab_size}) cannot hold "
                             f"{self.codebook_size} codes from id {code_offset}")
        super().__init__(**pretrained_config_kwargs(type(self), kwargs))

    @property
    def codebook_size(self) -> int:
        return self.tokenizer_config.codebook_size

    @property
    def grid(self) -> int:
        return self.tokenizer_config.grid

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def scene_inputs(self) -> bool:
        """Whether the model takes more than ids for the scene's span (features, cells or both)."""
        return self.hybrid or self.scene_positions

    def is_code(self, token_id):
        """Whether an id (or, elementwise, a tensor of ids) is a code."""
        return (token_id >= self.code_offset) & (token_id < self.code_offset + self.codebook_size)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["tokenizer_config"] = self.tokenizer_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out


# ----------------------------------------------------------------------------------------------
# the paper's setup (builds on the meta device; parameter count in the README)

def clawmachine_7b() -> ClawMachineConfig:
    """The release: EVA-CLIP g/14 + LaVIT's tokenizer (12-block merger, 16384 x 32 codes) + Llama-2-7B
    over LaVIT's joint vocabulary (32000 text ids, ``[IMG]`` 32000, ``[/IMG]`` 32001, codes from 32002)."""
    tok = VisualTokenizerConfig(vision_config=EvaVitConfig(), merger_depth=12, merger_heads=16, mlp_ratio=4.3637,
                                codebook_size=16384, code_dim=32)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32002 + 16384, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return ClawMachineConfig(tokenizer_config=tok, text_config=text, image_start_token_id=32000,
                             image_end_token_id=32001, code_offset=32002)


RELEASE_CONFIGS = {"clawmachine_7b": clawmachine_7b}
