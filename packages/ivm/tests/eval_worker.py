"""Worker of test_evaluation_under_two_processes: a tiny IVM (random, seeded) predicts heatmaps of
held-out samples under torchrun; the predictions must not depend on the number of processes."""

import sys
from pathlib import Path

import torch

from groundlab.ivm.evaluation import grounding_samples, predict_heatmaps
from groundlab.shared.testing import finish_worker, worker_args, worker_device
from groundlab.shared.world import World, WorldConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_model import tiny_ivm  # noqa: E402  (the tests' tiny model)


def main():
    args, _ = worker_args()
    model, processor, _ = tiny_ivm(seed=0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a condition MLP that carries the instruction well into the heatmap
        for p in model.condition_proj.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.to(worker_device())
    samples = grounding_samples(World(WorldConfig(), seed=0).scenes("val", 4))
    predict_heatmaps(model.eval(), processor, samples, args.out / "predictions.jsonl")
    finish_worker(None, args.out)


if __name__ == "__main__":
    main()
