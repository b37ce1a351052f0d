"""One attention dispatch for every groundlab model: flash-attn -> torch SDPA -> eager.

- ``attention(q, k, v, ...)`` runs scaled dot-product attention on either layout:
  padded ``(B, H, T, D)`` (optionally with a boolean ``attn_mask``, True = may attend), or packed
  ``(N, H, D)``: several sequences concatenated into one row, delimited by ``cu_seqlens`` (cumulative
  lengths, as flash-attn's varlen kernels take them) or by ``position_ids`` that restart at 0 for each
  sequence. A packed call equals running each sequence alone and never spends a FLOP on padding:
  flash-attn runs its varlen kernel, SDPA runs one call per sequence, and the eager reference uses a
  block-diagonal mask over the whole row (simple, quadratic in the row length).
- ``choose_attn_implementation`` picks the HF ``attn_implementation`` string the same way, so
  transformers models built by the packages follow one policy.

flash-attn is imported lazily and used only on CUDA with fp16/bf16 tensors; on this project's CPU
machines the SDPA path runs, and the eager path is the readable reference the tests compare against.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("auto", "flash", "sdpa", "eager")


@functools.cache
def flash_attn_available() -> bool:
    """flash-attn is installed and a CUDA device is present (never imports it otherwise)."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def choose_attn_implementation(preferred: str | None = None) -> str:
    """The HF ``attn_implementation`` to build with: ``flash_attention_2`` when usable, else ``sdpa``.

    ``preferred`` may name ``flash_attention_2``, ``sdpa`` or ``eager``; an unusable preference falls
    back down the chain instead of failing at model build time.
    """
    if preferred not in (None, "flash_attention_2", "sdpa", "eager"):
        raise ValueError(f"unknown attn_implementation {preferred!r}")
    if preferred == "eager":
        return "eager"
    if preferred in (None, "flash_attention_2") and flash_attn_available():
        return "flash_attention_2"
    return "sdpa"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence lengths (int32, starts with 0) of a packed row whose positions restart at 0."""
    pos = position_ids.reshape(-1)
    if pos.numel() == 0:
        raise ValueError("empty position_ids")
    if pos[0] != 0:
        raise ValueError(f"packed position_ids must start at 0, got {int(pos[0])}")
    starts = torch.nonzero(pos == 0).flatten()
    total = torch.tensor([pos.numel()], device=pos.device)
    return torch.cat([starts, total]).to(torch.int32)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> None:
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at the packed length {n}; got {cu_seqlens.tolist()}")
    if bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu_seqlens.tolist()}")


def packed_mask(cu_seqlens: torch.Tensor, causal: bool) -> torch.Tensor:
    """(N, N) bool mask of a packed row: True where query i may attend key j."""
    n = int(cu_seqlens[-1])
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= torch.ones(n, n, dtype=torch.bool, device=cu_seqlens.device).tril()
    return mask


def _eager(q, k, v, mask, scale, dropout_p):  # q (B, H, T, D), mask broadcastable to (B, H, T, S)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = torch.nan_to_num(probs, nan=0.0)  # a query with no key attends to nothing
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    attn_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    position_ids: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention on the padded or the packed layout (see the module docstring).

    Shapes: padded q (B, Hq, T, D), k/v (B, Hkv, S, D), ``attn_mask`` bool broadcastable to
    (B, Hq, T, S); packed q (N, Hq, D), k/v (N, Hkv, D) with ``cu_seqlens`` (int32, S+1) or
    ``position_ids`` (N,) or (1, N). Hq must be a multiple of Hkv (grouped-query attention).
    With ``causal`` on a padded (T != S) call the mask is aligned bottom-right, as flash-attn does.
    Returns the layout of ``q``. Queries with no visible key get zeros.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    packed = cu_seqlens is not None or position_ids is not None
    if packed and attn_mask is not None:
        raise ValueError("pass either attn_mask (padded layout) or cu_seqlens/position_ids (packed), not both")
    expected_ndim = 3 if packed else 4
    if q.ndim != expected_ndim or k.ndim != expected_ndim or v.ndim != expected_ndim:
        layout = "packed (N, H, D)" if packed else "padded (B, H, T, D)"
        raise ValueError(f"{layout} layout expected; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    hq, hkv = (q.shape[1], k.shape[1])
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])

    if packed:
        if cu_seqlens is None:
            cu_seqlens = cu_seqlens_from_position_ids(position_ids)
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        _check_cu_seqlens(cu_seqlens, q.shape[0])
        if k.shape[0] != q.shape[0]:
            raise ValueError("packed self-attention needs q and k of the same length")

    use_flash = implementation == "flash" or (
        implementation == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        and attn_mask is None and flash_attn_available()
    )
    if use_flash:
        return _flash(q, k, v, causal, cu_seqlens, max_seqlen, dropout_p, scale, packed)

    if packed and implementation == "eager":  # the reference: one row (1, H, N, D), block-diagonal mask
        mask = packed_mask(cu_seqlens, causal)[None, None]
        out = _padded(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                      mask, False, dropout_p, scale, implementation)
        return out[0].transpose(0, 1)
    if packed:  # SDPA one sequence at a time: sum(L_i^2) work instead of N^2 for a block mask
        bounds = cu_seqlens.tolist()
        outs = [
            _padded(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                    None, causal, dropout_p, scale, implementation)[0].transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(outs, dim=0)
    return _padded(q, k, v, attn_mask, causal, dropout_p, scale, implementation)


def _padded(q, k, v, mask, causal, dropout_p, scale, implementation):
    t, s = q.shape[-2], k.shape[-2]
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be bool (True = attend), got {mask.dtype}")
    if causal:
        causal_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        mask = causal_mask if mask is None else mask & causal_mask
    n_rep = q.shape[1] // k.shape[1]
    if implementation == "eager":
        return _eager(q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), mask, scale, dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=n_rep > 1)
    if mask is not None:  # SDPA returns NaN for a query that sees no key; define it as zeros
        has_key = mask.any(dim=-1, keepdim=True)
        out = out.masked_fill(~has_key, 0.0)
    return out


def _flash(q, k, v, causal, cu_seqlens, max_seqlen, dropout_p, scale, packed):
    if not flash_attn_available():
        raise RuntimeError("implementation='flash' needs the flash-attn package and a CUDA device "
                           "(pip install 'groundlab-shared[cuda]')")
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if packed:
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      dropout_p=dropout_p, softmax_scale=scale, causal=causal)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout_p, softmax_scale=scale, causal=causal)
    return out.transpose(1, 2)
