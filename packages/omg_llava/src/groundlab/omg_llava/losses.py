"""Mask2Former's training losses, used for the segmenter's pre-training and for ``[SEG]`` masks.

- point sampling: losses are computed on sampled points, not full masks: ``num_points`` points,
  ``oversample`` times as many candidates of which ``importance`` are the most uncertain (|logit|
  smallest) and the rest uniform (12544 / 3 / 0.75 in the release);
- mask loss per prediction: ``bce_weight * BCE + dice_weight * Dice`` (2.0 and 0.5 for OMG-LLaVA's
  ``[SEG]``; 5.0 / 5.0 for Mask2Former's panoptic training), mean over masks;
- panoptic set loss: Hungarian matching (class + mask + dice cost on shared random points), CE over
  classes with ``no_object_weight`` (0.1) for the unmatched queries, mask losses on matched pairs,
  each normalised over the whole batch, summed over every prediction (deep supervision).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

TARGETS = "full-resolution"
"""How the mask losses read their targets (part of the training stages' cache keys: a stage trained
when the targets were first shrunk to the logits' grid is rebuilt)."""


def point_sample(x: torch.Tensor, coords: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """(N, C, H, W) at (N, P, 2) normalised (x, y) in [0, 1] -> (N, C, P), bilinear (``grid_sample``'s
    ``padding_mode`` past the outer pixel centres)."""
    return F.grid_sample(x, 2 * coords[:, :, None] - 1, mode="bilinear", padding_mode=padding_mode,
                         align_corners=False)[..., 0]


def uncertain_points(logits: torch.Tensor, num: int, oversample: float = 3.0, importance: float = 0.75,
                     seeds: Sequence[int] | None = None) -> torch.Tensor:
    """(N, 1, H, W) logits -> (N, num, 2) points: the most uncertain of ``oversample * num`` random
    candidates (``importance`` of them) plus uniform ones. ``seeds`` (one per mask): each mask's points
    drawn from its own generator, so they do not depend on what else is in the batch (or on which
    process holds it); the global generator otherwise."""
    n = logits.shape[0]
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} masks")
    gens = None if seeds is None else [torch.Generator().manual_seed(int(s)) for s in seeds]

    def uniform(count: int) -> torch.Tensor:
        if gens is None:
            return torch.rand(n, count, 2, device=logits.device)
        return torch.stack([torch.rand(count, 2, generator=g) for g in gens]).to(logits.device)

    cand = uniform(int(num * oversample))
    unc = -point_sample(logits.detach(), cand).abs()[:, 0]
    k = int(importance * num)
    idx = unc.topk(k, dim=1).indices
    chosen = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))
    return torch.cat([chosen, uniform(num - k)], 1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, P) -> (N,) with Mask2Former's +1 smoothing."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)


def mask_loss(logits: torch.Tensor, targets: torch.Tensor, num_points: int = 12544, oversample: float = 3.0,
              importance: float = 0.75, bce_weight: float = 2.0, dice_weight: float = 0.5,
              reduce: bool = True, seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Point-sampled ``bce_weight * BCE + dice_weight * Dice`` of (N, h, w) logits against (N, H, W)
    targets, mean over the N masks (0 when N = 0); ``reduce=False``: the (N,) per-mask losses. The
    targets are sampled at their own resolution, at the same image points as the logits (as Mask2Former:
    a target shrunk to the logits' grid first would be blurred, or shifted by nearest resizing).
    ``seeds``: one per mask, for points that do not depend on the batch (:func:`uncertain_points`).
    Computed in fp32 whatever the logits' dtype (a bf16 model's)."""
    logits = logits.float()
    if logits.shape[0] == 0:
        return logits.sum() * 0.0 if reduce else logits.new_zeros(0)
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} predicted masks for {targets.shape[0]} targets")
    coords = uncertain_points(logits[:, None], num_points, oversample, importance, seeds)
    p = point_sample(logits[:, None], coords)[:, 0]
    t = point_sample(targets[:, None].float(), coords)[:, 0]
    per_mask = bce_weight * bce_loss(p, t) + dice_weight * dice_loss(p, t)
    return per_mask.mean() if reduce else per_mask


@torch.no_grad()
def matching_costs(class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                   num_points: int = 12544, class_weight: float = 2.0, mask_weight: float = 5.0,
                   dice_weight: float = 5.0) -> torch.Tensor:
    """Matching costs of N images at once: (N, Q, C+1) class logits and (N, Q, h, w) mask logits against
    (N, T) labels and (N, T, H, W) masks -> (N, Q, T) ``class_weight * -p(class) + mask_weight * BCE +
    dice_weight * Dice``, masks compared on ``num_points`` random points per image shared by its queries
    and targets (targets padded past an image's own count give columns to ignore)."""
    coords = torch.rand(mask_logits.shape[0], num_points, 2, device=mask_logits.device)
    p = point_sample(mask_logits, coords)  # (N, Q, P)
    t = point_sample(masks.float(), coords)  # (N, T, P)
    cost_class = -torch.gather(class_logits.softmax(-1), 2, labels[:, None].expand(-1, class_logits.shape[1], -1))
    pos = F.binary_cross_entropy_with_logits(p, torch.ones_like(p), reduction="none")
    neg = F.binary_cross_entropy_with_logits(p, torch.zeros_like(p), reduction="none")
    cost_mask = (pos @ t.transpose(1, 2) + neg @ (1 - t).transpose(1, 2)) / num_points
    sig = p.sigmoid()
    cost_dice = 1 - (2 * sig @ t.transpose(1, 2) + 1) / (sig.sum(-1)[..., None] + t.sum(-1)[:, None] + 1)
    return class_weight * cost_class + mask_weight * cost_mask + dice_weight * cost_dice


def hungarian_match(class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                    masks: torch.Tensor, num_points: int = 12544, class_weight: float = 2.0,
                    mask_weight: float = 5.0, dice_weight: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: (Q, C+1), (Q, h, w) predictions against (T,) labels and (T, H, W) masks ->
    (query indices, target indices)."""
    if len(labels) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        return empty, empty
    cost = matching_costs(class_logits[None], mask_logits[None], labels[None], masks[None], num_points,
                          class_weight, mask_weight, dice_weight)[0]
    q, tgt = linear_sum_assignment(cost.cpu().numpy())
    return (torch.as_tensor(q, dtype=torch.long, device=labels.device),
            torch.as_tensor(tgt, dtype=torch.long, device=labels.device))


def set_loss(predictions, targets: list[dict], num_classes: int, no_object_weight: float = 0.1,
             class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
             num_points: int = 12544) -> dict[str, torch.Tensor]:
    """Panoptic set loss summed over every prediction (deep supervision). ``targets``: per image
    ``{"labels": (T,), "masks": (T, H, W)}`` with masks at the predictions' resolution or larger.

    As Mask2Former normalises it: per prediction, the class CE is the weighted mean over every query
    of the batch and the mask loss the mean over every matched mask of the batch. The matching costs
    of all predictions and images are computed in one batch; only the assignments run per image."""
    class_logits = torch.stack([p.class_logits for p in predictions])  # (L, B, Q, C+1)
    mask_logits = torch.stack([p.mask_logits for p in predictions])  # (L, B, Q, h, w)
    n_pred, n_img, n_q = class_logits.shape[:3]
    device = class_logits.device
    counts = [len(t["labels"]) for t in targets]
    if len(targets) != n_img:
        raise ValueError(f"{len(targets)} targets for a batch of {n_img} predictions")
    width = max(counts + [1])
    labels = torch.zeros(n_img, width, dtype=torch.long, device=device)
    masks = torch.zeros(n_img, width, *targets[0]["masks"].shape[-2:], device=device)
    for b, t in enumerate(targets):
        labels[b, :counts[b]] = t["labels"]
        masks[b, :counts[b]] = t["masks"].float()
    cost = matching_costs(class_logits.flatten(0, 1), mask_logits.flatten(0, 1), labels.repeat(n_pred, 1),
                          masks.repeat(n_pred, 1, 1, 1), num_points, class_weight, mask_weight,
                          dice_weight).view(n_pred, n_img, n_q, width).cpu().numpy()
    cls_target = torch.full((n_pred, n_img, n_q), num_classes, dtype=torch.long, device=device)
    index = []  # (prediction, image, query, target) of every match
    for lvl in range(n_pred):
        for b, n in enumerate(counts):
            if n == 0:
                continue
            q, t = linear_sum_assignment(cost[lvl, b, :, :n])
            q, t = torch.as_tensor(q, device=device), torch.as_tensor(t, device=device)
            cls_target[lvl, b, q] = labels[b, t]
            index.append(torch.stack([torch.full_like(q, lvl), torch.full_like(q, b), q, t], 1))
    weight = torch.ones(num_classes + 1, device=device)
    weight[-1] = no_object_weight
    ce = F.cross_entropy(class_logits.flatten(0, 2), cls_target.flatten(), reduction="none")
    w = weight[cls_target].view(n_pred, -1)
    total_ce = class_weight * ((ce.view(n_pred, -1) * w).sum(1) / w.sum(1)).sum()
    if index:
        lvl, b, q, t = torch.cat(index).unbind(1)
        # the targets stay at their full resolution: the loss samples them at the logits' points
        logits, tgt = mask_logits[lvl, b, q], masks[b, t]
        per_mask = mask_loss(logits, tgt, num_points, bce_weight=mask_weight, dice_weight=dice_weight, reduce=False)
        per_level = torch.zeros(n_pred, device=device).index_add(0, lvl, per_mask)
        total_mask = (per_level / torch.bincount(lvl, minlength=n_pred).clamp(min=1)).sum()
    else:
        total_mask = mask_logits.sum() * 0.0
    return {"loss": total_ce + total_mask, "class": total_ce.detach(), "mask": total_mask.detach()}
