"""How IVM's inputs are built: the policy and discriminator prompts (LLaVA's conversation layout),
their encoding with ``<image>`` expanded to the vision tower's tokens, left padding, the
discriminator's label-masked view of an image, and the batch collator.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from groundlab.shared.multimodal import expand_token

POLICY_PROMPT = "USER: <image>\n{instruction} \n ASSISTANT:"
DISCRIMINATOR_PROMPT = ("USER: <image>\n{instruction} \n Can you follow instruction above based on the given image? "
                        "\n ASSISTANT:")


def encode_prompt(tokenizer, text: str, n_image_tokens: int) -> list[int]:
    """``<s>`` + the prompt's tokens, its ``<image>`` expanded to the vision tower's token count."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if ids.count(image_id) != 1:
        raise ValueError(f"the prompt must hold exactly one <image>, got {ids.count(image_id)}: {text!r}")
    return expand_token({"input_ids": ids}, image_id, n_image_tokens)["input_ids"]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (B, T) of token lists."""
    longest = max(len(x) for x in sequences)
    ids = torch.tensor([[pad_id] * (longest - len(x)) + list(x) for x in sequences])
    att = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in sequences])
    return ids, att


def policy_inputs(tokenizer, instructions, n_image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's prompts for ``instructions``, left padded: (input_ids, attention_mask)."""
    ids = [encode_prompt(tokenizer, POLICY_PROMPT.format(instruction=x), n_image_tokens) for x in instructions]
    return left_pad(ids, tokenizer.pad_token_id)


def tower_pixels(image_processor, images) -> torch.Tensor:
    """The LLaVA tower's ``pixel_values`` of (H, W, 3) uint8 images, each squashed to the tower's square
    first, as the release does before both encoders (the CLIP processor alone would resize the short
    side and crop the centre, hiding the borders of a non-square image from the LMM)."""
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    size = (int(crop["width"]), int(crop["height"]))
    squashed = [im if im.shape[1::-1] == size else np.asarray(Image.fromarray(im).resize(size, Image.BICUBIC))
                for im in (np.asarray(x) for x in images)]
    return image_processor(squashed, return_tensors="pt")["pixel_values"]


def masked_image(image: np.ndarray, heat: np.ndarray, fill: int = 255) -> np.ndarray:
    """The discriminator's view: pixels where the label heatmap is <= 0.5 filled white."""
    keep = (heat > 0.5)[..., None]
    return np.where(keep, image, np.uint8(fill)).astype(np.uint8)


class IVMCollator:
    """Left-padded prompts, the LLaVA processor's ``pixel_values``, SAM-side ``images`` (B, 3, S, S)
    uint8, ``masks`` (B, S, S), ``index`` (B,) into the dataset (generator role) and ``is_human`` (B,)."""

    def __init__(self, processor, role: str = "generator"):
        self.processor, self.role = processor, role

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        ids, att = left_pad([s["input_ids"] for s in samples], self.processor.tokenizer.pad_token_id)
        pixels = tower_pixels(self.processor.image_processor, [s["image"] for s in samples])
        batch = {"input_ids": ids, "attention_mask": att, "pixel_values": pixels,
                 "is_human": torch.tensor([s["is_human"] for s in samples])}
        if self.role == "generator":
            batch["images"] = torch.stack([torch.from_numpy(np.ascontiguousarray(s["image"])).permute(2, 0, 1)
                                           for s in samples])
            batch["masks"] = torch.stack([s["mask"] for s in samples])
            batch["index"] = torch.tensor([s["index"] for s in samples])
        return batch
