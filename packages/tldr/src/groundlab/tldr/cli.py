"""``groundlab-tldr``: train | eval | ablate | score | score-jsonl.

    groundlab-tldr train --config packages/tldr/configs/tiny.yaml [--force] [--key.sub value ...]
    groundlab-tldr ablate --config packages/tldr/configs/tiny.yaml [--seeds 0 1 2] [--arms ARM ...] [--force]
    groundlab-tldr score --image X.jpg --text "a small red circle." [--prompt "caption en"] [--html out.html]
    groundlab-tldr score-jsonl --input in.jsonl --image-root DIR --out scored.jsonl

``eval`` runs the same pipeline as ``train``; finished stages are reused, so it only re-scores.
``score`` uses the newest complete TLDR model under ``runs/tldr/<name>/`` (or ``--model DIR``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from groundlab.shared.cli import cli_main, package_cli
from groundlab.shared.inputs import check_text


def _find_model(name: str, model: str | None) -> Path:
    from groundlab.shared.runs import run_model, runs_root

    if model:
        if not (Path(model) / "model.json").is_file():
            raise FileNotFoundError(f"--model {model}: no TLDR model there (model.json missing)")
        return Path(model)
    # the run's own model (the ablation's seeds and arms sit beside it)
    model_dir = run_model(runs_root() / "tldr" / name, "tldr-*", "run `make train-tldr` first")
    if not (model_dir / "model.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a TLDR model (model.json missing); run `make train-tldr` again")
    return model_dir


def _load(model_dir: Path):
    from transformers import AutoProcessor

    from groundlab.shared.config import read_json
    from groundlab.shared.lora import load_adapter

    from .modeling import TldrRewardModel
    from .processing import layout_for

    info = read_json(model_dir / "model.json", "TLDR model description")
    if not isinstance(info, dict) or not isinstance(info.get("backbone"), str):
        raise ValueError(f"{model_dir / 'model.json'}: expected {{\"backbone\": <directory>, ...}}")
    backbone = Path(info["backbone"])  # the backbone it was trained on
    cfg = read_json(model_dir / "adapter" / "adapter_config.json", "adapter config")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"{model_dir / 'adapter' / 'adapter_config.json'}: '{key}' must be an integer")
    model = load_adapter(TldrRewardModel.from_backbone(str(backbone), lora_r=cfg["r"], lora_alpha=cfg["lora_alpha"]),
                         model_dir / "adapter")
    processor = AutoProcessor.from_pretrained(backbone)
    return model, processor, layout_for(processor)


ABLATE = ("Table 2 (where the LoRA goes) and the naive RM, over seeds",
          ("projector_decoder", "naive", "projector", "decoder"))
"""The ``ablate`` command's help and arms (``train.ablation``'s; imported only when it runs)."""


@cli_main
def main(argv: list[str] | None = None) -> None:
    package_cli("groundlab-tldr", "groundlab.tldr.train", argv, _add_commands,
                {"score": score, "score-jsonl": score},
                ablation=ABLATE)


def _add_commands(sub) -> None:
    s = sub.add_parser("score", help="per-token probabilities of one response, flagged tokens highlighted")
    s.add_argument("--image", required=True, type=Path)
    s.add_argument("--text", required=True)
    s.add_argument("--prompt", default="caption en")
    s.add_argument("--run", default="tiny")
    s.add_argument("--model", default=None)
    s.add_argument("--html", type=Path, default=None)
    b = sub.add_parser("score-jsonl", help='score {"image", "prompt", "response"} lines')
    b.add_argument("--input", required=True, type=Path)
    b.add_argument("--image-root", required=True, type=Path)
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--run", default="tiny")
    b.add_argument("--model", default=None)


def score(args) -> None:
    """``score`` (one response) and ``score-jsonl`` (a file of them)."""
    from groundlab.shared.config import iter_jsonl
    from groundlab.shared.world_io import load_image

    from .downstream import highlight_html, highlight_terminal, score_texts

    # every input is read and checked before the model is loaded
    if args.cmd == "score":
        check_text(args.text, "--text")
        check_text(args.prompt, "--prompt")
        images = [np.array(load_image(args.image))]
        rows = [{"prompt": args.prompt, "response": args.text}]
        if args.html and not args.html.parent.is_dir():
            raise FileNotFoundError(f"--html {args.html}: the directory {args.html.parent} does not exist")
    else:
        if not args.image_root.is_dir():
            raise FileNotFoundError(f"--image-root {args.image_root} is not a directory")
        rows = []
        for n, rec in iter_jsonl(args.input, "--input"):
            missing = {"image", "prompt", "response"} - set(rec)
            if missing:
                raise ValueError(f"{args.input}:{n}: missing keys {sorted(missing)}")
            for key in ("image", "prompt", "response"):
                if not isinstance(rec[key], str) or not rec[key].strip():
                    raise ValueError(f"{args.input}:{n}: '{key}' must be a non-empty string")
            rows.append(rec)
        if not rows:
            raise ValueError(f"{args.input}: no records")
        images = [np.array(load_image(args.image_root / r["image"])) for r in rows]

    model, processor, layout = _load(_find_model(args.run, args.model))
    scored = score_texts(model, processor, layout, images, [r["prompt"] for r in rows], [r["response"] for r in rows])
    if args.cmd == "score":
        [(tokens, probs)] = scored
        for t, p in zip(tokens, probs):
            print(f"{p:.3f}  {t!r}{'   <- flagged' if p <= 0.5 else ''}")
        print(highlight_terminal(tokens, probs))
        if args.html:
            args.html.write_text(highlight_html(tokens, probs))
            print(args.html)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r, (tokens, probs) in zip(rows, scored):
            f.write(json.dumps({**r, "tokens": tokens, "probs": probs,
                                "flagged": [t for t, p in zip(tokens, probs) if p <= 0.5]}) + "\n")
    print(args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
