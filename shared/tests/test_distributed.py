import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from groundlab.shared.distributed import (
    deepspeed_config,
    ds_config_path,
    get_rank,
    get_world_size,
    is_main_process,
    launch,
    load_ds_config,
    rank0_print,
    seed_everything,
    setup_logging,
    torchrun_command,
)

WORKER = Path(__file__).with_name("ds_worker.py")
REPO = Path(__file__).resolve().parents[2]


def test_rank_helpers_without_a_process_group(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (get_rank(), get_world_size(), is_main_process()) == (1, 2, False)
    rank0_print("hidden")
    monkeypatch.setenv("RANK", "0")
    rank0_print("shown")
    assert capsys.readouterr().out == "shown\n"


def test_seed_everything_repeats():
    seed_everything(3)
    a = (torch.rand(3), nn.Linear(2, 2).weight.detach().clone())
    seed_everything(3)
    b = (torch.rand(3), nn.Linear(2, 2).weight.detach().clone())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_logging_is_rank0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    log = setup_logging()
    log.info("from rank 1")
    monkeypatch.setenv("RANK", "0")
    log.info("from rank 0")
    out = capsys.readouterr().out
    assert "from rank 0" in out and "from rank 1" not in out


def test_logging_follows_a_stdout_redirected_after_setup(capsys):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # set up while stdout was elsewhere (an earlier caller)
        log = setup_logging()
    log.info("written after the redirect ended")
    assert "written after the redirect ended" in capsys.readouterr().out and buf.getvalue() == ""


@pytest.mark.parametrize("stage", [2, 3])
def test_packaged_configs_are_cpu_safe_and_fill_every_auto(stage):
    raw = load_ds_config(stage)
    assert ds_config_path(stage).is_file()
    assert raw["zero_optimization"]["stage"] == stage
    assert raw["optimizer"]["params"]["torch_adam"] is True
    cfg = deepspeed_config(stage, micro_batch_size=4, grad_accum=2, world_size=3, lr=2e-4)
    assert cfg["train_batch_size"] == 24
    assert cfg["optimizer"]["params"]["lr"] == 2e-4
    assert "auto" not in json.dumps(cfg)
    with pytest.raises(ValueError):
        ds_config_path(1)


def test_torchrun_command():
    cmd = torchrun_command("train.py", ["--x", "1"], nproc_per_node=2)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--standalone",
                       "train.py", "--x", "1"]


def _run(tmp_path, nproc, stage):
    out = tmp_path / f"n{nproc}"
    env = {"TORCH_EXTENSIONS_DIR": str(REPO / ".torch_extensions"), "PYTHONWARNINGS": "ignore"}
    res = launch(WORKER, ["--out", str(out), "--stage", str(stage)], nproc_per_node=nproc, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_match_one_process(tmp_path, stage):
    """torchrun x2 + deepspeed.initialize on the CPU (gloo): both ranks end with identical
    parameters, equal to a single-process run over the same global batch."""
    two = _run(tmp_path, 2, stage)
    one = _run(tmp_path, 1, stage)[0]
    seed_everything(0)
    init = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).state_dict()
    for name, value in one.items():
        torch.testing.assert_close(two[0][name], two[1][name], atol=0, rtol=0)
        torch.testing.assert_close(two[0][name], value, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(value, init[name]), f"{name} did not train"
    assert os.environ.get("RANK") is None  # the launch did not leak into this process
