"""``groundlab-tldr``: train | eval | score | score-jsonl.

    groundlab-tldr train --config packages/tldr/configs/tiny.yaml [--force] [--key.sub value ...]
    groundlab-tldr score --image X.jpg --text "a small red circle." [--prompt "caption en"] [--html out.html]
    groundlab-tldr score-jsonl --input in.jsonl --image-root DIR --out scored.jsonl

``eval`` runs the same pipeline as ``train``; finished stages are reused, so it only re-scores.
``score`` uses the newest complete TLDR model under ``runs/tldr/<name>/`` (or ``--model DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from groundlab.shared.config import add_run_commands


def _find_model(name: str, model: str | None) -> Path:
    from groundlab.shared.runs import check_complete, runs_root

    if model:
        return Path(model)
    candidates = [d for d in (runs_root() / "tldr" / name).glob("tldr-*") if check_complete(d)[0]]
    if not candidates:
        raise SystemExit(f"no trained TLDR model under {runs_root() / 'tldr' / name}: run `make train-tldr` first")
    return max(candidates, key=lambda d: d.stat().st_mtime)


def _load(model_dir: Path):
    from transformers import AutoProcessor

    from groundlab.shared.lora import load_adapter

    from .data import layout_for
    from .modeling import TldrRewardModel

    info = json.loads((model_dir / "model.json").read_text())  # the backbone it was trained on
    pali = info["backbone"]
    processor = AutoProcessor.from_pretrained(pali)
    cfg = json.loads((model_dir / "adapter" / "adapter_config.json").read_text())
    model = load_adapter(TldrRewardModel.from_backbone(str(pali), lora_r=cfg["r"], lora_alpha=cfg["lora_alpha"]),
                         model_dir / "adapter")
    return model, processor, layout_for(processor)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="groundlab-tldr")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_run_commands(sub)
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
    args, extra = parser.parse_known_args(argv)

    if args.cmd in ("train", "eval"):
        from groundlab.shared.config import parse_overrides

        from .train import RunConfig, run

        run(RunConfig.from_yaml(args.config, parse_overrides(extra)), force=args.force)
        return
    if extra:
        parser.error(f"unrecognized arguments: {extra}")
    from groundlab.shared.world_io import load_image

    from .downstream import highlight_html, highlight_terminal, score_texts

    model, processor, layout = _load(_find_model(args.run, args.model))
    if args.cmd == "score":
        image = np.array(load_image(args.image))
        [(tokens, probs)] = score_texts(model, processor, layout, [image], [args.prompt], [args.text])
        for t, p in zip(tokens, probs):
            print(f"{p:.3f}  {t!r}{'   <- flagged' if p <= 0.5 else ''}")
        print(highlight_terminal(tokens, probs))
        if args.html:
            args.html.write_text(highlight_html(tokens, probs))
            print(args.html)
        return
    rows = []
    with open(args.input) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = {"image", "prompt", "response"} - set(rec)
            if missing:
                raise SystemExit(f"{args.input}:{n}: missing keys {sorted(missing)}")
            rows.append(rec)
    images = [np.array(load_image(args.image_root / r["image"])) for r in rows]
    scored = score_texts(model, processor, layout, images, [r["prompt"] for r in rows], [r["response"] for r in rows])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r, (tokens, probs) in zip(rows, scored):
            f.write(json.dumps({**r, "tokens": tokens, "probs": probs,
                                "flagged": [t for t, p in zip(tokens, probs) if p <= 0.5]}) + "\n")
    print(args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
