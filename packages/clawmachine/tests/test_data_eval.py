"""The world in the release's sample format, the checks on reading it, scoring from a predictions
file, evaluation under two processes and stage 2 under ZeRO-2."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from groundlab.clawmachine.data import GROUNDED_CAPTION, REFERRING, ClawDataset, export_world, read_samples
from groundlab.clawmachine.evaluation import read_predictions, rec_items, score
from groundlab.clawmachine.processing import REGION_MARKER
from groundlab.shared.world import World, WorldConfig
from groundlab.shared.world_io import Refer

sys.path.insert(0, str(Path(__file__).parent))
from claw_zero2_worker import discrete_twin, tiny_claw_model, tokens_for  # noqa: E402

WORLD = WorldConfig()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("claw")
    counts = export_world(World(WORLD, seed=0), "train", 16, out) | export_world(World(WORLD, seed=0), "val", 4, out)
    return out, counts


def test_the_world_exports_in_the_release_format(data):
    out, counts = data
    assert counts["train_stage1"] == counts["train_stage2"] == 16  # 2 full global batches of the ZeRO-2 test
    world = World(WORLD, seed=0)
    for rec in read_samples(out / "train_stage1.json", out):
        scene = world.scene("train", int(rec["id"].split("-")[0]) - 1)
        assert rec["conversations"][0]["value"] == "<image>\n" + GROUNDED_CAPTION
        caption = rec["conversations"][1]["value"]
        assert caption.replace(REGION_MARKER, "") == scene.caption
        assert len(rec["ref_list"]) == caption.count(REGION_MARKER) == len(scene.objects)
        for phrase, region in zip(scene.caption_phrases, rec["ref_list"]):
            x, y, w, h = scene.objects[phrase.object_id].bbox
            assert np.allclose(region[0], [x / 64, y / 64, (x + w) / 64, (y + h) / 64], atol=1e-6)
    for rec in read_samples(out / "train_stage2.json", out):
        turns = rec["conversations"]
        answers = [t["value"] for t in turns[1::2]]
        assert answers.count("yes") >= 1 and answers.count("no") >= 1
        assert sum(t["value"].count(REGION_MARKER) for t in turns) == len(rec["ref_list"])
    refer = Refer(out / "refer", out / "images")
    items = rec_items(refer, "val", out)
    assert len(items) == len({s.ref_id for s in refer.samples("val")})  # each object's first expression
    assert all((out / it.image).is_file() and len(it.objects) >= 1 for it in items)
    evals = read_samples(out / "val_eval.json", out)
    assert {r["task"] for r in evals} == {"reg", "yesno"}
    assert all(r["conversations"][0]["value"].endswith(REFERRING) for r in evals if r["task"] == "reg")


def test_same_kind_repeat_adds_attribute_grounding_of_kind_shared_objects(data, tmp_path):
    out, _ = data
    world = World(WORLD, seed=0)
    counts = export_world(world, "train", 16, tmp_path, same_kind_repeat=3)
    plain = json.loads((out / "train_stage2.json").read_text())
    records = json.loads((tmp_path / "train_stage2.json").read_text())
    assert [r for r in records if r["id"].endswith("-conv")] == plain  # the conversations as before
    extra = [r for r in records if not r["id"].endswith("-conv")]
    scenes = {s.image_id: s for s in world.scenes("train", 16)}

    def told_by_look(scene):  # objects of a shared kind with an attribute expression
        return [o for o in scene.objects if sum(p.kind == o.kind for p in scene.objects) > 1
                and any(r.type == "attribute" for r in scene.refs_for(o.id))]

    shared = [i for i, s in scenes.items() if told_by_look(s)]
    assert shared and len(extra) == 2 * len(shared) and counts["train_stage2"] == 16 + len(extra)
    for rec in extra:
        scene = scenes[int(rec["id"].split("-")[0])]
        questions = [t["value"].removeprefix("<image>\n") for t in rec["conversations"][::2]]
        assert all(t["value"] == REGION_MARKER for t in rec["conversations"][1::2])
        objects = told_by_look(scene)
        assert len(questions) == len(rec["ref_list"]) == len(objects)
        for question, region in zip(questions, rec["ref_list"]):
            ref = next(r for r in scene.refs if f"Where is {r.text}?" == question)
            obj = scene.objects[ref.target]
            assert ref.type == "attribute" and obj in objects
            x, y, w, h = obj.bbox
            assert np.allclose(region[0], [x / 64, y / 64, (x + w) / 64, (y + h) / 64], atol=1e-6)
    with pytest.raises(ValueError, match="same_kind_repeat must be >= 1"):
        export_world(world, "train", 2, tmp_path, same_kind_repeat=0)


def test_copy_turns_write_each_objects_region_back(data, tmp_path):
    from groundlab.clawmachine.data import COPY

    out, _ = data
    world = World(WORLD, seed=0)
    export_world(world, "train", 16, tmp_path, copy_turns=True)
    plain = {r["id"]: r for r in json.loads((out / "train_stage2.json").read_text())}
    for rec in json.loads((tmp_path / "train_stage2.json").read_text()):
        scene = world.scene("train", int(rec["id"].split("-")[0]) - 1)
        turns, regions, k = [], iter(rec["ref_list"]), 0
        for q, a in zip(rec["conversations"][::2], rec["conversations"][1::2]):
            question = q["value"].removeprefix("<image>\n")
            taken = [next(regions) for _ in range(question.count(REGION_MARKER) + a["value"].count(REGION_MARKER))]
            if question == COPY:
                assert a["value"] == REGION_MARKER and taken[0] == taken[1]
                k += 1
            else:
                turns.append((question, a["value"], taken))
        assert k == sum(bool(scene.refs_for(o.id)) for o in scene.objects)
        base = plain[rec["id"]]
        regions = iter(base["ref_list"])
        expected = [(q["value"].removeprefix("<image>\n"), a["value"],
                     [next(regions) for _ in range(q["value"].count(REGION_MARKER) + a["value"].count(REGION_MARKER))])
                    for q, a in zip(base["conversations"][::2], base["conversations"][1::2])]
        assert sorted(map(str, turns)) == sorted(map(str, expected))  # the other turns as without copies


def _write(tmp_path, samples):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(samples))
    return path


@pytest.mark.parametrize("sample,message", [
    ({"image": "images/none.jpg", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                   {"from": "gpt", "value": "yes"}]}, "image not found"),
    ({"image": "IMG", "conversations": [{"from": "human", "value": "<image>\nWhere?"},
                                        {"from": "gpt", "value": "<ref_patch>"}]}, "1 <ref_patch> markers but ref_list has 0"),
    ({"image": "IMG", "conversations": [{"from": "human", "value": "<image>\nWhere?"},
                                        {"from": "gpt", "value": "<ref_patch>"}], "ref_list": [[[0.1, 0.1, 1.5, 0.2]]]},
     "ref_list[0]: box"),
    ({"image": "IMG", "conversations": [{"from": "human", "value": "<image>\nWhere?"}]}, "at least a human and a gpt"),
    ({"conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}]}, "'image' is missing"),
])
def test_bad_samples_are_errors_naming_file_and_sample(data, tmp_path, sample, message):
    out, _ = data
    image = json.loads((out / "train_stage1.json").read_text())[0]["image"]
    sample = json.loads(json.dumps(sample).replace('"IMG"', json.dumps(image)))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        read_samples(_write(tmp_path, [{"id": "ok", **sample}]), out)
    assert message in str(err.value) and "sample 0 (id ok)" in str(err.value)


@pytest.mark.parametrize("config", [{}, {"hybrid": True}, {"scene_positions": True}])
def test_text_only_samples_train(data, config):
    """Also a batch of text-only samples to a model whose scene takes features or cells."""
    from groundlab.clawmachine.processing import ClawCollator

    model, processor = tiny_claw_model(**config)
    samples = [{"conversations": [{"from": "human", "value": "Is the sky blue?"}, {"from": "gpt", "value": "yes"}]}]
    item = ClawDataset(samples, {}, processor)[0]
    assert processor.start_id not in item["input_ids"]
    loss = model(**ClawCollator(processor.tokenizer.pad_token_id)([item])).loss
    assert torch.isfinite(loss)


def test_scores_from_a_predictions_file(tmp_path):
    rows = [{"id": "a", "task": "rec", "question": "q", "prediction": "", "references": ["x"], "box": [0, 0, 10, 10],
             "target": [0, 0, 10, 12]},
            {"id": "b", "task": "rec", "question": "q", "prediction": "", "references": ["x"], "box": None,
             "target": [0, 0, 10, 10]},
            {"id": "c", "task": "yesno", "question": "q", "prediction": "Yes.", "references": ["yes"]},
            {"id": "d", "task": "yesno", "question": "q", "prediction": "yes", "references": ["no"]},
            {"id": "e", "task": "reg", "question": "q", "prediction": "the red circle", "references": ["the red circle"]}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = score(read_predictions(path))
    assert m["rec/acc50"] == 0.5 and m["rec/no_box"] == 0.5 and m["yesno/accuracy"] == 0.5
    assert m["reg/METEOR"] > 0.9
    path.write_text(json.dumps({**rows[0], "target": None}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1: a rec row needs its target box"):
        read_predictions(path)


@pytest.mark.parametrize("config", [{}, {"hybrid": True, "hybrid_mode": "add"}, {"scene_positions": True}])
def test_evaluation_is_the_same_in_batches_of_one(data, config):
    """Also where the scene takes features or cells: they reach the model in evaluation (left-padded
    batches) where they did in training."""
    from groundlab.clawmachine.evaluation import predict, record_items

    out, _ = data
    model, processor = tiny_claw_model(**config)
    with torch.no_grad():  # the extra inputs start at zero; make them count
        for name, p in model.named_parameters():
            if name.startswith(("mm_projector.2", "scene_")):
                torch.nn.init.normal_(p, std=0.5)
    records = read_samples(out / "val_eval.json", out)
    items = rec_items(Refer(out / "refer", out / "images"), "val", out)[:3]
    items += record_items(records, {r["image"]: (64, 64) for r in records})[:3]
    tokens = tokens_for(model, out, [{"image": it.image} for it in items])
    rows = [read_predictions(predict(model, processor, items, tokens, out / f"p{b}.jsonl", batch_size=b,
                                     max_new_tokens=6)) for b in (1, 3)]
    assert rows[0] == rows[1]
    if config:  # the scene's inputs change what is generated
        plain = read_predictions(predict(*discrete_twin(model), items, tokens, out / "plain.jsonl",
                                         batch_size=3, max_new_tokens=6))
        assert plain != rows[0]


@pytest.mark.slow
def test_evaluation_under_two_processes_predicts_what_one_process_does(data, tmp_path):
    from groundlab.shared.testing import outputs_one_and_two_processes

    out, _ = data
    dirs = outputs_one_and_two_processes(Path(__file__).with_name("claw_eval_worker.py"), ["--data", str(out)], tmp_path)
    one, two = (read_predictions(dirs[n] / "predictions.jsonl") for n in (1, 2))
    assert len(one) == 11 and one == two


@pytest.mark.slow
def test_stage_two_under_torchrun_zero2_matches_one_process(data, tmp_path):
    from groundlab.shared.testing import losses_one_and_two_processes

    out, _ = data
    losses = losses_one_and_two_processes(Path(__file__).with_name("claw_zero2_worker.py"), ["--data", str(out)], tmp_path)
    assert len(losses[1]) == 4 and losses[1][-1] < losses[1][0]
    torch.testing.assert_close(torch.tensor(losses[2]), torch.tensor(losses[1]), atol=5e-4, rtol=0)
