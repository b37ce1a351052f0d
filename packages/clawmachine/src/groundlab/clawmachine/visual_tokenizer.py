"""LaVIT's dynamic visual tokenizer (arXiv 2309.04669, Section 3.1), as ClawMachine uses it.

A frozen ViT gives one feature per patch (raster order); then

0. the ViT's features are standardised per channel (``feature_mean`` / ``feature_std``, set from the
   training images before pre-training; identity for the release's weights);
1. the **token selector** (``token_predictor``) scores each patch (its own feature beside the image's
   mean feature) and keeps or drops it: a hard Gumbel-softmax sample while training, and at
   evaluation the likelier choice (``VisualTokenizerConfig.deterministic``; the release samples here
   too, so one image gave 89-92 tokens from run to run);
2. the **token merger** (``causal_encoder``): blocks of causal self-attention among the kept patches
   (each also sees itself) and cross-attention from every patch to the dropped ones, so the kept
   tokens absorb what was dropped;
3. the **quantiser**: ``encode_task_layer`` (width -> width, tanh, -> code_dim), l2-normalised, and
   the nearest entry of an l2-normalised codebook.

The output of one image: its code ids and ``remained_map``, the raster indices of the kept patches.
Parameter names follow the release (``token_predictor.in_conv``, ``causal_encoder.blocks.N.
token_causal_attn.qkv``, ``quantize.embedding.weight``, ...), so its weights load by name
(:mod:`groundlab.clawmachine.convert`).

**Pre-training** (:class:`TokenizerPretrainer`; LaVIT trains the tokenizer to reconstruct the
frozen ViT's features before the LLM sees it): a feature decoder reads the quantised kept tokens at
their positions and a learned mask token at the dropped ones and predicts every patch's feature;
loss = 1 - cosine similarity to the ViT's feature, plus the codebook and commitment terms, plus
(mean keep rate - ``keep_ratio``)^2. The selector learns through a straight-through keep decision
that gates the decoder's input (kept token or mask token); the merger's attention masks use the hard
decision (the release multiplies the soft policy into its attention instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from groundlab.shared.attention import MultiheadAttention, attention
from groundlab.shared.vision import SamEncoderConfig, build_sam_image_encoder

from .configuration import VisualTokenizerConfig
from .eva import EvaVit


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, D) -> (B, H, N, D / H)


class TokenCausalAttention(nn.Module):
    """Self-attention among the kept patches, causal in raster order; every patch sees itself."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        mask = causal & (keep[:, None, None, :] | eye)  # (B, 1, N, N)
        return self.proj(attention(q, k, v, causal=False, attn_mask=mask).transpose(1, 2).flatten(2))


class TokenCrossAttention(nn.Module):
    """Every patch attends to the dropped patches' (normalised ViT) features."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, x_origin: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = _heads(self.query(x), self.heads)
        k, v = _heads(self.key(x_origin), self.heads), _heads(self.value(x_origin), self.heads)
        mask = (~keep)[:, None, None, :]  # a query with nothing dropped gets zeros
        return self.proj(attention(q, k, v, causal=False, attn_mask=mask).transpose(1, 2).flatten(2))


class CausalFuserBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm0, self.token_causal_attn = nn.LayerNorm(dim, eps=1e-5), TokenCausalAttention(dim, heads)
        self.norm1, self.token_cross_attn = nn.LayerNorm(dim, eps=1e-5), TokenCrossAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-5), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, x_origin: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.token_causal_attn(self.norm0(x), keep)
        x = x + self.token_cross_attn(self.norm1(x), x_origin, keep)
        return x + self.mlp(self.norm2(x))


class TokenMerger(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList([CausalFuserBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.ln_vision, self.norm = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x_origin = self.ln_vision(x)
        for block in self.blocks:
            x = block(x, x_origin, keep)
        return self.norm(x)


class TokenPredictor(nn.Module):
    """Keep / drop log-probabilities per patch from its feature and the image's mean feature."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        c = x.shape[-1] // 2
        local, pooled = x[..., :c], x[..., c:].mean(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local, pooled.expand_as(x[..., c:])], dim=-1))


class CodebookEmbedding(nn.Module):
    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(num_codes, dim), dim=-1))


class VectorQuantizer(nn.Module):
    """Nearest l2-normalised code of an l2-normalised vector (cosine distance)."""

    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self.embedding = CodebookEmbedding(num_codes, dim)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., dim) -> the normalised input's nearest code's vector and its id."""
        z = F.normalize(z, dim=-1)
        book = self.codebook().to(z.dtype)
        ids = (z.reshape(-1, z.shape[-1]) @ book.T).argmax(-1).reshape(z.shape[:-1])
        return book[ids], ids


@dataclass
class TokenizedImage:
    """One image through the tokenizer: ``codes`` (n,) ids in [0, codebook), ``remained_map`` (n,) the
    raster index of each kept patch (increasing), and the kept tokens' merged features (n, width)."""

    codes: torch.Tensor
    remained_map: torch.Tensor
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.codes.shape != self.remained_map.shape or self.codes.ndim != 1 or len(self.codes) == 0:
            raise ValueError(f"a tokenized image needs 1-D codes and remained_map of one non-zero length, got "
                             f"{tuple(self.codes.shape)} and {tuple(self.remained_map.shape)}")
        if bool((self.remained_map[1:] <= self.remained_map[:-1]).any()):
            raise ValueError("remained_map must be strictly increasing (raster order)")


class DynamicVisualTokenizer(nn.Module):
    """Frozen ViT + selector + merger + quantiser (see the module docstring)."""

    def __init__(self, config: VisualTokenizerConfig):
        super().__init__()
        self.config = config
        v, d = config.vision_config, config.width
        if isinstance(v, SamEncoderConfig):
            self.encoder = build_sam_image_encoder(v)
        else:
            self.encoder = EvaVit(v)
        self.token_predictor = TokenPredictor(d)
        self.causal_encoder = TokenMerger(d, config.merger_heads, config.merger_depth, config.mlp_ratio)
        self.encode_task_layer = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, config.code_dim))
        self.quantize = VectorQuantizer(config.codebook_size, config.code_dim)
        self.encoder.requires_grad_(False)
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_std", torch.ones(d))

    @torch.no_grad()
    def set_feature_statistics(self, features: torch.Tensor) -> None:
        """Standardise every ViT channel (z-scores over ``features``, before pre-training) for the
        selector, the merger and the reconstruction target: on raw features a few high-variance
        channels rule, and codes that keep only those lose the rest (on the SAM base: object cells'
        codes named their kind but not their colour). Identity (0 / 1) for the release's weights."""
        flat = features.flatten(0, -2).float()
        self.feature_mean.copy_(flat.mean(0))
        self.feature_std.copy_(flat.std(0).clamp_min(1e-6))

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.feature_mean) / self.feature_std

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 or [0, 1] floats -> normalised pixels at the ViT's size."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.config.pixel_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.pixel_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N = G * G, width) frozen ViT features in raster order (then the patches' mean colours,
        with ``colour_channels``)."""
        x = self.preprocess(images).to(next(self.encoder.parameters()).dtype)
        if isinstance(self.config.vision_config, SamEncoderConfig):
            feats = self.encoder(x).flatten(2).transpose(1, 2)
        else:
            feats = self.encoder(x)
        if not self.config.colour_channels:
            return feats
        colour = F.adaptive_avg_pool2d(x, self.config.grid).flatten(2).transpose(1, 2)  # (B, N, 3)
        return torch.cat([feats, colour.repeat_interleave(self.config.colour_channels // 3, dim=-1)], dim=-1)

    def keep_decision(self, logp: torch.Tensor, sample: bool) -> torch.Tensor:
        """(B, N) hard keep decisions (1 keep): straight-through Gumbel samples, or the argmax."""
        if sample:
            return F.gumbel_softmax(logp, hard=True)[..., 0]
        return (logp[..., 0] >= logp[..., 1]).to(logp.dtype)

    def merge(self, feats: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(merged features (B, N, width), hard keep decisions (B, N) with straight-through gradient,
        keep log-probabilities (B, N, 2))."""
        feats = self.standardise(feats)
        logp = self.token_predictor(feats)
        keep = self.keep_decision(logp, sample)
        if not bool(keep.bool().any(-1).all()):  # an image with nothing kept keeps its likeliest patch
            none = ~keep.bool().any(-1)
            best = logp[..., 0].argmax(-1)
            keep = keep + F.one_hot(best, keep.shape[1]).to(keep.dtype) * none[:, None].to(keep.dtype)
        merged = self.causal_encoder(feats, keep.detach().bool())
        return merged, keep, logp

    def quantise(self, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the l2-normalised pre-quantisation vectors, their codes' vectors, code ids)."""
        z = F.normalize(self.encode_task_layer(merged), dim=-1)
        zq, ids = self.quantize(z)
        return z, zq, ids

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor, sample: bool | None = None) -> list[TokenizedImage]:
        """One :class:`TokenizedImage` per image. ``sample``: draw the selection (default: only when
        training, or when the config is not deterministic)."""
        if sample is None:
            sample = self.training or not self.config.deterministic
        merged, keep, _ = self.merge(self.features(images), sample)
        _, _, ids = self.quantise(merged)
        out = []
        for b in range(ids.shape[0]):
            where = keep[b].bool().nonzero().flatten()
            out.append(TokenizedImage(ids[b, where], where, merged[b, where]))
        return out


# ----------------------------------------------------------------------------------------------
# pre-training


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), MultiheadAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h)
        return x + self.mlp(self.norm2(x))


class FeatureDecoder(nn.Module):
    """Quantised kept tokens (mask tokens where dropped) + positions -> every patch's ViT feature."""

    def __init__(self, config: VisualTokenizerConfig):
        super().__init__()
        d, n = config.width, config.grid ** 2
        self.decode_task_layer = nn.Sequential(nn.Linear(config.code_dim, d), nn.Tanh(), nn.Linear(d, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n, d))
        self.blocks = nn.ModuleList([DecoderBlock(d, config.merger_heads, config.mlp_ratio)
                                     for _ in range(config.decoder_depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, zq: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        k = keep[..., None]
        x = k * self.decode_task_layer(zq) + (1 - k) * self.mask_token + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class TokenizerPretrainer(nn.Module):
    """The tokenizer and its feature decoder, trained to reconstruct the frozen ViT's features (see the
    module docstring); ``forward(pixel_values)`` returns the loss and its parts."""

    def __init__(self, tokenizer: DynamicVisualTokenizer, commitment: float = 0.25, ratio_weight: float = 2.0):
        super().__init__()
        self.tokenizer, self.decoder = tokenizer, FeatureDecoder(tokenizer.config)
        self.commitment, self.ratio_weight = commitment, ratio_weight

    @torch.no_grad()
    def init_codebook(self, features: torch.Tensor) -> None:
        """Start the codebook from the (normalised) vectors of real patches (``features``: ViT features
        of a few images), so that no code starts dead."""
        tok = self.tokenizer
        merged, _, _ = tok.merge(features, sample=False)
        z = F.normalize(tok.encode_task_layer(merged), dim=-1).flatten(0, 1)
        book = tok.quantize.embedding.weight
        pick = torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[: len(book)]
        book[: len(pick)] = z[pick] + 0.01 * torch.randn_like(z[pick])
        book.copy_(F.normalize(book, dim=-1))

    def forward(self, pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """The loss of a batch of images, or of their frozen ViT ``features`` (computed once up front)."""
        tok = self.tokenizer
        feats = tok.features(pixel_values) if features is None else features
        merged, keep, _ = tok.merge(feats, sample=self.training)
        z, zq, _ = tok.quantise(merged)
        vq = F.mse_loss(zq, z.detach()) + self.commitment * F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()  # straight-through
        recon = self.decoder(zq, keep)
        rec = (1 - F.cosine_similarity(recon.float(), tok.standardise(feats), dim=-1)).mean()
        ratio = (keep.mean() - tok.config.keep_ratio) ** 2
        return {"loss": rec + vq + self.ratio_weight * ratio, "reconstruction": rec.detach(), "vq": vq.detach(),
                "keep_rate": keep.detach().mean()}
