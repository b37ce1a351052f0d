"""The visual prompt encoder and the MLLM that reads its tokens (Draw-and-Understand, Section 3).

:class:`VisualPromptEncoder` is SAM's prompt encoder turned into one token per prompt: random Fourier
features of the coordinates (SAM's frozen Gaussian matrix), plus learned embeddings; a point is its
features plus a valid / padding embedding, lifted 256 -> 512 by ``up``; a box is the features of its
two corners plus SAM's corner embeddings, side by side (512), plus a valid / padding embedding.
Parameter names follow the release (``pe_layer.positional_encoding_gaussian_matrix``,
``point_embeddings.{0,1}``, ``box_embeddings.{0..3}``, ``up``), so its weights and SAM's
``prompt_encoder.*`` load directly (:func:`load_sam_prompt_encoder`).

:class:`VPMLLMForConditionalGeneration` wraps any ``LlavaForConditionalGeneration``: the image's
tokens (one view, or SPHINX-V's five between ``start_img`` / ``end_img``) and the prompt block
(``start_vp``, K tokens through ``vp_proj`` = Linear + LayerNorm, ``end_vp``) are spliced at their
placeholders, and the language model runs on the result, padded or packed. With
``config.region_content`` (not in the paper) each prompt token also carries the mean image token of
its region (:func:`region_mean`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from transformers import LlavaForConditionalGeneration, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from groundlab.shared.attention import HF_ATTENTION
from groundlab.shared.loading import torch_load
from groundlab.shared.multimodal import causal_lm_forward, splice_features

from .configuration import VisualPromptEncoderConfig, VPMLLMConfig


class RandomFourierFeatures(nn.Module):
    """SAM's ``PositionEmbeddingRandom``: [0, 1] coordinates -> sin / cos of a frozen Gaussian
    projection (a buffer here, so no optimiser ever sees it)."""

    def __init__(self, num_feats: int, scale: float = 1.0):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_feats))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) in [0, 1] -> (..., 2 * num_feats)."""
        proj = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix.to(coords.dtype))
        return torch.cat([proj.sin(), proj.cos()], dim=-1)


class VisualPromptEncoder(nn.Module):
    """K prompt slots (B, K, 4) -> (B, K, 2 * embed_dim) tokens (see the module docstring)."""

    def __init__(self, config: VisualPromptEncoderConfig):
        super().__init__()
        self.config = config
        e = config.embed_dim
        self.pe_layer = RandomFourierFeatures(e // 2)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, e) for _ in range(2)])  # padding, valid
        # padding box, valid box (2e each), then SAM's top-left and bottom-right corner embeddings (e)
        self.box_embeddings = nn.ModuleList([nn.Embedding(1, 2 * e), nn.Embedding(1, 2 * e),
                                             nn.Embedding(1, e), nn.Embedding(1, e)])
        self.up = nn.Linear(e, 2 * e)
        nn.init.xavier_uniform_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def _features(self, xy: torch.Tensor) -> torch.Tensor:
        if self.config.half_pixel_offset:  # the release's shift, kept for its weights (see the config)
            xy = xy + 0.5
        return self.pe_layer(xy)

    def embed_points(self, coords: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        pe = self._features(coords[..., :2])
        flag = torch.where(valid[..., None], self.point_embeddings[1].weight[0], self.point_embeddings[0].weight[0])
        return self.up(pe + flag)

    def embed_boxes(self, coords: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        corners = self._features(coords.reshape(*coords.shape[:-1], 2, 2))  # (B, K, 2, e)
        corners = corners + torch.stack([self.box_embeddings[2].weight[0], self.box_embeddings[3].weight[0]])
        flag = torch.where(valid[..., None], self.box_embeddings[1].weight[0], self.box_embeddings[0].weight[0])
        return corners.flatten(-2) + flag

    def forward(self, coords: torch.Tensor, valid: torch.Tensor, is_box: torch.Tensor) -> torch.Tensor:
        """``coords`` (B, K, 4) in [0, 1], ``valid`` (B, K) bool, ``is_box`` (B,) bool (a sample's
        prompts are all boxes or all points)."""
        if coords.shape[-1] != 4 or coords.shape[:2] != valid.shape or coords.shape[1] != self.config.num_slots:
            raise ValueError(f"prompt slots must be (B, {self.config.num_slots}, 4) with a (B, "
                             f"{self.config.num_slots}) valid mask, got {tuple(coords.shape)} and {tuple(valid.shape)}")
        points = self.embed_points(coords, valid)
        boxes = self.embed_boxes(coords, valid)
        return torch.where(is_box.view(-1, 1, 1), boxes, points)


SAM_KEYS = {  # SAM prompt_encoder key -> this encoder's
    "pe_layer.positional_encoding_gaussian_matrix": "pe_layer.positional_encoding_gaussian_matrix",
    "point_embeddings.0.weight": "point_embeddings.0.weight",
    "point_embeddings.1.weight": "point_embeddings.1.weight",
    "point_embeddings.2.weight": "box_embeddings.2.weight",
    "point_embeddings.3.weight": "box_embeddings.3.weight",
}


def sam_prompt_dim(state: dict, checkpoint: str | Path = "SAM checkpoint") -> int:
    """SAM's ``prompt_embed_dim`` (256 in the release), read off its Fourier matrix (2, dim / 2)."""
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    if key not in state:
        raise KeyError(f"{checkpoint}: no {key} (not a SAM checkpoint?)")
    return 2 * int(state[key].shape[1])


def load_sam_prompt_encoder(encoder: VisualPromptEncoder, checkpoint: str | Path | dict) -> list[str]:
    """Initialise ``encoder`` from an official-layout SAM checkpoint's ``prompt_encoder.*`` (the release
    does this from SAM ViT-H): its Fourier matrix, its two point-label embeddings (as the padding /
    valid point embeddings) and its two box-corner embeddings. Every one must be there with the right
    shape (a missing file or key is an error). ``checkpoint``: a path or its loaded state dict.
    Returns the keys of the encoder it set."""
    state = checkpoint if isinstance(checkpoint, dict) else torch_load(checkpoint, "SAM checkpoint")
    checkpoint = "SAM checkpoint" if isinstance(checkpoint, dict) else checkpoint
    own = encoder.state_dict()
    loaded = {}
    for sam_key, key in SAM_KEYS.items():
        full = f"prompt_encoder.{sam_key}"
        if full not in state:
            raise KeyError(f"{checkpoint}: no {full} (not a SAM checkpoint?)")
        value = state[full]
        if value.shape != own[key].shape:
            raise ValueError(f"{checkpoint}: {full} has shape {tuple(value.shape)}, the encoder's {key} "
                             f"{tuple(own[key].shape)} (embed_dim must be SAM's prompt_embed_dim)")
        loaded[key] = value
    own.update(loaded)
    encoder.load_state_dict(own)
    return sorted(loaded)


def region_mean(grid: torch.Tensor, coords: torch.Tensor, is_box: torch.Tensor) -> torch.Tensor:
    """(B, G * G, D) raster image tokens of the square image, (B, K, 4) prompt slots in [0, 1] ->
    (B, K, D): per slot the mean token of the patches whose centre lies in the box; for a point
    (``[x, y, -1, -1]``), and for a box no patch centre falls in, the patch under the box's centre."""
    g = math.isqrt(grid.shape[1])
    if g * g != grid.shape[1]:
        raise ValueError(f"region content needs a square grid of image tokens, got {grid.shape[1]}")
    boxes = torch.where(is_box.view(-1, 1, 1), coords, coords[..., :2].repeat(1, 1, 2)).float().clamp(0, 1)
    centre = (torch.arange(g, dtype=boxes.dtype, device=boxes.device) + 0.5) / g
    cy, cx = (c.flatten() for c in torch.meshgrid(centre, centre, indexing="ij"))
    x0, y0, x1, y1 = (v[..., None] for v in boxes.unbind(-1))
    inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)  # (B, K, G * G)
    col = ((x0 + x1) / 2 * g).long().clamp(0, g - 1)
    row = ((y0 + y1) / 2 * g).long().clamp(0, g - 1)
    under = torch.zeros_like(inside).scatter_(-1, row * g + col, True)
    weights = torch.where(inside.any(-1, keepdim=True), inside, under).to(grid.dtype)
    return (weights / weights.sum(-1, keepdim=True)) @ grid


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) boxes ``x0 y0 x1 y1`` with uniform corners in [0, 1]."""
    corners = torch.rand(n, 2, 2, generator=generator)
    return torch.cat([corners.min(1).values, corners.max(1).values], -1)


def location_targets(table: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The sum of the location-token rows of ``table`` (bins, D) for [0, 1] coordinates (..., 4)."""
    return table[(coords * (len(table) - 1)).round().long()].sum(-2)


@torch.no_grad()
def align_to_locations(model: VPMLLMForConditionalGeneration, location_embeddings: torch.Tensor,
                       samples: int = 20000, seed: int = 0) -> dict[str, float]:
    """Start ``vp_proj`` where the language model already reads locations (a choice of this package:
    the paper starts it at random and its 7-13B LLMs were pre-trained on grounding).

    ``location_embeddings`` (bins, D): the input embeddings of the base's location tokens
    ``<loc0000>`` ... (a coordinate v in [0, 1] is token ``round(v * (bins - 1))``, as
    :func:`groundlab.shared.boxes.box_to_loc` writes it). A box's target token is the sum of the
    embeddings of its four location tokens (the base's text form of the box, collapsed to one vector);
    a point's is that of the box ``(x, y, x, y)``. ``vp_proj``'s Linear becomes the least-squares map
    from the encoder's features of ``samples`` random boxes and as many random points to their targets
    standardised per row (what its LayerNorm outputs), the LayerNorm's gain and bias the targets' mean
    row scale and offset. The encoder (SAM's) is not touched. Returns the fit's R^2 on 20 % of the
    samples held out, per prompt kind (``r2/box``, ``r2/point``)."""
    bins, d = location_embeddings.shape
    linear, norm = model.vp_proj
    if d != linear.out_features:
        raise ValueError(f"location embeddings are {d}-wide, the model's tokens {linear.out_features}")
    if bins < 2:
        raise ValueError(f"need at least two location tokens, got {bins}")
    table = location_embeddings.detach().float().cpu()
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(samples, g)
    points = torch.rand(samples, 2, generator=g)
    encoder = model.vp_encoder
    dev = next(encoder.parameters()).device
    valid = torch.ones(samples, 1, dtype=torch.bool, device=dev)
    feats = torch.cat([encoder.embed_boxes(boxes[:, None].to(dev), valid)[:, 0],
                       encoder.embed_points(points[:, None].to(dev), valid)[:, 0]]).float().cpu()
    coords = torch.cat([boxes, points.repeat(1, 2)])
    target = location_targets(table, coords)
    mean, std = target.mean(-1, keepdim=True), target.std(-1, keepdim=True, unbiased=False)
    z = (target - mean) / std
    x = torch.cat([feats, torch.ones(len(feats), 1)], 1)
    fit = torch.zeros(len(feats), dtype=torch.bool)
    fit[torch.randperm(samples, generator=g)[: int(0.8 * samples)]] = True
    fit[samples:] = fit[:samples]
    solution = torch.linalg.lstsq(x[fit].double(), z[fit].double()).solution.float()
    report = {}
    for kind, rows in (("box", slice(0, samples)), ("point", slice(samples, 2 * samples))):
        held = ~fit[rows]
        pred, truth = x[rows][held] @ solution, z[rows][held]
        report[f"r2/{kind}"] = float(1 - ((pred - truth) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum())
    linear.weight.copy_(solution[:-1].T)
    linear.bias.copy_(solution[-1])
    norm.weight.fill_(float(std.mean()))
    norm.bias.fill_(float(mean.mean()))
    return report


class VPMLLMForConditionalGeneration(PreTrainedModel):
    config_class = VPMLLMConfig
    base_model_prefix = "vp_mllm"
    main_input_name = "input_ids"
    _supports_attention_backend = True

    def __init__(self, config: VPMLLMConfig):
        super().__init__(config)
        self.lmm = LlavaForConditionalGeneration(config.lmm_config)
        self.lmm.set_attn_implementation(HF_ATTENTION)  # every attention layer through the shared dispatch
        d = config.hidden_size
        self.vp_encoder = VisualPromptEncoder(config.vp_config)
        self.vp_proj = nn.Sequential(nn.Linear(2 * config.vp_config.embed_dim, d), nn.LayerNorm(d))
        self.start_vp = nn.Parameter(torch.rand(1, 1, d))
        self.end_vp = nn.Parameter(torch.rand(1, 1, d))
        if config.slot_embeddings:  # one learned vector per slot (see VPMLLMConfig)
            self.vp_slots = nn.Parameter(0.5 * torch.randn(1, config.vp_config.num_slots, d))
        if config.views == "multi":
            self.start_img = nn.Parameter(torch.rand(1, 1, d))
            self.end_img = nn.Parameter(torch.rand(1, 1, d))
        self.post_init()

    def _init_weights(self, module):  # the parts above initialise themselves; the LLaVA its own way
        pass

    def get_decoder(self):
        """The language model's decoder (its ``layers`` are what ``TrainConfig.compile_layers`` compiles)."""
        return self.lmm.get_decoder()

    # -- the visual side ------------------------------------------------------------------------
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, views, 3, S, S) -> (B, n_image_tokens, D): each view's projected tower tokens, between
        ``start_img`` / ``end_img`` in the multi-view layout."""
        b, v = pixel_values.shape[:2]
        if v != self.config.num_views:
            raise ValueError(f"pixel_values has {v} views, the model's layout {self.config.num_views}")
        c = self.config.lmm_config
        feats = self.lmm.model.get_image_features(pixel_values.flatten(0, 1), vision_feature_layer=c.vision_feature_layer,
                                                  vision_feature_select_strategy=c.vision_feature_select_strategy)
        feats = torch.stack(list(feats.pooler_output))  # (B * views, n, D)
        if self.config.views == "multi":
            n = feats.shape[0]
            feats = torch.cat([self.start_img.expand(n, -1, -1).to(feats.dtype), feats,
                               self.end_img.expand(n, -1, -1).to(feats.dtype)], dim=1)
        return feats.reshape(b, -1, feats.shape[-1])

    def global_grid(self, image: torch.Tensor) -> torch.Tensor:
        """(B, n_image_tokens, D) -> (B, G * G, D): the patch tokens of the whole square image (the one
        view, or the multi-view layout's global view without its tags and any CLS token)."""
        start = 1 if self.config.views == "multi" else 0
        if self.config.lmm_config.vision_feature_select_strategy == "full":
            start += 1
        v = self.config.lmm_config.vision_config
        return image[:, start:start + (v.image_size // v.patch_size) ** 2]

    def prompt_tokens(self, vp_coords: torch.Tensor, vp_valid: torch.Tensor, vp_is_box: torch.Tensor,
                      image: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K + 2, D): ``start_vp``, the K projected prompt tokens, ``end_vp``. ``image``: the
        image's tokens (:meth:`image_tokens`), needed by ``config.region_content``."""
        tokens = self.vp_proj(self.vp_encoder(vp_coords, vp_valid, vp_is_box).to(self.vp_proj[0].weight.dtype))
        if self.config.region_content:
            if image is None:
                raise ValueError("config.region_content needs the image's tokens (prompt_tokens(..., image=))")
            content = region_mean(self.global_grid(image), vp_coords, vp_is_box) * vp_valid[..., None]
            tokens = tokens + content.to(tokens.dtype)
        if self.config.slot_embeddings:
            tokens = tokens + self.vp_slots
        b = tokens.shape[0]
        return torch.cat([self.start_vp.expand(b, -1, -1), tokens, self.end_vp.expand(b, -1, -1)], dim=1)

    def embed(self, input_ids, pixel_values, vp_coords=None, vp_valid=None, vp_is_box=None) -> torch.Tensor:
        """The language model's input embeddings with the image and prompt tokens spliced in."""
        c = self.config
        image_id, vp_id = c.lmm_config.image_token_index, c.vp_token_index
        placeholders = (input_ids == image_id) | (input_ids == vp_id)
        embeds = self.lmm.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))
        image = self.image_tokens(pixel_values)
        embeds = splice_features(embeds, input_ids, image, image_id, "<image>")
        if bool((input_ids == vp_id).any()):
            if vp_coords is None:
                raise ValueError("input_ids hold <vp> placeholders but no prompts were given (vp_coords)")
            embeds = splice_features(embeds, input_ids, self.prompt_tokens(vp_coords, vp_valid, vp_is_box, image),
                                     vp_id, "<vp>")
        return embeds

    # -- training and generation ----------------------------------------------------------------
    def forward(self, input_ids, pixel_values, attention_mask=None, labels=None, vp_coords=None, vp_valid=None,
                vp_is_box=None, packed: bool = False, **kwargs) -> CausalLMOutputWithPast:
        """The causal LM loss over ``labels`` (the assistant's words). ``packed``: the language model runs
        on the batch's real tokens laid end to end in one padding-free row (same loss and gradients).
        Other keyword arguments (the Trainer's ``num_items_in_batch``) go to the LM's loss."""
        embeds = self.embed(input_ids, pixel_values, vp_coords, vp_valid, vp_is_box)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return causal_lm_forward(self.lmm, embeds, attention_mask, labels, packed, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values, attention_mask, vp_coords=None, vp_valid=None, vp_is_box=None,
                 max_new_tokens: int = 48, eos_token_id: int | None = None, pad_token_id: int | None = None
                 ) -> torch.Tensor:
        """Greedy answers (B, new tokens) for a left-padded batch of prompts."""
        embeds = self.embed(input_ids, pixel_values, vp_coords, vp_valid, vp_is_box)
        return self.lmm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


# ----------------------------------------------------------------------------------------------
# what each stage trains (the paper's Section 4 / Appendix)

STAGES = ("stage1", "stage2")


def set_trainable(model: VPMLLMForConditionalGeneration, stage: str, aligned: bool = False) -> list[str]:
    """Freeze everything, then open the stage's set; returns the trainable parameter names.

    - ``stage1`` (image-visual prompt alignment): the prompt encoder (but its frozen Fourier matrix),
      ``vp_proj``, the start / end tokens, the vision projector, the token embeddings, the final norm
      and the LM head; the LLM's blocks and the vision tower frozen.
    - ``stage2`` (instruction tuning): everything but the vision tower and the prompt encoder itself
      (the whole LLM, the projectors, ``vp_proj``, the tags).

    ``aligned``: ``vp_proj`` was set by :func:`align_to_locations`, which does the prompt side's part of
    stage 1; stage 1 then holds the encoder and ``vp_proj`` (with the LLM frozen their gradients carry
    no location: trained, they lose the alignment in a few hundred steps, README) and trains the rest
    of its set. Stage 2 is unchanged.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    lm = model.lmm.model.language_model
    for p in model.parameters():
        p.requires_grad_(False)
    opened = [model.lmm.model.multi_modal_projector, model.lmm.lm_head]
    if not (aligned and stage == "stage1"):
        opened.append(model.vp_proj)
    if stage == "stage1":
        opened += [lm.get_input_embeddings(), lm.norm] + ([] if aligned else [model.vp_encoder])
    else:
        opened += [lm]
    for module in opened:
        for p in module.parameters():
            p.requires_grad_(True)
    for name in ("start_vp", "end_vp", "vp_slots", "start_img", "end_img"):
        if hasattr(model, name):
            getattr(model, name).requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]
