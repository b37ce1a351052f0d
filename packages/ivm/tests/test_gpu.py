"""On a GPU (marked ``gpu``; skipped without CUDA): the generator's training and the heatmap
evaluation give what they give on the CPU."""

from pathlib import Path

import pytest
import torch

from groundlab.ivm.data import export_world
from groundlab.ivm.evaluation import grounding_samples, read_heatmaps
from groundlab.shared.testing import losses_cpu_and_cuda, outputs_cpu_and_cuda
from groundlab.shared.world import World, WorldConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
HERE = Path(__file__).parent


def test_generator_training_on_the_gpu_gives_the_cpu_losses(tmp_path):
    export_world(World(WorldConfig(), seed=0), tmp_path / "data", 8, 0, 0.5, seed=0)
    losses = losses_cpu_and_cuda(HERE / "zero2_worker.py", ["--data", str(tmp_path / "data")], tmp_path)
    assert len(losses["cuda"]) == 4 and losses["cuda"][-1] < losses["cuda"][0]
    torch.testing.assert_close(torch.tensor(losses["cuda"]), torch.tensor(losses["cpu"]), atol=2e-3, rtol=0)


def test_heatmaps_on_the_gpu_are_the_cpu_heatmaps(tmp_path):
    samples = grounding_samples(World(WorldConfig(), seed=0).scenes("val", 4))
    dirs = outputs_cpu_and_cuda(HERE / "eval_worker.py", [], tmp_path)
    cpu, cuda = (read_heatmaps(dirs[d] / "predictions.jsonl", samples) for d in ("cpu", "cuda"))
    assert len(cpu) == len(samples) and min(float(abs(a - b).max()) for a, b in zip(cpu, cpu[1:])) > 1e-4
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), atol=1e-3, rtol=0)
