"""On a GPU (marked ``gpu``; skipped without CUDA): stage-2 training and evaluation give what they give
on the CPU."""

from pathlib import Path

import pytest
import torch

from groundlab.shared.testing import losses_cpu_and_cuda, outputs_cpu_and_cuda
from groundlab.shared.world import World, WorldConfig
from groundlab.vp_mllm.data import export_world
from groundlab.vp_mllm.evaluation import read_predictions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
HERE = Path(__file__).parent
WORLD = WorldConfig(min_objects=2, max_objects=4, glyph_prob=0.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("mdvp")
    export_world(World(WORLD, seed=0), "train", 12, out)
    export_world(World(WORLD, seed=0), "val", 4, out)
    return out


def test_stage_two_on_the_gpu_gives_the_cpu_losses(data, tmp_path):
    losses = losses_cpu_and_cuda(HERE / "zero2_worker.py", ["--data", str(data)], tmp_path)
    assert len(losses["cuda"]) == 4 and losses["cuda"][-1] < losses["cuda"][0]
    torch.testing.assert_close(torch.tensor(losses["cuda"]), torch.tensor(losses["cpu"]), atol=2e-3, rtol=0)


def test_evaluation_on_the_gpu_predicts_what_the_cpu_does(data, tmp_path):
    dirs = outputs_cpu_and_cuda(HERE / "eval_worker.py", ["--data", str(data)], tmp_path)
    cpu, cuda = (read_predictions(dirs[d] / "predictions.jsonl") for d in ("cpu", "cuda"))
    assert len(cpu) == 11 and cuda == cpu
