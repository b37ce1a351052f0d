import numpy as np
import pytest

from groundlab.shared.bases.vlm import TinyVLMConfig, build_model, build_processor
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.world import World, WorldConfig
from groundlab.tldr.correction import (
    REWRITE_PROMPT,
    RewriteDataset,
    corrected_where_marked,
    marked_caption,
    noisy_flags,
    oracle_flags,
    rewrite_items,
    self_correction,
)
from groundlab.tldr.processing import response_tokens


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_marked_caption_brackets_whole_words_and_keeps_punctuation_outside():
    tokens = ["a", "Ġsm", "all", "Ġgreen", "Ġsquare", ".", "Ġ3", ".", "5"]
    flags = [False, False, True, False, True, False, False, False, False]
    assert marked_caption(tokens, flags) == "a [small] green [square]. 3.5"
    # a flagged punctuation mark (a deletion point) marks the word it ends; alone, it is marked itself
    assert marked_caption(["a", "Ġcircle", ","], [False, False, True]) == "a [circle],"
    assert marked_caption(["a", "Ġ,"], [False, True]) == "a [,]"
    assert marked_caption(["a", "Ġcircle"], [False, False]) == "a circle"
    with pytest.raises(ValueError, match="2 tokens but 1 flags"):
        marked_caption(["a", "b"], [True])


def test_oracle_flags_mark_the_tokens_outside_the_alignment_with_the_truth(tok):
    truth = "a large red circle and a small blue square."
    wrong = "a large green circle and a small blue square."
    flags = oracle_flags(tok, wrong, truth)
    tokens = tok.convert_ids_to_tokens(response_tokens(tok, wrong))
    assert len(flags) == len(tokens)
    assert marked_caption(tokens, flags) == "a large [green] circle and a small blue square."
    assert not any(oracle_flags(tok, truth, truth))


def test_noisy_flags_miss_and_false_alarm_at_their_rates():
    rng = np.random.default_rng(0)
    flags = [True] * 5000 + [False] * 5000
    noisy = np.array(noisy_flags(flags, rng, keep=0.7, false_alarm=0.08))
    assert noisy[:5000].mean() == pytest.approx(0.7, abs=0.02)
    assert noisy[5000:].mean() == pytest.approx(0.08, abs=0.01)


def test_rewrite_items_and_dataset(tok):
    world = World(WorldConfig(), seed=0)
    scenes = world.scenes("train", 6)
    items = rewrite_items(scenes, [s.caption for s in scenes])
    assert [i.source for i in items[::2]] == ["base"] * 6 and len(items) == 12  # every scene allows an edit
    assert all(i.truth == s.caption and i.caption != i.truth for i, s in zip(items[1::2], scenes))
    with pytest.raises(ValueError, match="6 scenes but 5 captions"):
        rewrite_items(scenes, [s.caption for s in scenes[:5]])
    cfg = TinyVLMConfig(kind="paligemma")
    data = RewriteDataset(items, tok, cfg)
    assert sum(data.modes.values()) == 12 and data.modes["none"] and data.modes["oracle"]
    sample = data[1]
    answer = [t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab != -100]
    assert tok.decode(answer[:-1]) == data.targets[1] and answer[-1] == tok.eos_token_id  # only the target is learned
    for item, target, mode in zip(items, data.targets, data.item_modes):
        if mode == "none":  # nothing marked: the caption is kept
            assert target == item.caption
        elif mode == "oracle" and item.source != "base":  # one verified edit, marked: the truth
            assert target == item.truth
    prompt = tok.decode([t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab == -100
                         and t != tok.convert_tokens_to_ids("<image>")], skip_special_tokens=True)
    assert prompt.startswith(REWRITE_PROMPT.format(caption="")) and sample["image"] is items[1].image


def test_self_correction_reports_each_mark_set_on_the_same_captions(tok):
    world = World(WorldConfig(), seed=0)
    scenes = world.scenes("test", 3)
    cfg = TinyVLMConfig(kind="paligemma", text_kv_heads=1)
    model, processor = build_model(cfg, tok), build_processor(cfg, tok)
    captions = [scenes[0].caption, "a small red triangle.", scenes[2].caption]
    tokens = [tok.convert_ids_to_tokens(response_tokens(tok, c)) for c in captions]
    scores = [(t, [0.9] * len(t)) for t in tokens]
    scores[1] = (tokens[1], [0.9, 0.1] + [0.9] * (len(tokens[1]) - 2))
    out = self_correction(model, processor, cfg, scenes, captions, scores)
    assert out["before/true_error"] == pytest.approx(1 / 3) and out["n_captions"] == 3
    assert out["none/flag_recall"] == 0.0 and out["oracle/flag_recall"] == 1.0 and out["oracle/flag_precision"] == 1.0
    assert out["tldr/flag_precision"] in (0.0, 1.0)  # one flag, right or wrong
    assert [r["marked"] for r in out["rewrites/tldr"]] == [captions[0], "a [small] red triangle.", captions[2]]
    for mode in ("none", "tldr", "oracle"):  # an untrained rewriter writes no valid caption
        assert out[f"{mode}/true_error"] == 1.0 and out[f"{mode}/broken"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="other tokens"):
        self_correction(model, processor, cfg, scenes, captions, [scores[1], scores[0], scores[2]])


def test_rewrite_targets_correct_only_the_marked_differences(tok):
    truth = "a large red circle and a small blue square."
    wrong = "a small red circle and a small green square."
    n = len(response_tokens(tok, wrong))
    oracle = oracle_flags(tok, wrong, truth)
    assert corrected_where_marked(tok, wrong, truth, oracle) == truth
    assert corrected_where_marked(tok, wrong, truth, [True] * n) == truth
    assert corrected_where_marked(tok, wrong, truth, [False] * n) == wrong
    tokens = tok.convert_ids_to_tokens(response_tokens(tok, wrong))
    first = [f and i < n // 2 for i, f in enumerate(oracle)]  # only the first error marked
    assert marked_caption(tokens, first) == "a [small] red circle and a small green square."
    assert corrected_where_marked(tok, wrong, truth, first) == "a large red circle and a small green square."
    false_alarm = [i == 3 for i in range(n)]  # a right word marked stays
    assert corrected_where_marked(tok, wrong, truth, false_alarm) == wrong
    cut = "a large red circle."  # the truth's second object dropped: the cut point is flagged
    assert corrected_where_marked(tok, cut, truth, oracle_flags(tok, cut, truth)) == truth
    with pytest.raises(ValueError, match="flags"):
        corrected_where_marked(tok, wrong, truth, [True])
