"""groundlab.ivm: Instruction-Guided Visual Masking.

Jinliang Zheng et al., NeurIPS 2024, arXiv 2405.19783. Reference code: 2toinf/IVM.
This package predicts an instruction-relevance heatmap and masks the rest of the image; trained with DWSL.

Status: the package is scaffolded; the model, data, training and evaluation arrive with its issue.
"""

__version__ = "0.0.1"
__paper__ = "Instruction-Guided Visual Masking (NeurIPS 2024, arXiv 2405.19783)"
