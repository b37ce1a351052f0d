"""groundlab benchmarks: speed ratios measured side by side in one run, written as JSON + a table.

    make bench            # all benchmarks
    python benchmarks/run.py --only attention

attention: a batch of variable-length sequences (lengths drawn like a conversation dataset's, with a
long tail), attended causally (a) padded to the longest with a mask and (b) packed padding-free
through ``groundlab.shared.attention`` (``cu_seqlens``), forward + backward, SDPA on the CPU. Reports
the time of each, their ratio, and the share of the padded FLOPs that packing skips.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from groundlab.shared.attention import attention


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_attention(batch: int = 16, heads: int = 8, dim: int = 64, max_len: int = 512, repeats: int = 5) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = (torch.distributions.Exponential(torch.tensor(1 / 96.0)).sample((batch,)) + 16).clamp(max=max_len).long()
    lengths[0] = max_len  # one long sample sets the padded length, as in a real batch
    n, t = int(lengths.sum()), int(lengths.max())
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    qp, kp, vp = (torch.randn(n, heads, dim, generator=g, requires_grad=True) for _ in range(3))
    qd, kd, vd = (torch.randn(batch, heads, t, dim, generator=g, requires_grad=True) for _ in range(3))
    key_ok = (torch.arange(t)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)

    def padded():
        attention(qd, kd, vd, causal=True, attn_mask=key_ok, implementation="sdpa").sum().backward()

    def packed():
        attention(qp, kp, vp, causal=True, cu_seqlens=cu, implementation="sdpa").sum().backward()

    t_pad, t_pack = _time(padded, repeats), _time(packed, repeats)
    flops_pad = batch * t * t
    flops_pack = int((lengths.float() ** 2).sum())
    return {
        "batch": batch, "heads": heads, "head_dim": dim, "tokens": n, "padded_len": t,
        "padded_s": t_pad, "packed_s": t_pack, "speedup_packed_over_padded": t_pad / t_pack,
        "attention_flops_skipped_by_packing": 1 - flops_pack / flops_pad,
    }


BENCHES = {"attention": bench_attention}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(BENCHES), action="append")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "processor": platform.processor()}}
    for name in args.only or sorted(BENCHES):
        results[name] = BENCHES[name]()
        print(f"\n## {name}")
        print("| key | value |\n|---|---|")
        for k, v in results[name].items():
            print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\n{path}")


if __name__ == "__main__":
    main()
