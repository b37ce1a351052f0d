"""groundlab.omg_llava: OMG-LLaVA: Bridging Image-level, Object-level, Pixel-level Reasoning and Understanding.

Tao Zhang et al., NeurIPS 2024, arXiv 2406.19389. Reference code: lxtGH/OMG-Seg (folder omg_llava/).
One frozen universal segmenter (OMG-Seg) as visual encoder and mask decoder; an LLM in between answers
at image, object and pixel level, with ``[SEG]`` tokens decoded into masks by the frozen decoder.

Status: the segmenter, its pre-training, the perception prior, the OMG-LLaVA model and the data
formats are built; training stages, evaluation, CLI and the checkpoint converter are not yet.
"""

from .modeling import OMGLlavaConfig, OMGLlavaForCausalLM
from .omg_seg import OMGSegConfig, OMGSegModel

__version__ = "0.0.2"
__paper__ = "OMG-LLaVA: Bridging Image-level, Object-level, Pixel-level Reasoning and Understanding (NeurIPS 2024, arXiv 2406.19389)"

__all__ = ["OMGLlavaConfig", "OMGLlavaForCausalLM", "OMGSegConfig", "OMGSegModel"]
