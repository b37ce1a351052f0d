"""groundlab.clawmachine: ClawMachine: Learning to Fetch Visual Tokens for Referential Comprehension.

Tianren Ma, Lingxi Xie, Yunjie Tian, Boyu Yang, Qixiang Ye, ICLR 2025, arXiv 2406.11327. Reference code: martian422/ClawMachine.
Refers to and grounds objects by the visual tokens of the region instead of coordinates: LaVIT's
dynamic visual tokenizer (``visual_tokenizer``), the joint-vocabulary LLM (``modeling``), region
fetching and box decoding (``processing``), the two-stage recipe (``train``), REC / referring / yes-no
evaluation (``evaluation``), ``ground`` / ``refer`` inference (``inference``) and the release's
weights (``convert``).
"""

__version__ = "0.0.1"
__paper__ = "ClawMachine: Learning to Fetch Visual Tokens for Referential Comprehension (ICLR 2025, arXiv 2406.11327)"
