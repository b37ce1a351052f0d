from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from groundlab.shared.devices import model_device, pick_device, to_device


@dataclass
class Cached:
    features: torch.Tensor
    levels: list
    name: str = "x"


class Holder:
    """An object of a package's own with a ``to``: trusted to move itself."""

    def __init__(self):
        self.moved_to = None

    def to(self, device):
        self.moved_to = device
        return self


Pair = namedtuple("Pair", "a b")


def test_to_device_reaches_every_tensor_of_a_batch_and_leaves_the_rest():
    holder = Holder()
    batch = {"ids": torch.ones(2, dtype=torch.long), "nested": [(torch.zeros(1), "text")],
             "cached": Cached(torch.ones(3), [torch.zeros(2)]), "pair": Pair(torch.ones(1), 3), "own": holder,
             "n": 4, "none": None}
    out = to_device(batch, "meta")
    assert out["ids"].is_meta and out["nested"][0][0].is_meta and out["nested"][0][1] == "text"
    assert isinstance(out["nested"][0], tuple) and isinstance(out["pair"], Pair) and out["pair"].b == 3
    assert out["pair"].a.is_meta and out["cached"].features.is_meta and out["cached"].levels[0].is_meta
    assert out["cached"].name == "x" and out["n"] == 4 and out["none"] is None
    assert out["own"] is holder and holder.moved_to == "meta"
    assert not batch["ids"].is_meta and not batch["cached"].features.is_meta  # the input is not changed


def test_a_module_inside_a_batch_is_not_moved():
    layer = torch.nn.Linear(2, 2)
    assert to_device({"m": layer}, "meta")["m"] is layer and model_device(layer).type == "cpu"


def test_model_device_and_pick_device():
    with torch.device("meta"):
        layer = torch.nn.Linear(2, 2)
    assert model_device(layer).type == "meta"
    assert model_device(torch.nn.ReLU()).type == "cpu" and model_device(object()).type == "cpu"
    assert pick_device("cpu").type == "cpu"
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda")
