import torch
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
    (tmp_path / "checkpoint-6" / "optimizer.pt").unlink()  # a checkpoint written half-way is skipped
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-3"
