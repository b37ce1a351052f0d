"""What TLDR is used for (arXiv 2410.04734, Section 5): hallucination rates of any captioner,
flagged spans for human annotators, self-correction prompts, and the tau-scaled LoRA merge that turns
the reward model's backbone back into a generator.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from groundlab.shared.attention import HF_ATTENTION
from groundlab.shared.bases.vlm import CAPTION_PROMPT as BASE_CAPTION_PROMPT
from groundlab.shared.bases.vlm import TinyVLMConfig, generate
from groundlab.shared.devices import model_device, to_device
from groundlab.shared.loading import load_pretrained
from groundlab.shared.lora import merge_scaled
from groundlab.shared.world import Scene

from .metrics import ScoredResponse, ends_sentence, hallucination_rates, sentence_ids_from_text
from .modeling import GENERATORS
from .perturb import check_caption
from .processing import PROMPTS, Layout, collator_for, encode_record, response_tokens

CAPTION_PROMPT = PROMPTS["caption"]


@torch.no_grad()
def score_texts(model, processor, layout: Layout, images: Sequence[np.ndarray], prompts: Sequence[str],
                responses: Sequence[str], batch_size: int = 32) -> list[tuple[list[str], list[float]]]:
    """Per-token P(good) of each response: ``[(token strings, probabilities), ...]``."""
    tok = processor.tokenizer
    collate = collator_for(processor, layout)
    model.eval()
    out = []
    for start in range(0, len(responses), batch_size):
        chunk = range(start, min(start + batch_size, len(responses)))
        samples, spans = [], []
        for i in chunk:
            ids = response_tokens(tok, responses[i])
            if not ids:
                raise ValueError(f"response #{i} is empty")
            rec = {"id": str(i), "prompt": prompts[i], "response": responses[i], "labels": [1] * len(ids)}
            enc = encode_record(tok, rec, layout)
            samples.append({"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
                            "labels": enc["labels"], "image": images[i]})
            spans.append((enc["response_start"], enc["response_len"], tok.convert_ids_to_tokens(ids)))
        batch = collate(samples)
        batch.pop("labels")
        batch = to_device(batch, model_device(model))  # the model may be on a GPU
        probs = torch.sigmoid(model(**batch).logits.float())
        for row, (s, n, toks) in enumerate(spans):
            out.append((toks, probs[row, s : s + n].tolist()))
    return out


def rate_captions(reward_model, processor, layout: Layout, scenes: Sequence[Scene], captions: Sequence[str],
                  threshold: float = 0.5) -> dict[str, float]:
    """TLDR's token / sentence / response hallucination rates of ``captions`` (one per scene), and
    ``true_error``: the share of captions that are actually wrong (checked against the scene)."""
    images = [s.image for s in scenes]
    scored = score_texts(reward_model, processor, layout, images, [CAPTION_PROMPT] * len(scenes), captions)
    responses = [ScoredResponse([1] * len(p), p, sentence_ids_from_text(t)) for t, p in scored]
    rates = hallucination_rates(responses, threshold)
    rates["true_error"] = float(np.mean([not check_caption(c, s) for c, s in zip(captions, scenes)]))
    return rates


def tiny_captions(generator, processor, scenes: Sequence[Scene]) -> list[str]:
    """Greedy captions of ``scenes`` by a tiny LLaVA or PaliGemma (the bases' prompts)."""
    cfg = generator_config(generator)
    ids = generate(generator, processor, cfg, [s.image for s in scenes], [BASE_CAPTION_PROMPT[cfg.kind]] * len(scenes))
    return [processor.tokenizer.decode(x).strip() or "." for x in ids]


def generator_config(model) -> TinyVLMConfig:
    """The :class:`TinyVLMConfig` a tiny LLaVA or PaliGemma was built with, as far as its prompts need it."""
    kind = "llava" if isinstance(model, LlavaForConditionalGeneration) else "paligemma"
    vision = model.config.vision_config
    return TinyVLMConfig(kind=kind, image_size=vision.image_size, patch_size=vision.patch_size)


def captioner_rates(reward_model, processor, layout: Layout, captioner_path: str | Path,
                    scenes: Sequence[Scene], threshold: float = 0.5) -> dict[str, float]:
    """Caption ``scenes`` with a saved LLaVA captioner and rate its captions (:func:`rate_captions`)."""
    captioner = load_pretrained(LlavaForConditionalGeneration, captioner_path, "the captioner",
                                attn_implementation=HF_ATTENTION)
    captions = tiny_captions(captioner, AutoProcessor.from_pretrained(captioner_path), scenes)
    return rate_captions(reward_model, processor, layout, scenes, captions, threshold)


def flagged_spans(tokens: Sequence[str], probs: Sequence[float], threshold: float = 0.5) -> list[tuple[str, bool]]:
    """Merge byte-level tokens into display text and flag those the model calls hallucinated."""
    out = []
    for t, p in zip(tokens, probs):
        text = t.replace("Ġ", " ").replace("Ċ", "\n")
        out.append((text, p <= threshold))
    return out


def highlight_terminal(tokens: Sequence[str], probs: Sequence[float], threshold: float = 0.5) -> str:
    """The response with flagged tokens in red on the terminal (ANSI)."""
    return "".join(f"\033[1;31m{t}\033[0m" if bad else t for t, bad in flagged_spans(tokens, probs, threshold))


def highlight_html(tokens: Sequence[str], probs: Sequence[float], threshold: float = 0.5) -> str:
    """An HTML fragment for annotators: flagged tokens marked, every token's P(good) in its title."""
    parts = []
    for (text, bad), p in zip(flagged_spans(tokens, probs, threshold), probs):
        esc = html.escape(text)
        style = ' style="background:#f8b4b4"' if bad else ""
        parts.append(f'<span title="P(good)={p:.3f}"{style}>{esc}</span>')
    return "<p>" + "".join(parts) + "</p>"


def self_correction_prompt(response: str, tokens: Sequence[str], probs: Sequence[float],
                           threshold: float = 0.5) -> str:
    """The rewrite prompt of the paper's self-correction use (Table 4): flagged words listed per sentence."""
    spans = flagged_spans(tokens, probs, threshold)
    sentences, current, flagged = [], "", []
    for k, (text, bad) in enumerate(spans):
        current += text
        if bad and text.strip():
            flagged.append(text.strip())
        if ends_sentence(current, spans[k + 1][0] if k + 1 < len(spans) else ""):
            sentences.append((current.strip(), flagged))
            current, flagged = "", []
    if current.strip():
        sentences.append((current.strip(), flagged))
    lines = [f'- "{s}": {", ".join(repr(w) for w in f)}' for s, f in sentences if f]
    if not lines:
        return f"The following description has no flagged word; keep it as it is:\n{response}"
    return ("The following image description may contain hallucinations. The words flagged as possibly wrong, "
            "per sentence, are:\n" + "\n".join(lines) + "\nLook at the image again and rewrite the description, "
            "fixing only what is wrong.\nDescription: " + response)


def restore_generator(peft_reward_model, tau: float = 0.25, original: str | Path | None = None):
    """Section 5.3: drop the reward head, merge the LoRA into the backbone at strength ``tau``
    (``alpha_infer / alpha_train``; 0.25 was best, 1 collapses) and put the LM head back.

    PaliGemma ties its LM head to the token embeddings, so the head comes back with the (merged)
    backbone. Mllama's LM head is its own matrix: pass ``original``, the pretrained directory the reward
    model was built from, and its ``lm_head`` is loaded from there (the reward model never trained it).
    ``peft_reward_model`` is merged in place: load the adapter again for another ``tau``.
    """
    kind = peft_reward_model.config.backbone_type
    merged = merge_scaled(peft_reward_model, tau)
    generator = GENERATORS[kind](merged.config.backbone_config)
    generator.set_attn_implementation(HF_ATTENTION)
    generator.model.load_state_dict(merged.backbone.state_dict(), strict=True)
    if kind == "paligemma":
        generator.tie_weights()
    else:
        if original is None:
            raise ValueError("restoring an Mllama generator needs original=<the pretrained directory> for its lm_head")
        head = load_pretrained(GENERATORS[kind], original, "the original generator").lm_head
        generator.lm_head.load_state_dict(head.state_dict(), strict=True)
    return generator
