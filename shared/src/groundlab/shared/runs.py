"""Runs and their outputs (the house convention every package follows).

A run writes into ``runs/<pkg>/<run-name>/``: checkpoints, logs, predictions and ``metrics.json``
(flat keys such as ``"res/cIoU"`` and ``"baseline/whole_image/res/cIoU"``, plus the config and the git
commit that produced them). A finished stage leaves a ``COMPLETE`` marker listing every file it wrote,
with its size and SHA-256; a stage whose marker is missing, malformed, or does not match its files
(one missing, truncated or changed by a single bit) was written half-way or damaged and is rebuilt,
never loaded.
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


def _stage_files(directory: Path, skip: tuple[str, ...]) -> list[str]:
    """Every file under ``directory`` (relative, sorted), leaving out the marker and the top-level
    entries named in ``skip``."""
    out = []
    for p in directory.rglob("*"):
        rel = p.relative_to(directory)
        if p.is_file() and rel.parts[0] not in skip and rel.name not in (MARKER, MARKER + ".tmp"):
            out.append(str(rel))
    return sorted(out)


def mark_complete(directory: str | Path, files: list[str] | None = None,
                  skip: tuple[str, ...] = ("checkpoints",)) -> Path:
    """Record that ``directory`` holds a finished stage: the marker lists every file the stage wrote
    with its size and SHA-256. ``files=None`` (the usual call) lists every file under ``directory``
    except the top-level entries in ``skip`` (Trainer checkpoints, kept only for resuming); an explicit
    list must name files that exist."""
    directory = Path(directory)
    if files is None:
        files = _stage_files(directory, skip)
    if not files:
        raise ValueError(f"cannot mark {directory} complete: it holds no file")
    entries = {}
    for name in files:
        p = directory / name
        if not p.is_file():
            raise FileNotFoundError(f"cannot mark {directory} complete: {name} is missing")
        entries[name] = {"size": p.stat().st_size, "sha256": file_hash(p, length=64)}
    marker = directory / MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=2, sort_keys=True))
    tmp.replace(marker)  # atomic: a marker is either absent or whole
    return marker


def _marker_entries(marker: Path) -> dict[str, dict]:
    """The ``files`` of a marker, validated; ``ValueError`` saying what is wrong otherwise."""
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not a JSON marker ({err})") from err
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files:
        raise ValueError("it lists no files")
    for name, entry in files.items():
        if (not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts
                or not isinstance(entry, dict) or not isinstance(entry.get("size"), int)
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64):
            raise ValueError(f"malformed entry {name!r}: {entry!r}")
    return files


def check_complete(directory: str | Path) -> tuple[bool, str]:
    """``(True, "")`` when the stage finished and every file its marker lists is there with the
    recorded size and SHA-256; otherwise ``(False, why)``. A missing, unreadable or malformed marker
    means "not complete" (the stage is rebuilt), never an error."""
    directory = Path(directory)
    marker = directory / MARKER
    if not marker.is_file():
        return False, f"no {MARKER} marker in {directory} (never finished)"
    try:
        files = _marker_entries(marker)
    except ValueError as err:
        return False, f"unusable marker {marker}: {err}"
    for name, entry in files.items():
        p = directory / name
        if not p.is_file():
            return False, f"{p} is missing"
        if p.stat().st_size != entry["size"]:
            return False, f"{p} has {p.stat().st_size} bytes, the marker recorded {entry['size']}"
    for name, entry in files.items():  # contents last: sizes catch most damage without reading
        if file_hash(directory / name, length=64) != entry["sha256"]:
            return False, f"{directory / name} does not match the SHA-256 its marker recorded"
    return True, ""


def newest_complete(parent: str | Path, pattern: str) -> Path | None:
    """The most recently written complete stage directory under ``parent`` whose name matches the
    glob ``pattern`` (e.g. ``"stage2-*"``), or None."""
    found = [d for d in Path(parent).glob(pattern) if d.is_dir() and check_complete(d)[0]]
    return max(found, key=lambda d: (d / MARKER).stat().st_mtime) if found else None


def require_complete(parent: str | Path, pattern: str, hint: str) -> Path:
    """:func:`newest_complete`, or ``FileNotFoundError`` saying why: nothing there (``hint`` says what
    to run), or every candidate incomplete or damaged: the reason of the newest one that finished (its
    damage), else of the newest attempt (never finished). Ranking finished ones first keeps the
    answer independent of the file system's timestamp resolution."""
    found = newest_complete(parent, pattern)
    if found is not None:
        return found
    candidates = sorted((d for d in Path(parent).glob(pattern) if d.is_dir()),
                        key=lambda d: ((d / MARKER).is_file(), d.stat().st_mtime, d.name))
    if not candidates:
        raise FileNotFoundError(f"nothing trained under {Path(parent) / pattern}: {hint}")
    raise FileNotFoundError(f"no complete {pattern} under {parent} ({check_complete(candidates[-1])[1]}): {hint}")


MODEL_POINTER = "MODEL"
"""A run directory's file naming the stage directory of the run's own model, so that other stages
written beside it (an ablation's arms and seeds) are never taken for it."""


def point_to_model(run_root: str | Path, stage_dir: str | Path) -> None:
    """Record ``stage_dir`` (a stage directory inside ``run_root``) as the run's model."""
    (Path(run_root) / MODEL_POINTER).write_text(Path(stage_dir).name + "\n")


def run_model(run_root: str | Path, pattern: str, hint: str) -> Path:
    """The run's model: the stage directory its :data:`MODEL_POINTER` names (which must verify), else
    :func:`require_complete` of ``pattern`` (runs written before the pointer)."""
    pointer = Path(run_root) / MODEL_POINTER
    if not pointer.is_file():
        return require_complete(run_root, pattern, hint)
    directory = Path(run_root) / pointer.read_text().strip()
    ok, why = check_complete(directory)
    if not ok:
        raise FileNotFoundError(f"{pointer} names {directory}, which is not a finished stage ({why}): {hint}")
    return directory


def run_stage(directory: str | Path, build, force: bool = False, keep: tuple[str, ...] = ("checkpoints",)) -> Path:
    """One cached stage: reuse ``directory`` when its marker verifies, otherwise clear what a half-written
    attempt left (but ``keep``, e.g. the Trainer checkpoints to resume from), call ``build(directory)``
    and mark every file it wrote (``keep`` excepted). Returns ``directory``."""
    directory = Path(directory)
    if not reuse_or_reset(directory, force, keep=keep):
        directory.mkdir(parents=True, exist_ok=True)
        build(directory)
        mark_complete(directory, skip=keep)
    return directory


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
