"""``groundlab-omg-llava``: train | eval | chat | segment.

    groundlab-omg-llava train --config packages/omg_llava/configs/tiny.yaml [--force] [--key.sub value ...]
    groundlab-omg-llava chat --image X.png --prompt "Could you please give me a detailed description ..."
    groundlab-omg-llava segment --image X.png --prompt "the small red circle" [--out answer.png]
    groundlab-omg-llava convert-seg --checkpoint omg_seg_convl.pth \
        --class-embeddings convnext_large_d_320_CocoPanopticOVDataset.pth --out checkpoints/omg_seg

``eval`` runs the same pipeline as ``train``; finished stages are reused, so it only re-scores.
``chat`` and ``segment`` (which asks the RES question for an expression) print the answer and, when it
has ``[SEG]`` masks, write an overlay PNG next to the image (or at ``--out``) and each mask as
``<out>.mask<i>.png``. The model is the newest complete stage-2 model of ``runs/omg_llava/<run>/``
unless ``--model`` names a directory. ``--region x0,y0,x1,y1`` (a box region, repeatable) and
``--point x,y`` (repeatable) fill the prompt's ``<region>`` / ``<mark>`` placeholders. ``convert-seg``
writes the release's OMG-Seg as an ``OMGSegModel`` directory (see ``convert.load_omg_seg``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from groundlab.shared.config import add_run_commands


def _model_dir(run: str, model: str | None) -> Path:
    from groundlab.shared.runs import check_complete, runs_root

    if model:
        return Path(model)
    found = [d for d in (runs_root() / "omg_llava" / run).glob("stage2-*") if check_complete(d)[0]]
    if not found:
        raise SystemExit(f"no trained model under {runs_root() / 'omg_llava' / run}: run `make train-omg` first")
    return max(found, key=lambda d: d.stat().st_mtime) / "model"


def _numbers(text: str, n: int, what: str) -> list[float]:
    parts = text.split(",")
    if len(parts) != n:
        raise SystemExit(f"{what} needs {n} comma-separated numbers, got {text!r}")
    return [float(p) for p in parts]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="groundlab-omg-llava")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_run_commands(sub)
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
    args, extra = parser.parse_known_args(argv)

    if args.cmd == "convert-seg":
        from .convert import convert_omg_seg_to_dir

        for path in (args.checkpoint, args.class_embeddings):
            if not path.is_file():
                raise SystemExit(f"no such file: {path}")
        convert_omg_seg_to_dir(args.checkpoint, args.class_embeddings, args.out, prefix=args.prefix)
        return

    if args.cmd in ("train", "eval"):
        from groundlab.shared.config import parse_overrides

        from .train import RunConfig, run

        run(RunConfig.from_yaml(args.config, parse_overrides(extra)), force=args.force)
        return
    if extra:
        raise SystemExit(f"unexpected arguments {extra}")
    from PIL import Image

    from groundlab.shared.world_io import load_image

    from .inference import OMGLlavaPipeline, overlay

    image = np.array(load_image(args.image))
    regions = []
    for text in args.region:
        x0, y0, x1, y1 = (int(round(v)) for v in _numbers(text, 4, "--region"))
        m = np.zeros(image.shape[:2], bool)
        m[max(0, y0):y1, max(0, x0):x1] = True
        if not m.any():
            raise SystemExit(f"--region {text} is empty inside the {image.shape[1]}x{image.shape[0]} image")
        regions.append(m)
    points = [tuple(_numbers(t, 2, "--point")) for t in args.point]
    pipe = OMGLlavaPipeline.from_pretrained(_model_dir(args.run, args.model))
    if args.cmd == "segment":
        from .data import RES_PROMPT

        prompt = RES_PROMPT.format(sent=args.prompt)
    else:
        prompt = args.prompt
    answer = pipe(image, prompt, regions=regions, points=points, max_new_tokens=args.max_new_tokens)
    print(answer.text)
    if len(answer.masks):
        out = args.out or args.image.with_name(f"{args.image.stem}_omg.png")
        Image.fromarray(overlay(image, answer.masks)).save(out)
        for i, m in enumerate(answer.masks):
            Image.fromarray((m * 255).astype(np.uint8)).save(out.with_suffix(f".mask{i}.png"))
        print(f"{len(answer.masks)} mask(s): {out}")


if __name__ == "__main__":
    main()
