"""Frozen vision encoders more than one package builds from a config.

:class:`SamEncoderConfig` describes SAM's ``ImageEncoderViT`` (segment-anything's argument names; the
released ViT-H by default) and :func:`build_sam_image_encoder` builds it with every attention layer
through the shared dispatch. IVM reads its image embedding for the mask generator; ClawMachine
tokenizes it (one feature per cell of its grid) in the default CPU setup.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from transformers import PretrainedConfig

from .config import pretrained_config_kwargs


class SamEncoderConfig(PretrainedConfig):
    """SAM's ``ImageEncoderViT`` (segment-anything's argument names); ViT-H by default."""

    model_type = "groundlab_sam_encoder"

    def __init__(self, img_size: int = 1024, patch_size: int = 16, embed_dim: int = 1280, depth: int = 32,
                 num_heads: int = 16, window_size: int = 14, global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31),
                 out_chans: int = 256, **kwargs):
        """``out_chans`` is the image embedding's channels (256 in the release)."""
        self.img_size, self.patch_size, self.embed_dim, self.depth = img_size, patch_size, embed_dim, depth
        self.num_heads, self.window_size, self.out_chans = num_heads, window_size, out_chans
        self.global_attn_indexes = tuple(global_attn_indexes)
        super().__init__(**pretrained_config_kwargs(type(self), kwargs))

    @property
    def embedding_grid(self) -> int:
        return self.img_size // self.patch_size


def build_sam_image_encoder(config: SamEncoderConfig) -> nn.Module:
    """SAM's ``ImageEncoderViT`` at ``config``'s sizes, its attention through the shared dispatch.
    Input (B, 3, img_size, img_size) normalised pixels; output (B, out_chans, grid, grid)."""
    from segment_anything.modeling import ImageEncoderViT

    from .bases.sam import use_shared_attention

    s = config
    encoder = ImageEncoderViT(
        img_size=s.img_size, patch_size=s.patch_size, embed_dim=s.embed_dim, depth=s.depth,
        num_heads=s.num_heads, mlp_ratio=4, out_chans=s.out_chans, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=s.window_size,
        global_attn_indexes=s.global_attn_indexes)
    return use_shared_attention(encoder)
