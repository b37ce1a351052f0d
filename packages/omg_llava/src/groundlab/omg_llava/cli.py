"""``groundlab-omg-llava``: train | eval | ablate | chat | segment | convert-seg.

    groundlab-omg-llava train --config packages/omg_llava/configs/tiny.yaml [--force] [--key.sub value ...]
    groundlab-omg-llava ablate --config packages/omg_llava/configs/tiny.yaml [--seeds 0 1 2] [--arms ARM ...]
        [--key.sub value ...]
    groundlab-omg-llava chat --image X.png --prompt "Could you please give me a detailed description ..."
    groundlab-omg-llava segment --image X.png --prompt "the small red circle" [--out answer.png]
    groundlab-omg-llava convert-seg --checkpoint omg_seg_convl.pth \
        --class-embeddings convnext_large_d_320_CocoPanopticOVDataset.pth --out checkpoints/omg_seg

``eval`` runs the same pipeline as ``train``; finished stages are reused, so it only re-scores.
``ablate`` is the paper's Table 5 over seeds (``train.ablation``: the full model, no perception prior,
no object-centric tokens; stages 1-2 reseeded on the run's data and frozen segmenter; scored on RES and
GCG, the tasks of the paper's table).
``chat`` and ``segment`` (which asks the RES question for an expression) print the answer and, when it
has ``[SEG]`` masks, write an overlay PNG next to the image (or at ``--out``) and each mask as
``<out>.mask<i>.png``. The model is the run's own stage-2 model (the one its ``MODEL`` file names;
for runs written before that file, the newest complete stage 2 of ``runs/omg_llava/<run>/``) unless
``--model`` names a directory. ``--region x0,y0,x1,y1`` (a box region, repeatable) and
``--point x,y`` (repeatable) fill the prompt's ``<region>`` / ``<mark>`` placeholders. ``convert-seg``
writes the release's OMG-Seg as an ``OMGSegModel`` directory (see ``convert.load_omg_seg``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from groundlab.shared.cli import cli_main, package_cli
from groundlab.shared.inputs import check_box, check_point, check_text, parse_numbers


def _model_dir(run: str, model: str | None) -> Path:
    from groundlab.shared.runs import run_model, runs_root

    if model:
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"--model {model}: no saved OMG-LLaVA there (config.json missing)")
        return Path(model)
    # the run's own model (an ablation's arms and seeds sit beside it)
    return run_model(runs_root() / "omg_llava" / run, "stage2-*", "run `make train-omg` first") / "model"


def box_mask(box: tuple[float, float, float, float], shape: tuple[int, int]) -> np.ndarray:
    """The (H, W) mask of the pixels a checked (x0, y0, x1, y1) box covers."""
    x0, y0, x1, y1 = box
    m = np.zeros(shape, bool)
    m[math.floor(y0):math.ceil(y1), math.floor(x0):math.ceil(x1)] = True
    return m


ABLATE = ("the paper's Table 5 (perception prior, object-centric tokens) over seeds",
          ("full", "no_prior", "no_object_tokens"))
"""The ``ablate`` command's help and arms (``train.ablation``'s; imported only when it runs)."""


@cli_main
def main(argv: list[str] | None = None) -> None:
    package_cli("groundlab-omg-llava", "groundlab.omg_llava.train", argv, _add_commands,
                {"chat": chat, "segment": chat, "convert-seg": convert_seg},
                ablation=ABLATE)


def _add_commands(sub) -> None:
    for name, help_text in (("chat", "answer a prompt about an image"),
                            ("segment", "segment what an expression refers to")):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--image", required=True, type=Path)
        c.add_argument("--prompt", required=True)
        c.add_argument("--out", type=Path, default=None, help="overlay PNG (default: next to the image)")
        c.add_argument("--run", default="tiny")
        c.add_argument("--model", default=None, help="an OMG-LLaVA directory (save_pretrained + tokenizer)")
        c.add_argument("--region", action="append", default=[], help="x0,y0,x1,y1 box region for a <region>")
        c.add_argument("--point", action="append", default=[], help="x,y for a <mark>")
        c.add_argument("--max-new-tokens", type=int, default=64)
    c = sub.add_parser("convert-seg", help="the release's OMG-Seg checkpoint -> an OMGSegModel directory")
    c.add_argument("--checkpoint", required=True, type=Path, help="omg_seg_convl.pth (mmdet state_dict)")
    c.add_argument("--class-embeddings", required=True, type=Path, help="the CLIP text embeddings of the classes")
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--prefix", default="", help="a prefix of every checkpoint key to strip, e.g. visual_encoder.")


def convert_seg(args) -> None:
    from .convert import convert_omg_seg_to_dir

    for path in (args.checkpoint, args.class_embeddings):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    convert_omg_seg_to_dir(args.checkpoint, args.class_embeddings, args.out, prefix=args.prefix)


def chat(args) -> None:
    """``chat`` (a prompt) and ``segment`` (the RES question for an expression)."""
    from PIL import Image

    from groundlab.shared.world_io import load_image

    from .processing import MARK, REGION, RES_PROMPT

    # every input is checked before the model is loaded
    check_text(args.prompt, "--prompt")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prompt = RES_PROMPT.format(sent=args.prompt.strip()) if args.cmd == "segment" else args.prompt
    for token, given, flag in ((REGION, args.region, "--region"), (MARK, args.point, "--point")):
        if prompt.count(token) != len(given):
            raise ValueError(f"the prompt has {prompt.count(token)} {token} placeholder(s) but {len(given)} {flag} "
                             f"value(s) were given")
    image = np.array(load_image(args.image))
    h, w = image.shape[:2]
    regions = [box_mask(check_box(parse_numbers(t, 4, f"--region {t}"), w, h, f"--region {t}"), (h, w))
               for t in args.region]
    points = [check_point(parse_numbers(t, 2, f"--point {t}"), w, h, f"--point {t}") for t in args.point]
    out = args.out or args.image.with_name(f"{args.image.stem}_omg.png")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the directory {out.parent} does not exist")

    from .inference import OMGLlavaPipeline, overlay

    pipe = OMGLlavaPipeline.from_pretrained(_model_dir(args.run, args.model))
    answer = pipe(image, prompt, regions=regions, points=points, max_new_tokens=args.max_new_tokens)
    print(answer.text)
    if len(answer.masks):
        Image.fromarray(overlay(image, answer.masks)).save(out)
        for i, m in enumerate(answer.masks):
            Image.fromarray((m * 255).astype(np.uint8)).save(out.with_suffix(f".mask{i}.png"))
        print(f"{len(answer.masks)} mask(s): {out}")


if __name__ == "__main__":
    main()
