"""IVM: Instruction-Guided Visual Masking (Zheng et al., NeurIPS 2024, arXiv 2405.19783, Section 3).

    heatmap = G(SAM(image), MLP(LMM_lora(image, instruction)[second-to-last token]))

- ``image_encoder``: SAM's ``ImageEncoderViT`` (frozen), input resized to ``img_size`` (no padding),
  [0, 1] pixels normalised with ImageNet statistics -> (B, C, g, g).
- ``lmm``: a ``LlavaForConditionalGeneration`` with two LoRA adapters on the language model's q/v
  projections: ``generator`` (the condition) and ``discriminator`` (DWSL stage I). Its base weights are
  frozen. The condition token is the last hidden state at each row's second-to-last REAL token (found
  from the attention mask, so left or right padding both work), through ``condition_proj``
  (LMM width -> ``condition_hidden`` -> C, GELU).
- ``generator``: a SAM-style mask decoder without prompt encoder: [mask token; condition token]
  against the image embedding (TwoWayTransformer, random-Fourier positional encoding); the mask token's
  output through a 3-layer hypernetwork MLP, dotted with the upscaled embedding (x4, C/8 channels),
  gives (B, 1, 4g, 4g) logits, bilinearly upsampled to ``img_size``.
- ``discriminator_head``: MLP (LMM width -> ``discriminator_hidden`` -> 1) on the last token of the
  discriminator prompt over the label-masked image: P(the mask is human-annotated).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import nn
from transformers import LlavaForConditionalGeneration, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from groundlab.shared.attention import HF_ATTENTION, require_packing_support
from groundlab.shared.bases.sam import use_shared_attention
from groundlab.shared.multimodal import pack_rows
from groundlab.shared.vision import build_sam_image_encoder

from .configuration import IVMConfig

ADAPTERS = ("generator", "discriminator")


class ConditionMLP(nn.Module):
    """Linear -> GELU -> Linear (``fc1`` / ``fc2``)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConditionedMaskGenerator(nn.Module):
    """SAM's mask decoder with the prompt encoder replaced by one condition token (Section 3.2)."""

    def __init__(self, dim: int, depth: int, mlp_dim: int, heads: int, grid: int, num_mask_tokens: int = 1):
        super().__init__()
        self.grid = grid
        self.transformer = TwoWayTransformer(depth=depth, embedding_dim=dim, num_heads=heads, mlp_dim=mlp_dim)
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.mask_tokens = nn.Embedding(num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2), nn.GELU())
        self.output_hypernetwork = MLP(dim, dim, dim // 8, 3)

    def forward(self, image_embeddings: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) embeddings and (B, 1, C) conditions -> (B, 1, 4g, 4g) mask logits."""
        b, c, h, w = image_embeddings.shape
        if (h, w) != (self.grid, self.grid):
            raise ValueError(f"image embedding is {h}x{w}, the generator was built for {self.grid}x{self.grid}")
        image_pe = self.pe_layer((h, w)).unsqueeze(0).to(image_embeddings.dtype)
        tokens = torch.cat([self.mask_tokens.weight.unsqueeze(0).expand(b, -1, -1), condition], dim=1)
        hs, src = self.transformer(image_embeddings, image_pe, tokens)
        mask_token = hs[:, : self.mask_tokens.num_embeddings].mean(dim=1, keepdim=True)  # (B, 1, C)
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        masks = self.output_hypernetwork(mask_token) @ up.flatten(2)  # (B, 1, 16hw)
        return masks.view(b, 1, *up.shape[-2:])


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE with logits, mean over pixels: (B, H, W) -> (B,). Targets may be soft."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)


def soft_dice(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample soft Dice loss on sigmoid probabilities (scale 1000, eps 1e-6): (B, H, W) -> (B,)."""
    p, t = logits.sigmoid().flatten(1) / scale, targets.flatten(1)
    num = 2 * (p * t).sum(-1)
    den = p.sum(-1) + (t / scale).sum(-1)
    return 1 - (num + eps) / (den + eps)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (works for left and right padding)."""
    if not bool(attention_mask.any(dim=1).all()):
        raise ValueError("a row of the batch has no real token (its attention mask is all zeros)")
    t = attention_mask.shape[1]
    return t - 1 - attention_mask.flip(1).long().argmax(dim=1)


@dataclass
class IVMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    bce: torch.Tensor | None = None
    dice: torch.Tensor | None = None


class IVMModel(PreTrainedModel):
    config_class = IVMConfig
    base_model_prefix = "ivm"
    main_input_name = "input_ids"

    def __init__(self, config: IVMConfig):
        super().__init__(config)
        s = config.vision_config
        self.image_encoder = build_sam_image_encoder(s)
        self.lmm = LlavaForConditionalGeneration(config.lmm_config)
        self.lmm.set_attn_implementation(HF_ATTENTION)  # every attention layer through the shared dispatch
        d, c = config.lmm_hidden, s.out_chans
        self.condition_proj = ConditionMLP(d, config.condition_hidden, c)
        self.generator = ConditionedMaskGenerator(c, config.decoder_depth, config.decoder_mlp, config.decoder_heads,
                                                  config.embedding_grid, config.num_mask_tokens)
        self.discriminator_head = ConditionMLP(d, config.discriminator_hidden, 1)
        use_shared_attention(self)  # SAM's encoder and the two-way transformer through the shared dispatch
        # SAM's normalisation is read from the config at each call, not kept in buffers: from_pretrained
        # builds on the meta device and would leave non-persistent buffers as uninitialised memory.
        self.post_init()
        self.add_lora_adapters()

    def _init_weights(self, module):
        # SAM's and LLaVA's own modules keep their constructors' initialisation (PyTorch defaults);
        # the pretrained parts are loaded over them anyway.
        pass

    # ------------------------------------------------------------------------------------------
    # LoRA adapters and what trains

    def add_lora_adapters(self) -> None:
        """One LoRA adapter per role on the language model's target projections (not the vision tower)."""
        c = self.config
        pattern = r".*language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:" + "|".join(c.lora_targets) + r")$"
        for name in ADAPTERS:
            lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, bias="none",
                              target_modules=pattern)
            with warnings.catch_warnings():  # a second adapter is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(lora, self.lmm, adapter_name=name)
        self.use_adapter("generator")

    def lora_layers(self) -> list[BaseTunerLayer]:
        return [m for m in self.lmm.modules() if isinstance(m, BaseTunerLayer)]

    def use_adapter(self, name: str) -> None:
        """Route the LMM through one adapter (``generator`` or ``discriminator``). What trains is left
        as it was (peft's ``set_adapter`` would also flip ``requires_grad``; :meth:`set_trainable` decides)."""
        if name not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {name!r}")
        for layer in self.lora_layers():
            if layer.active_adapters != [name]:
                flags = [(p, p.requires_grad) for p in layer.parameters()]
                layer.set_adapter(name)
                for p, flag in flags:
                    p.requires_grad_(flag)

    def set_trainable(self, role: str) -> None:
        """Freeze everything but one role's parameters: ``generator`` (its LoRA, ``condition_proj``,
        ``generator``) or ``discriminator`` (its LoRA, ``discriminator_head``). SAM and the LMM's base
        weights always stay frozen."""
        self.use_adapter(role)
        own = ("condition_proj.", "generator.") if role == "generator" else ("discriminator_head.",)
        for name, p in self.named_parameters():
            p.requires_grad = name.startswith(own) or f".lora_A.{role}." in name or f".lora_B.{role}." in name

    # ------------------------------------------------------------------------------------------
    # forward

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 or [0, 1] float images -> SAM input (resized to ``img_size``, normalised)."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        size = self.config.vision_config.img_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.config.pixel_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.pixel_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.image_encoder(self.preprocess(images))

    def _lmm_hidden(self, input_ids, attention_mask, pixel_values, packed: bool = False) -> torch.Tensor:
        """The LMM's last hidden states (B, T, D). ``packed``: the language model runs on the batch's
        real tokens laid end to end in one padding-free row (the same function, no FLOP on padding)."""
        if not packed:
            return self.lmm.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                  use_cache=False).last_hidden_state
        require_packing_support(self.lmm)
        rows = pack_rows(attention_mask)
        out = self.lmm.model(input_ids=rows.pack(input_ids), pixel_values=pixel_values, use_cache=False, **rows.kwargs)
        return rows.unpack(out.last_hidden_state)

    def condition(self, input_ids, attention_mask, pixel_values, packed: bool = False) -> torch.Tensor:
        """(B, 1, C): the LMM's last hidden state at each row's second-to-last real token, projected."""
        self.use_adapter("generator")
        hidden = self._lmm_hidden(input_ids, attention_mask, pixel_values, packed)
        idx = last_token_index(attention_mask) - 1
        token = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        return self.condition_proj(token).unsqueeze(1)

    def forward(self, input_ids, attention_mask, pixel_values, images=None, image_embeddings=None,
                masks=None, weights=None, packed: bool = False) -> IVMOutput:
        """Heatmap logits (B, img_size, img_size). With ``masks`` (B, img_size, img_size) soft targets
        in [0, 1], the loss is ``mean(w * (BCE + Dice))`` with per-sample ``weights`` (1 by default).
        ``packed``: the language model runs padding-free (see :meth:`_lmm_hidden`)."""
        if image_embeddings is None:
            if images is None:
                raise ValueError("IVMModel needs images or precomputed image_embeddings")
            image_embeddings = self.embed_images(images)
        cond = self.condition(input_ids, attention_mask, pixel_values, packed)
        low = self.generator(image_embeddings, cond)
        size = self.config.vision_config.img_size
        logits = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        if masks is None:
            return IVMOutput(logits=logits)
        if masks.shape != logits.shape:
            raise ValueError(f"target masks have shape {tuple(masks.shape)}, the heatmaps {tuple(logits.shape)}")
        bce, dice = sigmoid_bce(logits, masks.float()), soft_dice(logits, masks.float())
        w = torch.ones_like(bce) if weights is None else weights.to(bce.dtype).detach()
        return IVMOutput(loss=(w * (bce + dice)).mean(), logits=logits, bce=bce.detach(), dice=dice.detach())

    def discriminate(self, input_ids, attention_mask, pixel_values, packed: bool = False) -> torch.Tensor:
        """(B,) logits of P(human-annotated) from the discriminator prompt over the label-masked image."""
        self.use_adapter("discriminator")
        try:
            hidden = self._lmm_hidden(input_ids, attention_mask, pixel_values, packed)
        finally:
            self.use_adapter("generator")
        token = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.discriminator_head(token).squeeze(-1)


class DiscriminatorForTraining(nn.Module):
    """DWSL stage I: BCE of the discriminator's logit against ``is_human`` (1 human, 0 machine)."""

    def __init__(self, model: IVMModel, packed: bool = False):
        super().__init__()
        self.model, self.packed = model, packed
        model.set_trainable("discriminator")

    def forward(self, input_ids, attention_mask, pixel_values, is_human):
        logits = self.model.discriminate(input_ids, attention_mask, pixel_values, self.packed)
        return {"loss": F.binary_cross_entropy_with_logits(logits, is_human.float()), "logits": logits}


def dwsl_weights(discriminator_logits: torch.Tensor, low: float = 0.1, high: float = 0.9) -> torch.Tensor:
    """Stage II sample weights: ``clip(sigmoid(D), 0.1, 0.9)``, detached."""
    return discriminator_logits.detach().sigmoid().clamp(low, high)


def label_weights(is_human: torch.Tensor) -> torch.Tensor:
    """The label-weighted baseline: ``0.2 + 0.8 * is_human``."""
    return 0.2 + 0.8 * is_human.float()
