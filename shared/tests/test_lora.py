import pytest
import torch
from torch import nn

from groundlab.shared.lora import (
    apply_lora,
    linear_names,
    load_adapter,
    lora_parameter_count,
    merge_scaled,
    save_adapter,
    trainable_report,
)


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.mlp = nn.Linear(d, d)

    def forward(self, x):
        return self.mlp(torch.relu(self.q_proj(x) + self.v_proj(x)))


class Tiny(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.reward_head = nn.Linear(d, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.reward_head(x)


def _model(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def test_targets_by_suffix_and_regex_and_trainable_report():
    m = apply_lora(_model(), ["q_proj", "v_proj"], r=2, alpha=4, modules_to_save=["reward_head"])
    # 4 adapted Linears x (A: 2x8 + B: 8x2) = 128 LoRA parameters; the head copy is 8 + 1.
    assert lora_parameter_count(m) == 4 * (2 * 8 + 8 * 2)
    rep = trainable_report(m)
    assert rep.trainable == 128 + 9
    assert rep.total == 128 + 9 + 2 * 3 * 72 + 9  # LoRA + head copy + frozen base (incl. original head)
    assert "trainable 137" in str(rep)

    m2 = apply_lora(_model(), r".*layers\.1\.(q_proj|mlp)", r=2, alpha=4)
    names = {n for n, p in m2.named_parameters() if p.requires_grad}
    assert names == {f"base_model.model.layers.1.{mod}.lora_{ab}.default.weight" for mod in ("q_proj", "mlp")
                     for ab in "AB"}


def test_linear_names_and_no_match_raises():
    assert linear_names(_model(), r"layers\.0", exclude="mlp") == ["layers.0.q_proj", "layers.0.v_proj"]
    with pytest.raises(ValueError, match="could not apply LoRA"):
        apply_lora(_model(), ["does_not_exist"], r=2, alpha=4)


def _train_a_bit(m):
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss = m(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x


def test_adapter_save_load_round_trip(tmp_path):
    m = apply_lora(_model(), ["q_proj", "v_proj"], r=2, alpha=4, modules_to_save=["reward_head"])
    x = _train_a_bit(m)
    expected = m(x)
    save_adapter(m, tmp_path / "adapter")
    loaded = load_adapter(_model(), tmp_path / "adapter")
    torch.testing.assert_close(loaded(x), expected)
    # A fresh model with the adapter is not the base model: the adapter carried information.
    assert not torch.allclose(_model()(x), expected)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
        load_adapter(_model(), tmp_path / "adapter")


@pytest.mark.parametrize("tau", [0.25, 1.0])
def test_scaled_merge_is_w_plus_tau_alpha_over_r_BA(tau):
    r, alpha = 2, 6
    m = apply_lora(_model(), ["q_proj"], r=r, alpha=alpha)
    x = _train_a_bit(m)
    base_w = m.base_model.model.layers[0].q_proj.base_layer.weight.detach().clone()
    a = m.base_model.model.layers[0].q_proj.lora_A["default"].weight.detach().clone()
    b = m.base_model.model.layers[0].q_proj.lora_B["default"].weight.detach().clone()
    assert b.abs().sum() > 0  # training moved B away from its zero init
    full_out = m(x)
    merged = merge_scaled(m, tau)
    assert isinstance(merged, Tiny)
    expected = base_w + tau * (alpha / r) * b @ a
    torch.testing.assert_close(merged.layers[0].q_proj.weight, expected)
    if tau == 1.0:
        torch.testing.assert_close(merged(x), full_out)
