"""``groundlab-vp-mllm``: train | eval | ask | convert.

    groundlab-vp-mllm train --config packages/vp_mllm/configs/tiny.yaml [--force] [--key.sub value ...]
    groundlab-vp-mllm ask --image X.png --box 4,3,14,13 [--box ...] "What is <Region 1>?"
    groundlab-vp-mllm ask --image X.png --point 9,8 [--point ...] "What is <Mark 1>?"
    groundlab-vp-mllm ask --image X.png --scribble "3,4;9,12;14,6" --mask region.png "Describe <Region 2>."
    groundlab-vp-mllm convert --shards DIR --out converted.pth

``eval`` runs the same pipeline as ``train``; finished stages are reused, so it only re-scores.
``ask`` answers with the newest complete model of ``runs/vp_mllm/<run>/`` (or ``--model DIR``) and
writes the image with the numbered marks painted on (``--marks``, default ``<image>_marks.png``).
Boxes, scribbles and masks are all box prompts; points are not mixed with them (one prompt type a
sample). ``convert`` takes the SPHINX-V release's prompt-encoder weights out of its two
tensor-parallel shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

from groundlab.shared.cli import cli_main, package_cli
from groundlab.shared.inputs import check_text, parse_numbers


@cli_main
def main(argv: list[str] | None = None) -> None:
    package_cli("groundlab-vp-mllm", "groundlab.vp_mllm.train", argv, _add_commands, {"ask": ask, "convert": convert})


def _add_commands(sub) -> None:
    a = sub.add_parser("ask", help="answer a question about marked regions of an image")
    a.add_argument("question")
    a.add_argument("--image", required=True, type=Path)
    a.add_argument("--box", action="append", default=[], help="x0,y0,x1,y1 in pixels (repeatable)")
    a.add_argument("--point", action="append", default=[], help="x,y in pixels (repeatable)")
    a.add_argument("--scribble", action="append", default=[], help='"x,y;x,y;..." a free-form stroke (its box)')
    a.add_argument("--mask", action="append", default=[], type=Path, help="an image whose non-black pixels are a region")
    a.add_argument("--marks", type=Path, default=None, help="where the image with the marks goes")
    a.add_argument("--run", default="tiny")
    a.add_argument("--model", default=None, help="a stage directory with model/ (default: the run's newest)")
    c = sub.add_parser("convert", help="the SPHINX-V release's prompt encoder weights, from its shards")
    c.add_argument("--shards", required=True, type=Path, help="the directory of consolidated.0{0,1}-of-02.model.pth")
    c.add_argument("--out", required=True, type=Path)


def ask(args) -> None:
    from groundlab.shared.world_io import load_image

    from .inference import VPAssistant, make_prompts, mask_from_file, paint_marks
    from .processing import check_references, encode_prompts

    check_text(args.question, "question")
    image = load_image(args.image)
    points = [parse_numbers(p, 2, f"--point {p}") for p in args.point]
    boxes = [parse_numbers(b, 4, f"--box {b}") for b in args.box]
    scribbles = [[parse_numbers(xy, 2, f"--scribble {s}") for xy in s.split(";") if xy.strip()] for s in args.scribble]
    masks = [mask_from_file(m) for m in args.mask]
    for m, path in zip(masks, args.mask):
        if m.shape != (image.height, image.width):
            raise ValueError(f"--mask {path}: {m.shape[1]}x{m.shape[0]} pixels, the image {image.width}x{image.height}")
    prompts = make_prompts(points, boxes, scribbles, masks)
    marks = args.marks or args.image.with_name(f"{args.image.stem}_marks.png")
    if not marks.parent.is_dir():
        raise FileNotFoundError(f"--marks {marks}: the directory {marks.parent} does not exist")
    # the references and coordinates are checked before a model loads; the slot count by its config
    check_references([{"from": "human", "value": args.question}], prompts, "question")
    encode_prompts(prompts, image.width, image.height, len(prompts), "ask")
    assistant = VPAssistant.load(args.model, args.run)
    assistant.processor.prompt(image, args.question, prompts, where="ask")
    answer = assistant.ask(image, args.question, prompts=prompts)
    paint_marks(image, prompts).save(marks)
    print(answer if answer else "(the model gave an empty answer)")
    print(f"(marks: {marks})", file=sys.stderr)


def convert(args) -> None:
    from .convert import convert_sphinx_v, save_converted

    state = convert_sphinx_v(args.shards)
    save_converted(state, args.out)
    print(f"{args.out}  ({len(state)} tensors)")


if __name__ == "__main__":
    main(sys.argv[1:])
