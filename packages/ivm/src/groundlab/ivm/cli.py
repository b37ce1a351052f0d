"""``groundlab-ivm``: train | eval | mask.

    groundlab-ivm train --config packages/ivm/configs/tiny.yaml [--force] [--key.sub value ...]
    groundlab-ivm mask --image X.jpg --instruction "what colour is the small circle?" [--mode overlay|blur|grayscale|crop]
                       [--threshold 0.8] [--out masked.png] [--run tiny --arm mixed_dwsl | --checkpoint ivm.pth]

``eval`` runs the same pipeline as ``train``; finished stages are reused, so it only re-scores.
``mask`` writes the masked image (and the heatmap as ``<out>.heatmap.png``) with a trained model:
by default the newest complete arm of ``runs/ivm/<run>/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from groundlab.shared.cli import cli_main, package_cli
from groundlab.shared.inputs import check_probability, check_text, existing_file


def _checkpoint(run: str, arm: str, checkpoint: str | None) -> Path:
    from groundlab.shared.runs import require_complete, runs_root

    if checkpoint:
        return existing_file(checkpoint, "--checkpoint")
    return require_complete(runs_root() / "ivm" / run, f"{arm}-*", "run `make train-ivm` first") / "ivm.pth"


ABLATE = ("the DWSL comparison over seeds (default: the config's arms)",
          ("human_only", "mixed_uniform", "mixed_label", "mixed_dwsl", "mixed_oracle", "mixed_clean"))
"""The ``ablate`` command's help and arms (``train.ablation``'s; imported only when it runs)."""


@cli_main
def main(argv: list[str] | None = None) -> None:
    package_cli("groundlab-ivm", "groundlab.ivm.train", argv, _add_commands, {"mask": mask}, ablation=ABLATE)


def _add_commands(sub) -> None:
    from .train import ARMS

    m = sub.add_parser("mask", help="mask an image to what an instruction needs")
    m.add_argument("--image", required=True, type=Path)
    m.add_argument("--instruction", required=True)
    m.add_argument("--mode", default="overlay", choices=("overlay", "blur", "grayscale", "crop"))
    m.add_argument("--threshold", type=float, default=0.8)
    m.add_argument("--out", type=Path, default=None)
    m.add_argument("--run", default="tiny")
    m.add_argument("--arm", default="mixed_dwsl", choices=ARMS)
    m.add_argument("--checkpoint", default=None, help="an IVM checkpoint in the release's layout")
    m.add_argument("--llava", default=None, help="the LLaVA directory the IVM was trained on (default: the run config's)")
    m.add_argument("--sam", default=None, help="the SAM checkpoint the IVM was trained on (default: the run config's)")
    m.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml",
                   help="the run config whose model settings built the checkpoint")


def mask(args) -> None:
    from PIL import Image

    from groundlab.shared.world_io import load_image

    # every input is checked before a model is built (or a base trained)
    check_text(args.instruction, "--instruction")
    check_probability(args.threshold, "--threshold")
    image = np.array(load_image(args.image))
    path = args.out or args.image.with_name(f"{args.image.stem}_ivm_{args.mode}.png")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {path}: the directory {path.parent} does not exist")
    checkpoint = _checkpoint(args.run, args.arm, args.checkpoint)
    for flag, value in (("--llava", args.llava), ("--sam", args.sam)):
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"{flag} {value} does not exist")

    from transformers import AutoProcessor

    from groundlab.shared.bases import ensure_base

    from .checkpoint import load_official
    from .masking import forward_batch
    from .train import RunConfig, build_from_bases

    cfg = RunConfig.from_yaml(args.config)
    llava = Path(args.llava or cfg.model.llava or ensure_base("llava"))
    sam = Path(args.sam or cfg.model.sam or ensure_base("sam"))
    model = load_official(build_from_bases(llava, sam, cfg.model), checkpoint)
    out = forward_batch(model, AutoProcessor.from_pretrained(llava), [image], [args.instruction],
                        threshold=args.threshold, mode=args.mode)
    Image.fromarray(out["images"][0]).save(path)
    heat = (out["heatmaps"][0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(heat, mode="L").save(path.with_suffix(".heatmap.png"))
    box = out["boxes"][0]
    print(f"{path}  (heatmap max {float(out['heatmaps'][0].max()):.3f}; box {box if box else 'none: whole image kept'})")


if __name__ == "__main__":
    main(sys.argv[1:])
