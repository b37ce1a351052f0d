"""Runs and their outputs (the house convention every package follows).

A run writes into ``runs/<pkg>/<run-name>/``: checkpoints, logs, predictions and ``metrics.json``
(flat keys such as ``"res/cIoU"`` and ``"baseline/whole_image/res/cIoU"``, plus the config and the git
commit that produced them). A finished stage leaves a ``COMPLETE`` marker listing the files it wrote,
with their sizes; a stage whose marker is missing or whose files do not match it was written half-way
and is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger("groundlab")

MARKER = "COMPLETE"


def runs_root() -> Path:
    """``$GROUNDLAB_RUNS`` or ``./runs``."""
    return Path(os.environ.get("GROUNDLAB_RUNS", "runs"))


def content_hash(*parts: object, length: int = 12) -> str:
    """A short stable hash of JSON-able parts (configs, world keys, versions)."""
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_hash(path: str | Path, length: int = 12) -> str:
    """A short hash of a file's bytes: keys a stage on the weights it starts from, not on their path
    (a rebuilt upstream stage keeps its directory but changes its weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def weights_hash(model_dir: str | Path) -> str:
    """``file_hash`` over a saved model directory's weight files (``*.safetensors``, ``*.bin``)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    return content_hash([(f.name, file_hash(f)) for f in files])


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def write_metrics(path: str | Path, metrics: dict[str, float], config: dict | None = None) -> Path:
    """Write ``metrics.json``: the flat metrics plus ``config`` and ``git_commit``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(metrics)
    payload["config"] = config or {}
    payload["git_commit"] = git_commit()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=repr))
    tmp.replace(path)
    return path


def mark_complete(directory: str | Path, files: list[str]) -> Path:
    """Record that ``directory`` holds a finished stage made of ``files`` (relative paths)."""
    directory = Path(directory)
    sizes = {}
    for name in files:
        p = directory / name
        if not p.is_file():
            raise FileNotFoundError(f"cannot mark {directory} complete: {name} is missing")
        sizes[name] = p.stat().st_size
    marker = directory / MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": sizes}, indent=2, sort_keys=True))
    tmp.replace(marker)  # atomic: a marker is either absent or whole
    return marker


def check_complete(directory: str | Path) -> tuple[bool, str]:
    """``(True, "")`` when the stage finished and every file it listed is there with its size;
    otherwise ``(False, why)``."""
    directory = Path(directory)
    marker = directory / MARKER
    if not marker.is_file():
        return False, f"no {MARKER} marker in {directory} (never finished)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        return False, f"unreadable marker {marker}: {err}"
    for name, size in files.items():
        p = directory / name
        if not p.is_file():
            return False, f"{p} is missing"
        if p.stat().st_size != size:
            return False, f"{p} has {p.stat().st_size} bytes, the marker recorded {size}"
    return True, ""


def invalidate(directory: str | Path, keep: tuple[str, ...] = ()) -> None:
    """Remove a stage's outputs (and its marker) except the entries named in ``keep``."""
    directory = Path(directory)
    if not directory.exists():
        return
    for entry in directory.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def reuse_or_reset(directory: str | Path, force: bool = False, keep: tuple[str, ...] = ("checkpoints",)) -> bool:
    """True when ``directory`` holds a finished stage to reuse. Otherwise clears what a half-written
    attempt left (except ``keep``: checkpoints to resume from, unless ``force``) and returns False."""
    ok, why = check_complete(directory)
    if ok and not force:
        logger.info("reusing %s", directory)
        return True
    if Path(directory).exists():
        logger.info("(re)building %s: %s", directory, "forced" if force else why)
        invalidate(directory, keep=() if force else keep)
    return False
