"""groundlab.omg_llava: OMG-LLaVA: Bridging Image-level, Object-level, Pixel-level Reasoning and Understanding.

Tao Zhang et al., NeurIPS 2024, arXiv 2406.19389. Reference code: lxtGH/OMG-Seg (folder omg_llava/).
This package one frozen universal segmenter as visual encoder and mask decoder; image-, object- and pixel-level reasoning with [SEG].

Status: the package is scaffolded; the model, data, training and evaluation arrive with its issue.
"""

__version__ = "0.0.1"
__paper__ = "OMG-LLaVA: Bridging Image-level, Object-level, Pixel-level Reasoning and Understanding (NeurIPS 2024, arXiv 2406.19389)"
