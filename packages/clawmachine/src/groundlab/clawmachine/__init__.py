"""groundlab.clawmachine: ClawMachine: Learning to Fetch Visual Tokens for Referential Comprehension.

Tianren Ma, Lingxi Xie, Yunjie Tian, Boyu Yang, Qixiang Ye, ICLR 2025, arXiv 2406.11327. Reference code: martian422/ClawMachine.
This package refers to and grounds objects by fetching the visual tokens of a region instead of writing coordinates.

Status: the package is scaffolded; the model, data, training and evaluation arrive with its issue.
"""

__version__ = "0.0.1"
__paper__ = "ClawMachine: Learning to Fetch Visual Tokens for Referential Comprehension (ICLR 2025, arXiv 2406.11327)"
