"""The offline tokenizer of the synthetic world: a small byte-level BPE, checked in as a fixture.

Tiny configs never download a tokenizer. This one is trained (with ``tokenizers``) on the world's
texts rendered through the default chat layout plus the prompt phrases the packages use, so every
world word preceded by a space is a single token, while any other text still encodes (byte
fallback). It is wrapped as a ``PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<unk>``/``<pad>``,
``<image>`` and the location tokens ``<loc0000>`` ... of :mod:`groundlab.shared.boxes` (one per
coordinate bin; PaliGemma's way of writing boxes, which the tiny LLaVA base uses too), a chat template matching :class:`groundlab.shared.multimodal.ChatTemplate`'s default,
and packages add their own special tokens (``[SEG]``, ``<region>`` ...) with ``add_special_tokens``.

Rebuild the fixture with ``python -m groundlab.shared.tokenizer build`` (deterministic; a test checks
that the checked-in files equal a fresh build).
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from .boxes import LOC_BINS, loc_token_names
from .world import World, WorldConfig, vocabulary

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
IMAGE_TOKEN = "<image>"
VOCAB_SIZE = 1024

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set messages = messages[1:] %}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% if not loop.first %} {% endif %}USER: {{ m['content'] }} ASSISTANT:"
    "{% else %} {{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
)

# Phrases of the packages' prompt templates, so they tokenize compactly too.
PROMPT_PHRASES = (
    "USER: ASSISTANT: Human: Assistant: ### Human: ### Assistant:",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "Please segment the object in this image. Sure, it is [SEG].",
    "Can you segment the object in the image? Please describe the image in detail with interleaved "
    "segmentation masks. Describe the image briefly. Describe the region. What is in the region?",
    "Please give a brief description of region1 <region>. Mark 1 <mark> <Mark 1> <Region 1>:",
    "Please provide the bounding box of the object. Where is the object? Which object is it?",
    "Describe the image. Answer the question using a single word or phrase. Is this caption correct?",
    "Rewrite the caption and fix the flagged words: 0 1 2 3 4 5 6 7 8 9 10",
)


def _corpus(n_scenes: int = 3000) -> list[str]:
    texts = list(PROMPT_PHRASES)
    for cfg in (WorldConfig(), WorldConfig(max_objects=6, glyph_prob=0.5, image_size=128)):
        world = World(cfg, seed=0)
        for i in range(n_scenes // 2):
            scene = world.scene("train", i)
            texts.append(f"USER: {IMAGE_TOKEN}\nDescribe the image. ASSISTANT: {scene.caption}</s>")
            texts += [f"USER: Please segment {r.text} in this image. ASSISTANT: {r.text}</s>" for r in scene.refs]
            texts += [f"USER: {q.question} ASSISTANT: {q.answer}</s>" for q in scene.qa]
            # PaliGemma's layout: prefix, newline, suffix (answers start without a space there)
            texts.append(f"caption en\n{scene.caption}</s>")
            texts += [f"{q.question}\n{q.answer}</s>" for q in scene.qa]
    words = vocabulary(WorldConfig())
    texts += [" ".join(words), " " + " ".join(words), "\n".join(words)]
    return texts


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE from scratch (about a second) and wrap it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = [SPECIAL_TOKENS["unk_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"],
                SPECIAL_TOKENS["pad_token"], IMAGE_TOKEN, *loc_token_names(LOC_BINS)]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS,
                                      additional_special_tokens=[IMAGE_TOKEN, *loc_token_names(LOC_BINS)],
                                      model_max_length=4096)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def fixture_dir() -> Path:
    return Path(str(resources.files("groundlab.shared") / "assets" / "tokenizer"))


def load_tokenizer(extra_special_tokens: list[str] | None = None) -> PreTrainedTokenizerFast:
    """The checked-in world tokenizer; ``extra_special_tokens`` are added as atomic special tokens
    (their ids follow the base vocabulary, so resize the model's embeddings after adding them)."""
    path = fixture_dir()
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer fixture missing at {path}; rebuild it with "
                                "`python -m groundlab.shared.tokenizer build`")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if extra_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)},
                               replace_extra_special_tokens=False)
    return tok


def save_fixture(out: Path | None = None) -> Path:
    out = Path(out) if out is not None else fixture_dir()
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(str(out))
    # Keep the fixture stable across runs: pretty-printed, keys sorted.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = out / name
        if p.is_file():
            p.write_text(json.dumps(json.loads(p.read_text()), indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m groundlab.shared.tokenizer")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the world tokenizer and write it (default: the package fixture)")
    b.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        print(save_fixture(args.out))


if __name__ == "__main__":
    main()
