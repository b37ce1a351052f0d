"""How TLDR's inputs are built, per backbone: task prompts, the response's place in the sequence, the
token labels, and the collators.

The model's input, per backbone (:class:`Layout`):

- PaliGemma: ``[image tokens x N] <bos> prompt \\n | response </s>`` with ``token_type_ids`` 0 on the
  prefix and 1 on the suffix (its prefix-LM mask);
- Llama-3.2-Vision (Mllama): ``<bos> <|image|> prompt \\n | response </s>``; the image enters through
  cross-attention, so the text sequence holds one ``<|image|>`` token and the response is indexed in the
  text alone. Text from the ``<|image|>`` token on attends to the image's valid tiles
  (``cross_attention_mask``, built by :class:`MllamaCollator`).

Only response tokens are scored (``</s>`` and padding excluded). With the naive head, only the last
response token is scored, with the response label (1 iff every token is good).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from groundlab.shared.bases.vlm import VLMCollator
from groundlab.shared.multimodal import IGNORE_INDEX, pad_batch

PROMPTS = {"description": "describe en", "caption": "caption en", "vqa": "answer en {question}"}
"""PaliGemma's task prefixes (the tiny PaliGemma base answers questions after ``answer en`` too)."""


def response_tokens(tokenizer, response: str) -> list[int]:
    return tokenizer(response, add_special_tokens=False)["input_ids"]



@dataclass
class Layout:
    """How responses are placed in the backbone's input (see the module docstring)."""

    image_token_id: int
    n_image_tokens: int
    """PaliGemma: image tokens in the sequence (``image_seq_length``); Mllama: 1 (cross-attention)."""
    head: str = "token"  # "token" | "last"
    backbone: str = "paligemma"  # "paligemma" | "mllama"

    def __post_init__(self):
        if self.head not in ("token", "last"):
            raise ValueError(f"Layout.head must be 'token' or 'last', got {self.head!r}")
        if self.backbone not in ("paligemma", "mllama"):
            raise ValueError(f"Layout.backbone must be 'paligemma' or 'mllama', got {self.backbone!r}")
        if self.backbone == "mllama" and self.n_image_tokens != 1:
            raise ValueError(f"an Mllama layout has one <|image|> token, got n_image_tokens={self.n_image_tokens}")


MLLAMA_IMAGE_TOKEN = "<|image|>"


def layout_for(processor, head: str = "token") -> Layout:
    """The layout of a backbone's processor (PaliGemma or Mllama), with the tokenizer's image token."""
    tok = processor.tokenizer
    if type(processor).__name__.startswith("Mllama"):
        token, n, kind = MLLAMA_IMAGE_TOKEN, 1, "mllama"
    else:
        token, n, kind = "<image>", processor.image_processor.image_seq_length, "paligemma"
    token_id = tok.convert_tokens_to_ids(token)
    if token_id is None or token_id == tok.unk_token_id:
        raise ValueError(f"the {kind} processor's tokenizer has no {token} token")
    return Layout(token_id, n, head, kind)


def encode_record(tokenizer, rec: dict, layout: Layout) -> dict[str, list[int]]:
    """input_ids, token_type_ids and labels (per scored response token; -100 elsewhere)."""
    prompt = tokenizer(rec["prompt"] + "\n", add_special_tokens=False)["input_ids"]
    if layout.backbone == "mllama":
        prefix = [tokenizer.bos_token_id, layout.image_token_id] + prompt
    else:
        prefix = [layout.image_token_id] * layout.n_image_tokens + [tokenizer.bos_token_id] + prompt
    resp = response_tokens(tokenizer, rec["response"])
    if len(resp) != len(rec["labels"]):
        raise ValueError(f"record {rec['id']}: {len(resp)} response tokens but {len(rec['labels'])} labels")
    ids = prefix + resp + [tokenizer.eos_token_id]
    if layout.head == "token":
        scored = list(rec["labels"])
    else:  # naive RM: one label, at the last response token
        scored = [IGNORE_INDEX] * (len(resp) - 1) + [int(all(rec["labels"]))]
    return {"input_ids": ids, "token_type_ids": [0] * len(prefix) + [1] * (len(resp) + 1),
            "labels": [IGNORE_INDEX] * len(prefix) + scored + [IGNORE_INDEX],
            "response_start": len(prefix), "response_len": len(resp)}


class MllamaCollator:
    """Batches of the Mllama layout: padded text, image tiles (``pixel_values`` (B, 1, tiles, 3, H, W),
    ``aspect_ratio_ids``, ``aspect_ratio_mask``) and the dense ``cross_attention_mask`` (B, T, 1, tiles):
    1 from the ``<|image|>`` token to the end of the text, on the tiles the image really has."""

    def __init__(self, processor, image_token_id: int, padding_side: str = "right"):
        self.processor, self.image_token_id, self.padding_side = processor, image_token_id, padding_side

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch([{k: s[k] for k in ("input_ids", "labels") if k in s} for s in samples],
                          self.processor.tokenizer.pad_token_id, self.padding_side)
        vision = self.processor.image_processor([[s["image"]] for s in samples], return_tensors="pt")
        n_tiles = vision.pop("num_tiles")
        batch |= {k: vision[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        ids = batch["input_ids"]
        xmask = torch.zeros(*ids.shape, 1, batch["pixel_values"].shape[2], dtype=torch.long)
        for row in range(len(samples)):
            where = (ids[row] == self.image_token_id).nonzero().flatten()
            if len(where) != 1:
                raise ValueError(f"sample {row}: expected one <|image|> token in the text, found {len(where)}")
            last_real = int(batch["attention_mask"][row].nonzero().max())
            xmask[row, int(where[0]) : last_real + 1, 0, : n_tiles[row][0]] = 1
        batch["cross_attention_mask"] = xmask
        return batch


def collator_for(processor, layout: Layout, padding_side: str = "right"):
    """The batch builder of ``layout``'s backbone."""
    if layout.backbone == "mllama":
        return MllamaCollator(processor, layout.image_token_id, padding_side)
    return VLMCollator(processor, padding_side)
