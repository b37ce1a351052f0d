"""Token labels of a hard negative, from a diff against the response it was made from.

TLDR (arXiv 2410.04734, Section 4) aligns the perturbed response's token ids to the original's; the
perturbed tokens outside the matched blocks are the hallucinated ones (label 0), the rest are good
(label 1). A pure deletion leaves no perturbed token unmatched: the token at the deletion point (the
first token after it, or the last token when the deletion is at the end) is labelled 0, so a negative
never comes out all ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import SequenceMatcher


def diff_labels(original: Sequence[int], perturbed: Sequence[int]) -> list[int]:
    """Per-token labels of ``perturbed`` (1 good, 0 hallucinated). Raises if the two are identical:
    that is not a negative."""
    if len(perturbed) == 0:
        raise ValueError("the perturbed response is empty")
    if list(original) == list(perturbed):
        raise ValueError("the perturbed response equals the original: not a negative")
    matcher = SequenceMatcher(a=list(original), b=list(perturbed), autojunk=False)
    labels = [0] * len(perturbed)
    for block in matcher.get_matching_blocks():
        for j in range(block.b, block.b + block.size):
            labels[j] = 1
    if all(labels):
        # Only deletions: mark where the text was cut.
        for tag, _i1, _i2, j1, _j2 in matcher.get_opcodes():
            if tag == "delete":
                labels[min(j1, len(perturbed) - 1)] = 0
                break
    if all(labels):  # unreachable for distinct sequences, kept as the guarantee the docstring makes
        raise AssertionError("diff produced an all-ones negative")
    return labels
