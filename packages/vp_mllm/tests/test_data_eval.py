import json
import sys
from pathlib import Path

import pytest
import torch

from groundlab.shared.world import World, WorldConfig
from groundlab.vp_mllm.data import (
    LABELS_QUESTION,
    MDVPDataset,
    export_world,
    majority_label,
    parse_labels,
    read_mdvp,
)
from groundlab.vp_mllm.evaluation import constant_predictions, random_object_scores, read_predictions, score
from groundlab.vp_mllm.judge import HTTPJudge, JudgeItem, OverlapJudge, judge, parse_scores
from groundlab.vp_mllm.metrics import names_label, semantic_iou

sys.path.insert(0, str(Path(__file__).parent))
from zero2_worker import tiny_vp_model  # noqa: E402

WORLD = WorldConfig(min_objects=2, max_objects=4, glyph_prob=0.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("mdvp")
    counts = export_world(World(WORLD, seed=0), "train", 12, out) | export_world(World(WORLD, seed=0), "val", 4, out)
    return out, counts


def test_the_world_exports_as_mdvp_instruct_data(data):
    out, counts = data
    assert counts["train_stage1"] == counts["train_stage2"] == 24  # a box and a point record a scene
    recs = read_mdvp(out / "train_stage1.json", out, 10)
    world = World(WORLD, seed=0)
    for rec in recs:
        scene = world.scene("train", int(rec["id"].split("-")[0]) - 1)
        kind = "box" if "bbox" in rec else "point"
        labels = parse_labels(rec["conversations"][1]["value"], kind)
        assert rec["conversations"][0]["value"] == "<image>\n" + LABELS_QUESTION
        # training records mark a non-empty subset of the objects
        assert 1 <= len(labels) == len(rec["bbox" if kind == "box" else "points"]) <= len(scene.objects)
        for n, text in labels.items():  # slot n's label is the object the slot marks
            if kind == "box":
                x, y, w, h = rec["bbox"][n - 1]
                obj = next(o for o in scene.objects if o.bbox == (x, y, w, h))
            else:
                px, py = rec["points"][n - 1]
                obj = next(o for o in scene.objects if o.mask[int(py), int(px)])
            assert text == f"{obj.colour} {obj.kind}"
    evals = json.loads((out / "val_eval.json").read_text())
    assert {r["task"] for r in evals} == {"labels", "single", "caption", "ocr"}
    assert {r["kind"] for r in evals} == {"box", "point"}
    # each object of a labels record again alone: its own prompt, the only one marked, as <Region 1>
    for full in (r for r in evals if r["task"] == "labels"):
        key = "bbox" if full["kind"] == "box" else "points"
        truth = parse_labels(full["conversations"][1]["value"], full["kind"])
        stem = full["id"].removesuffix("-labels")
        alone = [r for r in evals if r["task"] == "single" and r["id"].startswith(stem + "-")]
        assert len(alone) == len(truth) == len(full[key])
        for n, rec in enumerate(alone, 1):
            assert rec["id"] == f"{stem}-single-{n}" and rec[key] == [full[key][n - 1]]
            assert parse_labels(rec["conversations"][1]["value"], full["kind"]) == {1: truth[n]}


def test_a_set_share_of_training_records_marks_one_object(tmp_path):
    """``one_marked``: that share of training records mark a single object, the rest two or more; the
    evaluation records are not touched."""
    world = World(WORLD, seed=0)
    marked = {}
    for share in (0.0, 0.5, 1.0):
        out = tmp_path / str(share)
        export_world(world, "train", 60, out, one_marked=share, files=("stage1", "stage2"))
        for stage in ("stage1", "stage2"):
            recs = json.loads((out / f"train_{stage}.json").read_text())
            marked[share, stage] = [len(r.get("bbox", r.get("points"))) for r in recs]
    for stage in ("stage1", "stage2"):
        assert min(marked[0.0, stage]) == 2 and set(marked[1.0, stage]) == {1}
        ones = marked[0.5, stage].count(1) / len(marked[0.5, stage])
        assert 0.35 < ones < 0.65 and max(marked[0.5, stage]) >= 3
    with pytest.raises(ValueError, match="one_marked"):
        export_world(world, "train", 1, tmp_path / "bad", one_marked=1.5)


def test_the_rest_can_mark_every_object_and_a_label_question_asks_one_region(tmp_path):
    """``multi_marked="all"``: a record marks one object or every object of its scene;
    ``label_question``: each stage-2 record asks ``What is <Region k>?`` of one marked region, whose
    label is the answer."""
    world = World(WORLD, seed=0)
    export_world(world, "train", 30, tmp_path, one_marked=0.5, multi_marked="all", label_question=1.0,
                 files=("stage1", "stage2"))
    recs = json.loads((tmp_path / "train_stage2.json").read_text())
    for rec in recs:
        scene = world.scene("train", int(rec["id"].split("-")[0]) - 1)
        kind = "box" if "bbox" in rec else "point"
        prompts = rec["bbox" if kind == "box" else "points"]
        assert len(prompts) in (1, len(scene.objects))
        asked = [(q["value"].removeprefix("<image>\n"), a["value"])
                 for q, a in zip(rec["conversations"][::2], rec["conversations"][1::2])
                 if q["value"].removeprefix("<image>\n").startswith("What is <")]
        assert len(asked) == 1
        question, answer = asked[0]
        n = int(question.split()[-1].rstrip(">?"))
        if kind == "box":  # the answer is the label of the object in slot n
            x, y, w, h = prompts[n - 1]
            obj = next(o for o in scene.objects if o.bbox == (x, y, w, h))
            assert answer == f"{obj.colour} {obj.kind}"
    with pytest.raises(ValueError, match="multi_marked"):
        export_world(world, "train", 1, tmp_path / "bad", one_marked=0.5, multi_marked="most")


def test_reading_names_the_file_and_record_of_a_problem(data, tmp_path):
    out, _ = data
    good = json.loads((out / "train_stage2.json").read_text())

    def write(records):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(records))
        return path

    bad = [dict(good[0], image="images/missing.jpg")]
    with pytest.raises(FileNotFoundError, match=r"bad.json: record 0 .*image not found"):
        read_mdvp(write(bad), out, 10)
    many = dict(good[0], bbox=[[1, 1, 4, 4]] * 11)
    many.pop("points", None)
    with pytest.raises(ValueError, match="record 1 .*11 box prompts, more than the model's 10 slots"):
        read_mdvp(write([good[0], many]), out, 10)
    ref = dict(good[0], conversations=[{"from": "human", "value": "What is <Region 9>?"}, {"from": "gpt", "value": "x"}])
    with pytest.raises(ValueError, match="<Region 9> refers to a prompt that does not exist"):
        read_mdvp(write([ref]), out, 10)
    point = next(r for r in good if "points" in r)
    wrong = dict(point, conversations=[{"from": "human", "value": "What is <Region 1>?"}, {"from": "gpt", "value": "x"}])
    with pytest.raises(ValueError, match="<Region 1> names a box, but the sample's prompts are points"):
        read_mdvp(write([wrong]), out, 10)
    with pytest.raises(ValueError, match="JSON list"):
        read_mdvp(write({"not": "a list"}), out, 10)


def test_box_noise_is_seeded_by_item_and_epoch(data):
    out, _ = data
    _, processor = tiny_vp_model()
    recs = [r for r in read_mdvp(out / "train_stage1.json", out, 10) if "bbox" in r]
    ds = MDVPDataset(recs, out, processor, box_noise=True, seed=3)
    a, b = ds[0]["vp_coords"], ds[0]["vp_coords"]
    torch.testing.assert_close(a, b)  # the same item in the same epoch: the same boxes
    ds.set_epoch(1)
    assert not torch.allclose(ds[0]["vp_coords"], a)
    clean = MDVPDataset(recs, out, processor, box_noise=False)
    x, y, w, h = recs[0]["bbox"][0]
    torch.testing.assert_close(clean[0]["vp_coords"][0], torch.tensor([x, y, x + w, y + h]) / 64)
    assert (a[:, :2] >= 0).all() and (a[:, 2:] <= 1).all()


def test_label_metrics():
    assert semantic_iou("Red Circle", "red circle") == 1.0
    assert semantic_iou("a red circle", "red square") == pytest.approx(1 / 4)
    assert semantic_iou("", "") == 1.0
    assert names_label("a small red circle.", "red", "circle") and not names_label("red square", "red", "circle")
    assert parse_labels("<Region 1>: red circle\n<Region 3>: blue\nnoise\n<Region 1>: again", "box") == \
        {1: "red circle", 3: "blue"}
    assert parse_labels("<Mark 2>: green square", "point") == {2: "green square"}


def test_semantic_similarity_is_the_minilm_cosine():
    from groundlab.vp_mllm.metrics import default_embedder

    emb = default_embedder()
    same, near, far = emb.similarity(["red circle", "a red circle", "the letter q"],
                                     ["red circle", "red circle", "red circle"])
    assert same == pytest.approx(1.0, abs=1e-5) and far < near < same
    v = emb.embed(["red circle"])
    assert v.shape == (1, 384) and float(v.norm()) == pytest.approx(1.0, abs=1e-5)


def test_scores_from_rows_per_kind_and_the_majority_baseline(data):
    out, _ = data
    records = json.loads((out / "val_eval.json").read_text())
    labels = [r for r in records if r["task"] == "labels"]
    truth = [{"id": r["id"], "task": r["task"], "kind": r["kind"], "question": "q",
              "answer": r["conversations"][1]["value"], "prediction": r["conversations"][1]["value"]} for r in records]
    perfect = score(truth)
    for kind in ("box", "point"):
        assert perfect[f"{kind}/labels/accuracy"] == 1.0 and perfect[f"{kind}/labels/semantic_iou"] == 1.0
        assert perfect[f"{kind}/single/accuracy"] == 1.0
        assert perfect[f"{kind}/single/regions"] == perfect[f"{kind}/labels/regions"]  # every region once alone
        assert perfect[f"{kind}/labels/semantic_similarity"] == pytest.approx(1.0, abs=1e-5)
        assert perfect[f"{kind}/ocr/exact_match"] == 1.0 and perfect[f"{kind}/caption/CIDEr"] > 1.0
    # one region left out of every answer: it scores as the empty prediction
    dropped = [dict(r, prediction="\n".join(r["answer"].splitlines()[1:])) for r in truth if r["task"] == "labels"]
    regions = sum(len(parse_labels(r["answer"], r["kind"])) for r in dropped if r["kind"] == "box")
    assert score(dropped)["box/labels/accuracy"] == pytest.approx((regions - len(labels) / 2) / regions)
    majority = majority_label(json.loads((out / "train_stage1.json").read_text()))
    base = score(constant_predictions(labels, majority))
    hits = sum(t == majority for r in labels if r["kind"] == "box"
               for t in parse_labels(r["conversations"][1]["value"], "box").values())
    assert base["box/labels/accuracy"] == pytest.approx(hits / regions)


def test_the_random_object_baseline_is_the_expectation_over_the_scene():
    """Each region answered by a uniformly random object of its scene: in a scene of a red circle, a
    second red circle and a blue square a red circle is named right 2/3 of the time, the square 1/3;
    a one-marked record scores against the same scene; a record with no labels record is an error."""

    class Exact:  # similarity 1 for the same text
        def similarity(self, preds, truths):
            return [float(p == t) for p, t in zip(preds, truths)]

    def rec(rid, task, answer):
        return {"id": rid, "task": task, "kind": "box", "conversations": [{"from": "human", "value": "q"},
                                                                          {"from": "gpt", "value": answer}]}

    three = "<Region 1>: red circle\n<Region 2>: red circle\n<Region 3>: blue square"
    records = [rec("1-box-labels", "labels", three), rec("1-box-single-3", "single", "<Region 1>: blue square"),
               rec("2-box-labels", "labels", "<Region 1>: green triangle\n<Region 2>: blue square")]
    out = random_object_scores(records, Exact())
    assert out["box/labels/accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 / 2 + 1 / 2) / 5)
    assert out["box/labels/semantic_similarity"] == pytest.approx(out["box/labels/accuracy"])
    assert out["box/single/accuracy"] == pytest.approx(1 / 3) and out["box/single/regions"] == 1
    with pytest.raises(ValueError, match="no labels record 3-box-labels"):
        random_object_scores(records + [rec("3-box-single-1", "single", "<Region 1>: red circle")], Exact())


def test_predictions_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "task": "ocr", "kind": "box", "question": "q", "answer": "A",
                                "prediction": "a"}) + "\n")
    assert score(read_predictions(path)) == {"box/ocr/exact_match": 1.0, "box/ocr/n": 1}
    path.write_text(json.dumps({"id": "a", "task": "ocr"}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1: missing or non-text fields"):
        read_predictions(path)


def test_evaluation_gives_the_same_predictions_at_batch_size_1_and_8(data, tmp_path):
    from groundlab.vp_mllm.evaluation import predict

    out, _ = data
    model, processor = tiny_vp_model()
    records = json.loads((out / "val_eval.json").read_text())[:8]
    rows = {}
    for bs in (1, 8):
        rows[bs] = read_predictions(predict(model, processor, records, out, tmp_path / f"p{bs}.jsonl", batch_size=bs,
                                            max_new_tokens=8))
    assert [r["prediction"] for r in rows[1]] == [r["prediction"] for r in rows[8]]
    assert len({r["prediction"] for r in rows[1]}) > 1  # a random model still answers differently per record


def test_judge_harness_with_the_offline_judge():
    items = [JudgeItem("1", "Describe <Region 1>.", "region 1: a large red circle", "a large red circle",
                       "a large red circle"),
             JudgeItem("2", "Describe <Region 1>.", "region 1: a small blue square", "a small blue square", "a tree")]
    out = judge(items, OverlapJudge())
    assert out["n"] == 2 and 0 < out["relative_score"] < 100
    assert judge(items[:1], OverlapJudge())["relative_score"] == pytest.approx(100.0)
    assert judge(items, OverlapJudge()) == out  # deterministic
    assert parse_scores("8 6\nbecause", "x") == (8.0, 6.0)
    with pytest.raises(ValueError, match="item 1: the judge's reply does not open with two scores"):
        judge(items[:1], lambda prompt: "I think both are fine")
    with pytest.raises(ValueError, match="scores must lie in"):
        parse_scores("11 3", "x")
    with pytest.raises(OSError):  # no network here: a remote judge fails loudly, never scores 0
        HTTPJudge("http://127.0.0.1:9/v1/chat/completions", "gpt-4", timeout=2)("hello")


@pytest.mark.slow
def test_evaluation_under_two_processes_predicts_what_one_process_does(data, tmp_path):
    from groundlab.shared.testing import outputs_one_and_two_processes

    out, _ = data
    dirs = outputs_one_and_two_processes(Path(__file__).with_name("eval_worker.py"), ["--data", str(out)], tmp_path)
    one, two = (read_predictions(dirs[n] / "predictions.jsonl") for n in (1, 2))
    assert len(one) == 11 and one == two


@pytest.mark.slow
def test_stage_two_under_torchrun_zero2_matches_one_process(data, tmp_path):
    from groundlab.shared.testing import losses_one_and_two_processes

    out, _ = data
    losses = losses_one_and_two_processes(Path(__file__).with_name("zero2_worker.py"), ["--data", str(out)], tmp_path)
    assert len(losses[1]) == 4 and losses[1][-1] < losses[1][0]
    torch.testing.assert_close(torch.tensor(losses[2]), torch.tensor(losses[1]), atol=5e-4, rtol=0)


def test_majority_label_reads_both_kinds():
    recs = [{"bbox": [[0, 0, 1, 1]], "conversations": [{}, {"value": "<Region 1>: red circle"}]},
            {"points": [[0, 0], [1, 1]], "conversations": [{}, {"value": "<Mark 1>: red circle\n<Mark 2>: blue"}]}]
    assert majority_label(recs) == "red circle"
    assert majority_label([{"bbox": [[0, 0, 1, 1]], "conversations": [{}, {"value": "<loc0001>"}]}]) is None
