"""Self-correction with TLDR's flags (arXiv 2410.04734, Table 4), at toy scale.

The paper gives a VLM its own caption with the words TLDR flags and asks it to rewrite the caption.
A tiny base cannot follow such an instruction unaided, so the base is taught the world's rewrite task
first, once, and the same rewriter then runs three ways that differ only in the marks it is given:

- **none**: the caption as it is (what rewriting alone buys);
- **TLDR**: every word holding a token TLDR scores at P(good) <= 0.5, in brackets;
- **oracle**: every word holding a token outside the caption's diff alignment with the true caption
  (the labels a perfect token-level reward model would give, :func:`groundlab.tldr.labels.diff_labels`).

The rewriter is the PaliGemma base (the backbone TLDR itself starts from) fine-tuned on ``rewrite en
<caption with marks>`` -> the caption with its *marked* errors corrected (:func:`corrected_where_marked`:
each difference from the true caption is fixed when a word it touches is marked and left as it is
otherwise), on training scenes: the base's own greedy captions of them (its real errors) and one
verified single-edit wrong caption each (:func:`perturb.perturb_caption`, a random taxonomy the scene
allows). Each example's marks are drawn independently: the oracle's (40 %: the target is the true
caption), none (30 %: the target is the caption itself), or the oracle's with misses and false alarms
(30 %: each wrong word kept with p 0.7, each right word marked with p 0.08; a missed error stays, a
marked right word stays right). So the marks decide what changes, and a mark is a place to check,
not an order to change a word. (A rewriter taught the true caption whatever the marks learns to
re-caption from the image and ignores them: 140 of 150 rewrites were the same under every mark set.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from groundlab.shared.bases.vlm import TinyVLMConfig, VLMCollator, encode_text, generate, vision_tower
from groundlab.shared.world import Scene

from .downstream import generator_config
from .labels import diff_labels
from .perturb import TAXONOMIES, check_caption, perturb_caption
from .processing import response_tokens

REWRITE_PROMPT = "rewrite en {caption}"
REWRITE_TARGETS = "the marked differences corrected"  # what the rewriter is taught (part of its stage key)
MARK_MODES = ("none", "tldr", "oracle")
_WORD = re.compile(r"^(\s*)(.*?)([.,!?]*)$", re.S)


def oracle_flags(tokenizer, caption: str, truth: str) -> list[bool]:
    """Per token of ``caption`` (:func:`processing.response_tokens`): whether it lies outside the
    caption's diff alignment with ``truth`` (all False when the two are equal)."""
    ids = response_tokens(tokenizer, caption)
    if not ids:
        raise ValueError("an empty caption has no tokens to flag")
    if caption == truth:
        return [False] * len(ids)
    return [label == 0 for label in diff_labels(response_tokens(tokenizer, truth), ids)]


def corrected_where_marked(tokenizer, caption: str, truth: str, flags: Sequence[bool]) -> str:
    """``caption`` with the differences from ``truth`` that touch a flagged token replaced by the
    truth's text, the others kept (the alignment of :func:`oracle_flags`). No flags give ``caption``,
    every token flagged gives ``truth``, and so do the oracle's flags except where the caption also
    lacks a part of the truth beside another error (a difference that only drops truth tokens touches
    the caption token where they were cut, which the oracle flags only when it is the one difference)."""
    ids, want = response_tokens(tokenizer, caption), response_tokens(tokenizer, truth)
    if len(flags) != len(ids):
        raise ValueError(f"{len(ids)} caption tokens but {len(flags)} flags")
    if ids == want:
        return caption
    out: list[int] = []
    matcher = SequenceMatcher(a=want, b=ids, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        touched = any(flags[j1:j2]) if j2 > j1 else bool(flags[min(j1, len(ids) - 1)])
        out += want[i1:i2] if tag != "equal" and touched else ids[j1:j2]
    return tokenizer.decode(out)


def marked_caption(tokens: Sequence[str], flags: Sequence[bool]) -> str:
    """The caption's text with every word that holds a flagged token in brackets, its trailing
    punctuation outside (``a [small] green [square].``; a flagged comma marks the word it ends);
    ``tokens`` are byte-level token strings (``Ġ`` = a space)."""
    if len(tokens) != len(flags):
        raise ValueError(f"{len(tokens)} tokens but {len(flags)} flags")
    words: list[list] = []  # [text, flagged]
    for token, flag in zip(tokens, flags):
        text = token.replace("Ġ", " ").replace("Ċ", "\n")
        if not words or text[:1].isspace():
            words.append([text, bool(flag)])
        else:
            words[-1][0] += text
            words[-1][1] |= bool(flag)
    out = []
    for text, flag in words:
        lead, core, tail = _WORD.match(text).groups()
        if flag:
            core, tail = (f"[{core}]", tail) if core else ("", f"[{tail}]")
        out.append(lead + core + tail)
    return "".join(out)


def noisy_flags(flags: Sequence[bool], rng: np.random.Generator, keep: float = 0.7,
                false_alarm: float = 0.08) -> list[bool]:
    """The oracle's flags with misses (each kept with p ``keep``) and false alarms (each unflagged
    token flagged with p ``false_alarm``)."""
    return [bool(rng.random() < keep) if f else bool(rng.random() < false_alarm) for f in flags]


@dataclass
class RewriteItem:
    image: np.ndarray
    caption: str
    """The caption to rewrite."""
    truth: str
    """What the rewrite should say: the scene's caption."""
    source: str
    """``base`` (the base's own caption) or a perturbation taxonomy."""


def rewrite_items(scenes: Sequence[Scene], base_captions: Sequence[str], seed: int = 0) -> list[RewriteItem]:
    """Two items a training scene: the base's own caption, and one verified wrong caption of a random
    taxonomy the scene allows (left out when it allows none)."""
    if len(scenes) != len(base_captions):
        raise ValueError(f"{len(scenes)} scenes but {len(base_captions)} captions")
    items = []
    for scene, caption in zip(scenes, base_captions):
        items.append(RewriteItem(scene.image, caption, scene.caption, "base"))
        rng = np.random.default_rng([seed, scene.image_id])
        for t in rng.permutation(len(TAXONOMIES)):
            neg = perturb_caption(scene, TAXONOMIES[int(t)], seed=seed)
            if neg is not None:
                items.append(RewriteItem(scene.image, neg.perturbed, scene.caption, neg.taxonomy))
                break
    return items


class RewriteDataset(Dataset):
    """The rewrite task in the PaliGemma base's layout, each item's marks drawn once (seeded by index)
    from the oracle's (40 %), none (30 %) or the noisy oracle's (30 %); the target corrects the marked
    differences only (``targets``)."""

    def __init__(self, items: Sequence[RewriteItem], tokenizer, cfg: TinyVLMConfig, seed: int = 0):
        self.items, self.encoded, self.targets, self.item_modes = list(items), [], [], []
        self.modes = {"oracle": 0, "none": 0, "noisy": 0}
        for i, item in enumerate(self.items):
            rng = np.random.default_rng([seed, i])
            flags = oracle_flags(tokenizer, item.caption, item.truth)
            u = rng.random()
            mode = "oracle" if u < 0.4 else "none" if u < 0.7 else "noisy"
            self.modes[mode] += 1
            self.item_modes.append(mode)
            if mode == "none":
                flags = [False] * len(flags)
            elif mode == "noisy":
                flags = noisy_flags(flags, rng)
            tokens = tokenizer.convert_ids_to_tokens(response_tokens(tokenizer, item.caption))
            prompt = REWRITE_PROMPT.format(caption=marked_caption(tokens, flags))
            target = corrected_where_marked(tokenizer, item.caption, item.truth, flags)
            self.targets.append(target)
            self.encoded.append(encode_text(tokenizer, cfg, prompt, target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {**self.encoded[i], "image": self.items[i].image}


def rewrite(rewriter, processor, cfg: TinyVLMConfig, images: Sequence[np.ndarray], marked: Sequence[str],
            max_new_tokens: int = 48) -> list[str]:
    """Greedy rewrites of the marked captions."""
    ids = generate(rewriter, processor, cfg, list(images), [REWRITE_PROMPT.format(caption=m) for m in marked],
                   max_new_tokens=max_new_tokens)
    return [processor.tokenizer.decode(x).strip() or "." for x in ids]


def self_correction(rewriter, processor, cfg: TinyVLMConfig, scenes: Sequence[Scene], captions: Sequence[str],
                    tldr_scores: Sequence[tuple[list[str], list[float]]], threshold: float = 0.5) -> dict:
    """The true caption error of ``captions`` before and after one rewrite under each mark set
    (:data:`MARK_MODES`), the share of captions each rewrite changed, how many wrong words each mark
    set marks and misses, and the rewrites themselves (``rewrites/<mode>``, for the run's JSONL)."""
    tok = processor.tokenizer
    wrong = np.array([not check_caption(c, s) for c, s in zip(captions, scenes)])
    out: dict = {"before/true_error": float(wrong.mean()), "n_captions": len(captions)}
    oracle = [oracle_flags(tok, c, s.caption) for c, s in zip(captions, scenes)]
    flags = {"none": [[False] * len(o) for o in oracle], "oracle": oracle,
             "tldr": [[p <= threshold for p in probs] for _, probs in tldr_scores]}
    bad = np.concatenate([np.array(o, bool) for o in oracle])
    tokens = [tok.convert_ids_to_tokens(response_tokens(tok, c)) for c in captions]
    for (toks, _), mine in zip(tldr_scores, tokens):
        if list(toks) != list(mine):
            raise ValueError(f"TLDR scored other tokens than the caption's: {toks} vs {mine}")
    for mode in MARK_MODES:
        marked = [marked_caption(t, f) for t, f in zip(tokens, flags[mode])]
        new = rewrite(rewriter, processor, cfg, [s.image for s in scenes], marked)
        after = np.array([not check_caption(c, s) for c, s in zip(new, scenes)])
        flagged = np.concatenate([np.array(f, bool) for f in flags[mode]])
        out |= {f"{mode}/true_error": float(after.mean()),
                f"{mode}/changed": float(np.mean([a != b for a, b in zip(new, captions)])),
                f"{mode}/fixed": float((wrong & ~after).mean()), f"{mode}/broken": float((~wrong & after).mean()),
                f"{mode}/flag_recall": float((flagged & bad).sum() / max(1, bad.sum())),
                f"{mode}/flag_precision": float((flagged & bad).sum() / max(1, flagged.sum())),
                f"rewrites/{mode}": [{"marked": m, "rewrite": r} for m, r in zip(marked, new)]}
    return out


def train_rewriter(pali: str | Path, processor, items: Sequence[RewriteItem], train_cfg, out: Path,
                   seed: int = 0) -> None:
    """The PaliGemma base fine-tuned on the rewrite task (the vision tower frozen, as in the base's own
    mix), saved under ``out / "model"``."""
    from transformers import PaliGemmaForConditionalGeneration

    from groundlab.shared.attention import HF_ATTENTION
    from groundlab.shared.distributed import seed_everything
    from groundlab.shared.loading import load_pretrained
    from groundlab.shared.training import train

    seed_everything(seed)
    model = load_pretrained(PaliGemmaForConditionalGeneration, pali, "the PaliGemma base",
                            attn_implementation=HF_ATTENTION)
    vision_tower(model).requires_grad_(False)
    data = RewriteDataset(items, processor.tokenizer, generator_config(model), seed=seed)
    train(model, data, VLMCollator(processor), train_cfg, out / "checkpoints")
    model.save_pretrained(out / "model")

