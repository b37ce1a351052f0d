"""LoRA through peft: apply by module pattern, report what trains, save/load adapters, scaled merge.

The scaled merge is TLDR's (arXiv 2410.04734, Section 5.3) way back from a reward model to a
generator: fold the adapter into the base weights at a fraction ``tau`` of its trained strength,
``W <- W + tau * (alpha / r) * B @ A``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn


def linear_names(model: nn.Module, pattern: str | None = None, exclude: str | None = None) -> list[str]:
    """Full names of ``nn.Linear`` modules whose name matches the regex ``pattern`` (``re.search``)
    and not ``exclude``. Use it to build an explicit target list, e.g. every decoder Linear."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if pattern is not None and not re.search(pattern, name):
            continue
        if exclude is not None and re.search(exclude, name):
            continue
        out.append(name)
    return out


def apply_lora(
    model: nn.Module,
    target_modules: str | list[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
    bias: str = "none",
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters.

    ``target_modules`` is what peft takes: a list of module-name suffixes (``["q_proj", "v_proj"]``)
    or one regex matched against the full module name
    (``r".*language_model.*\\.(q_proj|v_proj)"``). Raises if nothing matches, instead of training
    nothing. Base weights are frozen; LoRA weights and ``modules_to_save`` train.
    """
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        modules_to_save=modules_to_save, bias=bias)
    try:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as err:
        raise ValueError(f"peft could not apply LoRA with target_modules {target_modules!r} to "
                         f"{type(model).__name__}: {err}") from err
    return peft_model


@dataclass
class TrainableReport:
    trainable: int
    total: int
    by_group: dict[str, int]

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [f"trainable {self.trainable:,} / {self.total:,} parameters ({100 * self.fraction:.4f}%)"]
        lines += [f"  {name}: {count:,}" for name, count in sorted(self.by_group.items())]
        return "\n".join(lines)


def trainable_report(model: nn.Module, depth: int = 2) -> TrainableReport:
    """Count trainable parameters, grouped by the first ``depth`` components of their names
    (peft's ``base_model.model.`` prefix is skipped). Shared parameters are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            parts = name.removeprefix("base_model.model.").split(".")
            key = ".".join(parts[:depth])
            groups[key] = groups.get(key, 0) + p.numel()
    return TrainableReport(trainable, total, groups)


def lora_parameter_count(model: nn.Module) -> int:
    """Parameters in LoRA A/B matrices only (what papers quote as 'LoRA parameters')."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n)


def save_adapter(model: PeftModel, path: str | Path) -> Path:
    """Save only the adapter (and ``modules_to_save``) weights, as safetensors."""
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    if not (path / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"peft wrote no adapter_model.safetensors into {path}")
    return path


def load_adapter(base_model: nn.Module, path: str | Path, is_trainable: bool = False) -> PeftModel:
    """Load an adapter saved by :func:`save_adapter` onto a freshly built base model, strictly: every
    adapter weight the config implies must be in the file with its shape, and every weight in the file
    must have a place (peft's own loader only warns about missing keys and ignores unexpected ones)."""
    from peft import PeftConfig
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    from .loading import key_report

    path = Path(path)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"LoRA adapter at {path} is missing {name}")
    try:
        config = PeftConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"unreadable adapter config {path / 'adapter_config.json'}: {err}") from err
    config.inference_mode = not is_trainable
    try:
        saved = load_peft_weights(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for a damaged file
        raise ValueError(f"unreadable adapter weights {path / 'adapter_model.safetensors'}: {err}") from err
    model = get_peft_model(base_model, config)
    expected = get_peft_model_state_dict(model)
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in saved.items()
                  if k in expected and v.shape != expected[k].shape]
    report = key_report(set(expected) - set(saved), set(saved) - set(expected), mismatched)
    if report:
        raise ValueError(f"LoRA adapter {path} does not fit {type(base_model).__name__}: {report}")
    set_peft_model_state_dict(model, saved)
    if not is_trainable:
        model.requires_grad_(False)
        model.eval()
    return model


@torch.no_grad()
def merge_scaled(model: PeftModel, tau: float, adapter_name: str = "default") -> nn.Module:
    """Fold the adapter into the base weights at strength ``tau`` and return the plain base model:
    ``W <- W + tau * (alpha / r) * B @ A`` for every LoRA layer (``tau = 1`` is an ordinary merge).

    ``modules_to_save`` copies are kept as trained (peft's unload does that too).
    """
    touched = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            module.scaling[adapter_name] = module.scaling[adapter_name] * tau
            touched += 1
    if touched == 0:
        raise ValueError(f"model has no LoRA layer with adapter {adapter_name!r}")
    return model.merge_and_unload(adapter_names=[adapter_name])
