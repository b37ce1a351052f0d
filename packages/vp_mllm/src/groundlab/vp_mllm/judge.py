"""Judged benchmarks (MDVP-Bench, Ferret-Bench referring description / reasoning, LLaVA-Bench style).

A judge reads the question, the facts a reviewer is given about the image (the ground-truth region
descriptions), a reference answer and the model's answer, and scores each from 1 to 10; a benchmark's
figure is the model's total over the reference's, in percent (the relative score these benchmarks
report). The judge is any callable ``prompt -> reply`` (:class:`HTTPJudge` talks to an
OpenAI-compatible chat endpoint; :class:`OverlapJudge` is offline and deterministic, for tests and
for runs without a network). A reply must open with the two scores; anything else is an error that
names the item, never a silent zero.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

JUDGE_TEMPLATE = (
    "You review two answers to a question about marked regions of an image. You cannot see the image; "
    "these facts about it are true:\n{context}\n\nQuestion: {question}\n\n[Answer 1]\n{reference}\n\n"
    "[Answer 2]\n{candidate}\n\nRate each answer's helpfulness, relevance, accuracy and level of detail "
    "from 1 to 10. Reply with the two scores on the first line, separated by a space, then explain."
)
SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)[\s,]+(\d+(?:\.\d+)?)")


@dataclass
class JudgeItem:
    id: str
    question: str
    context: str
    reference: str
    candidate: str


def judge_prompt(item: JudgeItem) -> str:
    return JUDGE_TEMPLATE.format(context=item.context, question=item.question, reference=item.reference,
                                 candidate=item.candidate)


def parse_scores(reply: str, where: str) -> tuple[float, float]:
    m = SCORES.match(reply)
    if m is None:
        raise ValueError(f"{where}: the judge's reply does not open with two scores: {reply[:80]!r}")
    a, b = float(m.group(1)), float(m.group(2))
    if not (0 <= a <= 10 and 0 <= b <= 10):
        raise ValueError(f"{where}: scores must lie in [0, 10], got {a}, {b}")
    return a, b


def judge(items: Sequence[JudgeItem], judge_fn: Callable[[str], str]) -> dict[str, float]:
    """The relative score (model total / reference total, %) and both mean scores over ``items``."""
    if not items:
        raise ValueError("nothing to judge")
    ref = cand = 0.0
    for item in items:
        a, b = parse_scores(judge_fn(judge_prompt(item)), f"item {item.id}")
        ref, cand = ref + a, cand + b
    return {"relative_score": 100 * cand / max(ref, 1e-9), "reference_mean": ref / len(items),
            "candidate_mean": cand / len(items), "n": len(items)}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class OverlapJudge:
    """An offline, deterministic judge: each answer scores ``1 + 9 * F1`` of its words against the facts
    (the context). It reads only the prompt it is given, like a remote judge."""

    def __call__(self, prompt: str) -> str:
        context = prompt.split("these facts about it are true:\n", 1)[1].split("\n\nQuestion:", 1)[0]
        first = prompt.split("[Answer 1]\n", 1)[1].split("\n\n[Answer 2]\n", 1)[0]
        second = prompt.split("[Answer 2]\n", 1)[1].split("\n\nRate each answer", 1)[0]
        return f"{self._score(first, context):.2f} {self._score(second, context):.2f}\nword overlap with the facts"

    @staticmethod
    def _score(answer: str, context: str) -> float:
        a, c = _words(answer), _words(context)
        common = sum(min(a.count(w), c.count(w)) for w in set(a))
        if not a or not c or not common:
            return 1.0
        p, r = common / len(a), common / len(c)
        return 1 + 9 * 2 * p * r / (p + r)


class HTTPJudge:
    """A judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (GPT-4 in the papers)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
        self.url, self.model, self.api_key, self.timeout = url, model, api_key, timeout

    def __call__(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            reply = json.loads(resp.read())
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"{self.url}: not a chat-completions reply: {str(reply)[:200]}") from err


def caption_items(rows: list[dict], facts: dict[str, str], references: dict[str, str] | None = None) -> list[JudgeItem]:
    """Judge items of region-caption predictions (``evaluation.predict`` rows): the facts of each row's
    image (id -> text), the reference answer (default: the row's ground-truth answer)."""
    items = []
    for r in rows:
        if r["id"] not in facts:
            raise KeyError(f"no facts for prediction {r['id']}")
        items.append(JudgeItem(r["id"], r["question"], facts[r["id"]], (references or {}).get(r["id"], r["answer"]),
                               r["prediction"]))
    return items
