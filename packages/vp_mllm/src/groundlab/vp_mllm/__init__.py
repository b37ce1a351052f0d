"""groundlab.vp_mllm: Draw-and-Understand: Leveraging Visual Prompts to Enable MLLMs to Comprehend What You Want.

Weifeng Lin et al., ICLR 2025, arXiv 2403.20271. Reference code: AFeng-x/Draw-and-Understand.
This package visual prompts (points, boxes, free-form shapes) as tokens in an MLLM (SPHINX-V / VP-LLaVA).

Status: the package is scaffolded; the model, data, training and evaluation arrive with its issue.
"""

__version__ = "0.0.1"
__paper__ = "Draw-and-Understand: Leveraging Visual Prompts to Enable MLLMs to Comprehend What You Want (ICLR 2025, arXiv 2403.20271)"
