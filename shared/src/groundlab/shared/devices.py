"""Running a model where it lives: the packages build their inputs on the CPU (images, token ids,
prompts, cached features), and a model may sit on a GPU.

``to_device(batch, device)`` moves every tensor inside a batch: tensors, and those inside dicts,
lists, tuples and objects with a ``to(device)`` method (a package's own containers, such as
omg_llava's ``Perception``); anything else comes back as it is. ``model_device(model)`` is where a
model's parameters are. ``pick_device("auto")`` is CUDA when there is one, else the CPU.

The Trainer moves a batch's tensors, dicts, lists and tuples itself but not a package's own objects;
a model whose batches carry such objects moves them in its ``forward``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it on ``device`` (non-blocking copies; the same object where
    nothing moves)."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return type(obj)((k, to_device(v, device)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and not hasattr(obj, "to"):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if callable(getattr(obj, "to", None)) and not isinstance(obj, torch.nn.Module):
        return obj.to(device)
    return obj


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters, or for an
    object that is no module)."""
    for p in getattr(model, "parameters", tuple)():
        return p.device
    return torch.device("cpu")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; any other name as torch reads
    it (``cpu``, ``cuda``, ``cuda:1``). Asking for CUDA where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device here")
    return device
