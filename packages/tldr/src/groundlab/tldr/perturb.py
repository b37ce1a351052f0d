"""Synthetic hard negatives (TLDR, arXiv 2410.04734, Section 4 and Appendix A).

A correct response is perturbed with a minimal edit of ONE taxonomy type, and a checker makes sure
the result is really wrong (and, for the taxonomy, wrong in the intended way). The perturber is
pluggable:

- :class:`WorldPerturber`: offline and rule based. It knows the scene, so its negatives are truly
  wrong: every candidate edit is verified against the scene by :func:`check_description`, a parser
  of the description grammar below, before it is accepted.
- :class:`LLMPerturber`: for real data. It builds the paper's prompt structure (the taxonomy's rule,
  examples, "minimal edits") for any text-in/text-out client, then runs a checker pass with the same
  client and rejects paraphrases, unchanged texts and wrong-type edits.

Responses of the world are detailed descriptions (:func:`describe`), one fact a sentence::

    there are two shapes.
    there is a large red circle with the letter k.
    there is a small blue square.
    the circle is left of the square.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from groundlab.shared.world import COLOURS, GLYPH_LETTERS, KINDS, NUMBER_WORDS, SIZES, Scene, holds

TAXONOMIES: tuple[str, ...] = (
    "spatial_relationship", "visual_attribute", "attribute_binding", "object_identification",
    "counting", "small_object", "text_ocr", "counterfactual",
)

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass
class Negative:
    """A perturbed response and where it came from."""

    original: str
    perturbed: str
    taxonomy: str
    edits: list[str] = field(default_factory=list)  # human-readable "old -> new" notes


# ----------------------------------------------------------------------------------------------
# the description grammar


def _object_sentence(obj) -> str:
    return f"there is a {obj.size} {obj.colour} {obj.kind}" + (f" with the letter {obj.glyph}" if obj.glyph else "") + "."


def _relation_sentences(scene: Scene, margin: float) -> list[str]:
    names = {}
    for obj in scene.objects:
        attr = [r.text for r in scene.refs_for(obj.id) if r.type == "attribute"]
        if attr:
            names[obj.id] = attr[0]
    ordered = sorted(scene.objects, key=lambda o: o.position[0])
    out = []
    for a, b in zip(ordered, ordered[1:]):
        if a.id not in names or b.id not in names:
            continue
        for rel in ("left of", "above", "below"):
            if holds(rel, a, b, margin):
                out.append(f"{names[a.id]} is {rel} {names[b.id]}.")
                break
    return out


def describe(scene: Scene, margin_fraction: float = 0.08) -> str:
    """The correct detailed description of a scene (count, each object left to right, relations)."""
    n = len(scene.objects)
    parts = [f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} shape{'' if n == 1 else 's'}."]
    parts += [_object_sentence(o) for o in sorted(scene.objects, key=lambda o: o.position[0])]
    parts += _relation_sentences(scene, margin_fraction * scene.size)
    return " ".join(parts)


SENTENCE = re.compile(r"(?:[^.?!]|(?<=\d)\.(?=\d))+(?:[.?!]|$)")
"""A sentence: up to a ``.``, ``?`` or ``!`` that is not a decimal point, or to the end of the text
(an unfinished last sentence is kept, and then fails the grammar's check)."""
COUNT = re.compile(r"^there (?:is|are) (\w+) shapes?\.$")
EXIST = re.compile(rf"^there is (a|no) ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(KINDS)})"
                   r"(?: with the letter (\w))?\.$")
RELATION = re.compile(r"^(the .+?) is (left of|right of|above|below) (the .+)\.$")
ATTR = re.compile(rf"^the (?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLOURS)}) )?({'|'.join(KINDS)})$")


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (the same boundaries as ``metrics.sentence_ids_from_text``)."""
    return [s.strip() for s in SENTENCE.findall(text) if s.strip()]


def _denote(phrase: str, scene: Scene):
    m = ATTR.match(phrase)
    if not m:
        return []
    size, colour, kind = m.groups()
    return [o for o in scene.objects if o.kind == kind and colour in (None, o.colour) and size in (None, o.size)]


def check_sentence(sentence: str, scene: Scene, margin_fraction: float = 0.08) -> bool:
    """Whether one sentence of the grammar is true of the scene (unparseable sentences are False)."""
    if m := COUNT.match(sentence):
        return m.group(1) in NUMBER_WORDS and NUMBER_WORDS.index(m.group(1)) == len(scene.objects)
    if m := EXIST.match(sentence):
        article, size, colour, kind, glyph = m.groups()
        present = any(o.size == size and o.colour == colour and o.kind == kind and o.glyph == glyph
                      for o in scene.objects)
        return present if article == "a" else not present
    if m := RELATION.match(sentence):
        a, rel, b = _denote(m.group(1), scene), m.group(2), _denote(m.group(3), scene)
        return len(a) == 1 and len(b) == 1 and holds(rel, a[0], b[0], margin_fraction * scene.size)
    return False


def check_description(text: str, scene: Scene) -> list[bool]:
    """Truth of every sentence of ``text``."""
    return [check_sentence(s, scene) for s in sentences(text)]


# ----------------------------------------------------------------------------------------------
# rule-based perturbations


class WorldPerturber:
    """Minimal, verified edits of world descriptions and QA answers, one taxonomy at a time."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def perturb(self, scene: Scene, response: str, taxonomy: str, key: int = 0) -> Negative | None:
        """A negative of ``response`` of type ``taxonomy``, or None when the scene offers none
        (e.g. text_ocr without glyphs). Deterministic in (seed, scene, taxonomy, key)."""
        if taxonomy not in TAXONOMIES:
            raise ValueError(f"unknown taxonomy {taxonomy!r}; known: {TAXONOMIES}")
        rng = np.random.default_rng([self.seed, scene.image_id, TAXONOMIES.index(taxonomy), key])
        sents = sentences(response)
        if not all(check_description(response, scene)):
            raise ValueError(f"scene {scene.image_id}: the response to perturb is not correct: {response!r}")
        candidates = getattr(self, f"_{taxonomy}")(scene, sents)
        order = rng.permutation(len(candidates)) if candidates else []
        for i in order:
            new_sents, edits = candidates[int(i)]
            changed = [k for k, (a, b) in enumerate(zip(sents, new_sents)) if a != b]
            truth = [check_sentence(s, scene) for s in new_sents]
            # the checker: every edited sentence is false, every untouched one stays true
            if changed and all(not truth[k] for k in changed) and all(
                    truth[k] for k in range(len(new_sents)) if k not in changed):
                return Negative(response, " ".join(new_sents), taxonomy, edits)
        return None

    # each returns a list of (new sentences, edit notes)

    @staticmethod
    def _replace(sents, k, old, new):
        out = list(sents)
        out[k] = re.sub(rf"\b{re.escape(old)}\b", new, out[k], count=1)
        return out, [f"{old} -> {new}"]

    def _counting(self, scene, sents):
        out = []
        for k, s in enumerate(sents):
            if m := COUNT.match(s):
                n = NUMBER_WORDS.index(m.group(1))
                for wrong in (n - 1, n + 1, n + 2):
                    if 1 <= wrong < len(NUMBER_WORDS):
                        new = f"there {'is' if wrong == 1 else 'are'} {NUMBER_WORDS[wrong]} shape{'' if wrong == 1 else 's'}."
                        out.append((sents[:k] + [new] + sents[k + 1:], [f"{m.group(1)} -> {NUMBER_WORDS[wrong]}"]))
        return out

    def _attribute_edits(self, sents, field_index, values, only_small=False):
        out = []
        for k, s in enumerate(sents):
            m = EXIST.match(s)
            if not m or m.group(1) != "a" or (only_small and m.group(2) != "small"):
                continue
            old = m.group(field_index)
            for new in values:
                if new != old:
                    out.append(self._replace(sents, k, f"{m.group(2)} {m.group(3)} {m.group(4)}",
                                             " ".join(new if i == field_index else m.group(i) for i in (2, 3, 4))))
        return out

    def _visual_attribute(self, scene, sents):
        return self._attribute_edits(sents, 3, COLOURS) + self._attribute_edits(sents, 2, SIZES)

    def _object_identification(self, scene, sents):
        return self._attribute_edits(sents, 4, KINDS)

    def _small_object(self, scene, sents):
        return self._attribute_edits(sents, 3, COLOURS, only_small=True) + self._attribute_edits(
            sents, 4, KINDS, only_small=True)

    def _attribute_binding(self, scene, sents):
        exist = [(k, EXIST.match(s)) for k, s in enumerate(sents)]
        exist = [(k, m) for k, m in exist if m and m.group(1) == "a"]
        out = []
        for (k1, m1), (k2, m2) in [(a, b) for i, a in enumerate(exist) for b in exist[i + 1:]]:
            if m1.group(3) == m2.group(3):
                continue
            new = list(sents)
            new[k1] = sents[k1].replace(f" {m1.group(3)} ", f" {m2.group(3)} ", 1)
            new[k2] = sents[k2].replace(f" {m2.group(3)} ", f" {m1.group(3)} ", 1)
            out.append((new, [f"colours of {m1.group(4)} and {m2.group(4)} swapped"]))
        return out

    def _spatial_relationship(self, scene, sents):
        out = []
        for k, s in enumerate(sents):
            if m := RELATION.match(s):
                out.append(self._replace(sents, k, m.group(2), OPPOSITE[m.group(2)]))
        return out

    def _text_ocr(self, scene, sents):
        out = []
        for k, s in enumerate(sents):
            m = EXIST.match(s)
            if m and m.group(5):
                out += [self._replace(sents, k, f"letter {m.group(5)}", f"letter {g}")
                        for g in GLYPH_LETTERS if g != m.group(5)]
        return out

    def _counterfactual(self, scene, sents):
        # "there is a X." -> "there is no X.": denies what is there
        return [self._replace(sents, k, "there is a", "there is no") for k, s in enumerate(sents)
                if (m := EXIST.match(s)) and m.group(1) == "a"]

    def perturb_answer(self, scene: Scene, qa_index: int) -> Negative | None:
        """A wrong answer to the scene's QA pair (VQA negatives); None when none can be made. The
        taxonomy follows the question type."""
        qa = scene.qa[qa_index]
        choices = {
            "colour": ("visual_attribute", list(COLOURS)), "size": ("visual_attribute", list(SIZES)),
            "shape": ("object_identification", list(KINDS)), "count": ("counting", list(NUMBER_WORDS[:7])),
            "exist": ("counterfactual", ["yes", "no"]), "spatial": ("spatial_relationship", ["yes", "no"]),
            "glyph": ("text_ocr", list(GLYPH_LETTERS)),
        }
        taxonomy, options = choices[qa.type]
        wrong = [o for o in options if o != qa.answer]  # the checker: a still-valid answer is discarded
        if not wrong:
            return None
        rng = np.random.default_rng([self.seed, scene.image_id, qa_index])
        new = wrong[int(rng.integers(len(wrong)))]
        return Negative(qa.answer, new, taxonomy, [f"{qa.answer} -> {new}"])


# ----------------------------------------------------------------------------------------------
# LLM-based perturbation (real data)

TAXONOMY_RULES: dict[str, str] = {
    "spatial_relationship": "Change one spatial relation between objects (left/right, above/below, in front/behind).",
    "visual_attribute": "Change one visual attribute of an object (colour, size, material, shape, texture).",
    "attribute_binding": "Swap attributes between two objects so that each is bound to the wrong object.",
    "object_identification": "Replace one object with a different, plausible object.",
    "counting": "Change one count of objects.",
    "small_object": "Change an attribute or the identity of one small, easily missed object.",
    "text_ocr": "Change text that appears in the image (a word, letter or number that is written there).",
    "counterfactual": "State something that contradicts the image, e.g. that a present object is absent.",
}

EXAMPLES: dict[str, tuple[str, str]] = {
    "spatial_relationship": ("A cat sits to the left of the lamp.", "A cat sits to the right of the lamp."),
    "visual_attribute": ("A red car is parked outside.", "A blue car is parked outside."),
    "attribute_binding": ("A white dog chases a black cat.", "A black dog chases a white cat."),
    "object_identification": ("A man holds an umbrella.", "A man holds a guitar."),
    "counting": ("Three birds sit on the wire.", "Five birds sit on the wire."),
    "small_object": ("A tiny green frog rests on the leaf.", "A tiny green snail rests on the leaf."),
    "text_ocr": ("The sign reads STOP.", "The sign reads SLOW."),
    "counterfactual": ("A boat floats on the lake.", "No boat is on the lake."),
}


def perturbation_prompt(response: str, taxonomy: str) -> str:
    """The instruction given to a text-only LLM: taxonomy rule, an example, minimal edits."""
    before, after = EXAMPLES[taxonomy]
    return (
        "You rewrite a correct image description into an incorrect one for training a hallucination "
        f"detector.\nError type: {taxonomy.replace('_', ' ')}. Rule: {TAXONOMY_RULES[taxonomy]}\n"
        f"Example:\nOriginal: {before}\nRewritten: {after}\n"
        "Make one or two minimal word-level edits of this type only; keep every other word exactly as it "
        "is; do not paraphrase. Reply with the rewritten text only.\n"
        f"Original: {response}\nRewritten:"
    )


def checker_prompt(original: str, perturbed: str, taxonomy: str) -> str:
    return (
        "Does the rewritten text contradict the original in a way of type "
        f"'{taxonomy.replace('_', ' ')}' ({TAXONOMY_RULES[taxonomy]}), and not merely paraphrase it? "
        f"Answer yes or no.\nOriginal: {original}\nRewritten: {perturbed}\nAnswer:"
    )


class LLMPerturber:
    """Perturb with any ``client(prompt) -> text`` (an API wrapper, a local model); a second call
    checks the edit. Rejected edits return None and are counted in ``self.rejected``."""

    def __init__(self, client: Callable[[str], str], max_edit_fraction: float = 0.5):
        self.client = client
        self.max_edit_fraction = max_edit_fraction
        self.rejected: dict[str, int] = {}

    def _reject(self, why: str) -> None:
        self.rejected[why] = self.rejected.get(why, 0) + 1

    def perturb(self, response: str, taxonomy: str) -> Negative | None:
        if taxonomy not in TAXONOMIES:
            raise ValueError(f"unknown taxonomy {taxonomy!r}; known: {TAXONOMIES}")
        perturbed = self.client(perturbation_prompt(response, taxonomy)).strip()
        if not perturbed or perturbed == response.strip():
            self._reject("unchanged")
            return None
        a, b = response.split(), perturbed.split()
        from difflib import SequenceMatcher

        if 1 - SequenceMatcher(a=a, b=b, autojunk=False).ratio() > self.max_edit_fraction:
            self._reject("not minimal")
            return None
        verdict = self.client(checker_prompt(response, perturbed, taxonomy)).strip().lower()
        if not verdict.startswith("yes"):
            self._reject("checker said no")
            return None
        return Negative(response, perturbed, taxonomy)


def generate_negatives(perturber: WorldPerturber, scenes: Sequence[Scene], taxonomies: Sequence[str] = TAXONOMIES
                       ) -> tuple[list[tuple[Scene, Negative]], dict[str, int]]:
    """One negative per (scene, taxonomy) where the scene allows it; also returns how many were not
    possible per taxonomy (reported, never silently dropped)."""
    out, impossible = [], {t: 0 for t in taxonomies}
    for scene in scenes:
        text = describe(scene)
        for t in taxonomies:
            neg = perturber.perturb(scene, text, t)
            if neg is None:
                impossible[t] += 1
            else:
                out.append((scene, neg))
    return out, impossible


# ----------------------------------------------------------------------------------------------
# captions: "a large red circle, a small blue square and a green triangle." (left to right)

PHRASE = re.compile(rf"^a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(KINDS)})(?: with the letter (\w))?$")


def caption_phrases(caption: str) -> list[str] | None:
    """The object phrases of a world caption, or None when it does not follow the grammar."""
    text = caption.strip()
    if not text.endswith("."):
        return None
    parts = re.split(r", | and ", text[:-1])
    return parts if all(PHRASE.match(p) for p in parts) else None


def join_caption(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0] + "."
    return ", ".join(phrases[:-1]) + " and " + phrases[-1] + "."


def check_caption(caption: str, scene: Scene) -> bool:
    """True iff the caption names exactly the scene's objects, left to right, with their attributes."""
    phrases = caption_phrases(caption)
    if phrases is None:
        return False
    truth = [o.phrase for o in sorted(scene.objects, key=lambda o: (o.position[0], o.position[1]))]
    return phrases == truth


def perturb_caption(scene: Scene, taxonomy: str, seed: int = 0) -> Negative | None:
    """A verified wrong caption of one taxonomy (None when the scene offers none)."""
    if taxonomy not in TAXONOMIES:
        raise ValueError(f"unknown taxonomy {taxonomy!r}; known: {TAXONOMIES}")
    caption = scene.caption
    phrases = caption_phrases(caption)
    if phrases is None or not check_caption(caption, scene):
        raise ValueError(f"scene {scene.image_id}: caption outside the grammar or wrong: {caption!r}")
    parsed = [PHRASE.match(p).groups() for p in phrases]  # (size, colour, kind, glyph)

    def phrase(size, colour, kind, glyph):
        return f"a {size} {colour} {kind}" + (f" with the letter {glyph}" if glyph else "")

    cands: list[list[str]] = []
    for i, (size, colour, kind, glyph) in enumerate(parsed):
        if taxonomy == "visual_attribute":
            cands += [phrases[:i] + [phrase(size, c, kind, glyph)] + phrases[i + 1:] for c in COLOURS if c != colour]
            cands += [phrases[:i] + [phrase(s, colour, kind, glyph)] + phrases[i + 1:] for s in SIZES if s != size]
        elif taxonomy == "object_identification":
            cands += [phrases[:i] + [phrase(size, colour, k, glyph)] + phrases[i + 1:] for k in KINDS if k != kind]
        elif taxonomy == "small_object" and size == "small":
            cands += [phrases[:i] + [phrase(size, c, kind, glyph)] + phrases[i + 1:] for c in COLOURS if c != colour]
        elif taxonomy == "text_ocr" and glyph:
            cands += [phrases[:i] + [phrase(size, colour, kind, g)] + phrases[i + 1:] for g in GLYPH_LETTERS if g != glyph]
        elif taxonomy == "counting" and len(phrases) > 1:
            cands.append(phrases[:i] + phrases[i + 1:])  # one object left out
        elif taxonomy == "spatial_relationship" and i + 1 < len(phrases) and phrases[i] != phrases[i + 1]:
            cands.append(phrases[:i] + [phrases[i + 1], phrases[i]] + phrases[i + 2:])
        elif taxonomy == "attribute_binding":
            for j in range(i + 1, len(parsed)):
                if parsed[j][1] != colour:
                    new = list(phrases)
                    new[i] = phrase(size, parsed[j][1], kind, glyph)
                    new[j] = phrase(parsed[j][0], colour, parsed[j][2], parsed[j][3])
                    cands.append(new)
    if taxonomy == "counterfactual":  # an object that is not there, inserted at a random place
        present = {(o.size, o.colour, o.kind) for o in scene.objects}
        for s in SIZES:
            for c in COLOURS:
                for k in KINDS:
                    if (s, c, k) not in present:
                        cands += [phrases[:i] + [phrase(s, c, k, None)] + phrases[i:] for i in range(len(phrases) + 1)]
    rng = np.random.default_rng([seed, scene.image_id, TAXONOMIES.index(taxonomy)])
    for idx in rng.permutation(len(cands)) if cands else []:
        text = join_caption(cands[int(idx)])
        if text != caption and not check_caption(text, scene):
            return Negative(caption, text, taxonomy)
    return None
