"""What every package's command line shares: the ``train`` / ``eval`` sub-commands and the rule that
bad input ends in one clear line on stderr and a non-zero exit, never a traceback.

    @cli_main
    def main(argv=None):
        return package_cli("groundlab-ivm", "groundlab.ivm.train", argv, add_commands, {"mask": mask})

``package_cli`` builds the parser (``train`` / ``eval`` from the recipe module's ``RunConfig`` and
``run``, then the package's own commands), dispatches, and refuses arguments a command does not take.
``eval --predictions FILE`` scores a predictions file (the run's, or any model's in its format) with
the recipe module's ``score_predictions(cfg, path)`` and prints the scores, running no model.

``cli_main`` turns an exception escaping ``main`` into ``error: <message>`` and exit status 2 (130 on
Ctrl-C). ``GROUNDLAB_DEBUG=1`` re-raises instead, for the full traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .config import parse_overrides

EXIT_BAD_INPUT = 2


def error_line(err: BaseException) -> str:
    """One line for an exception: its message (first line), prefixed with the type unless it is one of
    the input errors whose messages already say what is wrong."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, FileNotFoundError) and not text:
        text = f"file not found: {err.filename}"
    if isinstance(err, (ValueError, FileNotFoundError)) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def cli_main(fn):
    """Decorate a CLI's ``main(argv)``: one ``error:`` line and exit 2 for anything it raises."""

    @functools.wraps(fn)
    def wrapper(argv: list[str] | None = None):
        try:
            return fn(argv)
        except SystemExit:
            raise
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as err:  # noqa: BLE001 - the point: no traceback reaches the user
            if os.environ.get("GROUNDLAB_DEBUG"):
                raise
            print(f"error: {error_line(err)}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one ``error:`` line too (exit 2)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def add_run_commands(subparsers) -> None:
    """The ``train`` and ``eval`` sub-commands every package CLI has: ``--config`` and ``--force``,
    then ``--section.key value`` overrides."""
    for name in ("train", "eval"):
        p = subparsers.add_parser(name, help=f"{name} the run a config describes (finished stages are reused)",
                                  epilog="then --<section>.<key> value overrides of the config's fields (values read "
                                         "as YAML), e.g. --name my_run")
        p.add_argument("--config", required=True, type=Path)
        p.add_argument("--force", action="store_true", help="recompute every stage")
        if name == "eval":
            p.add_argument("--predictions", type=Path, default=None,
                           help="score this predictions file against the run's held-out data instead (no model runs)")


def run_command(recipe, args, extra: list[str]):
    """``train`` / ``eval``: the run config from ``--config`` and the overrides, then the run, or
    (``eval --predictions FILE``) the scores of the file, printed one per line."""
    cfg = recipe.RunConfig.from_yaml(args.config, parse_overrides(extra))
    predictions = getattr(args, "predictions", None)
    if predictions is None:
        return recipe.run(cfg, force=args.force)
    if not predictions.is_file():
        raise FileNotFoundError(f"--predictions {predictions}: no such file")
    scores = recipe.score_predictions(cfg, predictions)
    width = max(map(len, scores), default=0)
    for key, value in scores.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return scores


def add_ablate_command(subparsers, help_text: str, arms: tuple[str, ...]) -> None:
    """``ablate --config FILE [--seeds ...] [--arms ...] [--force]``, then ``--section.key value``
    overrides (an ablation's own schedule): a paper's ablation table over seeds."""
    a = subparsers.add_parser("ablate", help=help_text,
                              epilog="then --<section>.<key> value overrides of the config's fields, as for train: "
                                     "the ablation's own schedule")
    a.add_argument("--config", required=True, type=Path)
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                   help=f"a subset of {', '.join(arms)} (default: the package's own set)")
    a.add_argument("--force", action="store_true")


def ablate_command(recipe, args: argparse.Namespace, extra: list[str] = ()):
    """The recipe module's ``ablation(cfg, seeds, arms=..., force=...)`` on ``--config`` and the
    overrides in ``extra``."""
    overrides = parse_overrides(list(extra))
    if not args.config.is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file")
    return recipe.ablation(recipe.RunConfig.from_yaml(args.config, overrides), tuple(args.seeds),
                           arms=tuple(args.arms) if args.arms else None, force=args.force)


def package_cli(prog: str, recipe_module: str, argv: list[str] | None,
                add_commands: Callable[[argparse._SubParsersAction], None],
                commands: dict[str, Callable[[argparse.Namespace], object]],
                ablation: tuple[str, tuple[str, ...]] | None = None):
    """A package's command line: ``train`` / ``eval`` (``recipe_module``'s ``RunConfig`` and ``run``,
    imported only when called), ``ablate`` when ``ablation`` = (its help, the arms) is given (the
    module's ``ablation``), and the package's own ``commands``, whose parsers ``add_commands`` adds;
    every command but ``train`` / ``eval`` / ``ablate`` (which read them as overrides) refuses unknown arguments."""
    parser = ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_run_commands(sub)
    if ablation is not None:
        add_ablate_command(sub, *ablation)
    add_commands(sub)
    args, extra = parser.parse_known_args(argv)
    if args.cmd in ("train", "eval"):
        return run_command(importlib.import_module(recipe_module), args, extra)
    if args.cmd == "ablate":
        return ablate_command(importlib.import_module(recipe_module), args, extra)
    if extra:
        raise ValueError(f"unexpected arguments {extra}")
    return commands[args.cmd](args)
