"""Worker for test_distributed: trains a small MLP with deepspeed.initialize for a few steps on a
fixed global batch, each rank taking its slice, and saves the final parameters of its rank."""

import argparse
import os
import sys

import deepspeed
import torch
from torch import nn

from groundlab.shared.distributed import deepspeed_config, get_rank, get_world_size, seed_everything

GLOBAL_BATCH = 8
STEPS = 5


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--stage", type=int, default=2)
    args = p.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = get_rank(), get_world_size()
    seed_everything(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    micro = GLOBAL_BATCH // world
    cfg = deepspeed_config(args.stage, micro_batch_size=micro, world_size=world, lr=0.05, grad_clip=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 6, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        xs, ys = x[rank * micro : (rank + 1) * micro], y[rank * micro : (rank + 1) * micro]
        loss = nn.functional.mse_loss(engine(xs), ys)
        engine.backward(loss)
        engine.step()
    if args.stage == 3:
        params = {}
        for n, prm in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([prm]):
                params[n] = prm.detach().clone()
    else:
        params = {n: prm.detach().clone() for n, prm in engine.module.named_parameters()}
    os.makedirs(args.out, exist_ok=True)
    torch.save(params, os.path.join(args.out, f"rank{rank}.pt"))
    # leave together: a rank exiting while another still talks to it can abort the other at teardown
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Skip interpreter finalization: gloo threads still referenced by DeepSpeed's own groups can abort
    # a rank at teardown (SIGABRT, "terminate called without an active exception") after its work is
    # saved; seen once in CI on a stage-3 run. The parameters are on disk and both ranks have met.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
