"""groundlab.vp_mllm: Draw-and-Understand: Leveraging Visual Prompts to Enable MLLMs to Comprehend What You Want.

Weifeng Lin et al., ICLR 2025, arXiv 2403.20271. Reference code: AFeng-x/Draw-and-Understand.
Visual prompts (points, boxes, free-form shapes) as tokens in an MLLM (SPHINX-V / VP-LLaVA): the
prompt encoder and model (``modeling``), MDVP data (``data``), the two-stage recipe (``train``),
region evaluation (``evaluation``), ``ask`` inference (``inference``) and SPHINX-V's weights (``convert``).
"""

__version__ = "0.0.1"
__paper__ = "Draw-and-Understand: Leveraging Visual Prompts to Enable MLLMs to Comprehend What You Want (ICLR 2025, arXiv 2403.20271)"
