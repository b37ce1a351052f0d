"""The IVM masking API: heatmap -> soft mask -> masked image, in the paper's four deployment modes.

    out = forward_batch(model, processor, images, instructions, threshold=0.8, mode="overlay")

Post-process of one heatmap (Section 3.3 / Figure 11): resize the logits to the image, sigmoid; if no
pixel passes ``threshold`` keep the whole image; else binarise at ``> threshold``, dilate with a
square kernel of side ``k = int(H * dilate_rate) * 2 + 1`` (H = image height) and Gaussian-blur with
the same ``k`` (sigma as OpenCV's for sigma=0: ``0.3 * ((k - 1) / 2 - 1) + 0.8``), giving m in [0, 1].
Modes:

- ``overlay``: ``img * m + colour * (1 - m)`` (white by default);
- ``blur``: ``img * m + GaussianBlur(img) * (1 - m)`` (blur kernel ``int(H * 0.1) * 2 + 1``);
- ``grayscale``: ``img * m + gray(img) * (1 - m)`` (ITU-R 601 luma);
- ``crop``: overlay, then cropped to the bounding box of ``m > 0`` (best for V*-style small objects).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from groundlab.shared.devices import model_device
from groundlab.shared.inputs import check_probability, check_text
from groundlab.shared.metrics import mask_box

from .processing import policy_inputs, tower_pixels

MODES = ("overlay", "blur", "grayscale", "crop")


def cv2_sigma(k: int) -> float:
    """OpenCV's Gaussian sigma for a kernel of side ``k`` when sigma=0 is asked for."""
    return 0.3 * ((k - 1) * 0.5 - 1) + 0.8


def soft_mask(prob: torch.Tensor, threshold: float, dilate_rate: float = 0.05) -> torch.Tensor:
    """(H, W) probabilities -> (H, W) soft keep-mask in [0, 1] (all ones if nothing passes)."""
    if prob.ndim != 2:
        raise ValueError(f"a heatmap is (H, W), got shape {tuple(prob.shape)}")
    check_probability(threshold, "threshold")
    if float(prob.max()) <= threshold:
        return torch.ones_like(prob)
    m = (prob > threshold).float()[None, None]
    k = int(prob.shape[0] * dilate_rate) * 2 + 1
    if k > 1:
        m = F.max_pool2d(m, kernel_size=k, stride=1, padding=k // 2)
        m = TF.gaussian_blur(m, [k, k], [cv2_sigma(k)] * 2)
    return m[0, 0].clamp(0, 1)


def apply_mask(image: np.ndarray, m: torch.Tensor | np.ndarray, mode: str = "overlay",
               colour: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """One (H, W, 3) uint8 image masked with the soft mask ``m`` (H, W) in ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    m = torch.as_tensor(np.asarray(m), dtype=torch.float32)
    if image.ndim != 3 or image.shape[2] != 3 or tuple(m.shape) != image.shape[:2]:
        raise ValueError(f"image {image.shape} and mask {tuple(m.shape)} do not fit (expected (H, W, 3) and (H, W))")
    img = torch.from_numpy(np.ascontiguousarray(image)).float()  # (H, W, 3)
    w = m[..., None]
    h = image.shape[0]
    if mode in ("overlay", "crop"):
        back = torch.tensor(colour, dtype=torch.float32).expand_as(img)
    elif mode == "blur":
        k = int(h * 0.1) * 2 + 1
        back = TF.gaussian_blur(img.permute(2, 0, 1)[None], [k, k], [cv2_sigma(k)] * 2)[0].permute(1, 2, 0)
    else:
        gray = img @ torch.tensor([0.299, 0.587, 0.114])
        back = gray[..., None].expand_as(img)
    out = (img * w + back * (1 - w)).round().clamp(0, 255).to(torch.uint8).numpy()
    if mode == "crop":
        ys, xs = np.nonzero(m.numpy() > 0)
        out = out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return out


def box_of(m: torch.Tensor | np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) inclusive pixel box of ``m > threshold``; None if empty."""
    return mask_box(np.asarray(m) > threshold)


@torch.no_grad()
def heatmaps(model, processor, images: Sequence[np.ndarray], instructions: Sequence[str],
             batch_size: int = 32) -> list[torch.Tensor]:
    """Per image, the heatmap probabilities (H, W) at the image's own size, on the CPU (the model may
    be on another device)."""
    if len(images) != len(instructions):
        raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        ims = [np.asarray(x) for x in images[start : start + batch_size]]
        for j, im in enumerate(ims):
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise ValueError(f"image #{start + j} must be (H, W, 3) uint8, got {im.shape} {im.dtype}")
        input_ids, attention = policy_inputs(processor.tokenizer, instructions[start : start + len(ims)],
                                             model.config.n_image_tokens)
        device = model_device(model)  # the inputs are made on the CPU; the model may be elsewhere
        input_ids, attention = input_ids.to(device), attention.to(device)
        pixels = tower_pixels(processor.image_processor, ims).to(device)
        sam_in = torch.stack([model.preprocess(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None]
                                               .to(device))[0] for im in ims])
        emb = model.image_encoder(sam_in)
        logits = model(input_ids=input_ids, attention_mask=attention, pixel_values=pixels, image_embeddings=emb).logits
        for lg, im in zip(logits, ims):
            lg = F.interpolate(lg[None, None].float(), size=im.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            out.append(lg.sigmoid().cpu())
    return out


def forward_batch(model, processor, images: Sequence[np.ndarray], instructions: Sequence[str],
                  threshold: float = 0.8, mode: str = "overlay", colour: Sequence[int] = (255, 255, 255),
                  dilate_rate: float = 0.05) -> dict[str, list]:
    """Mask each image to what its instruction needs. Returns ``heatmaps`` (H, W) probabilities,
    ``masks`` (soft keep-masks), ``images`` (the masked uint8 images) and ``boxes`` (of ``heat > threshold``,
    None when nothing passed and the whole image was kept)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_probability(threshold, "threshold")
    if not (math.isfinite(dilate_rate) and 0 <= dilate_rate <= 0.5):
        raise ValueError(f"dilate_rate must be in [0, 0.5], got {dilate_rate!r}")
    for i, text in enumerate(instructions):
        check_text(text, f"instruction #{i}")
    heats = heatmaps(model, processor, images, instructions)
    masks = [soft_mask(h, threshold, dilate_rate) for h in heats]
    return {"heatmaps": heats, "masks": masks,
            "images": [apply_mask(np.asarray(im), m, mode, colour) for im, m in zip(images, masks)],
            "boxes": [box_of(h, threshold) for h in heats]}
