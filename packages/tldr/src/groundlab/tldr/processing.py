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
from groundlab.shared.multimodal import IGNORE_INDEX, pack_batch, pad_batch

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
    1 from the ``<|image|>`` token to the end of the text, on the tiles the image really has.

    ``packed``: the texts end to end in one padding-free row (:func:`pack_batch`) and the images as
    that row's B images (``pixel_values`` (1, B, tiles, 3, H, W)); each token's cross-attention mask
    (1, N, B, tiles) opens its own sample's image only, so a packed row computes what the padded batch
    does (tested)."""

    def __init__(self, processor, image_token_id: int, padding_side: str = "right", packed: bool = False):
        self.processor, self.image_token_id = processor, image_token_id
        self.padding_side, self.packed = padding_side, packed

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        text = [{k: s[k] for k in ("input_ids", "labels") if k in s} for s in samples]
        images = [[s["image"] for s in samples]] if self.packed else [[s["image"]] for s in samples]
        vision = self.processor.image_processor(images, return_tensors="pt")
        n_tiles = [t for row in vision.pop("num_tiles") for t in row]
        if self.packed:
            batch = pack_batch(text)
            bounds = batch["cu_seq_lens_q"].tolist()
            spans = [(0, i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        else:
            batch = pad_batch(text, self.processor.tokenizer.pad_token_id, self.padding_side)
            real = batch["attention_mask"]
            spans = [(i, 0, int(real[i].nonzero().min()), int(real[i].nonzero().max()) + 1) for i in range(len(samples))]
        batch |= {k: vision[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        ids = batch["input_ids"]
        xmask = torch.zeros(*ids.shape, batch["pixel_values"].shape[1], batch["pixel_values"].shape[2], dtype=torch.long)
        for sample, (row, image, start, end) in enumerate(spans):
            where = (ids[row, start:end] == self.image_token_id).nonzero().flatten()
            if len(where) != 1:
                raise ValueError(f"sample {sample}: expected one <|image|> token in the text, found {len(where)}")
            xmask[row, start + int(where[0]) : end, image, : n_tiles[sample]] = 1
        batch["cross_attention_mask"] = xmask
        return batch


def collator_for(processor, layout: Layout, padding_side: str = "right", packed: bool = False):
    """The batch builder of ``layout``'s backbone; ``packed``: one padding-free row per batch (training)."""
    if layout.backbone == "mllama":
        return MllamaCollator(processor, layout.image_token_id, padding_side, packed)
    return VLMCollator(processor, padding_side, packed)
