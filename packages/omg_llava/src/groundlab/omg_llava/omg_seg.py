"""The OMG-Seg segmenter as a ``PreTrainedModel``: config, model, input preprocessing.

Input: the image padded to a square with the mean colour (bottom / right, so that coordinates keep
their origin), resized to ``image_size``, normalised. ``encode`` caches what the LLM side needs:
the backbone's stride-32 features (the CLIP features of the pixel-centric tokens), the pixel
decoder's ``mask_features`` and memory; ``decode`` runs the learned queries; ``run_prompts`` runs
point / box / mask prompt queries through the same frozen decoder.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from groundlab.shared.config import pretrained_config_kwargs

from .losses import point_sample
from .segmenter import (
    ConvNeXtBackbone,
    MaskDecoder,
    PixelDecoder,
    Prediction,
    PromptEncoder,
    farthest_interior_points,
)


class OMGSegConfig(PretrainedConfig):
    model_type = "groundlab_omg_seg"

    def __init__(self, image_size: int = 1024, dims=(192, 384, 768, 1536), depths=(3, 3, 27, 3), dim: int = 256,
                 mask_dim: int = 256, encoder_layers: int = 6, encoder_heads: int = 8, encoder_points: int = 4,
                 encoder_ffn: int = 1024, groups: int = 32, num_queries: int = 300, decoder_layers: int = 9,
                 decoder_heads: int = 8, decoder_ffn: int = 2048, num_classes: int = 133,
                 pixel_mean=(0.48145466, 0.4578275, 0.40821073), pixel_std=(0.26862954, 0.26130258, 0.27577711),
                 prompt_radius: int = 3, classifier: str = "clip", class_embed_dim: int = 768,
                 class_prototypes: int = 1, prompt_features: bool = False, **kwargs):
        """The release (ConvNeXt-L CLIP, 6-layer deformable encoder, 9-layer decoder, 300 queries, 256-d,
        COCO panoptic's 133 classes classified against CLIP text embeddings, CLIP normalisation) by
        default. ``classifier="linear"``: a Linear class head instead (the tiny default).

        ``prompt_features``: each prompt's content query also gets the ``mask_features`` at its point
        (bilinear; no parameters, so a release checkpoint loads either way; needs ``mask_dim == dim``).
        Not the release's, whose point query carries the click's position only (``False``, the
        default): trained that way at the tiny scale, the decoder never learned to use the position,
        two clicks on two objects giving the same mask (their union) at every layer (README)."""
        self.image_size = image_size
        self.dims, self.depths = tuple(dims), tuple(depths)
        self.dim, self.mask_dim = dim, mask_dim
        self.encoder_layers, self.encoder_heads, self.encoder_points = encoder_layers, encoder_heads, encoder_points
        self.encoder_ffn, self.groups = encoder_ffn, groups
        self.num_queries, self.decoder_layers, self.decoder_heads = num_queries, decoder_layers, decoder_heads
        self.decoder_ffn, self.num_classes = decoder_ffn, num_classes
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.prompt_radius = prompt_radius
        self.classifier, self.class_embed_dim, self.class_prototypes = classifier, class_embed_dim, class_prototypes
        if prompt_features and mask_dim != dim:
            raise ValueError(f"prompt_features adds the {mask_dim}-d mask features to {dim}-d queries: "
                             "mask_dim must equal dim")
        self.prompt_features = bool(prompt_features)
        super().__init__(**pretrained_config_kwargs(type(self), kwargs))


AutoConfig.register(OMGSegConfig.model_type, OMGSegConfig, exist_ok=True)


def sample_at(features: torch.Tensor, points: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) features covering a ``size`` x ``size`` input and (B, N, 2) input-pixel (x, y)
    points (continuous coordinates: pixel i spans [i, i + 1)) -> (B, N, C), bilinear, the border
    value outside."""
    coords = (points.float() / size).to(features.dtype)
    return point_sample(features, coords, padding_mode="border").transpose(1, 2)


class OMGSegModel(PreTrainedModel):
    config_class = OMGSegConfig
    base_model_prefix = "omg_seg"
    main_input_name = "pixel_values"

    def __init__(self, config: OMGSegConfig):
        super().__init__(config)
        c = config
        self.backbone = ConvNeXtBackbone(c.dims, c.depths)
        self.pixel_decoder = PixelDecoder(c.dims, c.dim, c.mask_dim, c.encoder_layers, c.encoder_heads,
                                          c.encoder_points, c.encoder_ffn, c.groups)
        self.decoder = MaskDecoder(c.dim, c.num_queries, c.decoder_layers, c.decoder_heads, c.decoder_ffn,
                                   c.num_classes, c.mask_dim, classifier=c.classifier,
                                   class_embed_dim=c.class_embed_dim, class_prototypes=c.class_prototypes)
        self.prompt_encoder = PromptEncoder(c.dim, c.prompt_radius)
        # The normalisation is read from the config at each call, not kept in buffers: from_pretrained
        # builds on the meta device and would leave non-persistent buffers as uninitialised memory.
        self.post_init()

    def _init_weights(self, module):
        pass  # the modules' own initialisation (PyTorch defaults, MSDeformAttn's ring of offsets)

    # ------------------------------------------------------------------------------------------

    def pad_to_square(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """(H, W, 3) uint8 -> the square image padded bottom / right with the mean colour, and (H, W)."""
        h, w = image.shape[:2]
        side = max(h, w)
        mean = np.round(np.asarray(self.config.pixel_mean) * 255).astype(np.uint8)
        out = np.empty((side, side, 3), np.uint8)
        out[:] = mean
        out[:h, :w] = image
        return out, (h, w)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """Pad each image to a square, resize to ``image_size``, normalise: (B, 3, S, S)."""
        s = self.config.image_size
        out = []
        for im in images:
            sq, _ = self.pad_to_square(np.asarray(im))
            x = torch.from_numpy(sq).permute(2, 0, 1)[None].float() / 255
            if x.shape[-1] != s:
                x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            out.append(x)
        x = torch.cat(out)
        mean = x.new_tensor(self.config.pixel_mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.config.pixel_std).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode(self, pixel_values: torch.Tensor) -> dict:
        feats = self.backbone(pixel_values)
        mask_features, memory, pos = self.pixel_decoder(feats)
        return {"clip": feats[-1], "features": feats, "mask_features": mask_features, "memory": memory, "pos": pos}

    def decode(self, enc: dict) -> list[Prediction]:
        return self.decoder(enc["mask_features"], enc["memory"], enc["pos"])

    def forward(self, pixel_values: torch.Tensor) -> list[Prediction]:
        return self.decode(self.encode(pixel_values))

    # ------------------------------------------------------------------------------------------
    # prompts

    def prompt_queries(self, kind: str, prompts: torch.Tensor, size: int | None = None,
                       mask_features: torch.Tensor | None = None):
        """Queries for a batch of prompts of one kind, each (B, N, ...): points (x, y) or boxes (x0, y0,
        x1, y1) in input pixels, or masks (H, W) bool at input resolution. Returns (feat, pos). Each
        prompt becomes a point query (a box its centre, a mask its farthest interior pixel). With
        ``config.prompt_features`` the images' ``mask_features`` (B, C, h, w) are needed: the content
        query gains the features at the point."""
        s = size or self.config.image_size
        if kind == "point":
            points = prompts.float()
        elif kind == "box":
            points = (prompts[..., :2].float() + prompts[..., 2:].float()) / 2
        elif kind == "mask":
            points = farthest_interior_points(prompts.flatten(0, 1)).view(*prompts.shape[:2], 2)
        else:
            raise ValueError(f"prompt kind must be point, box or mask, got {kind!r}")
        feat, pos = self.prompt_encoder.from_points(points, (s, s))
        if not self.config.prompt_features:
            return feat, pos
        if mask_features is None:
            raise ValueError("config.prompt_features: prompt_queries needs the images' mask_features")
        if mask_features.shape[0] != points.shape[0]:
            raise ValueError(f"{points.shape[0]} images of prompts but mask features of {mask_features.shape[0]}")
        return feat + sample_at(mask_features, points.to(mask_features.device), s).to(feat.dtype), pos

    def run_prompts(self, enc: dict, kind: str, prompts: torch.Tensor, queries: tuple | None = None,
                    self_mask: torch.Tensor | None = None) -> list[Prediction]:
        """Masks for prompts (see :meth:`prompt_queries`) through the frozen decoder: a box keeps the
        cross-attention of every layer to the cells it touches (the predicted masks are not cropped, as
        in the release); a mask confines cross-attention at every layer to the region, resized
        (nearest) to each memory level. ``queries``: the prompts' ``(feat, pos)``
        when already computed; ``self_mask`` (B, N, N), True = a query another must not attend to."""
        mf = enc["mask_features"]
        feat, pos = queries if queries is not None else self.prompt_queries(kind, prompts, mask_features=mf)
        box = fixed = None
        if kind == "box":
            box = prompts.float().to(mf.device) / self.config.image_size  # normalised xyxy
        elif kind == "mask":
            fixed = []
            for m in enc["memory"]:
                r = F.interpolate(prompts.float(), size=m.shape[-2:], mode="nearest")  # (B, N, h, w)
                fixed.append(r.flatten(2) < 0.5)
        return self.decoder.run_queries(feat, pos, mf, enc["memory"], enc["pos"], fixed_masks=fixed, box=box,
                                        self_mask=self_mask)
