"""One attention dispatch for every groundlab model: flash-attn -> torch SDPA -> eager.

- ``attention(q, k, v, ...)`` runs scaled dot-product attention on either layout:
  padded ``(B, H, T, D)`` (optionally with a boolean ``attn_mask``, True = may attend), or packed
  ``(N, H, D)``: several sequences concatenated into one row, delimited by ``cu_seqlens`` (cumulative
  lengths, as flash-attn's varlen kernels take them) or by ``position_ids`` that restart at 0 for each
  sequence, optionally with ``prefix_lengths`` (a prefix-LM such as PaliGemma's: each sequence's
  first tokens attend to each other both ways). A packed call equals running each sequence alone:
  flash-attn runs its varlen kernel; elsewhere the sequences, sorted by length, are scattered into a
  few padded groups for batched kernel calls and gathered back, so everything outside attention runs
  padding-free and attention pays about the sum of the squared lengths.
- ``HF_ATTENTION`` (``"groundlab"``) is this dispatch registered with transformers' attention and
  mask interfaces: a HF model built or loaded with ``attn_implementation="groundlab"`` runs every
  attention layer through :func:`hf_attention_forward`: padded batches (HF builds a boolean mask, or
  none for plain causal) and padding-free packed rows, whose bounds come as ``cu_seq_lens_q`` (HF's
  name; :func:`groundlab.shared.multimodal.pack_batch` gives them, with ``prefix_lens`` for
  PaliGemma). ``choose_attn_implementation`` picks the string for models that want HF's own.

On the CPU, SDPA runs in fp32 whatever the input dtype (bf16 autocast included): at the tiny models'
shapes torch's bf16 CPU kernel is 1.3-1.5x slower than its fp32 one and than the eager path, while fp32
SDPA is the fastest of the three; a causal call without a mask (a packed row's groups of a causal LM,
or an unpadded causal batch) takes SDPA's own causal kernel instead of a materialised mask
(``python benchmarks/run.py --only vlm_step``).

flash-attn is imported lazily and used only on CUDA with fp16/bf16 tensors; on this project's CPU
machines the SDPA path runs, and the eager path is the readable reference the tests compare against.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn

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
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # scaling q: T x D products, not T x S
    if mask is not None and mask.dtype != torch.bool:  # an additive bias
        scores = scores + mask
    elif mask is not None:  # a finite minimum: a query with no key gets uniform weights, zeroed by _padded
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
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
    prefix_lengths: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention on the padded or the packed layout (see the module docstring).

    Shapes: padded q (B, Hq, T, D), k/v (B, Hkv, S, D), ``attn_mask`` broadcastable to (B, Hq, T, S):
    bool (True = attend) or a floating-point bias added to the scores; packed q (N, Hq, D), k/v (N, Hkv, D) with ``cu_seqlens`` (int32, S+1) or
    ``position_ids`` (N,) or (1, N). Hq must be a multiple of Hkv (grouped-query attention).
    With ``causal`` on a padded (T != S) call the mask is aligned bottom-right, as flash-attn does.
    ``prefix_lengths`` (packed only, one per sequence): that many first tokens of each sequence see
    each other both ways (with ``causal``, the rest stays causal).
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

    elif prefix_lengths is not None:
        raise ValueError("prefix_lengths applies to packed calls (cu_seqlens / position_ids) only")

    use_flash = implementation == "flash" or (
        implementation == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        and attn_mask is None and prefix_lengths is None and flash_attn_available()
    )
    if use_flash:
        if prefix_lengths is not None:
            raise ValueError("flash-attn has no prefix-LM mask; use implementation='sdpa' with prefix_lengths")
        return _flash(q, k, v, causal, cu_seqlens, max_seqlen, dropout_p, scale, packed)
    if packed:
        return _packed(q, k, v, cu_seqlens, causal, prefix_lengths, dropout_p, scale,
                       "sdpa" if implementation == "auto" else implementation)
    return _padded(q, k, v, attn_mask, causal, dropout_p, scale, implementation)


PACKED_GROUPS = 4
"""A packed row's sequences go through the kernel in up to this many groups of similar length (each
padded to its own longest): attention costs about the sum of the squared lengths, not S x longest^2."""


PACKED_LENGTH_MULTIPLE = 32
"""Each group's padded length is rounded up to a multiple of this (the extra slots are masked like any
padding, so the output is the same): a training run's groups then come in a few recurring sizes, whose
tensors the CPU allocator reuses; exact lengths ask for new sizes every step and the heap fragments
(see :func:`groundlab.shared.multimodal.pack_batch`'s ``pad_to_multiple_of``, its partner)."""


def _packed(q, k, v, cu_seqlens, causal, prefix_lengths, dropout_p, scale, implementation):
    """A packed row through a few padded kernel calls: the sequences, sorted by length, in up to
    ``PACKED_GROUPS`` groups, each scattered into (S_g, H, longest_g, D), attended with each sequence's
    own mask and gathered back (differentiable both ways)."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    for tokens, slots, n_seq, longest, mask in _packed_layout(cu_seqlens, prefix_lengths, causal, q.device):
        qg, kg, vg = (_scatter(x, tokens, slots, n_seq, longest) for x in (q, k, v))
        if causal and prefix_lengths is None:
            # each sequence's padding follows its last token, so causality alone keeps every real query off
            # it (the padded queries' outputs are dropped below): SDPA's causal kernel, no mask
            o = _padded(qg, kg, vg, None, True, dropout_p, scale, implementation)
        else:
            o = _padded(qg, kg, vg, mask, False, dropout_p, scale, implementation)
        flat = o.transpose(1, 2).reshape(n_seq * longest, o.shape[1], o.shape[-1])
        out = out.index_copy(0, tokens, flat.index_select(0, slots))
    return out


def _scatter(x, tokens, slots, n_seq: int, longest: int) -> torch.Tensor:
    """(N, H, D) packed -> (S_g, H, L, D): the group's tokens at their slots, zeros elsewhere."""
    padded = x.new_zeros(n_seq * longest, *x.shape[1:]).index_copy(0, slots, x.index_select(0, tokens))
    return padded.view(n_seq, longest, *x.shape[1:]).transpose(1, 2)


_LAYOUT_CACHE: dict = {}


def _packed_layout(cu_seqlens, prefix_lengths, causal, device) -> list[tuple]:
    """Per group: the packed index of its tokens, their slots in the padded (S_g x L) layout, S_g, L
    and the mask. Every layer of a forward asks for the same layout: the last one is kept (keyed by
    the values, not the tensors)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if prefix_lengths is not None and prefix_lengths.numel() != lengths.numel():
        raise ValueError(f"{prefix_lengths.numel()} prefix_lengths for {lengths.numel()} packed sequences")
    key = (tuple(cu_seqlens.tolist()), None if prefix_lengths is None else tuple(prefix_lengths.tolist()), causal,
           str(device))
    if key in _LAYOUT_CACHE:
        return _LAYOUT_CACHE[key]
    starts, groups = cu_seqlens[:-1].long(), []
    order = torch.argsort(lengths)
    for group in torch.tensor_split(order, min(PACKED_GROUPS, order.numel())):
        n_seq, longest = group.numel(), -(-int(lengths[group].max()) // PACKED_LENGTH_MULTIPLE) * PACKED_LENGTH_MULTIPLE
        within = torch.arange(longest, device=device)
        valid = within[None, :] < lengths[group][:, None]  # (S_g, L)
        tokens = (starts[group][:, None] + within[None, :])[valid]  # packed index of each real token
        slots = torch.nonzero(valid.flatten()).flatten()
        mask = valid[:, None, None, :]  # real keys only: (S_g, 1, 1, L)
        if causal:
            allowed = within[:, None] >= within[None, :]  # (L, L)
            if prefix_lengths is not None:
                inside = within[None, :] < prefix_lengths.to(device).long()[group][:, None]  # (S_g, L)
                allowed = (allowed | (inside[:, :, None] & inside[:, None, :]))[:, None]
            mask = mask & allowed
        groups.append((tokens, slots, n_seq, longest, mask))
    _LAYOUT_CACHE.clear()
    _LAYOUT_CACHE[key] = groups
    return groups


def _padded(q, k, v, mask, causal, dropout_p, scale, implementation):
    t, s = q.shape[-2], k.shape[-2]
    additive = mask is not None and mask.dtype != torch.bool
    if additive and not mask.is_floating_point():
        raise ValueError(f"attn_mask must be bool (True = attend) or a floating-point bias, got {mask.dtype}")
    if additive and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    if causal and mask is None and t == s and implementation != "eager":  # SDPA's own causal kernel
        return _sdpa(q, k, v, None, dropout_p, scale, is_causal=True)
    if causal:
        causal_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        if additive:
            mask = mask.masked_fill(~causal_mask, torch.finfo(mask.dtype).min)
        else:
            mask = causal_mask if mask is None else mask & causal_mask
    n_rep = q.shape[1] // k.shape[1]
    if implementation == "eager":
        out = _eager(q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), mask, scale, dropout_p)
    else:
        out = _sdpa(q, k, v, mask, dropout_p, scale)
    if mask is not None and not additive:  # a query that sees no key: SDPA gives NaN, eager uniform weights; zeros
        has_key = mask.any(dim=-1, keepdim=True)
        if not bool(has_key.all()):
            out = out.masked_fill(~has_key, 0.0)
    return out


def _sdpa(q, k, v, mask, dropout_p, scale, is_causal=False):
    """torch SDPA; on the CPU in fp32 (see the module docstring), the result in the inputs' dtype."""
    gqa = q.shape[1] != k.shape[1]
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              is_causal=is_causal, enable_gqa=gqa)
    with torch.autocast("cpu", enabled=False):  # CPU autocast would run SDPA in bf16
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p,
                                             scale=scale, is_causal=is_causal, enable_gqa=gqa)
    return out.to(q.dtype)


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


class MultiheadAttention(nn.Module):
    """Multi-head attention through :func:`attention`, for the attention modules the packages own.

    Its parameters are ``nn.MultiheadAttention``'s (``in_proj_weight`` / ``in_proj_bias`` / ``out_proj``,
    initialised by the same draws in the same order), so checkpoints of either load into the other.
    ``forward(query (B, T, D), key (B, S, D), value (B, S, D), mask=None)``: ``mask`` broadcastable to
    (B, H, T, S), bool with True = may attend (the inverse of ``nn.MultiheadAttention``'s ``attn_mask``)
    or a floating-point bias. Returns (B, T, D).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim)) if bias else None
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = (F.linear(x, w, b).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for x, w, b in zip((query, key, value), self.in_proj_weight.chunk(3), biases))
        out = attention(q, k, v, causal=False, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))


# ----------------------------------------------------------------------------------------------
# transformers integration

HF_ATTENTION = "groundlab"
CPU_KERNEL = "sdpa"
"""The kernel HF models get on the CPU (see the module docstring for the measurement; :func:`cpu_kernel`
switches it for a block)."""


@contextlib.contextmanager
def cpu_kernel(name: str):
    """Run the CPU attention of HF models through ``name`` (``"sdpa"``: fp32 SDPA, or ``"eager"``: the
    eager path, bf16 under bf16 autocast) inside the block. The two compute the same function at
    different precision, and a training run can learn differently on them (the PaliGemma base, README)."""
    global CPU_KERNEL
    if name not in ("sdpa", "eager"):
        raise ValueError(f"the CPU kernel is 'sdpa' or 'eager', got {name!r}")
    previous, CPU_KERNEL = CPU_KERNEL, name
    try:
        yield
    finally:
        CPU_KERNEL = previous


def hf_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over :func:`attention`.

    ``query`` (B, Hq, T, D), ``key`` / ``value`` (B, Hkv, S, D); ``attention_mask`` None, bool
    (B or 1, 1, T, S), True = attend (what the registered mask function gives), or a floating-point
    bias added to the scores (the masks some models build themselves: Mllama's cross-attention and
    vision encoder).
    A batch with ``cu_seq_lens_q`` is one packed row of causal sequences (``prefix_lens``:
    their prefix-LM prefixes; :func:`groundlab.shared.multimodal.pack_batch` gives both); otherwise the
    call is causal where the module is and no mask was built (HF drops the mask of an unpadded causal
    batch).
    Returns (B, T, Hq, D) and no attention weights.
    """
    dropout = dropout if module.training else 0.0
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    implementation = "auto" if query.is_cuda else CPU_KERNEL
    cu = kwargs.get("cu_seq_lens_q")
    # a packed row's self-attention: its bounds describe it whole (a mask HF derived from the restarting
    # position_ids is the same block-diagonal causal mask, without PaliGemma's prefixes); a
    # cross-attention of the row (Mllama's, to the images: another length, an additive mask) is not one
    self_attention = cu is not None and query.shape[-2] == key.shape[-2] == int(cu[-1])
    if self_attention and (attention_mask is None or attention_mask.dtype == torch.bool):
        if query.shape[0] != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row; got a batch of {query.shape[0]}")
        # a packed row is a language model's: causal (PaliGemma's Gemma says is_causal=False because HF
        # always hands it a full prefix-LM mask; here the prefix comes as prefix_lens)
        prefix = kwargs.get("prefix_lens")
        out = attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                        causal=bool(kwargs.get("is_causal", True)),
                        cu_seqlens=cu, max_seqlen=kwargs.get("max_length_q"), prefix_lengths=prefix,
                        dropout_p=dropout, scale=scaling, implementation=implementation)
        return out[None], None
    out = attention(query, key, value, causal=causal and attention_mask is None, attn_mask=attention_mask,
                    dropout_p=dropout, scale=scaling, implementation=implementation)
    return out.transpose(1, 2).contiguous(), None


PACKING_IMPLEMENTATIONS = (HF_ATTENTION, "flash_attention_2", "flash_attention_3")


def require_packing_support(model) -> None:
    """Raise unless every attention of the HF ``model`` reads packed rows' bounds (``cu_seq_lens_q``):
    under another implementation a packed row would attend across its sequences without a word."""
    language = getattr(model.config, "text_config", None) or model.config  # where the packed rows go
    impl = getattr(language, "_attn_implementation", None)
    if impl not in PACKING_IMPLEMENTATIONS:
        raise ValueError(f"packed batches need attn_implementation in {PACKING_IMPLEMENTATIONS}; "
                         f"{type(model).__name__} runs {impl!r}")


def register_with_transformers() -> None:
    """Make ``attn_implementation="groundlab"`` available to every transformers model (idempotent; run
    on import of this module)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HF_ATTENTION, hf_attention_forward)
    AttentionMaskInterface.register(HF_ATTENTION, sdpa_mask)


register_with_transformers()
