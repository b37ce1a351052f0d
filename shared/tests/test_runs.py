import json
import os

import pytest

from groundlab.shared.runs import (
    MARKER,
    check_complete,
    content_hash,
    mark_complete,
    newest_complete,
    point_to_model,
    require_complete,
    reuse_or_reset,
    run_model,
    run_stage,
    weights_hash,
)


def test_content_hash_is_stable_and_order_free_for_dicts():
    assert content_hash({"a": 1, "b": [2, 3]}) == content_hash({"b": [2, 3], "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})
    assert len(content_hash("x", length=8)) == 8


def test_weights_hash_follows_the_bytes_not_the_path(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x00" * 10)
    first = weights_hash(model)
    (model / "config.json").write_text('{"changed": true}')  # not a weight file
    assert weights_hash(model) == first
    (model / "model.safetensors").write_bytes(b"\x00" * 9 + b"\x01")  # same size, retrained
    assert weights_hash(model) != first
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_hash(tmp_path)


def test_a_stage_is_reused_only_when_its_marker_matches(tmp_path):
    stage = tmp_path / "stage"
    (stage / "checkpoints").mkdir(parents=True)
    (stage / "out.pt").write_bytes(b"abc")
    assert not reuse_or_reset(stage)  # no marker: half-written, cleared except checkpoints
    assert not (stage / "out.pt").exists() and (stage / "checkpoints").is_dir()
    (stage / "out.pt").write_bytes(b"abc")
    mark_complete(stage, ["out.pt"])
    assert check_complete(stage) == (True, "")
    assert reuse_or_reset(stage)
    (stage / "out.pt").write_bytes(b"abcd")
    ok, why = check_complete(stage)
    assert not ok and "4 bytes" in why
    with pytest.raises(FileNotFoundError, match="missing.pt is missing"):
        mark_complete(stage, ["missing.pt"])


def _stage(tmp_path):
    stage = tmp_path / "stage"
    (stage / "model").mkdir(parents=True)
    (stage / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (stage / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (stage / "model" / "config.json").write_text("{}")
    (stage / "metrics.json").write_text('{"a": 1}')
    (stage / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    mark_complete(stage)
    return stage


def test_the_marker_lists_every_file_but_checkpoints_and_verifies_contents(tmp_path):
    stage = _stage(tmp_path)
    files = json.loads((stage / MARKER).read_text())["files"]
    assert sorted(files) == ["metrics.json", "model/config.json", "model/model.safetensors"]
    assert all(len(e["sha256"]) == 64 for e in files.values())
    assert check_complete(stage) == (True, "")
    # one flipped bit, same size: not complete, and reuse_or_reset rebuilds (checkpoints kept)
    data = bytearray((stage / "model" / "model.safetensors").read_bytes())
    data[100] ^= 1
    (stage / "model" / "model.safetensors").write_bytes(bytes(data))
    ok, why = check_complete(stage)
    assert not ok and "SHA-256" in why and "model.safetensors" in why
    assert not reuse_or_reset(stage)
    assert not (stage / "model").exists() and (stage / "checkpoints" / "checkpoint-2" / "optimizer.pt").is_file()


def test_a_deleted_weight_file_is_not_complete(tmp_path):
    stage = _stage(tmp_path)
    (stage / "model" / "model.safetensors").unlink()
    ok, why = check_complete(stage)
    assert not ok and "model.safetensors is missing" in why


@pytest.mark.parametrize("marker", [
    "", "not json", "[]", '{"files": {}}', '{"files": []}', '{"files": {"metrics.json": 3}}',
    '{"files": {"metrics.json": {"size": 8}}}', '{"files": {"metrics.json": {"size": "8", "sha256": "' + "0" * 64 + '"}}}',
    '{"files": {"../outside": {"size": 1, "sha256": "' + "0" * 64 + '"}}}', "\xff\xfe",
])
def test_a_malformed_marker_means_rebuild_never_a_crash(tmp_path, marker):
    stage = _stage(tmp_path)
    (stage / MARKER).write_bytes(marker.encode("latin-1"))
    ok, why = check_complete(stage)
    assert not ok and MARKER in why
    assert not reuse_or_reset(stage)


def test_run_stage_builds_once_and_newest_complete_finds_it(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        (d / "out.txt").write_text("done")

    first = run_stage(tmp_path / "s-1", build)
    assert run_stage(tmp_path / "s-1", build) == first and len(calls) == 1
    assert (first / MARKER).is_file()

    def fails(d):
        (d / "half.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path / "s-2", fails)
    assert not (tmp_path / "s-2" / MARKER).exists()
    assert newest_complete(tmp_path, "s-*") == first
    assert newest_complete(tmp_path, "nothing-*") is None
    assert require_complete(tmp_path, "s-*", "train it") == first
    with pytest.raises(FileNotFoundError, match="nothing trained under .*nothing-\\*: train it"):
        require_complete(tmp_path, "nothing-*", "train it")
    (first / "out.txt").write_text("changed")
    later = (tmp_path / "s-2").stat().st_mtime + 10  # the unfinished attempt is newer: the damage is still named
    os.utime(tmp_path / "s-2", (later, later))
    with pytest.raises(FileNotFoundError, match="no complete s-\\* under .*(does not match|bytes)"):
        require_complete(tmp_path, "s-*", "train it")
    (first / MARKER).unlink()  # nothing finished: the newest attempt's reason
    with pytest.raises(FileNotFoundError, match="s-2 .*never finished"):
        require_complete(tmp_path, "s-*", "train it")


def test_recipe_stages_are_reused_rebuilt_when_damaged_and_timed(tmp_path, capsys):
    from groundlab.shared.recipe import Recipe, train_key
    from groundlab.shared.training import TrainConfig

    builds = []

    def build(out):
        builds.append(out)
        (out / "weights.txt").write_text(f"build {len(builds)}")

    recipe = Recipe("pkg", "tiny", root=tmp_path)
    a = recipe.stage("stage1", {"lr": 1}, build=build)
    assert a.parent == tmp_path / "pkg" / "tiny" and a.name.startswith("stage1-") and "time/stage1_s" in recipe.metrics
    again = Recipe("pkg", "tiny", root=tmp_path)
    assert again.stage("stage1", {"lr": 1}, build=build) == a and len(builds) == 1 and not again.metrics
    assert again.stage("stage1", {"lr": 2}, build=build) != a and len(builds) == 2  # another key, another stage
    (a / "weights.txt").write_text("damaged")
    assert again.stage("stage1", {"lr": 1}, build=build) == a and (a / "weights.txt").read_text() == "build 3"
    assert len(Recipe("pkg", "tiny", force=True, root=tmp_path).stage("stage1", {"lr": 1}, build=build).name) > 7
    assert len(builds) == 4
    path = again.finish({"k": 1}, table=lambda m: print("table", sorted(m)))
    assert path == tmp_path / "pkg" / "tiny" / "metrics.json" and "table" in capsys.readouterr().out
    cfg = TrainConfig(max_steps=1, batch_size=1, lr=1.0, bf16="auto")
    assert train_key(cfg)["progress_bar"] is None and train_key(cfg)["bf16"] in (True, False)


def test_run_model_follows_the_pointer_not_the_newest_stage(tmp_path):
    def stage(name):
        d = tmp_path / name
        d.mkdir()
        (d / "w.bin").write_bytes(name.encode())
        mark_complete(d)
        return d

    first = stage("stage2-aaaa")
    with pytest.raises(FileNotFoundError, match="nothing trained"):
        run_model(tmp_path / "other", "stage2-*", "train it")
    assert run_model(tmp_path, "stage2-*", "train it") == first  # no pointer: the newest complete stage
    point_to_model(tmp_path, first)
    newer = stage("stage2-bbbb")  # e.g. an ablation's arm, written after the run's own model
    assert newest_complete(tmp_path, "stage2-*") == newer and run_model(tmp_path, "stage2-*", "x") == first
    (first / "w.bin").write_bytes(b"damaged")
    with pytest.raises(FileNotFoundError, match=r"names .*stage2-aaaa, which is not a finished stage .*: retrain"):
        run_model(tmp_path, "stage2-*", "retrain")
