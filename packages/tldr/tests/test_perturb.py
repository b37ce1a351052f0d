import re

import pytest

from groundlab.shared.world import NUMBER_WORDS, World, WorldConfig
from groundlab.tldr.perturb import (
    TAXONOMIES,
    LLMPerturber,
    WorldPerturber,
    check_description,
    describe,
    generate_negatives,
    perturbation_prompt,
    sentences,
)

WORLD = World(WorldConfig(glyph_prob=0.5, image_size=96), seed=2)


@pytest.fixture(scope="module")
def scenes():
    return WORLD.scenes("train", 60)


def test_sentences_split_at_every_end_mark_but_decimals():
    assert sentences("there are 2 shapes. is it 3.5 wide? yes! the red circle") == [
        "there are 2 shapes.", "is it 3.5 wide?", "yes!", "the red circle"]  # an unfinished sentence is kept
    assert sentences("there is a red circle.  ") == ["there is a red circle."]
    assert sentences("") == []


def test_descriptions_are_true(scenes):
    for s in scenes:
        text = describe(s)
        assert all(check_description(text, s)), text
        n = re.match(r"there (?:is|are) (\w+) shape", text).group(1)
        assert NUMBER_WORDS.index(n) == len(s.objects)


def test_every_taxonomy_yields_verified_minimal_negatives(scenes):
    negs, impossible = generate_negatives(WorldPerturber(seed=0), scenes)
    by_tax = {t: [n for _, n in negs if n.taxonomy == t] for t in TAXONOMIES}
    assert all(by_tax[t] for t in TAXONOMIES), {t: len(v) for t, v in by_tax.items()}
    assert sum(impossible.values()) + len(negs) == len(scenes) * len(TAXONOMIES)
    for scene, neg in negs:
        before, after = sentences(neg.original), sentences(neg.perturbed)
        assert len(before) == len(after)
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        assert 1 <= len(changed) <= 2
        truth = check_description(neg.perturbed, scene)
        assert not any(truth[i] for i in changed) and all(truth[i] for i in range(len(after)) if i not in changed)
        # minimal: at most a few words differ
        diff = sum(a != b for a, b in zip(" ".join(before).split(), " ".join(after).split()))
        assert 1 <= diff <= 3, (neg.original, neg.perturbed)


def test_taxonomy_specific_edits_check_against_the_scene_directly(scenes):
    p = WorldPerturber(seed=1)
    for s in scenes:
        neg = p.perturb(s, describe(s), "counting")
        n = NUMBER_WORDS.index(re.match(r"there (?:is|are) (\w+) shape", neg.perturbed).group(1))
        assert n != len(s.objects)
        glyphs = {o.glyph for o in s.objects if o.glyph}
        ocr = p.perturb(s, describe(s), "text_ocr")
        if not glyphs:
            assert ocr is None
        else:
            claims = re.findall(r"there is a (\w+) (\w+) (\w+) with the letter (\w)", ocr.perturbed)
            actual = {(o.size, o.colour, o.kind, o.glyph) for o in s.objects}
            assert any(c not in actual for c in claims)


def test_perturbing_a_wrong_response_is_refused(scenes):
    s = scenes[0]
    with pytest.raises(ValueError, match="not correct"):
        WorldPerturber().perturb(s, "there are nine shapes.", "counting")
    with pytest.raises(ValueError, match="unknown taxonomy"):
        WorldPerturber().perturb(s, describe(s), "grammar")


def test_vqa_negatives_are_wrong_answers(scenes):
    p = WorldPerturber()
    for s in scenes[:20]:
        for i, qa in enumerate(s.qa):
            neg = p.perturb_answer(s, i)
            assert neg.perturbed != qa.answer and neg.original == qa.answer


def test_llm_perturber_prompt_and_checker_with_a_fake_client():
    calls = []

    def client(prompt):
        calls.append(prompt)
        if prompt.startswith("Does the rewritten"):
            return "yes" if "blue" in prompt.split("Rewritten:")[1] else "no"
        return "A blue car is parked outside."

    p = LLMPerturber(client)
    neg = p.perturb("A red car is parked outside.", "visual_attribute")
    assert neg.perturbed == "A blue car is parked outside." and len(calls) == 2
    assert "Error type: visual attribute" in calls[0] and "minimal" in calls[0]
    assert p.perturb("A blue car is parked outside.", "visual_attribute") is None  # unchanged
    assert p.rejected == {"unchanged": 1}
    paraphraser = LLMPerturber(lambda prompt: "Outside, one sees an automobile that happens to be azure.")
    assert paraphraser.perturb("A red car is parked outside.", "visual_attribute") is None
    assert paraphraser.rejected == {"not minimal": 1}
    assert "Original: x" in perturbation_prompt("x", "counting")
