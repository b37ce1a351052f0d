"""How OMG-LLaVA's inputs are built: its special tokens, the task prompts, the chat templates, the
segmenter's input frame for masks and visual prompts, and the batch collator.

Masks and visual prompts are brought to the segmenter's input frame: padded to a square (bottom /
right) and resized to its ``image_size``; points are scaled the same way; predicted masks go back
the other way (``from_input_frame``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from groundlab.shared.multimodal import ChatTemplate, pad_batch

IMAGE_TOKEN = "<image>"
SEG, BOP, EOP, REGION, MARK = "[SEG]", "<p>", "</p>", "<region>", "<mark>"
SPECIAL_TOKENS = (SEG, BOP, EOP, REGION, MARK)
"""Added to the LLM's tokenizer (with ``<image>`` if absent): the mask token, the phrase brackets of
grounded captions, and the region / point placeholders."""
PROMPT_KINDS = {REGION: "mask", MARK: "point"}  # placeholder -> the segmenter's prompt kind

RES_PROMPT = "Please segment {sent} in this image."
GCG_PROMPT = ("Could you please give me a detailed description of the image? Please respond with interleaved "
              "segmentation masks for the corresponding parts of the answer.")
REGION_PROMPT = "Please give me a short description of region1 <region>."
POINT_PROMPT = "What is the object at Mark 1 <mark>?"

TEMPLATES = {
    # the world tokenizer's Vicuna-style layout (the tiny LLaVA base was trained with it)
    "vicuna": ChatTemplate(),
    # InternLM2-chat, as the release formats its conversations
    "internlm2": ChatTemplate(user_prefix="<|im_start|>user\n", assistant_prefix="<|im_end|>\n<|im_start|>assistant\n",
                              answer_lead="", turn_end="<|im_end|>", sep="\n"),
}


def to_input_frame(masks: list[np.ndarray] | np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W) bool masks -> (N, size, size) bool in the segmenter's frame (pad bottom / right to a
    square, nearest resize)."""
    if len(masks) == 0:
        return torch.zeros(0, size, size, dtype=torch.bool)
    m = torch.from_numpy(np.stack([np.asarray(x, bool) for x in masks]))
    h, w = m.shape[-2:]
    side = max(h, w)
    m = F.pad(m.float(), (0, side - w, 0, side - h))
    return F.interpolate(m[None], size=(size, size), mode="nearest")[0] > 0.5


def from_input_frame(logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N, s, s) mask logits in the segmenter's frame -> (N, H, W) logits of the original image (resize to
    the padded square, then crop the padding away)."""
    h, w = hw
    side = max(h, w)
    if logits.shape[0] == 0:
        return logits.new_zeros(0, h, w)
    up = F.interpolate(logits[None].float(), size=(side, side), mode="bilinear", align_corners=False)[0]
    return up[:, :h, :w]


class OMGCollator:
    """Pads the token side (right for training, left for generation); the rest stays per sample."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad, self.side = pad_token_id, padding_side

    def __call__(self, samples: list[dict]) -> dict:
        batch = pad_batch([{k: s[k] for k in ("input_ids", "labels") if k in s} for s in samples], self.pad,
                          self.side)
        batch["perception"] = [s["perception"] for s in samples]
        batch["prompts"] = [s["prompts"] for s in samples]
        if "seg_masks" in samples[0]:
            batch["seg_masks"] = [s["seg_masks"] for s in samples]
        if "point_seed" in samples[0]:
            batch["point_seeds"] = [s["point_seed"] for s in samples]
        return batch
