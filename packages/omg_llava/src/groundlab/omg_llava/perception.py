"""The perception prior embedding and the visual tokens of OMG-LLaVA (arXiv 2406.19389, Section 3.2).

From the frozen segmenter's last prediction (class logits ``cls`` (Q, C+1), mask logits ``m``
(Q, h, w)), its last layer's query outputs before the head's norm ``Q`` (Q, d) and its learned query
embeddings ``E`` (Q, d):

    s_q   = max over non-background classes of softmax(cls_q)
    P_q   = (0.5 * s_q + 0.5) * sigmoid(m_q)        (mask resolution, then bilinear to the token grid)
    W(x)  = softmax over q of P_q(x)
    prior(x) = sum_q W_q(x) * [Q_q ; E_q]          (2d = 512-d in the release)

The paper says the prior is "added" to the image features; the released code CONCATENATES it to the
CLIP stride-32 features after a 2x pixel shuffle (1536 x 32 x 32 -> 6144 x 16 x 16, then 6656 with
the prior) and projects with one MLP: the same thing at the first Linear. This implementation
concatenates. Object-centric tokens are the ``[Q ; E]`` of the "valid" queries: those that win the
argmax of W at one grid cell or more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_unshuffle(features: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/f * W/f, C*f*f): every f x f block of the grid becomes one token."""
    b, c, h, w = features.shape
    if h % factor or w % factor:
        raise ValueError(f"a {h}x{w} feature map cannot be shuffled by {factor}")
    return F.pixel_unshuffle(features, factor).flatten(2).transpose(1, 2)


def perception_prior(class_logits: torch.Tensor, mask_logits: torch.Tensor, queries: torch.Tensor,
                     query_embed: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's prior (h*w, 2d) on the token ``grid`` and its valid-query mask (Q,).

    class_logits (Q, C+1) with the background last; mask_logits (Q, H, W); queries and query_embed (Q, d).
    """
    s = class_logits.softmax(-1)[:, :-1].max(-1).values  # (Q,)
    p = (0.5 * s + 0.5)[:, None, None] * mask_logits.sigmoid()
    p = F.interpolate(p[None], size=grid, mode="bilinear", align_corners=False)[0]  # (Q, h, w)
    w = p.flatten(1).softmax(0)  # (Q, h*w): softmax over the queries at each cell
    qe = torch.cat([queries, query_embed], -1)  # (Q, 2d)
    prior = w.T @ qe  # (h*w, 2d)
    winners = w.argmax(0)  # (h*w,)
    valid = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
    valid[winners] = True
    return prior, valid
