"""What the packages' tests share.

:func:`attention_outside_the_shared_dispatch` names every attention in a model that does not run
through :mod:`groundlab.shared.attention`.

The checks that a training stage runs the same under ``torchrun --nproc_per_node 2`` with the shared
ZeRO-2 config as in one process, and that evaluation predicts the same under 2 processes as under one:
A package writes a worker script that builds its stage (model, data, collator), trains it with
:func:`groundlab.shared.training.train` for a few steps with ``batch_size = global_batch // WORLD_SIZE``
and ``deepspeed`` from the command line, and ends with :func:`finish_worker`; its test calls
:func:`losses_one_and_two_processes` and compares the two lists. An evaluation worker predicts to
``<out>/predictions.jsonl`` and ends with ``finish_worker(None, out)``; its test calls
:func:`outputs_one_and_two_processes` and compares the two files. These are CPU checks (gloo): CUDA is
hidden from them, so they mean the same on a machine with a GPU.

The same workers check a GPU (tests marked ``gpu``): :func:`losses_cpu_and_cuda` and
:func:`outputs_cpu_and_cuda` run a worker in one process with CUDA hidden and with it visible (the
Trainer then trains on the GPU; an evaluation worker puts its model on :func:`worker_device`), fp32
both, TF32 off, for the test to compare.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path

from .distributed import launch


def worker_args() -> tuple[argparse.Namespace, int]:
    """A worker's command line (``--data DIR --out DIR [--deepspeed zero2]``) and its world size;
    one thread a process, so two processes share the two cores as one process would use them."""
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--data", default=None, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--deepspeed", default=None)
    torch.set_num_threads(1)
    # fp32 means fp32 on a GPU too, so that its results can be held to the CPU's
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return p.parse_args(), int(os.environ.get("WORLD_SIZE", 1))


def worker_device():
    """Where an evaluation worker puts its model: CUDA when this process sees it (the Trainer's
    choice too), else the CPU."""
    from .devices import pick_device

    return pick_device("auto")


def finish_worker(trainer, out: str | Path) -> None:
    """Rank 0 writes the run's per-step training losses to ``out/losses.json`` (with a ``trainer``);
    then every rank leaves together (a rank exiting while another still talks to it can abort the other)."""
    import torch.distributed as dist

    if trainer is not None and int(os.environ.get("RANK", 0)) == 0:
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
    dirs = outputs_one_and_two_processes(worker, args, out, timeout, {2: ["--deepspeed", "zero2"]})
    return {n: json.loads((d / "losses.json").read_text()) for n, d in dirs.items()}


def outputs_one_and_two_processes(worker: str | Path, args: list[str], out: str | Path, timeout: float = 900,
                                  extra: dict[int, list[str]] | None = None) -> dict[int, Path]:
    """Run ``worker`` with ``args`` under torchrun on 2 processes and on 1, each with its own ``--out``
    (``extra[n]``: more arguments for the n-process run); returns ``{2: out dir, 1: out dir}``.
    A failed launch raises with the end of its output."""
    dirs = {}
    for n in (2, 1):
        dirs[n] = _run_worker(worker, [*args, *(extra or {}).get(n, [])], Path(out) / f"n{n}", n, timeout,
                              cuda=False)
    return dirs


def losses_cpu_and_cuda(worker: str | Path, args: list[str], out: str | Path,
                        timeout: float = 900) -> dict[str, list[float]]:
    """Run a training ``worker`` in one process on the CPU (CUDA hidden) and on the GPU; returns
    ``{"cpu": losses, "cuda": losses}``."""
    dirs = outputs_cpu_and_cuda(worker, args, out, timeout)
    return {d: json.loads((path / "losses.json").read_text()) for d, path in dirs.items()}


def outputs_cpu_and_cuda(worker: str | Path, args: list[str], out: str | Path,
                         timeout: float = 900) -> dict[str, Path]:
    """Run ``worker`` in one process on the CPU (CUDA hidden) and with the GPU visible, each with its own
    ``--out``; returns ``{"cpu": out dir, "cuda": out dir}``."""
    return {d: _run_worker(worker, args, Path(out) / d, 1, timeout, cuda=d == "cuda") for d in ("cpu", "cuda")}


def _run_worker(worker, args: list[str], out: Path, nproc: int, timeout: float, cuda: bool) -> Path:
    env = {"PYTHONWARNINGS": "ignore"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    res = launch(worker, [*args, "--out", str(out)], nproc_per_node=nproc, env=env, timeout=timeout)
    if res.returncode != 0:
        where = "the GPU" if cuda else f"{nproc} CPU process(es)"
        raise RuntimeError(f"{worker} on {where} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return out


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


@contextmanager
def stray_tensors_on_meta():
    """A device check that needs no GPU: inside it, a tensor created without ``device=`` (``torch.zeros``,
    ``torch.arange``, ``torch.tensor(...)``, ...) lands on ``meta``, and the first operation that
    combines it with the CPU model's tensors, or reads its value, raises. Code that creates every tensor
    on its inputs' device runs inside it unchanged, as it would on a GPU."""
    import torch

    with torch.device("meta"):
        yield
