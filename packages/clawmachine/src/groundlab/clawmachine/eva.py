"""EVA-CLIP's ViT (the frozen encoder of LaVIT's tokenizer and so of ClawMachine), with the release's
parameter names (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv`` with
separate ``q_bias`` / ``v_bias``, ``blocks.N.mlp.fc1``), so its weights load by name. Pre-norm blocks,
exact GELU, absolute position embeddings, no final norm: the features are the last block's output
without the class token (how LaVIT reads them). Attention runs through the shared dispatch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from groundlab.shared.attention import attention
from groundlab.shared.config import pretrained_config_kwargs


class EvaVitConfig(PretrainedConfig):
    """EVA-CLIP ViT-g/14 as LaVIT runs it by default (224 px, 1408-d, 39 of its 40 blocks)."""

    model_type = "groundlab_eva_vit"

    def __init__(self, image_size: int = 224, patch_size: int = 14, hidden_size: int = 1408, depth: int = 39,
                 num_heads: int = 16, mlp_ratio: float = 4.3637, layer_norm_eps: float = 1e-6, **kwargs):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.image_size, self.patch_size, self.hidden_size, self.depth = image_size, patch_size, hidden_size, depth
        self.num_heads, self.mlp_ratio, self.layer_norm_eps = num_heads, mlp_ratio, layer_norm_eps
        super().__init__(**pretrained_config_kwargs(type(self), kwargs))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class _PatchEmbed(nn.Module):
    def __init__(self, c: EvaVitConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1))
        return self.proj(attention(q, k, v, causal=False).transpose(1, 2).flatten(2))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, c: EvaVitConfig):
        super().__init__()
        d = c.hidden_size
        self.norm1, self.attn = nn.LayerNorm(d, eps=c.layer_norm_eps), _Attention(d, c.num_heads)
        self.norm2, self.mlp = nn.LayerNorm(d, eps=c.layer_norm_eps), _Mlp(d, int(d * c.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaVit(nn.Module):
    def __init__(self, config: EvaVitConfig):
        super().__init__()
        self.config = config
        d, n = config.hidden_size, config.grid ** 2
        self.patch_embed = _PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n + 1, d))
        self.blocks = nn.ModuleList([_Block(config) for _ in range(config.depth)])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, grid * grid, hidden) patch features (raster order)."""
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1).to(x.dtype), x], dim=1) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return x[:, 1:]
