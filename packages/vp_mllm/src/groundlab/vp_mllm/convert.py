"""The SPHINX-V release's visual-prompt weights, out of its tensor-parallel checkpoint.

The release (LLaMA2-Accessory) is two files, ``consolidated.00-of-02.model.pth`` and
``consolidated.01-of-02.model.pth``, each ``{"model": {"llma.<name>": tensor}}``: the LLaMA blocks
split across the two (column- / row-parallel), everything else replicated. The visual prompt side
is replicated: the prompt encoder (``vp_encoder.*``), its projection (``vp_proj.0`` Linear,
``vp_proj.1`` LayerNorm), the ``start_vp`` / ``end_vp`` tags and the image view tags ``start_img`` /
``end_img``. :func:`convert_sphinx_v` takes those, checks that both shards agree on every one, and
gives them under this package's names (the same names, without ``llma.``), which
:func:`load_converted` loads into a :class:`VPMLLMForConditionalGeneration` with every shape checked.
The release's vision ensemble and LLaMA-2 are not converted (this package's models take an HF LLaVA).
"""

from __future__ import annotations

from pathlib import Path

import torch

from groundlab.shared.loading import torch_load

SHARDS = ("consolidated.00-of-02.model.pth", "consolidated.01-of-02.model.pth")
PREFIX = "llma."
ENCODER_KEYS = (
    "vp_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "vp_encoder.point_embeddings.0.weight", "vp_encoder.point_embeddings.1.weight",
    "vp_encoder.box_embeddings.0.weight", "vp_encoder.box_embeddings.1.weight",
    "vp_encoder.box_embeddings.2.weight", "vp_encoder.box_embeddings.3.weight",
    "vp_encoder.up.weight", "vp_encoder.up.bias",
    "vp_proj.0.weight", "vp_proj.0.bias", "vp_proj.1.weight", "vp_proj.1.bias",
    "start_vp", "end_vp",
)
VIEW_KEYS = ("start_img", "end_img")


def _shard(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch_load(path, "SPHINX-V shard")
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected {{'model': state_dict}}, got {type(state).__name__}")
    return state


def convert_sphinx_v(shards: str | Path, views: bool = True) -> dict[str, torch.Tensor]:
    """The prompt encoder, ``vp_proj`` and the tags (and the view tags with ``views``) of the release
    in ``shards`` (a directory of the two files). Missing files or keys, and shards that disagree, are
    errors."""
    shards = Path(shards)
    paths = [shards / name for name in SHARDS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"SPHINX-V shards not found: {missing} (expected {SHARDS} in {shards})")
    states = [_shard(p) for p in paths]
    out = {}
    for key in ENCODER_KEYS + (VIEW_KEYS if views else ()):
        full = PREFIX + key
        for path, state in zip(paths, states):
            if full not in state:
                raise KeyError(f"{path}: no {full} (not a SPHINX-V checkpoint?)")
        first, second = states[0][full], states[1][full]
        if first.shape != second.shape or not torch.equal(first, second):
            raise ValueError(f"{full}: the two shards differ (a replicated tensor should be the same in both)")
        out[key] = first.clone()
    return out


def load_converted(model, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`convert_sphinx_v`'s tensors into ``model`` (every key must exist in the model with the
    same shape; the model's other weights are left as they are)."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise KeyError(f"the model has no {key} (a multi-view model has start_img / end_img; "
                           f"convert with views=False for a single-view one)")
        if own[key].shape != value.shape:
            raise ValueError(f"{key}: the checkpoint's {tuple(value.shape)} vs the model's {tuple(own[key].shape)} "
                             f"(build the model with the release's sizes: vp_config.embed_dim 256, the LLM's width)")
    own.update({k: v.to(own[k].dtype) for k, v in state.items()})
    model.load_state_dict(own)


def save_converted(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the directory {path.parent} does not exist")
    torch.save(state, path)
    return path
