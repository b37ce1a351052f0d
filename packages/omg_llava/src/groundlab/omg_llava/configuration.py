"""OMG-LLaVA's model config (``OMGLlavaConfig``), and the real-size ones: the release's OMG-Seg with the
paper's LLMs (main text and appendix).

InternLM2 is not a transformers architecture (it ships as remote code with a fused ``wqkv``); its
7B chat model is, layer for layer, a Llama with grouped-query attention, so it is described here by
an equivalent ``LlamaConfig`` (32 layers, 4096 hidden, 14336 FFN, 32 heads, 8 KV heads, vocabulary
92544). Phi-3-mini and Qwen2-7B are their own transformers architectures.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from groundlab.shared.config import pretrained_config_kwargs

from .omg_seg import OMGSegConfig

FEATURE_STRIDES = (4, 8, 16, 32)


class OMGLlavaConfig(PretrainedConfig):
    model_type = "groundlab_omg_llava"

    def __init__(self, seg_config: dict | PretrainedConfig | None = None, text_config: dict | PretrainedConfig | None = None,
                 shuffle: int = 2, use_prior: bool = True, use_object_tokens: bool = True,
                 token_ids: dict[str, int] | None = None, seg_bce_weight: float = 2.0, seg_dice_weight: float = 0.5,
                 seg_points: int = 12544, reconstruction_weight: float = 10.0, template: str = "internlm2",
                 seg_queries_attend: bool = False, feature_stride: int = 32, **kwargs):
        """
        Args:
            seg_config: the segmenter (:class:`OMGSegConfig`; the release's OMG-Seg by default).
            text_config: any causal LM's config (a dict with ``model_type``: llama, internlm2 via remote
                code, phi3, qwen2, ...).
            shuffle: the pixel-unshuffle factor of the pixel-token features (2: 32x32 -> 16x16 at 1024 px).
            feature_stride: the backbone level the pixel tokens come from (4, 8, 16 or 32; the release's
                CLIP stride-32 features). The token grid, ``image_size / feature_stride / shuffle`` on a
                side, is also where the perception prior is read and the object tokens are chosen: a
                target whose mask wins no cell of it gets no object token.
            use_prior, use_object_tokens: the paper's Table 5 ablations (prior zeroed; no object tokens).
            token_ids: ids of ``<image>`` and the special tokens in the tokenizer.
            seg_bce_weight, seg_dice_weight, seg_points: the ``[SEG]`` mask loss (2.0 / 0.5 / 12544).
            reconstruction_weight: stage 1's ``10 * MSE(text2vision(object token), [Q ; E])``.
            template: the chat layout the LLM was tuned with (``groundlab.omg_llava.inference.TEMPLATES``).
            seg_queries_attend: False (the release): every ``[SEG]`` of an answer is decoded as its own
                query, as if alone (the release puts each in its own batch element); True: the ``[SEG]``
                queries of one answer attend to each other in the decoder's self-attention.
        """
        if isinstance(seg_config, dict):
            seg_config = OMGSegConfig(**seg_config)
        self.seg_config = seg_config or OMGSegConfig()
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)
        self.text_config = text_config or AutoConfig.for_model("llama")
        self.shuffle = shuffle
        self.use_prior, self.use_object_tokens = use_prior, use_object_tokens
        self.token_ids = dict(token_ids or {})
        self.seg_bce_weight, self.seg_dice_weight, self.seg_points = seg_bce_weight, seg_dice_weight, seg_points
        self.reconstruction_weight = reconstruction_weight
        self.template = template
        self.seg_queries_attend = seg_queries_attend
        if feature_stride not in FEATURE_STRIDES:
            raise ValueError(f"feature_stride must be one of {FEATURE_STRIDES} (the backbone's levels), got {feature_stride!r}")
        self.feature_stride = feature_stride
        super().__init__(**pretrained_config_kwargs(type(self), kwargs))

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["seg_config"] = self.seg_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out

    @property
    def grid(self) -> int:
        return self.seg_config.image_size // self.feature_stride // self.shuffle

    @property
    def feature_level(self) -> int:
        """The index of the pixel tokens' level among the backbone's outputs (strides 4, 8, 16, 32)."""
        return FEATURE_STRIDES.index(self.feature_stride)

    @property
    def query_dim(self) -> int:
        return 2 * self.seg_config.dim

    @property
    def clip_dim(self) -> int:
        return self.seg_config.dims[self.feature_level] * self.shuffle**2


AutoConfig.register(OMGLlavaConfig.model_type, OMGLlavaConfig, exist_ok=True)


N_SPECIAL = 6  # <image> and the five special tokens, appended to the vocabulary


def internlm2_7b():
    return AutoConfig.for_model("llama", vocab_size=92544 + N_SPECIAL, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1_000_000.0)


def phi3_mini():
    return AutoConfig.for_model("phi3", vocab_size=32064 + N_SPECIAL, hidden_size=3072, intermediate_size=8192,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                max_position_embeddings=4096)


def qwen2_7b():
    return AutoConfig.for_model("qwen2", vocab_size=152064 + N_SPECIAL, hidden_size=3584, intermediate_size=18944,
                                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                max_position_embeddings=32768, tie_word_embeddings=False)


LLMS = {"internlm2_7b": internlm2_7b, "phi3_mini": phi3_mini, "qwen2_7b": qwen2_7b}


def release(llm: str = "internlm2_7b") -> OMGLlavaConfig:
    if llm not in LLMS:
        raise ValueError(f"llm must be one of {sorted(LLMS)}, got {llm!r}")
    return OMGLlavaConfig(seg_config=OMGSegConfig(), text_config=LLMS[llm]().to_dict())
