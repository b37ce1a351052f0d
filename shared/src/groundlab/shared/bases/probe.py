"""Does the LLaVA base's hidden state carry what an instruction refers to? A linear probe.

IVM (``packages/ivm``) conditions its mask generator on the LLaVA's last hidden state at the token
before the answer; it can only follow an instruction if that state carries the referred object. The
probe measures it the way ``packages/ivm/scripts/diagnose_condition.py probe`` does, on the same
items: every target object of 400 training and 100 held-out scenes, each with all its instructions
(``find <referring expression>.`` and the questions about it alone: colour, size, shape), in IVM's
prompt ``USER: <image>\\n{instruction} \\n ASSISTANT:``, left-padded; the state at the second-to-last
token; a linear classifier of the target's (colour, kind) on standardised features (Adam, lr 1e-2,
weight decay 1e-3, 300 full-batch steps); held-out accuracy.

The text-only ceiling is the same probe on a bag of the instruction's words (what the words alone
allow: a relational expression names its target's kind and maybe its colour, not always both).
Both are reported on all instructions and on attribute expressions alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..multimodal import expand_token
from ..tokenizer import IMAGE_TOKEN
from ..world import World
from .sam import semantic_class

PROMPT = "USER: <image>\n{instruction} \n ASSISTANT:"  # IVM's policy prompt (groundlab.ivm.data.POLICY_PROMPT)


def instructions(scene) -> dict[int, list[tuple[str, str]]]:
    """Per target object: its instructions with their kind (``attribute``, ``superlative``, ``relation``
    for referring expressions, ``question`` for the colour / size / shape questions about it alone)."""
    out: dict[int, list[tuple[str, str]]] = {}
    for r in scene.refs:
        out.setdefault(r.target, []).append((f"find {r.text}.", r.type))
    for q in scene.qa:
        if q.type in ("colour", "size", "shape") and len(q.objects) == 1:
            out.setdefault(q.objects[0], []).append((q.question, "question"))
    return out


def class_of(world: World, obj) -> int:
    """The object's (colour, kind) index, 0-based (the SAM base's class ids count background as 0)."""
    return semantic_class(world, obj) - 1


def words_of(text: str) -> list[str]:
    return text.lower().replace("?", " ").replace(".", " ").replace(",", " ").split()


def items(world: World, split: str, n: int) -> list[tuple[np.ndarray, str, int, str]]:
    out = []
    for s in world.scenes(split, n):
        for t, ins in instructions(s).items():
            out += [(s.image, text, class_of(world, s.objects[t]), kind) for text, kind in ins]
    return out


@torch.no_grad()
def hidden_states(llava, processor, its, batch_size: int = 64) -> torch.Tensor:
    """(N, D) last hidden states at the second-to-last token of each item's left-padded prompt."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    n_img = processor.image_processor.crop_size["height"] // processor.patch_size
    n_img *= n_img
    llava.eval()
    out = []
    for k in range(0, len(its), batch_size):
        group = its[k:k + batch_size]
        rows = [expand_token({"input_ids": tok(PROMPT.format(instruction=i[1]))["input_ids"]}, image_id, n_img)["input_ids"]
                for i in group]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        att = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        px = processor.image_processor([i[0] for i in group], return_tensors="pt")["pixel_values"]
        hs = llava.model(input_ids=ids, attention_mask=att, pixel_values=px, use_cache=False).last_hidden_state
        out.append(hs[:, -2].float())
    return torch.cat(out)


def bag_of_words(its, vocab: dict[str, int]) -> torch.Tensor:
    x = torch.zeros(len(its), len(vocab))
    for row, i in enumerate(its):
        for w in words_of(i[1]):
            if w in vocab:
                x[row, vocab[w]] += 1
    return x


def linear_probe(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, n_classes: int, seed: int = 0) -> torch.Tensor:
    """Held-out predictions of a linear classifier trained on standardised ``x``."""
    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xv = (x - mu) / sd, (xv - mu) / sd
    cls = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(cls.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        loss = F.cross_entropy(cls(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return cls(xv).argmax(1)


def probe(llava, processor, world: World, seed: int = 0, n_train: int = 400, n_val: int = 100) -> dict[str, float]:
    """Held-out (colour, kind) accuracy of the probe on the hidden state and on the words, on all
    instructions and on attribute expressions alone; the majority class beside them."""
    train, val = items(world, "train", n_train), items(world, "val", n_val)
    y, yv = torch.tensor([i[2] for i in train]), torch.tensor([i[2] for i in val])
    n_cls = len(world.config.colours) * len(world.config.kinds)
    words = sorted({w for i in train for w in words_of(i[1])})
    vocab = {w: k for k, w in enumerate(words)}
    preds = {"hidden": linear_probe(hidden_states(llava, processor, train), y,
                                    hidden_states(llava, processor, val), n_cls, seed),
             "words": linear_probe(bag_of_words(train, vocab), y, bag_of_words(val, vocab), n_cls, seed)}
    attribute = torch.tensor([i[3] == "attribute" for i in val])
    out = {"probe/n_val": len(val), "probe/majority": float((yv == y.mode().values).float().mean())}
    for name, p in preds.items():
        right = (p == yv).float()
        out[f"probe/{name}/all"] = float(right.mean())
        out[f"probe/{name}/attribute"] = float(right[attribute].mean())
    return out
