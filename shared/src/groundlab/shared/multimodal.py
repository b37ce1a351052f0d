"""What every multimodal LLM here does to its text side: splice visual features into the token
embeddings at special-token positions, build supervised conversations whose labels cover only the
assistant's words, and batch them: padded, or packed into one padding-free row (``pack_batch``).

The splice follows transformers' Llava (``masked_scatter`` on a special-token mask) and checks counts
first, so a prompt whose placeholders do not match its features fails with a clear message instead of
deep inside a tensor op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def token_counts(input_ids: torch.Tensor, token_id: int) -> list[int]:
    """How many ``token_id`` tokens each row of ``input_ids`` (B, T) holds."""
    return (input_ids == token_id).sum(dim=-1).tolist()


def splice_features(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    features: torch.Tensor | Sequence[torch.Tensor],
    token_id: int,
    token_name: str = "<image>",
) -> torch.Tensor:
    """Replace the embedding at every ``token_id`` position with the next feature row, in reading order.

    ``inputs_embeds`` (B, T, D); ``input_ids`` (B, T); ``features`` either (N, D), (B, n, D) or a list
    of per-sample (n_b, D) tensors. With a list, each sample's count is checked on its own; otherwise
    only the total can be. Returns a new tensor; gradients flow into both inputs.
    """
    mask = input_ids == token_id  # (B, T)
    if isinstance(features, (list, tuple)):
        counts = mask.sum(dim=-1).tolist()
        for b, (have, feats) in enumerate(zip(counts, features)):
            if have != feats.shape[0]:
                raise ValueError(f"sample {b}: {have} {token_name} tokens in input_ids but {feats.shape[0]} "
                                 f"feature rows")
        if len(features) != len(counts):
            raise ValueError(f"{len(features)} feature tensors for a batch of {len(counts)}")
        features = torch.cat(list(features), dim=0) if features else inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
    flat = features.reshape(-1, features.shape[-1])
    n_tokens = int(mask.sum())
    if n_tokens != flat.shape[0]:
        raise ValueError(f"{n_tokens} {token_name} tokens in input_ids but {flat.shape[0]} feature rows "
                         f"(features of shape {tuple(features.shape)})")
    if flat.shape[-1] != inputs_embeds.shape[-1]:
        raise ValueError(f"feature width {flat.shape[-1]} != embedding width {inputs_embeds.shape[-1]}")
    mask3 = mask.unsqueeze(-1).expand_as(inputs_embeds)
    return inputs_embeds.masked_scatter(mask3, flat.to(inputs_embeds.dtype))


# ----------------------------------------------------------------------------------------------
# conversations and labels


@dataclass(frozen=True)
class ChatTemplate:
    """A plain-text chat layout:
    ``[bos] system user_prefix Q assistant_prefix answer_lead A turn_end sep user_prefix ...``.

    Only ``answer_lead + A + turn_end`` is supervised. The default is the Vicuna-v1 style layout of the
    world tokenizer's chat template; each package defines its paper's template with this class.
    Keeping the space before the answer in the answer (``answer_lead``) makes segment-wise and
    whole-text tokenization agree for byte-level BPE tokenizers.
    """

    system: str = ""
    user_prefix: str = "USER: "
    assistant_prefix: str = " ASSISTANT:"
    answer_lead: str = " "
    turn_end: str = "</s>"
    sep: str = " "
    add_bos: bool = True


def _turns(conversation: Sequence[dict]) -> list[tuple[str, str]]:
    out = []
    for i, turn in enumerate(conversation):
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role in ("human", "user"):
            role = "user"
        elif role in ("gpt", "assistant"):
            role = "assistant"
        else:
            raise ValueError(f"turn {i}: unknown role {role!r} (expected human/user or gpt/assistant)")
        if not isinstance(text, str):
            raise ValueError(f"turn {i}: text must be a string, got {type(text).__name__}")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"turn {i}: expected a {expected} turn (turns must alternate, user first), got {role}")
        out.append((role, text))
    return out


def conversation_segments(conversation: Sequence[dict], template: ChatTemplate,
                          add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The conversation as ``(text, supervised)`` segments in order."""
    turns = _turns(conversation)
    segments: list[tuple[str, bool]] = []
    if template.system:
        segments.append((template.system, False))
    for i, (role, text) in enumerate(turns):
        if role == "user":
            prefix = (template.sep if i > 0 else "") + template.user_prefix
            segments.append((prefix + text + template.assistant_prefix, False))
        else:
            segments.append((template.answer_lead + text + template.turn_end, True))
    if add_generation_prompt and (not turns or turns[-1][0] == "assistant"):
        raise ValueError("add_generation_prompt needs a conversation that ends with a user turn")
    return segments


def tokenize_conversation(tokenizer, conversation: Sequence[dict], template: ChatTemplate,
                          max_length: int | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (``IGNORE_INDEX`` outside the assistant's answers).

    Segments are tokenized one by one and concatenated, so label boundaries are exact; inference
    prompts built by :func:`tokenize_prompt` produce the same ids for the same prefix. Too-long
    sequences raise (never silently truncated into a sample without targets).
    """
    ids: list[int] = [tokenizer.bos_token_id] if template.add_bos else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    segments = conversation_segments(conversation, template)
    encoded = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]  # one call
    for seg, (_, supervised) in zip(encoded, segments):
        ids += seg
        labels += seg if supervised else [IGNORE_INDEX] * len(seg)
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"conversation of {len(ids)} tokens exceeds max_length={max_length}")
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError("conversation has no supervised (assistant) token")
    return {"input_ids": ids, "labels": labels}


def tokenize_prompt(tokenizer, conversation: Sequence[dict], template: ChatTemplate) -> list[int]:
    """Ids of a generation prompt: the conversation (ending with a user turn) + the assistant prefix."""
    ids: list[int] = [tokenizer.bos_token_id] if template.add_bos else []
    for text, _ in conversation_segments(conversation, template, add_generation_prompt=True):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def expand_token(sample: dict[str, list[int]], token_id: int, n: int) -> dict[str, list[int]]:
    """Repeat every ``token_id`` of ``input_ids`` ``n`` times (one placeholder per visual feature, as
    transformers' Llava expects); the copies are never supervised."""
    ids, labels = [], []
    for i, tid in enumerate(sample["input_ids"]):
        if tid == token_id:
            ids += [token_id] * n
            labels += [IGNORE_INDEX] * n
        else:
            ids.append(tid)
            labels.append(sample["labels"][i] if "labels" in sample else tid)
    out = {"input_ids": ids}
    if "labels" in sample:
        out["labels"] = labels
    return out


# ----------------------------------------------------------------------------------------------
# batching


def pad_batch(samples: Sequence[dict[str, list[int]]], pad_token_id: int, padding_side: str = "right"
              ) -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` / ``labels`` lists to (B, T) with an ``attention_mask``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
    longest = max(len(s["input_ids"]) for s in samples)
    out = {"input_ids": [], "attention_mask": []}
    has_labels = "labels" in samples[0]
    if has_labels:
        out["labels"] = []
    left = padding_side == "left"
    for s in samples:
        n = longest - len(s["input_ids"])
        out["input_ids"].append(_pad(s["input_ids"], pad_token_id, n, left))
        out["attention_mask"].append(_pad([1] * len(s["input_ids"]), 0, n, left))
        if has_labels:
            out["labels"].append(_pad(s["labels"], IGNORE_INDEX, n, left))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def _pad(seq: Sequence[int], value: int, n: int, left: bool) -> list[int]:
    return [value] * n + list(seq) if left else list(seq) + [value] * n


def pack_batch(samples: Sequence[dict[str, list[int]]], position_offset: int = 0, pad_to_multiple_of: int = 1,
               pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate samples into one padding-free row (1, N): ``input_ids``, ``labels``, ``position_ids``
    restarting at ``position_offset`` for every sample (0: Llama; 1: PaliGemma counts from 1), an
    all-ones ``attention_mask``, and the sequence bounds under transformers' padding-free names
    (``cu_seq_lens_q`` / ``cu_seq_lens_k``, int32 cumulative lengths starting at 0, and ``max_length_q``
    / ``max_length_k``), which the ``groundlab`` attention (and flash-attn) read. Samples with
    ``token_type_ids`` (PaliGemma: 0 = prefix, attended bidirectionally) add ``prefix_lens``, the
    prefix length of each. The first label of every sample is ignored, so no token learns to predict
    the start of the next, unrelated sample; the loss is the padded batch's (tested).

    ``pad_to_multiple_of``: append one filler sequence (``pad_token_id`` tokens, every label ignored, a
    sequence of its own in the bounds, causal) so that the row's length is a multiple of it. The loss
    and gradients stay the same (tested); what it buys is memory: a training run's rows then come in a
    few recurring lengths, whose tensors the CPU allocator reuses, where rows of every length make it
    fragment (the LLaVA base's mix grew past 3.4 GiB in 75 steps and kept growing; with 256 here and
    the attention's :data:`~groundlab.shared.attention.PACKED_LENGTH_MULTIPLE` it stays at 1.9 GiB)."""
    if not samples:
        raise ValueError("cannot pack an empty batch")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    fill = -sum(len(s["input_ids"]) for s in samples) % pad_to_multiple_of
    if fill:
        if pad_token_id is None:
            raise ValueError("pad_to_multiple_of > 1 needs the pad_token_id of the filler sequence")
        filler = {"input_ids": [pad_token_id] * fill, "labels": [IGNORE_INDEX] * fill}
        if "token_type_ids" in samples[0]:
            filler["token_type_ids"] = [1] * fill  # no prefix: plain causal
        samples = [*samples, filler]
    ids, labels, positions, cu, prefix = [], [], [], [0], []
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        if n == 0:
            raise ValueError(f"cannot pack an empty sample (sample {i})")
        ids += s["input_ids"]
        lab = list(s.get("labels", s["input_ids"]))
        if len(lab) != n:
            raise ValueError(f"sample {i}: {len(lab)} labels for {n} input_ids")
        lab[0] = IGNORE_INDEX
        labels += lab
        positions += range(position_offset, position_offset + n)
        cu.append(cu[-1] + n)
        if "token_type_ids" in s:
            types = list(s["token_type_ids"])
            p = types.index(1) if 1 in types else n
            if len(types) != n or any(t != 0 for t in types[:p]) or any(t != 1 for t in types[p:]):
                raise ValueError(f"sample {i}: token_type_ids must be a prefix of 0s then 1s over its {n} tokens")
            prefix.append(p)
    if prefix and len(prefix) != len(samples):
        raise ValueError("either every sample carries token_type_ids or none does")
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    out = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": longest, "max_length_k": longest,
    }
    if prefix:
        out["prefix_lens"] = torch.tensor(prefix, dtype=torch.int32)
    return out


def keep_labeled_logits(batch: dict[str, torch.Tensor], multiple: int = 64) -> dict[str, torch.Tensor]:
    """Add what makes a transformers causal LM (Llava, PaliGemma, ...) compute its logits only where a
    label follows: ``logits_to_keep``, a (B, T) bool mask of the positions whose next label is not
    ignored, and ``shift_labels``, those labels in the same order (transformers' ``ForCausalLMLoss``
    takes them instead of shifting ``labels``, which stay in the batch for the Trainer's token count).
    The loss and gradients are the full-logits ones (tested); the language-model head and its softmax
    then run over the answer tokens only, not the image and prompt (PaliGemma base: a step 0.85x).
    The kept count is rounded up to a multiple of ``multiple`` with ignored positions, so that a long
    run's logits come in a few recurring sizes (see :func:`pack_batch`'s ``pad_to_multiple_of``)."""
    labels = batch["labels"]
    following = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts t + 1
    keep = following != IGNORE_INDEX
    extra = -int(keep.sum()) % multiple
    if extra:
        spare = torch.nonzero(~keep.flatten()).flatten()[:extra]
        keep = keep.flatten().index_fill(0, spare, True).view_as(keep)
    return {**batch, "logits_to_keep": keep, "shift_labels": following[keep]}


@dataclass
class PackedRows:
    """The real tokens of a padded batch laid end to end in one padding-free row, for a model that
    builds its language model's input padded (splicing per sample) and runs the language model packed:
    ``pack`` (B, T, ...) -> (1, N, ...), ``unpack`` back (zeros at padding), ``kwargs`` the row's
    all-ones ``attention_mask``, ``position_ids`` and sequence bounds under transformers' padding-free names (what
    :func:`pack_batch` gives; read by the ``groundlab`` attention). Built by :func:`pack_rows`."""

    index: torch.Tensor  # (N,) flat (B * T) position of each real token, row-major
    shape: tuple[int, int]  # (B, T)
    kwargs: dict

    @property
    def starts(self) -> torch.Tensor:
        """(B,) index in the row of each sequence's first token."""
        return self.kwargs["cu_seq_lens_q"][:-1].long()

    @property
    def ends(self) -> torch.Tensor:
        """(B,) index in the row of each sequence's last token."""
        return self.kwargs["cu_seq_lens_q"][1:].long() - 1

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(0, 1).index_select(0, self.index.to(x.device))[None]

    def pack_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """:meth:`pack` with each sequence's first label ignored: a causal LM's loss shifts by one, so
        the row's last token of one sequence must not learn to predict the next sequence's first (in
        the padded batch no token predicts a first label either)."""
        return self.pack(labels).index_fill(1, self.starts.to(labels.device), IGNORE_INDEX)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        b, t = self.shape
        flat = x.new_zeros(b * t, *x.shape[2:])
        return flat.index_copy(0, self.index.to(x.device), x[0]).view(b, t, *x.shape[2:])


def pack_rows(attention_mask: torch.Tensor, position_offset: int = 0) -> PackedRows:
    """:class:`PackedRows` of a padded batch (either padding side): sequences in batch order, positions
    restarting at ``position_offset`` for each (0: Llama; 1: PaliGemma). Every row needs a real token."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (B, T), got {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    lengths = real.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError(f"row {int((lengths == 0).nonzero()[0])} of the batch has no real token")
    index = real.flatten().nonzero().flatten()
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    positions = torch.cat([torch.arange(int(n)) for n in lengths]) + position_offset
    longest = int(lengths.max())
    kwargs = {"attention_mask": torch.ones(1, int(lengths.sum()), dtype=torch.long, device=attention_mask.device),
              "position_ids": positions[None].to(attention_mask.device), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
              "max_length_q": longest, "max_length_k": longest}
    return PackedRows(index, tuple(attention_mask.shape), kwargs)


def causal_lm_forward(lm, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                      packed: bool = False, **kwargs):
    """``lm`` (a HF causal LM) on input embeddings, padded or (``packed``) on the batch's real tokens laid
    end to end in one padding-free row: the same loss and, unpacked, the same (B, T, V) logits.
    Returns a ``CausalLMOutputWithPast`` with ``loss`` and ``logits``; ``kwargs`` (the Trainer's
    ``num_items_in_batch``) go to the LM's loss."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .attention import require_packing_support

    if packed:
        require_packing_support(lm)
        rows = pack_rows(attention_mask)
        out = lm(inputs_embeds=rows.pack(embeds), use_cache=False,
                 labels=None if labels is None else rows.pack_labels(labels), **rows.kwargs, **kwargs)
        return CausalLMOutputWithPast(loss=out.loss, logits=rows.unpack(out.logits))
    out = lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False, **kwargs)
    return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)
