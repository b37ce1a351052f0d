"""Can the LLaVA base's language model (128-d, 4 layers) look an item up by its number, in text alone?

The binding ``<Region k>`` -> the k-th prompt needs a lookup by number; ``diagnose_reading.py`` found
it missing with prompts on images. This script asks the same of the language model with no image, on
random boxes written as the world tokenizer's location tokens, trained from scratch (``--init
scratch``, the base's text sizes, or ``--layers`` / ``--hidden`` others) or from a LLaVA base's
weights (``--init DIR``), batch 32, fresh samples each step, AdamW at ``--lr``, bf16 autocast where
the CPU runs it natively (fp32 elsewhere); teacher-forced accuracy (every answer token right) on 300
held-out samples every 250 steps:

- ``--mode copy`` (one hop): ``Regions: 1 <box>, 2 <box>, ... What is region k?`` -> box k's four
  location tokens;
- ``--mode twohop``: the same list, then the boxes' contents listed apart in another order
  (``Objects: <box> red circle, <box> blue star, ...``) -> the colour and kind of box k: the number
  finds a box, the box finds its words, as a prompt's number finds its slot and the slot its region of
  the image;
- ``--mode twohop_spelled``: the same question, answered with both hops written out: box k's four
  location tokens, then its colour and kind (each step a one-hop copy of something already in the
  sequence). Accuracy counts every answer token, the box included.

Answering with one of the listed items at random is right (1/2 + 1/3 + 1/4) / 3 = 0.36 of the time
(2-4 items).

    .venv/bin/python packages/vp_mllm/scripts/diagnose_lookup.py --mode copy --steps 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

from groundlab.shared.bases.vlm import TinyVLMConfig
from groundlab.shared.boxes import loc_token_names
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.training import resolve_bf16

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
KINDS = ("circle", "square", "triangle", "star")
BINS = 32


class Samples:
    def __init__(self, tok, mode: str):
        self.tok, self.mode = tok, mode
        self.locs = tok.convert_tokens_to_ids(loc_token_names(BINS))

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def box(self, b) -> list[int]:
        return [self.locs[c] for c in b]

    def __call__(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        n, = rng.integers(2, 5, 1)
        k = int(rng.integers(n))
        boxes = []
        for _ in range(n):
            (x0, x1), (y0, y1) = np.sort(rng.integers(0, BINS, 2)), np.sort(rng.integers(0, BINS, 2))
            boxes.append((x0, y0, x1, y1))
        prompt = self.ids("Regions:")
        for i, b in enumerate(boxes):
            prompt += self.ids(f" {i + 1}") + self.box(b) + self.ids("," if i < n - 1 else ".")
        answer = self.box(boxes[k])
        if self.mode.startswith("twohop"):
            words = [(str(rng.choice(COLOURS)), str(rng.choice(KINDS))) for _ in range(n)]
            prompt += self.ids(" Objects:")
            for j in rng.permutation(n):
                prompt += self.box(boxes[j]) + self.ids(f" {words[j][0]} {words[j][1]},")
            answer = self.ids(f" {words[k][0]} {words[k][1]}")
            if self.mode == "twohop_spelled":
                answer = self.box(boxes[k]) + answer
        return [self.tok.bos_token_id] + prompt + self.ids(f" What is region {k + 1}?"), answer


def batch(items, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(p) + len(a) for p, a in items)
    ids = torch.full((len(items), length), pad)
    labels = torch.full((len(items), length), -100)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for j, (p, a) in enumerate(items):
        ids[j, :len(p) + len(a)] = torch.tensor(p + a)
        mask[j, :len(p) + len(a)] = 1
        labels[j, len(p):len(p) + len(a)] = torch.tensor(a)
    return ids, mask, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("copy", "twohop", "twohop_spelled"), default="copy")
    ap.add_argument("--init", default="scratch", help="'scratch' or a LLaVA base directory")
    ap.add_argument("--layers", type=int, help="with --init scratch: decoder layers (default: the base's)")
    ap.add_argument("--hidden", type=int, help="with --init scratch: width (default: the base's; FFN 4x)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    tok = load_tokenizer()
    if args.init == "scratch":
        c = TinyVLMConfig()
        hidden = args.hidden or c.text_hidden
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=hidden, intermediate_size=4 * hidden if args.hidden else c.text_ffn,
            num_hidden_layers=args.layers or c.text_layers,
            num_attention_heads=c.text_heads, num_key_value_heads=c.text_kv_heads, vocab_size=len(tok),
            max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id))
    else:  # text-only forwards through the base's language model
        if args.layers or args.hidden:
            raise SystemExit("--layers / --hidden size a model from scratch; a base has its own")
        model = LlavaForConditionalGeneration.from_pretrained(args.init)
    sample = Samples(tok, args.mode)
    held_out = [sample(np.random.default_rng([1, i])) for i in range(300)]
    rng = np.random.default_rng([0, args.seed])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def accuracy() -> float:
        model.eval()
        right = 0
        with torch.no_grad():
            for i in range(0, len(held_out), 100):
                ids, mask, labels = batch(held_out[i:i + 100], tok.pad_token_id)
                pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
                scored = labels[:, 1:] != -100
                right += int(((pred == labels[:, 1:]) | ~scored).all(1).sum())
        model.train()
        return right / len(held_out)

    bf16 = resolve_bf16("auto")
    print(f"step 0: accuracy {accuracy():.3f}", flush=True)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        ids, mask, labels = batch([sample(rng) for _ in range(32)], tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 250 == 0:
            print(f"step {step}: loss {loss.item():.3f}, accuracy {accuracy():.3f} ({time.time() - t0:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
