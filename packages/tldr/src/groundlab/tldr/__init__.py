"""groundlab.tldr: TLDR: Token-Level Detective Reward Model for Large Vision Language Models.

Deqing Fu, Tong Xiao, Rui Wang, Wang Zhu, Pengchuan Zhang, Guan Pang, Robin Jia, Lawrence Chen, ICLR 2025, arXiv 2410.04734. Reference code: none published (this package is the reference).
This package a token-level hallucination reward model on a VLM backbone, trained on synthetic hard negatives.

Status: the package is scaffolded; the model, data, training and evaluation arrive with its issue.
"""

__version__ = "0.0.1"
__paper__ = "TLDR: Token-Level Detective Reward Model for Large Vision Language Models (ICLR 2025, arXiv 2410.04734)"
