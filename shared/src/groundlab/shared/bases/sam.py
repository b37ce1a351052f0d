"""A tiny pretrained SAM: ``segment-anything``'s own ImageEncoderViT / PromptEncoder / MaskDecoder at
small sizes, trained on the world's instance masks with point and box prompts, and saved in the
official SAM checkpoint layout (a ``torch.save``d ``Sam`` state dict: ``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``), so it loads the way ``sam_model_registry[...](checkpoint=)``
loads ViT-B/L/H. IVM freezes a trained SAM image encoder; VP-MLLM initialises its visual-prompt
encoder from SAM's prompt encoder.

``Sam.forward`` runs under ``torch.no_grad``, so training calls the three parts directly; the decoder
pass of a training batch takes every prompt of every image at once (:func:`predict_masks_batched`;
``MaskDecoder`` itself repeats one image's embedding per prompt, so a loop over images: a training step
1.9x slower at the base's sizes, ``benchmarks/run.py --only sam_decoding``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
    image_encoder,
)
from segment_anything.modeling import transformer as two_way
from torch import nn
from torch.utils.data import Dataset
from torchvision.ops import sigmoid_focal_loss

from ..attention import attention
from ..metrics import mask_iou
from ..world import World

PIXEL_MEAN = [123.675, 116.28, 103.53]  # SAM's, on 0-255 images
PIXEL_STD = [58.395, 57.12, 57.375]


@dataclass(frozen=True)
class TinySamConfig:
    """Sizes of the tiny SAM (the official ViT-B: image 1024, patch 16, dim 768, depth 12, 256-d prompts)."""

    image_size: int = 64
    patch_size: int = 8
    encoder_dim: int = 64
    encoder_depth: int = 2
    encoder_heads: int = 4
    window_size: int = 4
    global_attn_indexes: tuple[int, ...] = (1,)
    prompt_dim: int = 64
    """SAM's ``prompt_embed_dim`` (256 in the release): the image embedding's channels too."""
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp: int = 256
    decoder_heads: int = 4
    iou_head_hidden: int = 64
    semantic_weight: float = 1.0
    """Weight of a training-only dense class head (1x1 conv on the image embedding, per-pixel colour x
    kind or background; not part of the saved SAM). The released SAM's encoder carries semantics from
    MAE pre-training on natural images; SAM's own mask losses alone do not make the tiny encoder keep
    them (an oracle colour x kind condition cannot select an object from its embeddings), so the base
    learns them this way. 0: SAM's losses only."""
    semantic_hidden: int = 0
    """Hidden channels of the class head: 0 is one 1x1 conv (the embedding itself must be linearly
    separable by class); > 0 puts a 3x3 conv + GELU of this width before it."""
    multimask_clicks: bool = False
    """SAM's answer to an ambiguous click: a lone click is decoded by the three multi-mask outputs,
    trained on the one with the lowest mask loss (the IoU head on all three), and answered by the
    output whose predicted IoU is highest; boxes use the single-mask output. False: every prompt is
    trained and answered by the single-mask output."""
    touching_weight: float = 1.0
    """Weight of the mask loss of an object that touches another (:func:`touching`), relative to an
    isolated one's (1.0: all equal). A click on an isolated shape is nearly always answered right; the
    errors are masks that run into a touching neighbour, the same colour or not."""
    mask_loss: str = "bce_dice"
    """The mask loss of a prompt (:func:`mask_loss`): ``"bce_dice"``, per-pixel BCE + Dice at 1:1;
    ``"focal_dice"``, SAM's own, focal and Dice at 20:1 (the SAM paper; the focal loss's gamma 2 and
    alpha 0.25, which the paper does not state, are the usual ones), which weighs the few pixels a mask
    still gets wrong, mostly where two objects meet, above the many it already gets right (one build:
    point / box 0.948 / 0.960 -> 0.956 / 0.964; not the default base's: IVM does worse on its encoder,
    see ``bases.default_spec``)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, path: str | Path) -> TinySamConfig:
        """The ``config.json`` saved beside a tiny SAM checkpoint, checked field by field."""
        from ..config import build, read_json

        raw = read_json(path, "SAM config")
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a SAM config is a JSON object")
        return build(cls, raw, str(path))


class _EncoderAttention(image_encoder.Attention):
    """The SAM image encoder's attention (decomposed relative positions as an additive bias) through
    the shared dispatch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.use_rel_pos:  # (B * heads, T, T) -> (B, heads, T, T)
            flat = q.reshape(b * self.num_heads, h * w, -1)
            bias = image_encoder.add_decomposed_rel_pos(flat.new_zeros(flat.shape[0], h * w, h * w), flat,
                                                        self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            bias = bias.view(b, self.num_heads, h * w, h * w)
        out = attention(q, k, v, causal=False, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class _DecoderAttention(two_way.Attention):
    """The SAM mask decoder's (two-way transformer's) attention through the shared dispatch."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._separate_heads(proj(x), self.num_heads)
                   for proj, x in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)))
        return self.out_proj(self._recombine_heads(attention(q, k, v, causal=False)))


def use_shared_attention(module: nn.Module) -> nn.Module:
    """Run every ``segment_anything`` attention inside ``module`` (image encoder, two-way transformer)
    through :func:`groundlab.shared.attention.attention`: the same parameters and function (tested),
    one dispatch. Returns ``module``."""
    for sub in module.modules():
        for plain, shared in ((image_encoder.Attention, _EncoderAttention), (two_way.Attention, _DecoderAttention)):
            if type(sub) is plain:
                sub.__class__ = shared
    return module


def build_tiny_sam(cfg: TinySamConfig | None = None, checkpoint: str | Path | None = None) -> Sam:
    """Build a ``Sam`` at the given sizes; with ``checkpoint``, load an official-layout state dict
    strictly (``weights_only``), with an error naming missing / unexpected / mis-shaped keys."""
    cfg = cfg or TinySamConfig()
    grid = cfg.image_size // cfg.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.encoder_dim, depth=cfg.encoder_depth,
            num_heads=cfg.encoder_heads, mlp_ratio=4, out_chans=cfg.prompt_dim, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=cfg.window_size,
            global_attn_indexes=cfg.global_attn_indexes),
        prompt_encoder=PromptEncoder(embed_dim=cfg.prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_dim,
                                          mlp_dim=cfg.decoder_mlp, num_heads=cfg.decoder_heads),
            transformer_dim=cfg.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=cfg.iou_head_hidden),
        pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD,
    )
    use_shared_attention(sam)
    if checkpoint is not None:
        load_sam_checkpoint(sam, checkpoint)
    return sam


def load_sam_checkpoint(sam: nn.Module, checkpoint: str | Path, prefix: str = "") -> None:
    """Load an official-layout SAM state dict into ``sam`` (all keys, or those under ``prefix``, e.g.
    ``"image_encoder."`` to load only the encoder into an ``ImageEncoderViT``), strictly."""
    from ..loading import load_state, torch_load

    path = Path(checkpoint)
    state = torch_load(path, "SAM checkpoint")
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{path}: no key starts with {prefix!r}")
    load_state(sam, state, f"SAM checkpoint {path}" + (f" ({prefix}*)" if prefix else ""))


def save_sam_checkpoint(sam: Sam, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path


# ----------------------------------------------------------------------------------------------
# data


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """A deterministic click inside ``mask``: the mask pixel nearest to the mask's centroid, (x, y)."""
    ys, xs = np.nonzero(mask)
    i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return int(xs[i]), int(ys[i])


@dataclass
class Prompts:
    """The prompts of one image: one per object, each a point or a box (never both)."""

    points: torch.Tensor  # (n, 1, 2) pixel (x, y)
    boxes: torch.Tensor  # (n, 4) xyxy pixels
    use_box: torch.Tensor  # (n,) bool
    masks: torch.Tensor  # (n, H, W) float targets
    extra: dict = field(default_factory=dict)


class WorldSamDataset(Dataset):
    """One image per item with every object prompted: a random interior point, or (half the time) its
    box with a few pixels of jitter. The rng is seeded by (seed, index), so items never change."""

    def __init__(self, world: World, split: str, n_scenes: int, seed: int = 0, box_prob: float = 0.5,
                 box_jitter: int = 2):
        self.world, self.split, self.n, self.seed = world, split, n_scenes, seed
        self.box_prob, self.box_jitter = box_prob, box_jitter

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict:
        scene = self.world.scene(self.split, idx)
        rng = np.random.default_rng([self.seed, idx])
        size = scene.size
        points, boxes, use_box = [], [], []
        classes = [semantic_class(self.world, o) for o in scene.objects]
        masks = np.stack([o.mask for o in scene.objects])
        for obj in scene.objects:
            ys, xs = np.nonzero(obj.mask)
            k = int(rng.integers(len(xs)))
            points.append([[xs[k], ys[k]]])
            x, y, w, h = obj.bbox
            j = rng.integers(-self.box_jitter, self.box_jitter + 1, size=4)
            boxes.append(np.clip([x + j[0], y + j[1], x + w + j[2], y + h + j[3]], 0, size))
            use_box.append(rng.random() < self.box_prob)
        return {
            "images": torch.from_numpy(scene.image).permute(2, 0, 1).float(),
            "prompts": {
                "points": torch.tensor(points, dtype=torch.float),
                "boxes": torch.tensor(np.array(boxes), dtype=torch.float),
                "use_box": torch.tensor(use_box),
                "masks": torch.from_numpy(masks).float(),
                "classes": torch.tensor(classes),
                "touching": torch.from_numpy(touching(masks)),
            },
        }


def touching(masks: np.ndarray) -> np.ndarray:
    """(n, H, W) bool masks -> (n,) bool: whether each mask comes within one pixel (8-neighbourhood) of
    another."""
    m = np.asarray(masks, bool)
    padded = np.pad(m, ((0, 0), (1, 1), (1, 1)))
    h, w = m.shape[1:]
    grown = np.zeros_like(m)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            grown |= padded[:, dy:dy + h, dx:dx + w]
    counts = m.sum(0)
    return np.array([bool((grown[i] & (counts - m[i] > 0)).any()) for i in range(len(m))])


def num_semantic_classes(world: World) -> int:
    """Background + one class per (colour, kind) of the world."""
    return 1 + len(world.config.colours) * len(world.config.kinds)


def semantic_class(world: World, obj) -> int:
    """An object's class id: 1 + its (colour, kind) index; 0 is background."""
    kinds, colours = world.config.kinds, world.config.colours
    return 1 + colours.index(obj.colour) * len(kinds) + kinds.index(obj.kind)


def class_map(masks: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(n, H, W) visible-pixel masks and (n,) class ids -> (H, W) ids, 0 where no object is."""
    out = torch.zeros(masks.shape[-2:], dtype=torch.long)
    for m, c in zip(masks, classes):
        out[m > 0.5] = c
    return out


def collate_sam(samples: list[dict]) -> dict:
    return {"images": torch.stack([s["images"] for s in samples]), "prompts": [s["prompts"] for s in samples]}


# ----------------------------------------------------------------------------------------------
# model pieces used in training and evaluation


def predict_masks(sam: Sam, embedding: torch.Tensor, points: torch.Tensor | None, boxes: torch.Tensor | None,
                  out_size: int, multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits (n, out_size, out_size) and predicted IoUs (n,) for n point OR n box prompts on one
    image embedding (1, C, h, w), through SAM's own ``MaskDecoder.forward``: the single-mask output, or
    with ``multimask`` the one of the three multi-mask outputs whose predicted IoU is highest."""
    coords = None if points is None else (points, torch.ones(points.shape[:2], dtype=torch.int, device=points.device))
    sparse, dense = sam.prompt_encoder(points=coords, boxes=boxes, masks=None)
    low, iou = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=multimask)
    best = iou.argmax(1)
    rows = torch.arange(len(best), device=best.device)
    logits = F.interpolate(low[rows, best][:, None], size=(out_size, out_size), mode="bilinear", align_corners=False)
    return logits[:, 0], iou[rows, best]


def predict_masks_batched(sam: Sam, embeddings: torch.Tensor, image_index: torch.Tensor, points: torch.Tensor,
                          boxes: torch.Tensor, use_box: torch.Tensor, out_size: int,
                          all_outputs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`predict_masks` for the prompts of many images in one decoder pass: prompt i is on image
    ``image_index[i]`` of ``embeddings`` (B, C, h, w), and is its box where ``use_box[i]``, else its
    point. A single click and a box both make two sparse tokens (the click gets SAM's padding point),
    so one batch holds both. The steps are ``MaskDecoder.predict_masks``'s with one image embedding per
    prompt instead of one per call (SAM's repeats a single image's): same weights, same outputs, one
    pass instead of a Python loop over images. ``all_outputs``: every mask token's logits (n, 4, size,
    size) and IoUs (n, 4), the single-mask output first, then the three multi-mask outputs."""
    pe, md = sam.prompt_encoder, sam.mask_decoder
    labels = torch.ones(points.shape[:2], dtype=torch.int, device=points.device)
    point_sparse, dense = pe(points=(points, labels), boxes=None, masks=None)
    box_sparse, _ = pe(points=None, boxes=boxes, masks=None)
    sparse = torch.where(use_box[:, None, None], box_sparse, point_sparse)
    n = sparse.shape[0]
    tokens = torch.cat([torch.cat([md.iou_token.weight, md.mask_tokens.weight]).expand(n, -1, -1), sparse], dim=1)
    src = embeddings[image_index] + dense
    b, c, h, w = src.shape
    hs, src = md.transformer(src, pe.get_dense_pe().expand(n, -1, -1, -1), tokens)
    upscaled = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    k = md.num_mask_tokens if all_outputs else 1  # token 0 is the single-mask output
    hyper = torch.stack([md.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(k)], dim=1)
    low = (hyper @ upscaled.flatten(2)).view(b, k, *upscaled.shape[-2:])
    iou = md.iou_prediction_head(hs[:, 0])[:, :k]
    logits = F.interpolate(low, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return (logits, iou) if all_outputs else (logits[:, 0], iou[:, 0])


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, reduce: bool = True) -> torch.Tensor:
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    loss = 1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return loss.mean() if reduce else loss


MASK_LOSSES = ("bce_dice", "focal_dice")
FOCAL_WEIGHT = 20.0  # SAM's focal : Dice


def mask_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce_dice") -> torch.Tensor:
    """(n, H, W) mask logits and float targets -> (n,) the loss of each mask (``TinySamConfig.mask_loss``):
    the per-pixel term's mean over the mask plus its Dice loss."""
    if kind == "bce_dice":
        pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return pixel.flatten(1).mean(1) + dice_loss(logits, target, reduce=False)
    if kind == "focal_dice":
        pixel = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="none")
        return FOCAL_WEIGHT * pixel.flatten(1).mean(1) + dice_loss(logits, target, reduce=False)
    raise ValueError(f"unknown mask loss {kind!r}; known: {MASK_LOSSES}")


class SamForTraining(nn.Module):
    """Trainer-facing wrapper: ``forward(images, prompts) -> {"loss"}`` with SAM's losses (the mask loss,
    :func:`mask_loss` of kind ``mask_loss``, and MSE of the IoU head against the achieved IoU), plus
    ``semantic_weight`` x the per-pixel cross-entropy of a training-only 1x1 class head on the image
    embedding (see ``TinySamConfig``). The mask loss is a weighted mean over prompts:
    ``touching_weight`` for an object that touches another (prompts carry ``touching``), 1 for the rest."""

    def __init__(self, sam: Sam, num_classes: int = 0, semantic_weight: float = 0.0, semantic_hidden: int = 0,
                 multimask_clicks: bool = False, touching_weight: float = 1.0, mask_loss: str = "bce_dice"):
        super().__init__()
        if touching_weight <= 0:
            raise ValueError(f"touching_weight must be > 0, got {touching_weight}")
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        self.sam, self.semantic_weight, self.multimask_clicks = sam, semantic_weight, multimask_clicks
        self.touching_weight, self.mask_loss = touching_weight, mask_loss
        if semantic_weight > 0 and num_classes < 2:
            raise ValueError("a semantic loss needs num_classes >= 2 (background + object classes)")
        channels = sam.prompt_encoder.embed_dim
        if semantic_weight <= 0:
            self.semantic_head = None
        elif semantic_hidden > 0:
            self.semantic_head = nn.Sequential(nn.Conv2d(channels, semantic_hidden, 3, padding=1), nn.GELU(),
                                               nn.Conv2d(semantic_hidden, num_classes, 1))
        else:
            self.semantic_head = nn.Conv2d(channels, num_classes, 1)

    @classmethod
    def for_config(cls, sam: Sam, cfg: TinySamConfig, world: World) -> SamForTraining:
        """The wrapper with every training option of ``cfg`` (what a base build trains with)."""
        return cls(sam, num_semantic_classes(world), cfg.semantic_weight, cfg.semantic_hidden,
                   cfg.multimask_clicks, cfg.touching_weight, cfg.mask_loss)

    def semantic_logits(self, embeddings: torch.Tensor, size: int) -> torch.Tensor:
        """(B, C, h, w) embeddings -> (B, classes, size, size) per-pixel class logits."""
        return F.interpolate(self.semantic_head(embeddings), size=(size, size), mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, prompts: list[dict]) -> dict:
        size = images.shape[-1]
        embeddings = self.sam.image_encoder(self.sam.preprocess(images))  # (B, C, h, w)
        image_index = torch.cat([torch.full((len(p["use_box"]),), b, device=images.device)
                                 for b, p in enumerate(prompts)])
        points, boxes, use_box, target = (torch.cat([p[k] for p in prompts])
                                          for k in ("points", "boxes", "use_box", "masks"))
        weight = torch.ones(len(target), device=images.device)
        if self.touching_weight != 1.0:
            near = torch.cat([p["touching"] for p in prompts]).to(images.device)
            weight = torch.where(near, torch.full_like(weight, self.touching_weight), weight)
        weight = weight / weight.sum()
        if self.multimask_clicks:
            loss = self._multimask_loss(embeddings, image_index, points, boxes, use_box, target, size, weight)
        else:
            logits, iou_pred = predict_masks_batched(self.sam, embeddings, image_index, points, boxes, use_box, size)
            per_prompt = mask_loss(logits, target, self.mask_loss)
            loss = (per_prompt * weight).sum() + F.mse_loss(iou_pred, achieved_iou(logits, target))
        if self.semantic_head is not None:
            target = torch.stack([class_map(p["masks"], p["classes"]) for p in prompts]).to(images.device)
            loss = loss + self.semantic_weight * F.cross_entropy(self.semantic_logits(embeddings, size), target)
        return {"loss": loss}


    def _multimask_loss(self, embeddings, image_index, points, boxes, use_box, target, size,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
        """Boxes: the single-mask output; clicks: the lowest-loss of the three multi-mask outputs (SAM's
        recipe for ambiguous prompts). The IoU head learns every output it is asked for. ``weight``: the
        prompts' loss weights, summing to 1 (None: equal)."""
        logits, iou_pred = predict_masks_batched(self.sam, embeddings, image_index, points, boxes, use_box, size,
                                                 all_outputs=True)
        n, k = logits.shape[:2]
        targets = target[:, None].expand(-1, k, -1, -1)
        per_output = mask_loss(logits.flatten(0, 1), targets.flatten(0, 1), self.mask_loss).view(n, k)
        click_best = 1 + per_output[:, 1:].argmin(1).detach()
        chosen = torch.where(use_box, torch.zeros_like(click_best), click_best)
        rows = torch.arange(n, device=logits.device)
        iou = achieved_iou(logits.flatten(0, 1), targets.flatten(0, 1)).view(n, k)
        asked = torch.ones_like(iou, dtype=torch.bool)
        asked[:, 0] = use_box
        asked[:, 1:] = ~use_box[:, None]
        if weight is None:
            weight = torch.full((n,), 1 / n, device=logits.device)
        return ((per_output[rows, chosen] * weight).sum()
                + F.mse_loss(iou_pred[asked], iou[asked]))


def achieved_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n, H, W) mask logits and targets -> (n,) IoU of the thresholded masks (no gradient): what SAM's IoU
    head learns to predict."""
    with torch.no_grad():
        pred, truth = logits > 0, target > 0.5
        return ((pred & truth).flatten(1).sum(1) / (pred | truth).flatten(1).sum(1).clamp(min=1)).float()


@torch.no_grad()
def semantic_accuracy(wrapper: SamForTraining, world: World, split: str = "val", n_scenes: int = 200) -> float:
    """Pixel accuracy of the training-only class head on held-out scenes, over object pixels."""
    right = total = 0
    for scene in world.scenes(split, n_scenes):
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float()[None]
        emb = wrapper.sam.image_encoder(wrapper.sam.preprocess(image))
        pred = wrapper.semantic_logits(emb, scene.size).argmax(1)[0]
        target = class_map(torch.from_numpy(np.stack([o.mask for o in scene.objects])).float(),
                           torch.tensor([semantic_class(world, o) for o in scene.objects]))
        fg = target > 0
        right += int((pred[fg] == target[fg]).sum())
        total += int(fg.sum())
    return right / max(1, total)


@torch.no_grad()
def evaluate(sam: Sam, world: World, split: str = "val", n_scenes: int = 200, multimask_clicks: bool = False) -> dict:
    """Held-out mean mask IoU with one centre click, and with the exact box, per object, also apart for
    the objects that touch another (:func:`touching`) and the isolated ones; plus the figures of two
    prompt-only baselines: a disk at the click, and the filled box. ``multimask_clicks``:
    a click is answered by its most confident multi-mask output (see ``TinySamConfig``)."""
    sam.eval()
    ious = {"point": [], "box": [], "disk": [], "filled_box": []} | ({"point_best_of_3": []} if multimask_clicks else {})
    for scene in world.scenes(split, n_scenes):
        size = scene.size
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float()[None]
        emb = sam.image_encoder(sam.preprocess(image))
        clicks = [interior_point(o.mask) for o in scene.objects]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (o.bbox for o in scene.objects)]
        pl, _ = predict_masks(sam, emb, torch.tensor(clicks, dtype=torch.float)[:, None], None, size,
                              multimask=multimask_clicks)
        bl, _ = predict_masks(sam, emb, None, torch.tensor(boxes, dtype=torch.float), size)
        if multimask_clicks:  # every one of the three outputs, for the oracle that picks the best
            ml, _ = predict_masks_batched(sam, emb, torch.zeros(len(clicks), dtype=torch.long),
                                          torch.tensor(clicks, dtype=torch.float)[:, None],
                                          torch.zeros(len(clicks), 4), torch.zeros(len(clicks), dtype=torch.bool),
                                          size, all_outputs=True)
            for i, obj in enumerate(scene.objects):
                ious["point_best_of_3"].append(max(mask_iou(m.numpy() > 0, obj.mask) for m in ml[i, 1:]))
        yy, xx = np.mgrid[0:size, 0:size]
        near = touching(np.stack([o.mask for o in scene.objects]))
        for i, obj in enumerate(scene.objects):
            ious["point"].append(mask_iou(pl[i].numpy() > 0, obj.mask))
            ious["box"].append(mask_iou(bl[i].numpy() > 0, obj.mask))
            for prompt in ("point", "box"):  # objects that touch another, and the rest
                ious.setdefault(f"{prompt}_{'touching' if near[i] else 'isolated'}", []).append(ious[prompt][-1])
            r = np.sqrt(obj.area / np.pi)
            cx, cy = clicks[i]
            ious["disk"].append(mask_iou((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r, obj.mask))
            x0, y0, x1, y1 = boxes[i]
            filled = np.zeros((size, size), bool)
            filled[y0:y1, x0:x1] = True
            ious["filled_box"].append(mask_iou(filled, obj.mask))
    return ({f"{k}/mIoU": float(np.mean(v)) for k, v in ious.items()} | {"n_objects": len(ious["point"])}
            | {"n_touching": len(ious.get("point_touching", []))})
