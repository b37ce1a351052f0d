"""groundlab.omg_llava: OMG-LLaVA: Bridging Image-level, Object-level, Pixel-level Reasoning and Understanding.

Tao Zhang et al., NeurIPS 2024, arXiv 2406.19389. Reference code: lxtGH/OMG-Seg (folder omg_llava/).
One frozen universal segmenter (OMG-Seg) as visual encoder and mask decoder; an LLM in between answers
at image, object and pixel level, with ``[SEG]`` tokens decoded into masks by the frozen decoder.

Status: the segmenter and its pre-training, the model, both training stages, RES / GCG / region
evaluation, the inference pipeline and CLI, and the converters of the release's checkpoints are
built; what the toy run reaches is in the package README.
"""

from .configuration import OMGLlavaConfig
from .modeling import OMGLlavaForCausalLM
from .omg_seg import OMGSegConfig, OMGSegModel

__version__ = "0.0.2"
__paper__ = "OMG-LLaVA: Bridging Image-level, Object-level, Pixel-level Reasoning and Understanding (NeurIPS 2024, arXiv 2406.19389)"

__all__ = ["OMGLlavaConfig", "OMGLlavaForCausalLM", "OMGSegConfig", "OMGSegModel"]
