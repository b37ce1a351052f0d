"""Real-size OMG-LLaVA configs: the release's OMG-Seg with the paper's LLMs (main text and appendix).

InternLM2 is not a transformers architecture (it ships as remote code with a fused ``wqkv``); its
7B chat model is, layer for layer, a Llama with grouped-query attention, so it is described here by
an equivalent ``LlamaConfig`` (32 layers, 4096 hidden, 14336 FFN, 32 heads, 8 KV heads, vocabulary
92544). Phi-3-mini and Qwen2-7B are their own transformers architectures.
"""

from __future__ import annotations

from transformers import AutoConfig

from .modeling import OMGLlavaConfig
from .omg_seg import OMGSegConfig

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
