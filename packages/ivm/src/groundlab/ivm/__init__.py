"""groundlab.ivm: Instruction-Guided Visual Masking.

Jinliang Zheng et al., NeurIPS 2024, arXiv 2405.19783. Reference code: 2toinf/IVM (inference only; the
DWSL training procedure has no public code and is made runnable here).

A frozen SAM image encoder, a LLaVA LMM with LoRA that turns (image, instruction) into one condition
token, and a SAM-style conditioned mask generator predict a heatmap of the instruction-relevant
regions; :func:`groundlab.ivm.masking.forward_batch` masks the rest of the image for any downstream
model. Training is DWSL: a discriminator (the same LMM, its own LoRA) learns human vs machine labels,
and weights the generator's per-sample loss.
"""

from .checkpoint import load_official, to_official
from .configuration import IVMConfig, ivm_release
from .masking import MODES, apply_mask, forward_batch, soft_mask
from .modeling import IVMModel, dwsl_weights, label_weights

__version__ = "0.1.0"
__paper__ = "Instruction-Guided Visual Masking (NeurIPS 2024, arXiv 2405.19783)"

__all__ = [
    "MODES", "IVMConfig", "IVMModel", "apply_mask", "dwsl_weights", "forward_batch", "ivm_release",
    "label_weights", "load_official", "soft_mask", "to_official",
]
