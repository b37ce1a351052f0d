"""Where instruction following breaks in the toy: the image side or the LMM side.

1. ``generator``: the IVM generator on frozen SAM-base embeddings, conditioned not by the LMM but by an
   oracle token: an embedding of the target's (colour, kind) (``attr``), an MLP of its centre
   (``loc``), one constant token (``none``, the "segment everything" floor), or the mean of learned
   embeddings of the instruction's words (``words``: a text encoder that passes the words through,
   trained with the generator; every instruction of every target). Held-out mIoU says what the
   frozen encoder + generator can do when the condition carries the target (or the words).
2. ``probe``: linear probes on the LMM's last hidden state (the base's, no LoRA) at the condition token
   and its neighbours: held-out accuracy for the target's (colour, kind) and error of its centre.
   Says whether the condition token carries the target before any IVM training.

    .venv/bin/python packages/ivm/scripts/diagnose_condition.py generator --condition attr
    .venv/bin/python packages/ivm/scripts/diagnose_condition.py probe [--llava DIR]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoProcessor

from groundlab.ivm.data import target_instructions
from groundlab.ivm.modeling import sigmoid_bce, soft_dice
from groundlab.ivm.processing import policy_inputs
from groundlab.ivm.train import ModelConfig, build_from_bases
from groundlab.shared.bases import ensure_base
from groundlab.shared.bases.probe import class_of, words_of
from groundlab.shared.world import World, WorldConfig


def generator_check(model, world: World, condition: str, steps: int, seed: int) -> float:
    """Train the generator (and the oracle condition) on targets that are the only one of their
    (colour, kind) in the scene (``words``: every instruction of every target); held-out mIoU."""
    def items(split, n):
        out = []
        for s in world.scenes(split, n):
            if condition == "words":
                for t, instructions in target_instructions(s).items():
                    out += [(s.image, s.objects[t].mask, 0, s.objects[t].position, x) for x in instructions]
                continue
            for o in s.objects:
                if sum(class_of(world, p) == class_of(world, o) for p in s.objects) == 1:
                    out.append((s.image, o.mask, class_of(world, o), o.position, ""))
        return out

    torch.manual_seed(seed)
    train, val = items("train", 1000), items("val", 100)
    images = lambda its: torch.from_numpy(np.stack([i[0] for i in its])).permute(0, 3, 1, 2)  # noqa: E731
    emb_train, emb_val = model.embed_images(images(train)), model.embed_images(images(val))
    t_train = torch.from_numpy(np.stack([i[1] for i in train])).float()
    t_val = torch.from_numpy(np.stack([i[1] for i in val]))
    c, size = model.config.vision_config.out_chans, model.config.vision_config.img_size
    n_cls = len(world.config.colours) * len(world.config.kinds)
    vocab = {w: i for i, w in enumerate(sorted({w for it in train + val for w in words_of(it[4])}))}
    oracle = {"attr": torch.nn.Embedding(n_cls, c), "none": torch.nn.Embedding(1, c),
              "words": torch.nn.EmbeddingBag(max(1, len(vocab)), c, mode="mean"),
              "loc": torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.GELU(), torch.nn.Linear(64, c))}[condition]

    def cond(idx, its):
        if condition == "words":
            ids = [torch.tensor([vocab[w] for w in words_of(its[i][4])]) for i in idx]
            offsets = torch.tensor([0, *np.cumsum([len(x) for x in ids])[:-1].tolist()])
            return oracle(torch.cat(ids), offsets)[:, None]
        if condition == "attr":
            return oracle(torch.tensor([its[i][2] for i in idx]))[:, None]
        if condition == "loc":
            return oracle(torch.tensor([its[i][3] for i in idx], dtype=torch.float32) / size)[:, None]
        return oracle(torch.zeros(len(idx), dtype=torch.long))[:, None]

    def logits(emb, idx, its, shape):
        low = model.generator(emb, cond(idx, its))
        return F.interpolate(low, size=shape, mode="bilinear", align_corners=False)[:, 0]

    opt = torch.optim.AdamW(list(model.generator.parameters()) + list(oracle.parameters()), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(len(train), (32,)).tolist()
        out = logits(emb_train[idx], idx, train, t_train.shape[-2:])
        loss = (sigmoid_bce(out, t_train[idx]) + soft_dice(out, t_train[idx])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = logits(emb_val, list(range(len(val))), val, t_val.shape[-2:]) > 0
        inter, union = (pred & t_val).flatten(1).sum(1), (pred | t_val).flatten(1).sum(1).clamp(min=1)
    print(f"generator, {condition} condition: {len(train)} train / {len(val)} held-out targets, "
          f"held-out mIoU {(inter / union).mean().item():.3f}")
    return (inter / union).mean().item()


@torch.no_grad()
def hidden_states(model, processor, its):
    out = {}
    for k in range(0, len(its), 64):
        group = its[k:k + 64]
        ids, att = policy_inputs(processor.tokenizer, [i[1] for i in group], model.config.n_image_tokens)
        px = processor.image_processor([i[0] for i in group], return_tensors="pt")["pixel_values"]
        hs = model.lmm.model(input_ids=ids, attention_mask=att, pixel_values=px, use_cache=False).last_hidden_state
        for pos in (1, 2, 3):  # left padded: -2 is the condition token
            out.setdefault(f"token -{pos}" + (" (the condition token)" if pos == 2 else ""), []).append(hs[:, -pos])
    return {k: torch.cat(v) for k, v in out.items()}


def probe(model, processor, world: World, seed: int) -> None:
    def items(split, n):
        out = []
        for s in world.scenes(split, n):
            for t, instructions in target_instructions(s).items():
                out += [(s.image, x, class_of(world, s.objects[t]), s.objects[t].position) for x in instructions]
        return out

    torch.manual_seed(seed)
    train, val = items("train", 400), items("val", 100)
    h_train, h_val = hidden_states(model, processor, train), hidden_states(model, processor, val)
    y_train, y_val = torch.tensor([i[2] for i in train]), torch.tensor([i[2] for i in val])
    size = world.config.image_size
    p_train = torch.tensor([i[3] for i in train], dtype=torch.float32) / size
    p_val = torch.tensor([i[3] for i in val], dtype=torch.float32) / size
    n_cls = len(world.config.colours) * len(world.config.kinds)
    majority = (y_val == y_train.mode().values).float().mean().item()
    mean_err = ((p_val - p_train.mean(0)) ** 2).sum(1).sqrt().mean().item() * size
    print(f"probe: {len(train)} train / {len(val)} held-out instructions; majority class {majority:.3f}, "
          f"centre error of the mean position {mean_err:.1f} px")
    for name in h_train:
        x, xv = h_train[name], h_val[name]
        mu, sd = x.mean(0), x.std(0) + 1e-6
        x, xv = (x - mu) / sd, (xv - mu) / sd
        cls, reg = torch.nn.Linear(x.shape[1], n_cls), torch.nn.Linear(x.shape[1], 2)
        opt = torch.optim.Adam([*cls.parameters(), *reg.parameters()], lr=1e-2, weight_decay=1e-3)
        for _ in range(300):
            loss = F.cross_entropy(cls(x), y_train) + 10 * ((reg(x) - p_train) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (cls(xv).argmax(1) == y_val).float().mean().item()
            err = ((reg(xv) - p_val) ** 2).sum(1).sqrt().mean().item() * size
        print(f"  {name}: target (colour, kind) accuracy {acc:.3f}, centre error {err:.1f} px")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=("generator", "probe"))
    parser.add_argument("--condition", choices=("attr", "loc", "none", "words"), default="attr")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--llava", default=None, help="a LLaVA directory (default: the tiny base)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    llava = args.llava or ensure_base("llava")
    model = build_from_bases(llava, ensure_base("sam"), ModelConfig()).eval()
    world = World(WorldConfig(), seed=0)
    if args.check == "generator":
        generator_check(model, world, args.condition, args.steps, args.seed)
    else:
        probe(model, AutoProcessor.from_pretrained(llava), world, args.seed)


if __name__ == "__main__":
    main()
