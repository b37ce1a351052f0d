"""Distributed helpers: rank/world, rank-0 logging, seeding, DeepSpeed ZeRO configs, a torchrun launcher.

The ZeRO-2 / ZeRO-3 JSON files under ``ds_configs/`` are written for ``transformers.Trainer``
(``"auto"`` values are filled from ``TrainingArguments``); :func:`deepspeed_config` fills them for a
direct ``deepspeed.initialize`` call. Both select ``torch_adam`` so nothing is compiled for the
optimizer and they run on the CPU (DeepSpeed's CPU accelerator, gloo) as well as on GPUs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger("groundlab")


def get_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return get_rank() == 0


def rank0_print(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushes, so interleaved process output stays readable)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


class _Rank0Filter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()


class _StdoutHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stdout`` is when a line is written, not on the one there was
    when logging was set up: a caller that redirects stdout later (a test's capture, a tool) gets the
    lines."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it; the property always reads sys.stdout
        pass


def setup_logging(level: int = logging.INFO, all_ranks: bool = False) -> logging.Logger:
    """Configure the ``groundlab`` logger: one line format, rank-0 only unless ``all_ranks``."""
    if not any(getattr(h, "_groundlab", False) for h in logger.handlers):
        handler = _StdoutHandler()
        handler._groundlab = True  # type: ignore[attr-defined]
        rank = get_rank()
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    for h in logger.handlers:
        h.filters = [] if all_ranks else [_Rank0Filter()]
    logger.setLevel(level)
    logger.propagate = False
    return logger


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices). ``deterministic`` also asks torch for
    deterministic kernels (slower; raises on ops that have none)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# evaluation over several processes


def init_process_group() -> bool:
    """Join the torchrun job this process belongs to, when there is one (``WORLD_SIZE`` > 1) and it
    has not joined yet: NCCL on CUDA, gloo elsewhere. Returns whether several processes run."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(get_local_rank())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shard(n: int) -> range:
    """This process's share of ``n`` evaluation items: one contiguous block per rank, in rank order
    (everything in one process). :func:`gather_shards` puts the blocks back together."""
    init_process_group()
    rank, world = get_rank(), get_world_size()
    size = -(-n // world)
    return range(min(n, rank * size), min(n, (rank + 1) * size))


def gather_shards(rows: list) -> list:
    """Every process's :func:`shard` results, concatenated in rank order (= the items' order), on every
    process: prediction under torchrun gives the file one process would write."""
    if get_world_size() == 1:
        return list(rows)
    parts = [None] * get_world_size()
    dist.all_gather_object(parts, list(rows))
    return [row for part in parts for row in part]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """``rows`` as JSON lines at ``path``, written by the first process; every process returns once the
    file is complete."""
    path = Path(path)
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    barrier()
    return path


# ----------------------------------------------------------------------------------------------
# DeepSpeed


def ds_config_path(stage: int) -> Path:
    """Path of the packaged ZeRO config (``stage`` 2 or 3), to hand to ``TrainingArguments(deepspeed=...)``."""
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage}")
    path = resources.files("groundlab.shared") / "ds_configs" / f"zero{stage}.json"
    return Path(str(path))


def load_ds_config(stage: int) -> dict:
    return json.loads(ds_config_path(stage).read_text())


def deepspeed_config(
    stage: int,
    micro_batch_size: int,
    grad_accum: int = 1,
    world_size: int | None = None,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    bf16: bool = False,
) -> dict:
    """The packaged ZeRO config with every ``"auto"`` filled, for a direct ``deepspeed.initialize``."""
    world_size = world_size or get_world_size()
    cfg = copy.deepcopy(load_ds_config(stage))
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch_size * grad_accum * world_size
    cfg["gradient_clipping"] = grad_clip
    cfg["bf16"]["enabled"] = bf16
    cfg["optimizer"]["params"].update(lr=lr, betas=list(betas), eps=eps, weight_decay=weight_decay)
    zero = cfg["zero_optimization"]
    for key, value in list(zero.items()):
        if value == "auto":  # ZeRO-3 bucket sizes: DeepSpeed's own defaults suit small models
            zero.pop(key)
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise AssertionError(f"unfilled 'auto' values in the ZeRO-{stage} config: {leftover}")
    return cfg


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# ----------------------------------------------------------------------------------------------
# launching


def torchrun_command(script: str | Path, args: list[str] | None = None, nproc_per_node: int = 1,
                     nnodes: int = 1, master_port: int | None = None, module: bool = False) -> list[str]:
    """The argv of a single-node ``torchrun`` launch of ``script`` (a path, or a module with ``module``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
           f"--nnodes={nnodes}"]
    if nnodes == 1:
        cmd.append("--standalone" if master_port is None else f"--master_port={master_port}")
    if module:
        cmd.append("-m")
    cmd.append(str(script))
    return cmd + list(args or [])


def launch(script: str | Path, args: list[str] | None = None, nproc_per_node: int = 1,
           env: dict[str, str] | None = None, timeout: float | None = None, module: bool = False,
           **kwargs) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun and wait. With one process it still goes through torchrun, so
    the script sees the same environment (RANK, WORLD_SIZE, MASTER_ADDR) either way.

    On the CPU, DeepSpeed compiles a small shared-memory op on first use: it is cached in
    ``TORCH_EXTENSIONS_DIR`` (default ``./.torch_extensions``) so later launches skip it.
    """
    full_env = dict(os.environ)
    full_env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".torch_extensions"))
    full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    full_env.update(env or {})
    cmd = torchrun_command(script, args, nproc_per_node, module=module)
    return subprocess.run(cmd, env=full_env, timeout=timeout, capture_output=True, text=True, check=False, **kwargs)
