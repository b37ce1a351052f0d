"""Where reading a visual prompt breaks on the tiny LLaVA base: the token, or the binding of
``<Region n>`` to the n-th slot.

One question a sample (``What is <Region k>?`` -> ``colour kind``) on world scenes of 2-4 shapes; the
LLaVA base with the prompt block of this package, trained with the stage-2 trainable set (the whole
LLM, ``vp_proj``, the tags) for ``--steps`` at ``--lr`` (warm-up then cosine), batch 32, fresh
samples each step from 3,000 training scenes; teacher-forced accuracy (every answer token right) on
200 held-out scenes every 50 steps. How the region reaches the model (``--token``):

- ``encoder``: the prompt encoder's token (SAM's Fourier features, ``vp_proj``), ``vp_proj`` at random
  as in the paper, or with ``--align`` started by ``modeling.align_to_locations``;
- ``loc_sum``: the slot's token is the sum of the base's four location-token embeddings of the box
  (a fixed lookup, no encoder);
- ``roi``: the slot's token is the mean of the image tokens (as they enter the LLM) whose patch centre
  lies in the box (the patch under the box's centre when none does): the region's content itself, as
  region-feature MLLMs pool it, so ``<Region k>`` -> slot k is the only lookup left;
- ``encoder_roi``: the prompt encoder's token (as ``encoder``) plus the ``roi`` mean: the paper's
  token with the region's content added, as region-feature MLLMs add it;
- ``text``: no prompt block; the box written as the base's location tokens in the question
  (``What is <loc..><loc..><loc..><loc..>?``): the design's upper bound, the base's own reading.

``--marked one`` marks only the asked object (slot 1); ``two`` the asked object and one other in a
random order; ``all`` marks every object in a shuffled slot order and asks about a random one (the binding of ``<Region k>`` to slot k is then needed);
``--train-one-share P`` marks that share of the training samples as ``one`` does (the held-out ones as ``--marked``);
``--slot-numbers X`` adds a learned per-slot vector started at X times the embedding of the number
token `` k`` (the one the text reference uses). ``--answer box``: the answer is the asked region's
box in location tokens instead of its label (reading the slot without looking at the image: with
``--marked all`` the binding alone). ``--interleave`` writes the number token of ``<Region k>`` in front of slot k's token in the prompt
block (the layout of a text list, not the paper's). ``--extra-layers N`` puts N fresh decoder blocks, started as
the identity, in front of the base LLM's four (is depth what the binding lacks?). ``--llava DIR``
starts from another LLaVA base (a ``runs/bases/llava-*/model`` of another mix) than ``make bases``'s.

``--check DIR [DIR ...]`` instead measures saved models (a run's ``start-*``, ``vp_stage1-*``, ...
directories): how close each one's box tokens are to the sum of its own location-token embeddings
(mean cosine over 500 random boxes, and how often a box's token is nearest its own box's target).

    .venv/bin/python packages/vp_mllm/scripts/diagnose_reading.py --token encoder --align --marked one
    .venv/bin/python packages/vp_mllm/scripts/diagnose_reading.py --check runs/vp_mllm/tiny/start-* runs/vp_mllm/tiny/vp_stage1-*
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from groundlab.shared.bases import ensure_base
from groundlab.shared.boxes import box_to_loc, loc_bins, loc_token_names, xywh_to_xyxy
from groundlab.shared.distributed import seed_everything
from groundlab.shared.loading import load_pretrained, torch_load
from groundlab.shared.training import resolve_bf16
from groundlab.shared.world import World, WorldConfig
from groundlab.vp_mllm.configuration import VPMLLMConfig
from groundlab.vp_mllm.data import label
from groundlab.vp_mllm.modeling import (
    VPMLLMForConditionalGeneration,
    align_to_locations,
    load_sam_prompt_encoder,
    location_targets,
    random_boxes,
    region_mean,
    sam_prompt_dim,
    set_trainable,
)
from groundlab.vp_mllm.processing import VisualPrompts, VPCollator, VPProcessor, add_tokens, jitter_box


def build(args):
    llava, sam = (args.llava or ensure_base("llava")), ensure_base("sam")
    hf = AutoProcessor.from_pretrained(llava)
    tok = hf.tokenizer
    vp_id = add_tokens(tok)
    base = load_pretrained(LlavaForConditionalGeneration, llava, "the LLaVA base")
    sam_state = torch_load(sam, "SAM checkpoint")
    config = VPMLLMConfig(vp_config={"embed_dim": sam_prompt_dim(sam_state)}, lmm_config=base.config.to_dict(),
                          vp_token_index=vp_id, slot_embeddings=args.slot_numbers > 0)
    model = VPMLLMForConditionalGeneration(config)
    model.lmm.load_state_dict(base.state_dict())
    load_sam_prompt_encoder(model.vp_encoder, sam_state)
    table = model.lmm.get_input_embeddings().weight[tok.convert_tokens_to_ids(loc_token_names(loc_bins(tok)))]
    if args.align:
        print("alignment", align_to_locations(model, table), flush=True)
    numbers = tok.convert_tokens_to_ids([tok.tokenize(f" {k + 1}")[-1] for k in range(config.vp_config.num_slots)])
    if args.slot_numbers > 0:
        with torch.no_grad():
            model.vp_slots.copy_(args.slot_numbers * model.lmm.get_input_embeddings().weight[numbers][None])
    if args.extra_layers:
        add_blocks(model, args.extra_layers)
    if args.token == "loc_sum":
        fixed, bins = table.detach().clone(), len(table)

        def prompt_tokens(coords, valid, is_box):  # the sum of the box's location-token rows
            tokens = fixed[(coords.clamp(0, 1) * (bins - 1)).round().long()].sum(-2) * valid[..., None]
            return slot_block(model, tokens)

        model.prompt_tokens = prompt_tokens
    if args.token in ("roi", "encoder_roi"):
        image_tokens, encoder_block, seen = model.image_tokens, model.prompt_tokens, {}

        def stash(pixel_values):
            seen["image"] = image_tokens(pixel_values)
            return seen["image"]

        def prompt_tokens(coords, valid, is_box):  # the mean image token inside each box
            tokens = region_mean(seen["image"], coords, is_box) * valid[..., None]
            if args.token == "roi":
                return slot_block(model, tokens)
            block = encoder_block(coords, valid, is_box)  # the prompt encoder's tokens, the content added
            return torch.cat([block[:, :1], block[:, 1:-1] + tokens.to(block.dtype), block[:, -1:]], 1)

        model.image_tokens, model.prompt_tokens = stash, prompt_tokens
    processor = VPProcessor(tok, hf.image_processor, config)
    if args.interleave:
        interleave(model, processor, numbers)
    return model, processor


def slot_block(model, tokens: torch.Tensor) -> torch.Tensor:
    """(B, K, D) slot tokens -> the prompt block ``start_vp``, the tokens (+ the per-slot vectors
    when the model has them), ``end_vp``, as ``VPMLLMForConditionalGeneration.prompt_tokens`` builds it."""
    if model.config.slot_embeddings:
        tokens = tokens + model.vp_slots
    b = tokens.shape[0]
    return torch.cat([model.start_vp.expand(b, -1, -1), tokens.to(model.start_vp.dtype),
                      model.end_vp.expand(b, -1, -1)], 1)


def interleave(model, processor, numbers: list[int]) -> None:
    """The prompt block as ``start_vp, [n 1] slot 1, [n 2] slot 2, ..., end_vp``: each slot's token
    after the embedding of the number token that ``<Region k>`` uses (the layout of a text list
    ``1 <box>, 2 <box>``, whose lookup the LLM learns at once: ``diagnose_lookup.py --mode copy``)."""
    from groundlab.shared.multimodal import expand_token

    slots, image_id, vp_id = model.prompt_tokens, processor.image_id, processor.vp_id
    n_image, n_vp = processor.config.n_image_tokens, 2 * processor.config.vp_config.num_slots + 2

    def prompt_tokens(coords, valid, is_box):
        block = slots(coords, valid, is_box)  # start, K slot tokens, end
        tags = model.lmm.get_input_embeddings()(torch.tensor(numbers))[None].expand(block.shape[0], -1, -1)
        pairs = torch.stack([tags.to(block.dtype), block[:, 1:-1]], dim=2).flatten(1, 2)
        return torch.cat([block[:, :1], pairs, block[:, -1:]], dim=1)

    def expand(sample, use_prompts):
        sample = expand_token(sample, image_id, n_image)
        return expand_token(sample, vp_id, n_vp) if use_prompts else sample

    model.prompt_tokens, processor._expand = prompt_tokens, expand


def add_blocks(model, n: int) -> None:
    """``n`` fresh decoder blocks in front of the base LLM's, started as the identity (their output
    projections zero): does the binding need depth the 4-layer base lacks?"""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    lm = model.lmm.model.language_model
    fresh = []
    for _ in range(n):
        block = LlamaDecoderLayer(lm.config, 0)
        for name, p in block.named_parameters():
            with torch.no_grad():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.zero_()
                elif name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, lm.config.initializer_range)
        fresh.append(block)
    lm.layers = torch.nn.ModuleList(fresh + list(lm.layers))
    for i, block in enumerate(lm.layers):
        block.self_attn.layer_idx = i
    lm.config.num_hidden_layers = len(lm.layers)
    if getattr(lm.config, "layer_types", None):
        lm.config.layer_types = [lm.config.layer_types[0]] * len(lm.layers)


def sample(processor, scene, rng, args, train: bool):
    objects = [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))]
    k = int(rng.integers(len(objects)))
    boxes = []
    for obj in objects:
        box = xywh_to_xyxy(obj.bbox)
        if train:
            x0, y0, x1, y1 = jitter_box(box, rng)
            box = (max(0.0, x0), max(0.0, y0), min(scene.size, x1), min(scene.size, y1))
        boxes.append(box)
    answer = label(objects[k]) if args.answer == "label" else box_to_loc(boxes[k], scene.size, scene.size, order="xyxy")
    if args.token == "text":
        question = f"What is {box_to_loc(boxes[k], scene.size, scene.size, order='xyxy')}?"
        return processor.encode(scene.image, [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                                None, use_prompts=False)
    marked = "one" if train and args.train_one_share > 0 and rng.random() < args.train_one_share else args.marked
    if marked == "one":
        boxes, k = [boxes[k]], 0
    elif marked == "two":  # the asked object and one other, in a random order
        other = int(rng.choice([i for i in range(len(boxes)) if i != k]))
        pair = [k, other] if rng.random() < 0.5 else [other, k]
        boxes, k = [boxes[i] for i in pair], pair.index(k)
    conv = [{"from": "human", "value": f"What is <Region {k + 1}>?"}, {"from": "gpt", "value": answer}]
    return processor.encode(scene.image, conv, VisualPrompts("box", boxes))


@torch.no_grad()
def check(directories: list[str]) -> None:
    from pathlib import Path

    from groundlab.vp_mllm.train import load_model

    boxes = random_boxes(500, torch.Generator().manual_seed(3))
    slots = torch.zeros(500, 10, 4)
    slots[:, 0] = boxes
    valid = torch.zeros(500, 10, dtype=torch.bool)
    valid[:, 0] = True
    for directory in directories:
        model, processor = load_model(Path(directory))
        tok = processor.tokenizer
        table = model.lmm.get_input_embeddings().weight[tok.convert_tokens_to_ids(loc_token_names(loc_bins(tok)))]
        tokens = model.prompt_tokens(slots, valid, torch.ones(500, dtype=torch.bool))[:, 1].float()
        target = location_targets(table, boxes).float()
        cosine = torch.nn.functional.cosine_similarity(tokens, target, dim=-1).mean()
        nearest = (torch.cdist(tokens, target).argmin(1) == torch.arange(500)).float().mean()
        print(f"{directory}: cosine {float(cosine):.3f}, nearest its own target {float(nearest):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--token", choices=("encoder", "loc_sum", "roi", "encoder_roi", "text"), default="encoder")
    ap.add_argument("--align", action="store_true")
    ap.add_argument("--marked", choices=("one", "two", "all"), default="one")
    ap.add_argument("--train-one-share", type=float, default=0.0,
                    help="the share of training samples marked as with --marked one (held-out ones as --marked)")
    ap.add_argument("--slot-numbers", type=float, default=0.0)
    ap.add_argument("--answer", choices=("label", "box"), default="label")
    ap.add_argument("--extra-layers", type=int, default=0)
    ap.add_argument("--interleave", action="store_true")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", nargs="+", metavar="DIR")
    ap.add_argument("--llava", metavar="DIR", help="a LLaVA base's model directory (default: make bases's)")
    args = ap.parse_args()
    if args.check:
        return check(args.check)
    seed_everything(args.seed)
    model, processor = build(args)
    world = World(WorldConfig(image_size=64, min_objects=2, max_objects=4, glyph_prob=0.3), seed=0)
    train_scenes, held_out = world.scenes("train", 3000), world.scenes("val", 200)
    rng = np.random.default_rng(args.seed)
    test = [sample(processor, s, rng, args, train=False) for s in held_out]
    params = [model.get_parameter(n) for n in set_trainable(model, "stage2")]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    collate = VPCollator(processor.tokenizer.pad_token_id)
    bf16 = resolve_bf16("auto")

    def accuracy() -> float:
        model.eval()
        hits = 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(test), 50):
                batch = collate(test[i:i + 50])
                logits, labels = model(**batch).logits[:, :-1].float(), batch["labels"][:, 1:]
                hits += int(((logits.argmax(-1) == labels) | (labels == -100)).all(1).sum())
        model.train()
        return hits / len(test)

    t0 = time.time()
    print(f"step 0 accuracy {accuracy():.3f}", flush=True)
    for step in range(1, args.steps + 1):
        scale = min(1.0, step / 10) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = args.lr * scale
        batch = collate([sample(processor, train_scenes[int(rng.integers(len(train_scenes)))], rng, args, True)
                         for _ in range(32)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 8.0)
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.3f} accuracy {accuracy():.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
