"""The shape of every package's run: a recipe of named, cached stages.

A package's ``train.run(cfg, force)`` reads as its paper's pipeline, one named stage after another::

    run = Recipe("tldr", cfg.name, force)                    # runs/tldr/<name>/
    data = run.stage("data", asdict(cfg.data), build=export)  # runs/tldr/<name>/data-<hash>/
    model = run.stage("tldr", ..., build=train_reward_model)
    ...
    return run.finish(cfg.to_dict(), print_table)            # metrics.json + the printed tables

A stage's directory is named by its key (everything that decides its outputs: configs, the
directories or weights it starts from); a second run with the same key reuses it when its
``COMPLETE`` marker verifies, a half-written one is cleared (but its Trainer ``checkpoints/``, so
training resumes) and rebuilt, and ``force`` rebuilds everything. The build's wall time lands in the
run's metrics as ``time/<stage>_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .runs import content_hash, mark_complete, reuse_or_reset, runs_root, write_metrics
from .training import TrainConfig, resolve_bf16


def train_key(cfg: TrainConfig) -> dict:
    """The part of a stage's key that its optimisation settings give: every field but the progress
    bar, ``packed`` (the same function computed without padding) and ``compile_layers`` (the same
    function compiled), with ``bf16: auto`` resolved to what this machine runs (a bf16 run is not an
    fp32 run)."""
    key = asdict(cfg) | {"progress_bar": None, "bf16": resolve_bf16(cfg.bf16)}
    del key["packed"], key["compile_layers"]
    return key


class Recipe:
    """One run of a package: its directory ``runs/<package>/<name>/``, its stages and its metrics."""

    def __init__(self, package: str, name: str, force: bool = False, root: Path | None = None):
        self.root = (root or runs_root()) / package / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.force = force
        self.metrics: dict[str, float] = {}
        self.started = time.time()

    def stage_dir(self, name: str, *key) -> Path:
        """Where the stage ``name`` with this key lives (``<name>-<hash of key>``)."""
        return self.root / f"{name}-{content_hash(*key)}"

    def stage(self, name: str, *key, build: Callable[[Path], object],
              keep: tuple[str, ...] = ("checkpoints",)) -> Path:
        """The stage's directory, built by ``build(directory)`` unless a complete one is there."""
        directory = self.stage_dir(name, *key)
        if reuse_or_reset(directory, self.force, keep=keep):
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        build(directory)
        self.metrics[f"time/{name}_s"] = time.time() - t0
        mark_complete(directory, skip=keep)
        return directory

    def finish(self, config: dict, table: Callable[[dict], None] | None = None) -> Path:
        """Write ``metrics.json`` (with the total time and the config), print the tables and the path."""
        self.metrics["time/total_s"] = time.time() - self.started
        path = write_metrics(self.root / "metrics.json", self.metrics, config=config)
        if table is not None:
            table(self.metrics)
        print(path)
        return path
