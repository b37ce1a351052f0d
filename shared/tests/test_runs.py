import pytest

from groundlab.shared.runs import check_complete, content_hash, mark_complete, reuse_or_reset, weights_hash


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
