"""What the packages' tests share.

:func:`attention_outside_the_shared_dispatch` names every attention in a model that does not run
through :mod:`groundlab.shared.attention`.

The check that a training stage runs the same under ``torchrun --nproc_per_node 2`` with the shared
ZeRO-2 config as in one process:
A package writes a worker script that builds its stage (model, data, collator), trains it with
:func:`groundlab.shared.training.train` for a few steps with ``batch_size = global_batch // WORLD_SIZE``
and ``deepspeed`` from the command line, and ends with :func:`finish_worker`; its test calls
:func:`losses_one_and_two_processes` and compares the two lists.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .distributed import launch


def worker_args() -> tuple[argparse.Namespace, int]:
    """A worker's command line (``--data DIR --out DIR [--deepspeed zero2]``) and its world size;
    one thread a process, so two processes share the two cores as one process would use them."""
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--deepspeed", default=None)
    torch.set_num_threads(1)
    return p.parse_args(), int(os.environ.get("WORLD_SIZE", 1))


def finish_worker(trainer, out: str | Path) -> None:
    """Rank 0 writes the run's per-step training losses to ``out/losses.json``; then every rank
    leaves together (a rank exiting while another still talks to it can abort the other)."""
    import torch.distributed as dist

    if int(os.environ.get("RANK", 0)) == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        Path(out, "losses.json").write_text(json.dumps(losses))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def losses_one_and_two_processes(worker: str | Path, args: list[str], out: str | Path,
                                 timeout: float = 900) -> dict[int, list[float]]:
    """Run ``worker`` with ``args`` under torchrun: 2 processes with ``--deepspeed zero2`` and 1
    process without DeepSpeed, each with its own ``--out``; returns ``{2: losses, 1: losses}``.
    A failed launch raises with the end of its output."""
    losses = {}
    for n, ds in ((2, ["--deepspeed", "zero2"]), (1, [])):
        run_out = Path(out) / f"n{n}"
        res = launch(worker, [*args, "--out", str(run_out), *ds], nproc_per_node=n,
                     env={"PYTHONWARNINGS": "ignore"}, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{worker} on {n} process(es) failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        losses[n] = json.loads((run_out / "losses.json").read_text())
    return losses


def attention_outside_the_shared_dispatch(model) -> list[str]:
    """The modules of ``model`` whose attention bypasses the shared dispatch: HF (sub)models built with
    another ``attn_implementation``, ``torch.nn.MultiheadAttention``, ``segment_anything``'s own
    attention. Empty when every attention runs through :mod:`groundlab.shared.attention`."""
    from segment_anything.modeling import image_encoder
    from segment_anything.modeling import transformer as two_way
    from torch import nn

    from .attention import HF_ATTENTION

    bypass = (nn.MultiheadAttention, image_encoder.Attention, two_way.Attention)
    found = []
    for name, module in model.named_modules():
        if type(module) in bypass:
            found.append(f"{name}: {type(module).__module__}.{type(module).__name__}")
        # transformers' attention layers read the implementation from their config at every call
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if "Attention" in type(module).__name__ and impl not in (None, HF_ATTENTION):
            found.append(f"{name}: {type(module).__name__} with attn_implementation={impl!r}")
    return found
