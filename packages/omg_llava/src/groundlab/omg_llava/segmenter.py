"""OMG-Seg, the universal segmenter OMG-LLaVA freezes and uses as both visual encoder and mask decoder
(arXiv 2406.19389, Section 3.1; Mask2Former's meta-architecture).

- ``ConvNeXtBackbone``: 4 stages at strides 4 / 8 / 16 / 32 (ConvNeXt-L CLIP in the release:
  192 / 384 / 768 / 1536 channels, depths 3 / 3 / 27 / 3). Parameter names follow timm's ConvNeXt
  (``stem``, ``stages.N.downsample``, ``stages.N.blocks.M.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}``).
- ``PixelDecoder``: a multi-scale deformable-attention encoder over the strides 8 / 16 / 32 features
  (6 layers, 256-d in the release) in pure torch (``grid_sample``), then an FPN step to stride 4 and a
  1x1 conv giving ``mask_features``.
- ``MaskDecoder``: Mask2Former's transformer decoder: learned queries (``query_feat``) and their
  positional embeddings (``query_embed``); per layer masked cross-attention to one memory level
  (cycling ``i % levels``), self-attention, FFN, each post-norm; a prediction head (shared norm,
  classifier - the release's CLIP-text cosine one or a Linear -, mask-embedding MLP, IoU MLP) before
  the first layer and after each, giving
  ``num_layers + 1`` predictions. The cross-attention mask of a layer is the previous prediction,
  ``sigmoid < 0.5`` masked, resized to that level; a row masked everywhere is unmasked.
  ``run_queries`` runs any queries (the ``[SEG]`` and visual-prompt queries of OMG-LLaVA) through the
  same frozen layers, optionally with fixed per-layer masks (mask prompts) or with predictions
  restricted to a box (box prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from groundlab.shared.attention import MultiheadAttention

# ----------------------------------------------------------------------------------------------
# backbone


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    def __init__(self, dim_in: int, dim: int, depth: int, downsample: bool):
        super().__init__()
        self.downsample = (nn.Sequential(LayerNorm2d(dim_in, eps=1e-6), nn.Conv2d(dim_in, dim, 2, stride=2))
                           if downsample else nn.Identity())
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtBackbone(nn.Module):
    """(B, 3, H, W) -> 4 feature maps at strides 4, 8, 16, 32."""

    def __init__(self, dims: tuple[int, ...] = (192, 384, 768, 1536), depths: tuple[int, ...] = (3, 3, 27, 3)):
        super().__init__()
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"ConvNeXt has 4 stages, got dims {dims} and depths {depths}")
        self.dims = tuple(dims)
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.ModuleList(
            ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0) for i in range(4))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


# ----------------------------------------------------------------------------------------------
# multi-scale deformable attention (pure torch)


def ms_deform_sample(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """The core of multi-scale deformable attention.

    value: (B, S, heads, hd) for all levels flattened (S = sum h*w); locations: (B, Q, heads, L, P, 2) in
    [0, 1] (x, y); weights: (B, Q, heads, L, P), softmax-normalised over (L, P). Returns (B, Q, heads*hd) in
    ``value``'s dtype; the sampling runs in fp32 (a bf16 location is off by up to 1/256 of the image).
    """
    b, _, heads, hd = value.shape
    _, q, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample's [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(b * heads, hd, h, w).float()
        g = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(b * heads, q, points, 2).float()
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # (BH, hd, Q, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (BH, hd, Q, L*P)
    w = weights.permute(0, 2, 1, 3, 4).reshape(b * heads, 1, q, levels * points).float()
    return (stacked * w).sum(-1).view(b, heads * hd, q).transpose(1, 2).to(value.dtype)


class MSDeformAttn(nn.Module):
    def __init__(self, dim: int = 256, levels: int = 3, heads: int = 8, points: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self):
        # offsets start on a ring of directions, one per head, growing with the point index
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor,
                shapes: list[tuple[int, int]], padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Q, D); reference (B, Q, L, 2) in [0, 1]; value (B, S, D)."""
        b, q, _ = query.shape
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(b, -1, self.heads, self.dim // self.heads)
        offsets = self.sampling_offsets(query).view(b, q, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(b, q, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(b, q, self.heads, self.levels, self.points)
        normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=query.device)
        locations = reference.float()[:, :, None, :, None, :] + offsets.float() / normaliser[None, None, None, :, None, :]
        return self.output_proj(ms_deform_sample(v, shapes, locations, weights))


def sine_position(mask_shape: tuple[int, int, int], dim: int, device=None, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's 2-D sine positional encoding (normalised, scale 2*pi): (B, dim, H, W)."""
    b, h, w = mask_shape
    half = dim // 2
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)[:, None].expand(h, w) / (h + 1e-6) * 2 * math.pi
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)[None, :].expand(h, w) / (w + 1e-6) * 2 * math.pi
    t = temperature ** (2 * (torch.arange(half, dtype=torch.float32, device=device) // 2) / half)
    px, py = x[..., None] / t, y[..., None] / t
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], -1).flatten(-2)
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], -1).flatten(-2)
    return torch.cat([py, px], -1).permute(2, 0, 1)[None].expand(b, -1, -1, -1)


class DeformEncoderLayer(nn.Module):
    def __init__(self, dim: int, levels: int, heads: int, points: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1, self.linear2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, pos, reference, shapes):
        x = self.norm1(x + self.dropout(self.self_attn(x + pos, reference, x, shapes)))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class PixelDecoder(nn.Module):
    """Backbone features (strides 4..32) -> (mask_features at stride 4, memory levels coarse to fine)."""

    def __init__(self, in_dims: tuple[int, ...], dim: int = 256, mask_dim: int = 256, layers: int = 6,
                 heads: int = 8, points: int = 4, ffn: int = 1024, groups: int = 32):
        super().__init__()
        self.levels = 3
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(groups, dim)) for c in reversed(in_dims[1:]))
        self.level_embed = nn.Parameter(torch.randn(self.levels, dim) * 0.02)
        self.layers = nn.ModuleList(DeformEncoderLayer(dim, self.levels, heads, points, ffn) for _ in range(layers))
        self.lateral_conv = nn.Sequential(nn.Conv2d(in_dims[0], dim, 1, bias=False), nn.GroupNorm(groups, dim))
        self.output_conv = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.GroupNorm(groups, dim),
                                         nn.ReLU())
        self.mask_features = nn.Conv2d(dim, mask_dim, 1)
        self.dim = dim

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Returns mask_features (B, mask_dim, H/4, W/4), memory [(B, D, h, w) for strides 32, 16, 8] and
        their positional encodings."""
        coarse = [proj(f) for proj, f in zip(self.input_proj, reversed(feats[1:]))]  # strides 32, 16, 8
        shapes = [tuple(x.shape[-2:]) for x in coarse]
        b = coarse[0].shape[0]
        pos = [sine_position((b, h, w), self.dim, coarse[0].device).to(coarse[0].dtype) for h, w in shapes]
        src = torch.cat([x.flatten(2).transpose(1, 2) for x in coarse], 1)
        pos_flat = torch.cat([(p.flatten(2).transpose(1, 2) + self.level_embed[i]) for i, p in enumerate(pos)], 1)
        refs = []
        for h, w in shapes:
            ys, xs = torch.meshgrid(torch.arange(h, device=src.device), torch.arange(w, device=src.device), indexing="ij")
            refs.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
        reference = torch.cat(refs, 0)[None, :, None, :].expand(b, -1, self.levels, -1)
        x = src
        for layer in self.layers:
            x = layer(x, pos_flat, reference, shapes)
        memory = [m.transpose(1, 2).reshape(b, self.dim, h, w) for m, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes)]
        fine = self.lateral_conv(feats[0]) + F.interpolate(memory[-1], size=feats[0].shape[-2:], mode="bilinear",
                                                           align_corners=False)
        return self.mask_features(self.output_conv(fine)), memory, pos


# ----------------------------------------------------------------------------------------------
# Mask2Former transformer decoder


class DecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each followed by a residual and LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.cross_attn = MultiheadAttention(dim, heads, dropout=dropout)
        self.norm_cross = nn.LayerNorm(dim)
        self.self_attn = MultiheadAttention(dim, heads, dropout=dropout)
        self.norm_self = nn.LayerNorm(dim)
        self.linear1, self.linear2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.norm_ffn = nn.LayerNorm(dim)

    def forward(self, q, query_pos, memory, memory_pos, attn_mask=None, self_mask=None):
        """q (B, N, D); memory (B, S, D); attn_mask (B, N, S) True = not allowed."""
        seen = None if attn_mask is None else ~attn_mask[:, None]  # (B, 1, N, S), True = may attend
        q = self.norm_cross(q + self.cross_attn(q + query_pos, memory + memory_pos, memory, seen))
        seen = None if self_mask is None else ~self_mask[:, None]
        out = self.self_attn(q + query_pos, q + query_pos, q, seen)
        q = self.norm_self(q + out)
        return self.norm_ffn(q + self.linear2(F.relu(self.linear1(q))))


@dataclass
class Prediction:
    class_logits: torch.Tensor  # (B, N, C + 1)
    mask_logits: torch.Tensor  # (B, N, H/4, W/4)
    iou: torch.Tensor  # (B, N)
    query: torch.Tensor  # (B, N, D): the layer's query output before the head's norm


BOX_PROMPTS = "attention"
"""How a box prompt acts (part of a trained segmenter's cache key): ``attention``, every layer's
cross-attention kept to the cells the box touches (the release's). Segmenters trained before it
cropped the predicted masks to the box instead, which cost each mask the pixels along the box's edges
under bilinear upsampling (box-prompted mIoU 0.884 -> 0.916 on the same segmenter, README)."""


def box_cells(box: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, N, 4) normalised xyxy boxes -> (B, N, h, w) bool, True on every cell of an h x w grid over
    the image that the box touches: columns floor(x0 w) .. floor(x1 w), the release's rounding (a box
    ending on a cell edge keeps the cell after it)."""
    h, w = size
    b = box.float().clamp(0, 1)
    x0, x1 = (b[..., 0] * w).floor(), (b[..., 2] * w).floor()
    y0, y1 = (b[..., 1] * h).floor(), (b[..., 3] * h).floor()
    xs = torch.arange(w, dtype=torch.float32, device=box.device)
    ys = torch.arange(h, dtype=torch.float32, device=box.device)
    cols = (xs >= x0[..., None]) & (xs <= x1[..., None])  # (B, N, w)
    rows = (ys >= y0[..., None]) & (ys <= y1[..., None])  # (B, N, h)
    return rows[..., :, None] & cols[..., None, :]


def unmask_full_rows(mask: torch.Tensor) -> torch.Tensor:
    """A query whose cross-attention mask hides every position attends everywhere instead."""
    full = mask.all(dim=-1, keepdim=True)
    return mask & ~full


def mask_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of ``features`` (B, C, h, w) over each mask's positive-logit pixels: masks (B, N, H, W) ->
    (B, N, C). Masks are resized to the features and detached; an empty mask pools to zero."""
    if masks.shape[-2:] != features.shape[-2:]:
        masks = F.interpolate(masks, size=features.shape[-2:], mode="bilinear", align_corners=False)
    m = (masks.detach() > 0).to(features.dtype)
    return torch.einsum("bchw,bnhw->bnc", features, m / (m.sum((-2, -1), keepdim=True) + 1e-8))


class MaskDecoder(nn.Module):
    """``classifier``: ``"linear"`` (a Linear over the normed query) or ``"clip"``, the release's
    open-vocabulary classifier: the mask-pooled ``mask_features`` (LayerNorm + Linear) plus the normed
    query, through an MLP into the CLIP text space; logits = 100 x the cosine to each class's text
    embeddings (``class_embeddings`` (classes + 1, prototypes, E), max over prototypes; the background
    row is zero, so its logit is 0)."""

    LOGIT_SCALE = 4.6052  # log(100), fixed

    def __init__(self, dim: int = 256, num_queries: int = 300, layers: int = 9, heads: int = 8, ffn: int = 2048,
                 num_classes: int = 133, mask_dim: int = 256, levels: int = 3, classifier: str = "linear",
                 class_embed_dim: int = 768, class_prototypes: int = 1):
        super().__init__()
        if classifier not in ("linear", "clip"):
            raise ValueError(f"classifier must be 'linear' or 'clip', got {classifier!r}")
        self.levels, self.num_layers, self.classifier = levels, layers, classifier
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(levels, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn) for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(dim)
        if classifier == "linear":
            self.class_embed = nn.Linear(dim, num_classes + 1)
        else:
            self.cls_proj = MLP(dim, dim, class_embed_dim, 3)
            self.mask_pooling_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
            self.register_buffer("class_embeddings", torch.zeros(num_classes + 1, class_prototypes, class_embed_dim))
        self.mask_embed = MLP(dim, dim, mask_dim, 3)
        self.iou_embed = MLP(dim, dim, 1, 3)

    def classify(self, normed: torch.Tensor, masks: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        if self.classifier == "linear":
            return self.class_embed(normed)
        pooled = self.mask_pooling_proj(mask_pool(mask_features, masks))
        emb = F.normalize(self.cls_proj(pooled + normed), dim=-1)
        cos = torch.einsum("bne,kpe->bnkp", emb, self.class_embeddings).amax(-1)
        return math.exp(self.LOGIT_SCALE) * cos

    def head(self, q, mask_features) -> tuple[Prediction, torch.Tensor]:
        """A prediction from queries ``q`` and the attention mask it implies at full mask resolution."""
        normed = self.decoder_norm(q)
        masks = torch.einsum("bnd,bdhw->bnhw", self.mask_embed(normed), mask_features)
        logits = self.classify(normed, masks, mask_features)
        return Prediction(logits, masks, self.iou_embed(normed).squeeze(-1), q), masks

    @staticmethod
    def attention_mask(masks: torch.Tensor, size: tuple[int, int], box: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, h, w) mask logits -> (B, N, h'*w') True where the next layer must not look; with
        ``box`` (B, N, 4) normalised xyxy, also every cell of the h' x w' grid outside the box."""
        m = F.interpolate(masks, size=size, mode="bilinear", align_corners=False).sigmoid().flatten(2) < 0.5
        if box is not None:
            m = m | ~box_cells(box, size).flatten(2)
        return unmask_full_rows(m)

    def run_queries(self, query_feat: torch.Tensor, query_pos: torch.Tensor, mask_features: torch.Tensor,
                    memory: list[torch.Tensor], memory_pos: list[torch.Tensor],
                    fixed_masks: list[torch.Tensor] | None = None, box: torch.Tensor | None = None,
                    self_mask: torch.Tensor | None = None) -> list[Prediction]:
        """Queries (B, N, D) with positions (B, N, D) through the head and every layer: ``layers + 1``
        predictions. ``fixed_masks``: per memory level (B, N, h*w) True = masked, used at every layer
        instead of the predicted masks (mask prompts). ``box``: (B, N, 4) normalised xyxy boxes (box
        prompts): as the release does, each layer's cross-attention is kept to the cells of its memory
        level that the box touches, beside the predicted mask; the predicted masks are not cropped."""
        # Mask2Former adds the level embedding to the memory itself (keys and values)
        mem = [m.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, m in enumerate(memory)]
        pos = [p.flatten(2).transpose(1, 2) for p in memory_pos]
        q = query_feat
        pred, masks = self.head(q, mask_features)
        preds = [pred]
        for i, layer in enumerate(self.layers):
            lvl = i % self.levels
            if fixed_masks is not None:
                amask = unmask_full_rows(fixed_masks[lvl])
            else:
                amask = self.attention_mask(masks, tuple(memory[lvl].shape[-2:]), box)
            q = layer(q, query_pos, mem[lvl], pos[lvl], amask, self_mask)
            pred, masks = self.head(q, mask_features)
            preds.append(pred)
        return preds

    def forward(self, mask_features, memory, memory_pos) -> list[Prediction]:
        b = mask_features.shape[0]
        qf = self.query_feat.weight[None].expand(b, -1, -1)
        qp = self.query_embed.weight[None].expand(b, -1, -1)
        return self.run_queries(qf, qp, mask_features, memory, memory_pos)


# ----------------------------------------------------------------------------------------------
# visual-prompt queries


def box_encoding(boxes: torch.Tensor, feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """(..., 4) normalised cxcywh boxes -> (..., 4 * feats): per coordinate ``feats`` sines / cosines
    (interleaved: sin of the even frequencies, cos of the odd), concatenated in the order y, x, w, h
    (the DETR-family box encoding the release's prompt queries use)."""
    if feats % 2:
        raise ValueError(f"box encoding features per coordinate must be even, got {feats}")
    t = temperature ** (2 * (torch.arange(feats, dtype=torch.float32, device=boxes.device) // 2) / feats)
    x = boxes[..., None].float() * 2 * math.pi / t  # (..., 4, feats)
    x = torch.stack([x[..., 0::2].sin(), x[..., 1::2].cos()], -1).flatten(-2)
    return torch.cat([x[..., 1, :], x[..., 0, :], x[..., 2, :], x[..., 3, :]], -1)


def farthest_interior_points(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 2) float (x, y): for each mask a pixel farthest from its boundary
    (chessboard distance, by repeated 3x3 erosion of all masks at once; the first such pixel in raster
    order)."""
    n, h, w = masks.shape
    if n and not bool(masks.flatten(1).any(1).all()):
        raise ValueError(f"mask prompt {int((~masks.flatten(1).any(1)).nonzero()[0])} is empty")
    m = masks.float()[:, None]
    last = m
    while True:
        m = -F.max_pool2d(-F.pad(m, (1, 1, 1, 1), value=0.0), 3, stride=1)
        alive = m.flatten(1).any(1)
        if not bool(alive.any()):
            break
        last = torch.where(alive[:, None, None, None], m, last)
    first = (last.flatten(1) > 0).float().argmax(1)  # the first maximum: raster order
    return torch.stack([first % w, first // w], 1).float()


def farthest_interior_point(mask: torch.Tensor) -> tuple[int, int]:
    """:func:`farthest_interior_points` of one (H, W) mask, as (x, y) ints."""
    x, y = farthest_interior_points(mask[None])[0].tolist()
    return int(x), int(y)


class PromptEncoder(nn.Module):
    """Queries for point / box / mask prompts, as the release builds them: every prompt is a point (a
    box prompt its centre, a mask prompt its farthest interior pixel), taken as the box of
    +-``radius`` px around it; positional query = Linear(box encoding of its normalised cxcywh, 2 x dim
    features); content query = the learned label embedding + the mask token. The label embedding has
    OMG-Seg's two rows (0: point, 1: box); OMG-LLaVA's prompts all use row 0. A box prompt also
    keeps the cross-attention to the box, a mask prompt to the mask."""

    def __init__(self, dim: int, radius: int = 3):
        super().__init__()
        self.radius = radius
        self.pos_proj = nn.Linear(2 * dim, dim)
        self.prompt_embed = nn.Embedding(2, dim)
        self.mask_token = nn.Embedding(1, dim)
        self.dim = dim

    def from_points(self, points: torch.Tensor, size: tuple[int, int], label: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 2) pixel (x, y) points of an image of ``size`` (H, W) -> (query_feat, query_pos), each
        (B, N, dim): the +-``radius`` px box around each point as normalised cxcywh (not clipped at the
        border, so the centre stays the point; the whole box kept in [0, 1] as the release's sigmoid does)."""
        h, w = size
        x, y = points[..., 0].float(), points[..., 1].float()
        cxcywh = torch.stack([x / w, y / h, torch.full_like(x, 2 * self.radius / w),
                              torch.full_like(y, 2 * self.radius / h)], -1).clamp(0, 1)
        pos = self.pos_proj(box_encoding(cxcywh, self.dim // 2))
        feat = (self.prompt_embed.weight[label] + self.mask_token.weight[0]).expand_as(pos)
        return feat, pos
