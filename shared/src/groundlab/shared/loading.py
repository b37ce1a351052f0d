"""Strict loading: every weight a model expects comes from the file, and every weight in the file has
a place in the model, or the load fails naming the file and the keys.

``transformers``' ``from_pretrained`` and ``torch``'s ``load_state_dict(strict=False)`` only log (or
return) missing and unexpected keys and leave the model partly at its initialisation; a model whose
saved weights do not fit it must not run. Use these instead:

    model = load_pretrained(OMGLlavaForCausalLM, "runs/.../model")
    load_state(model.projector, state, "stage1.pt:projector")          # = strict load_state_dict
    load_partial(model, state, required=trained_keys, what="ivm.pth")  # a subset, but checked
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _few(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def key_report(missing=(), unexpected=(), mismatched=()) -> str:
    """One line naming what does not fit ('' when everything does)."""
    parts = []
    if missing:
        parts.append(f"missing {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected {_few(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches {_few(mismatched)}")
    return "; ".join(parts)


def load_pretrained(cls, path: str | Path, what: str | None = None, **kwargs):
    """``cls.from_pretrained(path, **kwargs)`` that raises when any weight is missing, unexpected or of
    another shape (``ValueError`` naming the directory and the keys), and when ``path`` is not a saved
    model (``FileNotFoundError``). ``cls`` may be a model class or an ``AutoModel*`` class."""
    path = Path(path)
    what = what or getattr(cls, "__name__", "model")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no saved {what} at {path} (config.json missing)")
    from safetensors import SafetensorError

    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:  # corrupt or foreign files
        raise ValueError(f"cannot load {what} from {path}: {err}") from err
    mismatched = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in info.get("mismatched_keys", ())]
    report = key_report(info.get("missing_keys", ()), info.get("unexpected_keys", ()), mismatched)
    errors = list(info.get("error_msgs", ())) + [f"{k}: {v}" for k, v in (info.get("conversion_errors") or {}).items()]
    if report or errors:
        raise ValueError(f"{path}: the saved weights do not fit {what}: {report or '; '.join(errors)}")
    return model


def load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error naming ``what`` and the keys."""
    own = module.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    report = key_report(set(own) - set(state), set(state) - set(own), mismatched)
    if report:
        raise ValueError(f"{what} does not fit {type(module).__name__}: {report}")
    module.load_state_dict(state, strict=True)


def load_partial(module: nn.Module, state: dict[str, torch.Tensor], required, what: str) -> None:
    """Load ``state`` into part of ``module``: every key of ``state`` must be one of the module's (same
    shape) and every key in ``required`` must be in ``state``; the module's other weights keep their
    values. For checkpoints that by design hold only what was trained (a LoRA, a head)."""
    own = module.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    report = key_report(set(required) - set(state), set(state) - set(own), mismatched)
    if report:
        raise ValueError(f"{what} does not fit {type(module).__name__}: {report}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def torch_load(path: str | Path, what: str = "checkpoint", expect: type = dict):
    """``torch.load(path, weights_only=True)`` with errors that name the file; the loaded object must be
    an ``expect`` (a state dict by default; ``torch.Tensor`` for a tensor file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file; all mean "unreadable"
        raise ValueError(f"cannot read {what} {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    if not isinstance(state, expect):
        raise ValueError(f"{what} {path} holds a {type(state).__name__}, not a {expect.__name__}")
    return state
