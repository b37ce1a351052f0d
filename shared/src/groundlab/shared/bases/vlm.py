"""Tiny pretrained VLM bases that see and ground: a LLaVA (CLIP ViT + MLP projector + Llama,
transformers' ``LlavaForConditionalGeneration``) and a PaliGemma (SigLIP + linear projector + Gemma
with a prefix-LM mask, ``PaliGemmaForConditionalGeneration``).

The papers start from LLaVA-1.5 (IVM, VP-LLaVA, ClawMachine's LLM) and PaliGemma-3B (TLDR); both were
trained from a pretrained contrastive vision encoder and on region tasks (LLaVA-1.5: RefCOCO and
Visual Genome boxes as text; PaliGemma: ``detect`` / ``refer`` with location tokens). These stand in
for them on the CPU, trained the same way in two stages, and load through the same
``from_pretrained`` / ``AutoProcessor`` paths as the real checkpoints:

1. **vision**: the vision tower alone, pre-trained densely on the world (per patch: the (colour,
   kind) of the object covering it, or background, and that object's box), the way CLIP / SigLIP
   arrive pretrained. Its position embeddings start from a 2-D sine-cosine code.
2. **vlm**: the tower frozen (LLaVA-1.5 freezes CLIP), projector + language model trained on an
   instruction mix from the world's ground truth, in each family's conventions:

   - LLaVA: multi-turn conversations (turn order shuffled): a caption, questions, box -> region
     description and referring expression -> box for every object of the scene in one (the base's
     mix; ``MixConfig.separate_box_tasks`` moves each REC to a conversation of its own, which
     grounded far worse at the same step count: docs/bases.md); a grounded caption (each object's
     phrase followed by its box) with a question in another, for a third of the scenes;
   - PaliGemma: one task a sample, with its prefixes: ``caption en``, ``answer en <question>``,
     ``detect <colour> <kind>`` / ``detect <kind>`` (every matching object, ``" ; "``-separated),
     ``detect <referring expression>``, and region captioning ``caption en <box>``.

Boxes are location tokens (:mod:`groundlab.shared.boxes`, 32 bins on the 64 px images): PaliGemma's
own format, and for the tiny LLaVA the same tokens in LLaVA's x0, y0, x1, y1 order instead of
LLaVA-1.5's two-decimal text ``[0.12, 0.34, 0.56, 0.78]`` (about 20 byte-level tokens a box here): one
token a coordinate is what grounds at this size (measured in docs/bases.md). Real-size loaders keep
LLaVA-1.5's text format (``groundlab.shared.boxes.box_to_text``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from ..attention import HF_ATTENTION  # importing it registers attn_implementation="groundlab"
from ..boxes import box_to_loc, loc_bins, loc_to_boxes, xywh_to_xyxy
from ..devices import model_device, to_device
from ..metrics import box_iou
from ..multimodal import (
    IGNORE_INDEX,
    ChatTemplate,
    expand_token,
    keep_labeled_logits,
    pack_batch,
    pad_batch,
    tokenize_conversation,
    tokenize_prompt,
)
from ..tokenizer import IMAGE_TOKEN
from ..world import Scene, World, draw_expression, shares_kind

VLM_KINDS = ("llava", "paligemma")
BOX_ORDER = {"llava": "xyxy", "paligemma": "yxyx"}
PROMPTS = {
    "llava": {"caption": "Describe the image.", "question": "{question}",
              "rec": "Please provide the bounding box of {expression}.",
              "region": "What is in the region {box}?",
              "region_list": "Regions: {regions}. What is region {k}?",
              "grounded": "Describe the image with the box of each object."},
    "paligemma": {"caption": "caption en", "question": "answer en {question}", "rec": "detect {expression}",
                  "detect": "detect {phrase}", "region": "caption en {box}"},
}
CAPTION_PROMPT = {kind: p["caption"] for kind, p in PROMPTS.items()}


@dataclass(frozen=True)
class TinyVLMConfig:
    """Sizes of a tiny VLM (~1.6 M parameters with the defaults)."""

    kind: str = "llava"
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    """96 x 3: boxes read from its patch features hit IoU >= 0.5 for 95% of held-out objects (64 x 2:
    91%, 83% of the small ones), the precision REC needs; frozen after its own stage, so cheap later."""
    vision_heads: int = 4
    vision_ffn: int = 384
    text_hidden: int = 128
    text_layers: int = 4
    """4: two layers could not learn to ground at this width (REC below the random-object baseline)."""
    text_heads: int = 4
    text_kv_heads: int = 4
    text_ffn: int = 512
    attn_implementation: str = HF_ATTENTION
    """The shared dispatch (``groundlab.shared.attention``; on the CPU its eager kernel, as fast as
    transformers' eager and faster than SDPA under bf16 autocast at these sizes:
    ``python benchmarks/run.py --only vlm_step``); it also reads packed batches. Not part of what a
    base is (every implementation computes the same function, tested): :meth:`BaseSpec.key` ignores it."""

    def __post_init__(self) -> None:
        if self.kind not in VLM_KINDS:
            raise ValueError(f"kind must be one of {VLM_KINDS}, got {self.kind!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_image_tokens(self) -> int:
        return self.grid ** 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MixConfig:
    """How many samples of each task a training scene gives (see the module docstring)."""

    questions: int = 3
    """Questions per scene (LLaVA: in the first conversation; the grounded-caption one adds one more)."""
    rec: int = 1
    """Referring expression -> box, each for a different object, at most one per object (LLaVA: each in a
    conversation of its own)."""
    region: int = 1
    """Box -> description."""
    separate_box_tasks: bool = True
    """LLaVA: each referring expression -> box in a conversation of its own (no conversation holds two
    box tasks); False puts them in the first conversation, with the caption, questions and region
    description (fewer, longer conversations: more supervised tokens for each image's 64 tokens)."""
    grounded_caption: float = 0.34
    """LLaVA: the share of scenes that also give a grounded-caption conversation (its 64 image tokens
    are paid for a single answer, so a third of the scenes: more of the other tasks per minute)."""
    detect: int = 1
    """PaliGemma's ``detect <colour> <kind>`` / ``detect <kind>``."""
    detect_contrast: float = 0.0
    """PaliGemma: the probability that a ``detect`` sample of a scene where two objects share a kind asks
    for one of those objects by its colour and kind (the phrase whose colour decides) instead of the
    uniform draw (a random object, named by colour and kind 3 times in 5, else by its kind). 0: no extra
    random draw, older mixes unchanged. Built without it, in fp32, ``detect`` missed mostly there: 0.37
    of the objects sharing their kind against 0.9 of the others (docs/bases.md)."""
    region_list: int = 0
    """LLaVA: questions in the first conversation that list every box of the scene, numbered from 1 in a
    random order, and ask what region k is (the answer: its description, as for a box): looking an item
    up by its number, which a model that reads prompts by their number (vp_mllm's ``<Region k>``) needs
    and a real LLM brings from its text pre-training."""
    rec_per_object: int = 1
    """Referring expressions asked for each of those objects (distinct ones while it has them)."""
    rec_contrast: float = 0.0
    """The probability that the referring expression of an object sharing its kind with another object of
    the scene is drawn from its attribute expressions alone (each names the colour or size that tells the
    two apart) instead of from all its expressions. 0: uniform over all, where about one REC draw in ten
    needs the colour or size to find its object, and a model can learn to find the kind and guess."""
    rec_shortest: float = 0.0
    """The probability that an object's first referring expression is its shortest one (``the <kind>``
    when its kind is alone in the scene: what the held-out REC asks, and what people write most), not a
    uniform draw. Uniform draws give ``the <kind>`` about one REC turn in ten, while most of its other
    expressions name the colour, which a model learns to find first; the builds that missed REC missed
    on ``the <kind>`` (0.57 / 0.42 on 2 / 3-object scenes against 0.91 / 0.67 with the colour named).
    Later expressions of the object draw as before. 0: no extra random draw, older mixes unchanged. The
    default LLaVA base uses 0.5, which met REC in two seeds (docs/bases.md, "The shortest expression")."""

    def to_dict(self) -> dict:
        return asdict(self)


def build_processor(cfg: TinyVLMConfig, tokenizer):
    """The HF processor saved with the model (image transform + tokenizer + image-token expansion)."""
    size = cfg.image_size
    if cfg.kind == "llava":
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token=IMAGE_TOKEN)
    image_processor = SiglipImageProcessor(size={"height": size, "width": size})
    image_processor.image_seq_length = cfg.n_image_tokens
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(cfg: TinyVLMConfig, tokenizer):
    """A randomly initialised tiny LLaVA or PaliGemma for ``tokenizer``'s vocabulary, with the 2-D
    position code of the vision tower and the ordinal code of the location tokens."""
    vocab = len(tokenizer)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    if cfg.kind == "llava":
        vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_ffn,
                                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                                  image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden)
        text = LlamaConfig(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_ffn,
                           num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                           num_key_value_heads=cfg.text_kv_heads, vocab_size=vocab, max_position_embeddings=512,
                           tie_word_embeddings=False, **ids)
        # vision_feature_layer=-1: the default -2 would leave the last ViT layer untrained and unused.
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                             vision_feature_layer=-1, vision_feature_select_strategy="default",
                             projector_hidden_act="gelu", **ids)
        model_cls = LlavaForConditionalGeneration
    else:
        vision = SiglipVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_ffn,
                                    num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                                    image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False)
        text = GemmaConfig(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_ffn,
                           num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                           num_key_value_heads=cfg.text_kv_heads, head_dim=cfg.text_hidden // cfg.text_heads,
                           vocab_size=vocab, max_position_embeddings=512, **ids)
        config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                 projection_dim=cfg.text_hidden, **ids)
        model_cls = PaliGemmaForConditionalGeneration
    config._attn_implementation = cfg.attn_implementation
    for sub in (config.vision_config, config.text_config):
        sub._attn_implementation = cfg.attn_implementation
    model = model_cls(config)
    _init_position_code(model, cfg)
    _init_location_tokens(model, tokenizer)
    return model


def vision_tower(model) -> nn.Module:
    return model.model.vision_tower


def _sincos(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) values in [0, 1] -> (N, dim) sines and cosines of ``dim // 2`` geometric frequencies."""
    n = dim // 2
    freqs = 10.0 ** (-torch.arange(n, dtype=torch.float32) / max(1, n)) * math.pi * 8
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


@torch.no_grad()
def _init_position_code(model, cfg: TinyVLMConfig) -> None:
    """The vision tower's patch position embeddings as a 2-D sine-cosine code (x in the first half of
    the channels, y in the second), at the scale of the patch embeddings: every patch knows where it
    is from the first step (a learned table starts as noise)."""
    emb = vision_tower(model).embeddings
    table = emb.position_embedding.weight  # (extra + grid * grid, D)
    g, d = cfg.grid, table.shape[1]
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    code = torch.cat([_sincos(xs.flatten() / max(1, g - 1), d // 2), _sincos(ys.flatten() / max(1, g - 1), d - d // 2)], 1)
    probe = emb.patch_embedding(torch.randn(64, 3, cfg.patch_size, cfg.patch_size, generator=torch.Generator().manual_seed(0)))
    extra = table.shape[0] - g * g  # CLIP's class token
    table[extra:] = code / code.std() * probe.std()
    table[:extra] = 0


@torch.no_grad()
def _init_location_tokens(model, tokenizer) -> None:
    """Input and output embeddings of ``<loc0000>`` ... as an ordinal code (sines of the bin at several
    frequencies, channels shuffled once) at the scale of the other rows: neighbouring bins start close
    together, so what is learnt for one bin carries to its neighbours."""
    bins = loc_bins(tokenizer)
    if not bins:
        return
    ids = tokenizer.convert_tokens_to_ids([f"<loc{i:04d}>" for i in range(bins)])
    others = torch.ones(len(tokenizer), dtype=torch.bool)
    others[ids] = False
    for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
        w = emb.weight
        code = _sincos(torch.arange(bins) / (bins - 1), w.shape[1])
        code = code[:, torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(1))]
        w[ids] = code / code.std() * w[others].std()


# ----------------------------------------------------------------------------------------------
# stage 1: dense pre-training of the vision tower


def dense_classes(world: World) -> int:
    """Patch classes of the dense pre-training: background + (colour, kind) (the SAM base's classes;
    adding the size as well made REC learn slower in a pilot)."""
    from .sam import num_semantic_classes

    return num_semantic_classes(world)


def dense_targets(scene: Scene, world: World, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (raster order): the class of the object covering most of it (0 background, else the
    SAM base's ``semantic_class``: 1 + its (colour, kind) index) and that object's box
    (x0, y0, x1, y1) / image size."""
    from .sam import semantic_class

    size = scene.size
    ps = size // grid
    classes = np.zeros(grid * grid, np.int64)
    boxes = np.zeros((grid * grid, 4), np.float32)
    if not scene.objects:
        return classes, boxes
    cover = np.stack([o.mask.reshape(grid, ps, grid, ps).sum((1, 3)) for o in scene.objects])  # (n, g, g)
    best, has = cover.argmax(0).flatten(), cover.max(0).flatten() > 0
    for i in np.nonzero(has)[0]:
        o = scene.objects[best[i]]
        classes[i] = semantic_class(world, o)
        boxes[i] = np.asarray(xywh_to_xyxy(o.bbox), np.float32) / size
    return classes, boxes


class DenseVisionDataset(Dataset):
    """World scenes with their per-patch targets (rendered once, up front)."""

    def __init__(self, world: World, split: str, n_scenes: int, cfg: TinyVLMConfig):
        self.images, self.classes, self.boxes = [], [], []
        for scene in world.scenes(split, n_scenes):
            c, b = dense_targets(scene, world, cfg.grid)
            self.images.append(scene.image)
            self.classes.append(c)
            self.boxes.append(b)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "classes": self.classes[i], "boxes": self.boxes[i]}


class DenseCollator:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, samples: list[dict]) -> dict:
        pixels = self.processor.image_processor([s["image"] for s in samples], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "classes": torch.from_numpy(np.stack([s["classes"] for s in samples])),
                "boxes": torch.from_numpy(np.stack([s["boxes"] for s in samples]))}


class VisionPretrainer(nn.Module):
    """The vision tower with a linear head on each patch: cross-entropy of the patch class (see
    :func:`dense_targets`) + ``box_weight``
    x L1 of the covering object's box on object patches. Holds the tower only (the head is dropped
    after this stage), so its checkpoints are small and free of the LM's tied weights."""

    def __init__(self, tower: nn.Module, num_classes: int, drop_first: bool, box_weight: float = 5.0):
        super().__init__()
        self.tower, self.num_classes, self.drop_first, self.box_weight = tower, num_classes, drop_first, box_weight
        self.head = nn.Linear(tower.config.hidden_size, num_classes + 4)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values=pixel_values).last_hidden_state
        return hidden[:, 1:] if self.drop_first else hidden

    def forward(self, pixel_values, classes, boxes):
        out = self.head(self.features(pixel_values)).float()
        loss = F.cross_entropy(out[..., :self.num_classes].flatten(0, 1), classes.flatten())
        fg = classes > 0
        if bool(fg.any()):
            loss = loss + self.box_weight * F.l1_loss(out[..., self.num_classes:][fg], boxes[fg])
        return {"loss": loss}

    @torch.no_grad()
    def evaluate(self, dataset: DenseVisionDataset, collate: DenseCollator, batch_size: int = 128) -> dict:
        """Held-out patch class accuracy (all patches, object patches), box L1 in pixels, and the
        oracle of box answers: each object's box read from its own patches (the mean prediction where
        it is the majority), IoU >= 0.5 (what a model that always picks the right object could reach)."""
        self.eval()
        right = right_fg = n = n_fg = 0
        l1 = 0.0
        hits = []
        for start in range(0, len(dataset), batch_size):
            b = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            out = self.head(self.features(b["pixel_values"])).float()
            pred, fg = out[..., :self.num_classes].argmax(-1), b["classes"] > 0
            right += int((pred == b["classes"]).sum())
            right_fg += int((pred == b["classes"])[fg].sum())
            n, n_fg = n + b["classes"].numel(), n_fg + int(fg.sum())
            boxes = out[..., self.num_classes:]
            l1 += float((boxes[fg] - b["boxes"][fg]).abs().sum())
            for img in range(len(fg)):
                for gt in torch.unique(b["boxes"][img][fg[img]], dim=0):
                    own = fg[img] & (b["boxes"][img] == gt).all(-1)
                    hits.append(hit50(boxes[img][own].mean(0).tolist(), gt.tolist()))
        size = dataset.images[0].shape[0]
        return {"vision/patch_accuracy": right / n, "vision/object_patch_accuracy": right_fg / max(1, n_fg),
                "vision/box_l1_px": l1 / max(1, 4 * n_fg) * size, "vision/box_acc50": float(np.mean(hits))}


# ----------------------------------------------------------------------------------------------
# stage 2: the instruction mix


def box_text(obj, kind: str, size: int) -> str:
    """An object's box as the family's location tokens."""
    return box_to_loc(xywh_to_xyxy(obj.bbox), size, size, order=BOX_ORDER[kind])


def grounded_caption(scene: Scene, kind: str) -> str:
    """The caption with each object's box after its phrase."""
    text, last = "", 0
    for ph in sorted(scene.caption_phrases, key=lambda p: p.start):
        text += scene.caption[last:ph.end] + " " + box_text(scene.objects[ph.object_id], kind, scene.size)
        last = ph.end
    return text + scene.caption[last:]


def detect_answer(scene: Scene, phrase: str, objects: list) -> str:
    """PaliGemma's detection answer: ``<loc..>x4 phrase`` per object, left to right, ``" ; "``-joined."""
    objects = sorted(objects, key=lambda o: o.bbox[0])
    return " ; ".join(f"{box_text(o, 'paligemma', scene.size)} {phrase}" for o in objects)


def rec_expression(scene: Scene, oid: int, rng: np.random.Generator, mix: MixConfig, first: bool = False):
    """The referring expression a training REC turn asks for object ``oid``
    (:func:`groundlab.shared.world.draw_expression` with ``mix.rec_contrast`` and ``mix.rec_shortest``)."""
    return draw_expression(scene, oid, rng, mix.rec_contrast, mix.rec_shortest, first)


def region_list_question(scene: Scene, rng: np.random.Generator) -> tuple[str, object]:
    """``Regions: 1 <box>, 2 <box>, ... What is region k?`` over the scene's objects in a random order,
    and the object region k is."""
    order = [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))]
    k = int(rng.integers(len(order)))
    regions = ", ".join(f"{i + 1} {box_text(o, 'llava', scene.size)}" for i, o in enumerate(order))
    return PROMPTS["llava"]["region_list"].format(regions=regions, k=k + 1), order[k]


def llava_conversations(scene: Scene, rng: np.random.Generator, mix: MixConfig) -> list[list[tuple[str, str]]]:
    """The (prompt, answer) turns of a scene's conversations, before shuffling: the caption, questions
    and box -> description in the first; each referring expression -> box in one of its own with a
    question (``mix.separate_box_tasks``; else in the first too); the grounded caption (a share of the
    scenes) with a question. Separate, no conversation holds two box tasks of the scene: a second one
    could be answered by elimination or by copying an earlier box, which a model asked a single
    question cannot do."""
    p = PROMPTS["llava"]
    picked = rng.choice(len(scene.qa), size=min(mix.questions + mix.rec + 1, len(scene.qa)), replace=False)
    questions = [(p["question"].format(question=scene.qa[int(j)].question), scene.qa[int(j)].answer) for j in picked]
    order = [int(k) for k in rng.permutation(len(scene.objects))]
    first = [(p["caption"], scene.caption)] + questions[: mix.questions]
    for oid in order[: mix.region]:
        obj = scene.objects[oid]
        first.append((p["region"].format(box=box_text(obj, "llava", scene.size)), obj.phrase))
    for _ in range(mix.region_list):
        prompt, obj = region_list_question(scene, rng)
        first.append((prompt, obj.phrase))
    convs = [first]
    extra = questions[mix.questions:]
    for k in range(min(mix.rec, len(order))):
        oid = order[k]
        asked = set()
        for j in range(mix.rec_per_object):
            ref = rec_expression(scene, oid, rng, mix, first=j == 0)
            if ref.text in asked:
                continue
            asked.add(ref.text)
            turn = (p["rec"].format(expression=ref.text), box_text(scene.objects[oid], "llava", scene.size))
            if mix.separate_box_tasks:
                convs.append([turn] + extra[k:k + 1])
            else:
                first.append(turn)
    if rng.random() < mix.grounded_caption:
        convs.append([(p["grounded"], grounded_caption(scene, "llava"))] + extra[mix.rec:mix.rec + 1])
    return convs


def paligemma_samples(scene: Scene, rng: np.random.Generator, mix: MixConfig) -> list[tuple[str, str]]:
    """The (prefix, suffix) samples of a scene (see the module docstring)."""
    p = PROMPTS["paligemma"]
    out = [(p["caption"], scene.caption)]
    for j in rng.choice(len(scene.qa), size=min(mix.questions, len(scene.qa)), replace=False):
        out.append((p["question"].format(question=scene.qa[int(j)].question), scene.qa[int(j)].answer))
    shared = [o for o in scene.objects if shares_kind(scene, o)]
    for _ in range(mix.detect):
        if mix.detect_contrast and shared and rng.random() < mix.detect_contrast:
            obj = shared[int(rng.integers(len(shared)))]
            phrase = f"{obj.colour} {obj.kind}"
        else:
            obj = scene.objects[int(rng.integers(len(scene.objects)))]
            phrase = f"{obj.colour} {obj.kind}" if rng.random() < 0.6 else obj.kind
        objects = [o for o in scene.objects if o.kind == obj.kind and (phrase == obj.kind or o.colour == obj.colour)]
        out.append((p["detect"].format(phrase=phrase), detect_answer(scene, phrase, objects)))
    for oid in rng.permutation(len(scene.objects))[: mix.rec]:
        ref = rec_expression(scene, int(oid), rng, mix)
        out.append((p["rec"].format(expression=ref.text), detect_answer(scene, ref.text, [scene.objects[int(oid)]])))
    for oid in rng.permutation(len(scene.objects))[: mix.region]:
        obj = scene.objects[int(oid)]
        out.append((p["region"].format(box=box_text(obj, "paligemma", scene.size)), obj.phrase))
    return out


class WorldVLMDataset(Dataset):
    """The instruction mix of the world's scenes in the base VLM's own training layout. Scenes are
    rendered and texts tokenized once, up front; images are normalised per batch by the collator."""

    def __init__(self, world: World, split: str, n_scenes: int, processor, cfg: TinyVLMConfig,
                 mix: MixConfig | None = None, seed: int = 0):
        self.cfg, mix = cfg, mix or MixConfig()
        tok = processor.tokenizer
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.images: list[np.ndarray] = []
        self.samples: list[tuple[int, dict]] = []
        for i in range(n_scenes):
            scene = world.scene(split, i)
            self.images.append(scene.image)
            rng = np.random.default_rng([seed, i])
            if cfg.kind == "llava":
                for turns in llava_conversations(scene, rng, mix):
                    conv = []
                    for k, t in enumerate(rng.permutation(len(turns))):
                        prompt, answer = turns[int(t)]
                        conv += [{"from": "human", "value": (f"{IMAGE_TOKEN}\n" if k == 0 else "") + prompt},
                                 {"from": "gpt", "value": answer}]
                    enc = tokenize_conversation(tok, conv, ChatTemplate())
                    self.samples.append((i, expand_token(enc, image_id, cfg.n_image_tokens)))
            else:
                for prompt, answer in paligemma_samples(scene, rng, mix):
                    self.samples.append((i, encode_text(tok, cfg, prompt, answer)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        scene_idx, text = self.samples[idx]
        return {**text, "image": self.images[scene_idx]}


def encode_text(tok, cfg: TinyVLMConfig, prompt: str, answer: str | None) -> dict[str, list[int]]:
    """The token side of one single-turn sample; ``answer=None`` gives a generation prompt."""
    image_token = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if cfg.kind == "llava":
        conv = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}]
        if answer is None:
            return expand_token({"input_ids": tokenize_prompt(tok, conv, ChatTemplate())}, image_token,
                                cfg.n_image_tokens)
        conv.append({"from": "gpt", "value": answer})
        return expand_token(tokenize_conversation(tok, conv, ChatTemplate()), image_token, cfg.n_image_tokens)
    # PaliGemma: [image tokens] <bos> prefix \n | suffix </s>; the prefix attends bidirectionally.
    prefix = ([image_token] * cfg.n_image_tokens + [tok.bos_token_id]
              + tok(prompt + "\n", add_special_tokens=False)["input_ids"])
    if answer is None:
        return {"input_ids": prefix, "token_type_ids": [0] * len(prefix)}
    suffix = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": prefix + suffix, "labels": [IGNORE_INDEX] * len(prefix) + suffix,
            "token_type_ids": [0] * len(prefix) + [1] * len(suffix)}


class VLMCollator:
    """Pads the token side and runs the model's image processor over the batch's images.

    ``packed``: the samples concatenated into one padding-free row instead
    (:func:`~groundlab.shared.multimodal.pack_batch`; models built with the ``groundlab`` attention):
    the same loss and gradients, no FLOP spent on padding. PaliGemma's prefix-LM goes in as
    ``prefix_lens`` instead of ``token_type_ids`` and its positions count from 1, as the model's own do.
    The row is filled up to a multiple of ``row_multiple`` tokens (``pack_batch``'s
    ``pad_to_multiple_of``: the same loss; a long run's memory stays flat). ``labeled_logits_only``:
    training batches that make the model compute logits where a label follows only
    (:func:`~groundlab.shared.multimodal.keep_labeled_logits`: the same loss, a cheaper step)."""

    def __init__(self, processor, padding_side: str = "right", packed: bool = False, row_multiple: int = 256,
                 labeled_logits_only: bool = False):
        self.processor, self.padding_side, self.packed = processor, padding_side, packed
        self.row_multiple, self.labeled_logits_only = row_multiple, labeled_logits_only

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        paligemma = "token_type_ids" in samples[0]
        if self.packed:
            batch = pack_batch(samples, position_offset=int(paligemma), pad_to_multiple_of=self.row_multiple,
                               pad_token_id=self.processor.tokenizer.pad_token_id)
        else:
            batch = pad_batch(samples, self.processor.tokenizer.pad_token_id, self.padding_side)
            if paligemma:
                tt = pad_batch([{"input_ids": s["token_type_ids"]} for s in samples], 0, self.padding_side)
                batch["token_type_ids"] = tt["input_ids"]
        batch["pixel_values"] = self.processor.image_processor([s["image"] for s in samples],
                                                               return_tensors="pt")["pixel_values"]
        return keep_labeled_logits(batch) if self.labeled_logits_only else batch


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def generate(model, processor, cfg: TinyVLMConfig, images: list[np.ndarray], prompts: list[str],
             max_new_tokens: int = 32, batch_size: int = 64) -> list[list[int]]:
    """Greedy answers (token ids, up to and excluding ``</s>``) for each (image, prompt)."""
    tok = processor.tokenizer
    collate = VLMCollator(processor, padding_side="left")
    model.eval()
    outs: list[list[int]] = []
    for start in range(0, len(images), batch_size):
        samples = [{**encode_text(tok, cfg, p, None), "image": im}
                   for im, p in zip(images[start:start + batch_size], prompts[start:start + batch_size])]
        batch = to_device(collate(samples), model_device(model))  # the model may be on a GPU
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for row in gen[:, batch["input_ids"].shape[1]:].tolist():
            outs.append(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
    return outs


def rec_items(scenes: list[Scene]) -> list[tuple[Scene, object, str]]:
    """The held-out REC items: the first referring expression of each object."""
    return [(s, o, s.refs_for(o.id)[0].text) for s in scenes for o in s.objects if s.refs_for(o.id)]


def region_list_items(scenes: list[Scene], seed: int = 0) -> list[tuple[Scene, str, object]]:
    """The held-out numbered-region questions: one per scene of two or more objects (a seeded order and
    number), with the object it asks for."""
    rng = np.random.default_rng(seed)
    return [(s, *region_list_question(s, rng)) for s in scenes if len(s.objects) > 1]


def detect_items(scenes: list[Scene]) -> list[tuple[Scene, object, str]]:
    """``<colour> <kind>`` phrases that name exactly one object of their scene."""
    out = []
    for s in scenes:
        for o in s.objects:
            if sum(x.colour == o.colour and x.kind == o.kind for x in s.objects) == 1:
                out.append((s, o, f"{o.colour} {o.kind}"))
    return out


def well_formed(box) -> bool:
    """An (x0, y0, x1, y1) box with its corners the right way round (a generated one may not be)."""
    return box[2] >= box[0] and box[3] >= box[1]


def hit50(pred, gt) -> bool:
    """IoU >= 0.5; a predicted box with its corners the wrong way round misses."""
    return well_formed(pred) and float(box_iou(pred, gt)[0, 0]) >= 0.5


def rec_misses(kind: str, answers: list[str], items, size: int) -> dict[str, int]:
    """Where REC answers miss (counts): no box; the box of another object (hit at IoU >= 0.5), and of
    those one of the same kind; a box of no object at all, and of those one that overlaps the right
    object most (a loose box). A box with its corners the wrong way round is a box of no object, and
    not a loose one."""
    out = dict.fromkeys(("no_box", "other_object", "other_object/same_kind", "no_object", "no_object/loose"), 0)
    for text, (scene, obj, _) in zip(answers, items):
        boxes = loc_to_boxes(text, size, size, order=BOX_ORDER[kind])
        if not boxes:
            out["no_box"] += 1
            continue
        if hit50(boxes[0], xywh_to_xyxy(obj.bbox)):
            continue
        other = [o for o in scene.objects if o is not obj and hit50(boxes[0], xywh_to_xyxy(o.bbox))]
        if other:
            out["other_object"] += 1
            out["other_object/same_kind"] += other[0].kind == obj.kind
        else:
            out["no_object"] += 1
            if not well_formed(boxes[0]):
                continue
            nearest = max(scene.objects, key=lambda o: float(box_iou(boxes[0], xywh_to_xyxy(o.bbox))[0, 0]))
            out["no_object/loose"] += nearest is obj
    return {f"rec/miss/{k}": v for k, v in out.items()}


def by_scene_objects(prefix: str, name: str, values, items) -> dict[str, float]:
    """The mean of per-item ``values`` apart by the number of objects in the item's scene:
    ``{prefix}/objects_{k}/{name}``."""
    groups: dict[int, list] = {}
    for v, (scene, *_) in zip(values, items):
        groups.setdefault(len(scene.objects), []).append(v)
    return {f"{prefix}/objects_{k}/{name}": float(np.mean(vs)) for k, vs in sorted(groups.items())}


def _box_hits(kind: str, answers: list[str], items, size: int) -> list[bool]:
    hits = []
    for text, (_, obj, _) in zip(answers, items):
        boxes = loc_to_boxes(text, size, size, order=BOX_ORDER[kind])
        hits.append(bool(boxes) and hit50(boxes[0], xywh_to_xyxy(obj.bbox)))
    return hits


def evaluate(model, processor, cfg: TinyVLMConfig, world: World, split: str = "val", n_scenes: int = 100) -> dict:
    """Held-out figures of every task the base trains: caption greedy token accuracy and exact match,
    QA accuracy, REC acc@0.5 (first expression of each object; with its binomial standard error and
    apart by the scene's number of objects), region description (colour and kind both named), and
    PaliGemma's ``detect <colour> <kind>`` acc@0.5 / LLaVA's grounded caption."""
    tok = processor.tokenizer
    p = PROMPTS[cfg.kind]
    scenes = world.scenes(split, n_scenes)
    size = world.config.image_size
    images = [s.image for s in scenes]
    out: dict[str, float] = {"n_scenes": n_scenes}
    caps = generate(model, processor, cfg, images, [p["caption"]] * len(scenes))
    ref_ids = [_answer_ids(tok, cfg, s.caption) for s in scenes]
    correct = sum(sum(a == b for a, b in zip(pred, ref)) for pred, ref in zip(caps, ref_ids))
    out["caption/token_acc"] = correct / sum(len(ref) for ref in ref_ids)
    out["caption/exact_match"] = float(np.mean([pred == ref for pred, ref in zip(caps, ref_ids)]))
    qa = [s.qa[i % len(s.qa)] for i, s in enumerate(scenes)]
    answers = generate(model, processor, cfg, images, [p["question"].format(question=q.question) for q in qa],
                       max_new_tokens=8)
    right = [tok.decode(a).strip() == q.answer for a, q in zip(answers, qa)]
    out["qa/accuracy"] = float(np.mean(right))
    for qtype in sorted({q.type for q in qa}):
        out[f"qa/{qtype}/accuracy"] = float(np.mean([r for r, q in zip(right, qa) if q.type == qtype]))
    items = rec_items(scenes)
    gen = generate(model, processor, cfg, [s.image for s, _, _ in items],
                   [p["rec"].format(expression=e) for _, _, e in items], max_new_tokens=16)
    answers = [tok.decode(g) for g in gen]
    hits = _box_hits(cfg.kind, answers, items, size)
    out["rec/acc50"], out["rec/n"] = float(np.mean(hits)), len(hits)
    out["rec/acc50_stderr"] = float(np.sqrt(out["rec/acc50"] * (1 - out["rec/acc50"]) / len(hits)))
    out |= rec_misses(cfg.kind, answers, items, size)
    out |= by_scene_objects("rec", "acc50", hits, items)  # a random object: 1, 1/2, 1/3
    for rtype in ("attribute", "superlative", "relation"):
        sel = [h for h, (s, o, e) in zip(hits, items) if s.refs_for(o.id)[0].type == rtype]
        if sel:
            out[f"rec/{rtype}/acc50"] = float(np.mean(sel))
    # scenes of several objects: the object named by its kind alone ("the circle"), or by more
    several = [(h, e == f"the {o.kind}") for h, (s, o, e) in zip(hits, items) if len(s.objects) > 1]
    for form, kind_only in (("kind_only", True), ("more_than_kind", False)):
        sel = [h for h, k in several if k == kind_only]
        if sel:
            out[f"rec/several/{form}/acc50"], out[f"rec/several/{form}/n"] = float(np.mean(sel)), len(sel)
    objs = [(s, o) for s in scenes for o in s.objects]
    gen = generate(model, processor, cfg, [s.image for s, _ in objs],
                   [p["region"].format(box=box_text(o, cfg.kind, size)) for _, o in objs], max_new_tokens=8)
    out["region/colour_kind"] = float(np.mean([_names(tok.decode(g), o) for g, (_, o) in zip(gen, objs)]))
    listed = region_list_items(scenes) if cfg.kind == "llava" else []
    if listed:  # none where no scene has two objects
        gen = generate(model, processor, cfg, [s.image for s, _, _ in listed], [q for _, q, _ in listed],
                       max_new_tokens=8)
        out["region_list/colour_kind"] = float(np.mean([_names(tok.decode(g), o) for g, (_, _, o) in zip(gen, listed)]))
        out["region_list/n"] = len(listed)
    if cfg.kind == "paligemma":
        items = detect_items(scenes)
        gen = generate(model, processor, cfg, [s.image for s, _, _ in items],
                       [p["detect"].format(phrase=ph) for _, _, ph in items], max_new_tokens=16)
        out["detect/acc50"] = float(np.mean(_box_hits(cfg.kind, [tok.decode(g) for g in gen], items, size)))
        out["detect/n"] = len(items)
    else:
        gen = generate(model, processor, cfg, images, [p["grounded"]] * len(scenes), max_new_tokens=64)
        out |= _grounded_scores([tok.decode(g) for g in gen], scenes, size)
    return out


def _names(text: str, obj) -> bool:
    words = text.replace(".", " ").replace(",", " ").split()
    return obj.colour in words and obj.kind in words


def _grounded_scores(texts: list[str], scenes: list[Scene], size: int) -> dict[str, float]:
    """Grounded captions: the caption without its boxes right, and the share of objects whose box (the
    i-th of the answer, for the i-th phrase) has IoU >= 0.5."""
    import re

    caption_right, box_right, n = [], [], 0
    for text, s in zip(texts, scenes):
        plain = re.sub(r"\s*(<loc\d{4}>)+", "", text).strip()
        caption_right.append(plain == s.caption)
        boxes = loc_to_boxes(text, size, size, order="xyxy")
        for i, ph in enumerate(sorted(s.caption_phrases, key=lambda p: p.start)):
            gt = xywh_to_xyxy(s.objects[ph.object_id].bbox)
            box_right.append(i < len(boxes) and hit50(boxes[i], gt))
            n += 1
    return {"grounded/caption_exact": float(np.mean(caption_right)), "grounded/box_acc50": float(np.mean(box_right))}


def _answer_ids(tok, cfg: TinyVLMConfig, text: str) -> list[int]:
    lead = " " if cfg.kind == "llava" else ""  # the chat layout puts a space before the answer
    return tok(lead + text, add_special_tokens=False)["input_ids"]


def trivial_baselines(world: World, train_split: str = "train", n_train: int = 2000, split: str = "val",
                      n_scenes: int = 100) -> dict[str, float]:
    """What needs no image understanding, on the same held-out items as :func:`evaluate`: the most
    common training caption (exact match), the most common training answer of each question type, and
    for boxes a random object of the scene (the expected acc@0.5), the largest object, and the union
    of every object; for region descriptions the most common (colour, kind)."""
    train = world.scenes(train_split, n_train)
    scenes = world.scenes(split, n_scenes)
    out = {}
    common = Counter(s.caption for s in train).most_common(1)[0][0]
    out["baseline/constant/caption/exact_match"] = float(np.mean([s.caption == common for s in scenes]))
    by_type: dict[str, Counter] = {}
    for s in train:
        for q in s.qa:
            by_type.setdefault(q.type, Counter())[q.answer] += 1
    qa = [s.qa[i % len(s.qa)] for i, s in enumerate(scenes)]
    out["baseline/majority/qa/accuracy"] = float(np.mean([q.answer == by_type[q.type].most_common(1)[0][0]
                                                          if q.type in by_type else False for q in qa]))
    for name, items in (("rec", rec_items(scenes)), ("detect", detect_items(scenes))):
        rand, largest, union = [], [], []
        for s, o, _ in items:
            gt = xywh_to_xyxy(o.bbox)
            boxes = [xywh_to_xyxy(x.bbox) for x in s.objects]
            rand.append(np.mean([hit50(b, gt) for b in boxes]))
            big = max(s.objects, key=lambda x: x.area)
            largest.append(hit50(xywh_to_xyxy(big.bbox), gt))
            u = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
            union.append(hit50(u, gt))
        out[f"baseline/random_object/{name}/acc50"] = float(np.mean(rand))
        out[f"baseline/largest_object/{name}/acc50"] = float(np.mean(largest))
        out[f"baseline/union_box/{name}/acc50"] = float(np.mean(union))
        if name == "rec":  # apart by the scene's number of objects, as evaluate reports it
            out |= by_scene_objects("baseline/random_object/rec", "acc50", rand, items)
    # a numbered region answered with a random object of the scene (the expected share named right);
    # none where no scene has two objects
    listed = region_list_items(scenes)
    if listed:
        out["baseline/random_object/region_list/colour_kind"] = float(np.mean(
            [np.mean([(x.colour, x.kind) == (o.colour, o.kind) for x in s.objects]) for s, _, o in listed]))
    pairs = Counter((o.colour, o.kind) for s in train for o in s.objects)
    colour, kind = pairs.most_common(1)[0][0]
    out["baseline/majority/region/colour_kind"] = float(np.mean(
        [o.colour == colour and o.kind == kind for s in scenes for o in s.objects]))
    return out
