"""On a GPU (marked ``gpu``; skipped without CUDA): the reward model's training and scoring give what
they give on the CPU."""

from pathlib import Path

import pytest
import torch

from groundlab.shared.testing import losses_cpu_and_cuda, outputs_cpu_and_cuda
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.world import World, WorldConfig
from groundlab.tldr.data import export_world
from groundlab.tldr.evaluation import read_predictions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
HERE = Path(__file__).parent


def test_reward_model_training_on_the_gpu_gives_the_cpu_losses(tmp_path):
    export_world(World(WorldConfig(), seed=0), "train", 6, tmp_path / "data", load_tokenizer())
    losses = losses_cpu_and_cuda(HERE / "zero2_worker.py", ["--data", str(tmp_path / "data")], tmp_path)
    assert len(losses["cuda"]) == 4 and losses["cuda"][-1] < losses["cuda"][0]
    torch.testing.assert_close(torch.tensor(losses["cuda"]), torch.tensor(losses["cpu"]), atol=2e-3, rtol=0)


def test_scores_on_the_gpu_are_the_cpu_scores(tmp_path):
    export_world(World(WorldConfig(), seed=0), "val", 2, tmp_path / "data", load_tokenizer())
    dirs = outputs_cpu_and_cuda(HERE / "eval_worker.py", ["--data", str(tmp_path / "data")], tmp_path)
    cpu, cuda = (read_predictions(dirs[d] / "predictions.jsonl") for d in ("cpu", "cuda"))
    assert len(cpu) == 13 and [r["id"] for r in cuda] == [r["id"] for r in cpu]
    assert max(abs(p - 0.5) for r in cpu for p in r["probs"]) > 0.01
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(torch.tensor(b["probs"]), torch.tensor(a["probs"]), atol=1e-4, rtol=0)
