"""groundlab.tldr: TLDR: Token-Level Detective Reward Model for Large Vision Language Models.

Deqing Fu, Tong Xiao, Rui Wang, Wang Zhu, Pengchuan Zhang, Guan Pang, Robin Jia, Lawrence Chen,
ICLR 2025, arXiv 2410.04734. No official code is published: this package is the reference
implementation, and every choice the paper leaves open is made explicit (see the README).

A VLM backbone without its LM head + a ``reward_head`` Linear(D, 1) scoring every response token;
trained with token-level BCE on synthetic hard negatives of 8 taxonomies.
"""

from .configuration import TldrConfig, llama32_11b_vision, paligemma_3b_448
from .labels import diff_labels
from .metrics import ScoredResponse, hallucination_rates, tldr_metrics
from .modeling import TldrRewardModel, with_lora
from .perturb import TAXONOMIES, LLMPerturber, WorldPerturber

__version__ = "0.1.0"
__paper__ = "TLDR: Token-Level Detective Reward Model for Large Vision Language Models (ICLR 2025, arXiv 2410.04734)"

__all__ = [
    "TAXONOMIES", "LLMPerturber", "ScoredResponse", "TldrConfig", "TldrRewardModel", "WorldPerturber",
    "diff_labels", "hallucination_rates", "llama32_11b_vision", "paligemma_3b_448", "tldr_metrics", "with_lora",
]
