import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from groundlab.shared.training import TrainConfig, last_complete_checkpoint, train


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, y):
        out = self.lin(x)
        return {"loss": ((out.float() - y) ** 2).mean(), "out": out}


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 4, generator=g)
    return [{"x": x, "y": x.sum(0, keepdim=True)} for x in xs]


def _collate(batch):
    return {"x": torch.stack([b["x"] for b in batch]), "y": torch.stack([b["y"] for b in batch])}


def test_bf16_training_leaves_an_fp32_model_and_complete_checkpoints(tmp_path):
    model = Toy()
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=1e-2, bf16=True, save_steps=3, progress_bar=False)
    train(model, _data(), _collate, cfg, tmp_path)
    # accelerate's autocast wrapper is removed: evaluation after training runs in fp32, as after loading
    assert model(torch.randn(2, 4), torch.zeros(2, 1))["out"].dtype == torch.float32
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-6"
    (tmp_path / "checkpoint-6" / "optimizer.pt").write_bytes(b"")  # a checkpoint written half-way is skipped
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-3"
    (tmp_path / "checkpoint-3" / "COMPLETE").unlink()  # as is one whose save never finished (no marker)
    assert last_complete_checkpoint(tmp_path) is None


def _worker(out, die_at=None):
    cmd = [sys.executable, str(Path(__file__).with_name("train_worker.py")), "--out", str(out)]
    if die_at is not None:
        cmd += ["--die-at", str(die_at)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})


@pytest.mark.slow
def test_a_run_killed_at_a_random_step_resumes_to_the_same_weights(tmp_path):
    """SIGKILL at a random step (then again after damaging the newest checkpoint): the resumed run ends
    with the weights of an uninterrupted one (fp32, dropout on, data order across epochs restored)."""
    die_at = random.Random().randint(6, 23)  # after the first checkpoint, before the end
    whole = _worker(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _worker(tmp_path / "killed", die_at)
    assert killed.returncode == -signal.SIGKILL, (die_at, killed.stderr[-2000:])
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    newest = last_complete_checkpoint(tmp_path / "killed" / "checkpoints")
    # the kill comes at the end of the step, before that step's own save
    assert newest is not None and int(newest.name.split("-")[1]) == (die_at - 1) // 5 * 5, (die_at, newest)
    resumed = _worker(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(tmp_path / "whole" / "final.safetensors"), load_file(tmp_path / "killed" / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=f"{k} (killed at step {die_at})")
    # killed again, then its newest checkpoint loses its optimizer state: resume goes one checkpoint back
    second = _worker(tmp_path / "again", die_at=17)  # checkpoints 10 and 15 on disk (save_total_limit 2)
    assert second.returncode == -signal.SIGKILL
    (tmp_path / "again" / "checkpoints" / "checkpoint-15" / "optimizer.pt").write_bytes(b"")
    assert last_complete_checkpoint(tmp_path / "again" / "checkpoints").name == "checkpoint-10"
    assert _worker(tmp_path / "again").returncode == 0
    c = load_file(tmp_path / "again" / "final.safetensors")
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=1e-6, rtol=0, msg=k)


def test_compile_layers_finds_the_decoder_inside_a_wrapper_and_a_peft_model():
    """A stage's module often wraps the model (a loss wrapper holding a LoRA ``PeftModel``):
    ``compile_decoder_layers`` finds the first language model inside (not a segmenter's mask decoder
    before it) and compiles its layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from groundlab.shared.lora import apply_lora, linear_names
    from groundlab.shared.training import compile_decoder_layers, uncompile_layers

    class Segmenter(nn.Module):  # a get_decoder() with layers but no output embeddings: not a language model
        def __init__(self):
            super().__init__()
            self.decoder = nn.Module()
            self.decoder.layers = nn.ModuleList([nn.Linear(2, 2)])

        def get_decoder(self):
            return self.decoder

        def get_output_embeddings(self):
            return None

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2))
    wrapper = nn.Module()
    wrapper.segmenter = Segmenter()  # registered first, passed over
    wrapper.llm = apply_lora(llm, linear_names(llm, exclude=r"lm_head$"), r=2, alpha=4, dropout=0.0)
    layers = compile_decoder_layers(wrapper)
    try:
        assert layers == list(llm.model.layers) and all(layer._compiled_call_impl is not None for layer in layers)
    finally:
        uncompile_layers(layers)
    assert all(layer._compiled_call_impl is None for layer in layers)
    with pytest.raises(ValueError, match="get_decoder"):
        compile_decoder_layers(nn.Sequential(Segmenter()))
