"""Mask2Former's training losses, used for the segmenter's pre-training and for ``[SEG]`` masks.

- point sampling: losses are computed on sampled points, not full masks: ``num_points`` points,
  ``oversample`` times as many candidates of which ``importance`` are the most uncertain (|logit|
  smallest) and the rest uniform (12544 / 3 / 0.75 in the release);
- mask loss per prediction: ``bce_weight * BCE + dice_weight * Dice`` (2.0 and 0.5 for OMG-LLaVA's
  ``[SEG]``; 5.0 / 5.0 for Mask2Former's panoptic training), mean over masks;
- panoptic set loss: Hungarian matching (class + mask + dice cost on shared random points), CE over
  classes with ``no_object_weight`` (0.1) for the unmatched queries, mask losses on matched pairs,
  summed over every prediction (deep supervision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) at (N, P, 2) normalised (x, y) in [0, 1] -> (N, C, P), bilinear."""
    return F.grid_sample(x, 2 * coords[:, :, None] - 1, mode="bilinear", align_corners=False)[..., 0]


def uncertain_points(logits: torch.Tensor, num: int, oversample: float = 3.0, importance: float = 0.75) -> torch.Tensor:
    """(N, 1, H, W) logits -> (N, num, 2) points: the most uncertain of ``oversample * num`` random
    candidates (``importance`` of them) plus uniform ones."""
    n = logits.shape[0]
    cand = torch.rand(n, int(num * oversample), 2, device=logits.device)
    unc = -point_sample(logits.detach(), cand).abs()[:, 0]
    k = int(importance * num)
    idx = unc.topk(k, dim=1).indices
    chosen = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))
    return torch.cat([chosen, torch.rand(n, num - k, 2, device=logits.device)], 1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, P) -> (N,) with Mask2Former's +1 smoothing."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)


def mask_loss(logits: torch.Tensor, targets: torch.Tensor, num_points: int = 12544, oversample: float = 3.0,
              importance: float = 0.75, bce_weight: float = 2.0, dice_weight: float = 0.5,
              reduce: bool = True) -> torch.Tensor:
    """Point-sampled ``bce_weight * BCE + dice_weight * Dice`` of (N, h, w) logits against (N, H, W)
    targets, mean over the N masks (0 when N = 0); ``reduce=False``: the (N,) per-mask losses."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0 if reduce else logits.new_zeros(0)
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} predicted masks for {targets.shape[0]} targets")
    coords = uncertain_points(logits[:, None], num_points, oversample, importance)
    p = point_sample(logits[:, None], coords)[:, 0]
    t = point_sample(targets[:, None].float(), coords)[:, 0]
    per_mask = bce_weight * bce_loss(p, t) + dice_weight * dice_loss(p, t)
    return per_mask.mean() if reduce else per_mask


@torch.no_grad()
def hungarian_match(class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                    masks: torch.Tensor, num_points: int = 12544, class_weight: float = 2.0,
                    mask_weight: float = 5.0, dice_weight: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: (Q, C+1), (Q, h, w) predictions against (T,) labels and (T, H, W) masks ->
    (query indices, target indices)."""
    if len(labels) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    coords = torch.rand(1, num_points, 2, device=mask_logits.device)
    p = point_sample(mask_logits[None], coords)[0]  # (Q, P)
    t = point_sample(masks[None].float(), coords)[0]  # (T, P)
    cost_class = -class_logits.softmax(-1)[:, labels]
    pos = F.binary_cross_entropy_with_logits(p, torch.ones_like(p), reduction="none")
    neg = F.binary_cross_entropy_with_logits(p, torch.zeros_like(p), reduction="none")
    cost_mask = (pos @ t.T + neg @ (1 - t).T) / num_points
    sig = p.sigmoid()
    cost_dice = 1 - (2 * sig @ t.T + 1) / (sig.sum(-1)[:, None] + t.sum(-1)[None] + 1)
    cost = class_weight * cost_class + mask_weight * cost_mask + dice_weight * cost_dice
    q, tgt = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(q, dtype=torch.long), torch.as_tensor(tgt, dtype=torch.long)


def set_loss(predictions, targets: list[dict], num_classes: int, no_object_weight: float = 0.1,
             class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
             num_points: int = 12544) -> dict[str, torch.Tensor]:
    """Panoptic set loss summed over every prediction (deep supervision). ``targets``: per image
    ``{"labels": (T,), "masks": (T, H, W)}`` with masks at the predictions' resolution or larger."""
    weight = torch.ones(num_classes + 1, device=predictions[0].class_logits.device)
    weight[-1] = no_object_weight
    total_ce, total_mask = 0.0, 0.0
    for pred in predictions:
        ce, mk = [], []
        for b, tgt in enumerate(targets):
            qi, ti = hungarian_match(pred.class_logits[b], pred.mask_logits[b], tgt["labels"], tgt["masks"],
                                     num_points, class_weight, mask_weight, dice_weight)
            cls_target = torch.full((pred.class_logits.shape[1],), num_classes, dtype=torch.long,
                                    device=pred.class_logits.device)
            cls_target[qi] = tgt["labels"][ti]
            ce.append(F.cross_entropy(pred.class_logits[b], cls_target, weight=weight))
            masks = tgt["masks"][ti].float()
            logits = pred.mask_logits[b][qi]
            if masks.shape[-2:] != logits.shape[-2:]:
                masks = F.interpolate(masks[None], size=logits.shape[-2:], mode="nearest")[0]
            mk.append(mask_loss(logits, masks, num_points, bce_weight=mask_weight, dice_weight=dice_weight))
        total_ce = total_ce + class_weight * torch.stack(ce).mean()
        total_mask = total_mask + torch.stack(mk).mean()
    return {"loss": total_ce + total_mask, "class": total_ce.detach(), "mask": total_mask.detach()}
