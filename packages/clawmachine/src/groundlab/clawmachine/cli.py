"""``groundlab-clawmachine``: train | eval | ground | refer | convert.

    groundlab-clawmachine train --config packages/clawmachine/configs/tiny.yaml [--force] [--key.sub value ...]
    groundlab-clawmachine ground --image X.png "the red circle"     # prints the box, draws it
    groundlab-clawmachine refer --image X.png --box 4,3,14,13        # prints what the region is
    groundlab-clawmachine convert --tokenizer tokenizer.bin --llm llm.bin --out clawmachine.pth

``eval`` runs the same pipeline as ``train``; finished stages are reused, so it only re-scores.
``ground`` / ``refer`` use the newest complete model of ``runs/clawmachine/<run>/`` (or ``--model DIR``);
``ground`` writes the image with the region's cells and box drawn (``--overlay``, default
``<image>_ground.png``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from groundlab.shared.cli import cli_main, package_cli
from groundlab.shared.inputs import check_text, parse_numbers


@cli_main
def main(argv: list[str] | None = None) -> None:
    package_cli("groundlab-clawmachine", "groundlab.clawmachine.train", argv, _add_commands,
                {"ground": ground, "refer": refer, "convert": convert})


def _add_commands(sub) -> None:
    g = sub.add_parser("ground", help="the box of the object an expression names")
    g.add_argument("expression")
    g.add_argument("--image", required=True, type=Path)
    g.add_argument("--overlay", type=Path, default=None, help="where the image with the region drawn goes")
    r = sub.add_parser("refer", help="what the object in a box is")
    r.add_argument("--image", required=True, type=Path)
    r.add_argument("--box", required=True, help="x0,y0,x1,y1 in pixels")
    for p in (g, r):
        p.add_argument("--run", default="tiny")
        p.add_argument("--model", default=None, help="a stage directory with model/ (default: the run's newest)")
    c = sub.add_parser("convert", help="the release's tokenizer and LLM weights in this package's layout")
    c.add_argument("--tokenizer", required=True, type=Path, help="LaVIT's visual tokenizer state dict")
    c.add_argument("--llm", type=Path, default=None, help="a LLaVA-style LLM state dict (.bin / .safetensors)")
    c.add_argument("--out", required=True, type=Path, help="the converted state dict (.pth)")


def ground(args) -> None:
    from groundlab.shared.world_io import load_image

    from .inference import ClawAssistant, draw_box

    check_text(args.expression, "expression")
    image = load_image(args.image)
    overlay = args.overlay or args.image.with_name(f"{args.image.stem}_ground.png")
    if not overlay.parent.is_dir():
        raise FileNotFoundError(f"--overlay {overlay}: the directory {overlay.parent} does not exist")
    claw = ClawAssistant.load(args.model, args.run)
    box, text = claw.ground(image, args.expression)
    draw_box(image, box, claw.last_cells, claw.model.config.grid).save(overlay)
    print("no region generated" if box is None else "box " + ",".join(f"{v:.1f}" for v in box))
    print(f"(overlay: {overlay})", file=sys.stderr)


def refer(args) -> None:
    from groundlab.shared.inputs import check_box
    from groundlab.shared.world_io import load_image

    from .inference import ClawAssistant

    image = load_image(args.image)
    box = check_box(parse_numbers(args.box, 4, f"--box {args.box}"), image.width, image.height, "--box")
    answer = ClawAssistant.load(args.model, args.run).refer(image, box)
    print(answer if answer else "(the model gave an empty answer)")


def convert(args) -> None:
    from .convert import convert_release, save_converted

    state = convert_release(args.tokenizer, args.llm)
    save_converted(state, args.out)
    print(f"{args.out}  ({len(state)} tensors)")


if __name__ == "__main__":
    main(sys.argv[1:])
