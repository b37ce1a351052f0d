"""TLDR's evaluation metrics (arXiv 2410.04734, Section 3), defined exactly once.

A response is a sequence of response tokens with a true label each (1 = good, 0 = hallucinated) and
a predicted probability of being good; a token is predicted good iff ``p > threshold`` (0.5).

- Token accuracy ``A_T``: mean over the tokens of a response, then over responses.
- Sentence accuracy ``A_S``: a response is split into sentences after each ``.``, ``?`` or ``!`` (a
  period between two digits, a decimal, ends nothing: :func:`sentence_ids_from_text`); a sentence
  is right iff the product of its predicted labels equals the product of its true labels (it is good
  only if all its tokens are); mean within a response, then over responses.
- Response accuracy ``A_R``: ``1[prod(pred) == prod(true)]``, mean over responses. ``A_R_balanced``
  (not in the paper) averages A_R over the positives and over the negatives, so an evaluation set
  dominated by one kind cannot be won by always answering that kind.
- ``mAP(neg)``: average precision of finding the bad tokens (labels flipped, score ``1 - p``), the
  meaningful one since most tokens are good; ``mAP(pos)``: good tokens positive, score ``p``.
  Choice left open by the paper: both pool every response token of the evaluation set (one ranking,
  not a mean of per-response APs), which also keeps responses without a bad token from being
  undefined.

Every figure is also reported per taxonomy tag (the positives' tag is ``"original"``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from groundlab.shared.metrics import average_precision


@dataclass
class ScoredResponse:
    """One scored response. ``sentence_ids[k]`` is the sentence token k belongs to (see
    :func:`sentence_ids_from_text`)."""

    labels: Sequence[int]
    probs: Sequence[float]
    sentence_ids: Sequence[int] | None = None
    taxonomy: str = "original"

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.probs):
            raise ValueError(f"{len(self.labels)} labels but {len(self.probs)} probabilities")
        if len(self.labels) == 0:
            raise ValueError("a response needs at least one token")
        if self.sentence_ids is not None and len(self.sentence_ids) != len(self.labels):
            raise ValueError(f"{len(self.sentence_ids)} sentence ids for {len(self.labels)} tokens")


def ends_sentence(text: str, following: str = "") -> bool:
    """Whether ``text`` (a token, or a sentence so far) ends a sentence: it ends with ``.``, ``?`` or
    ``!``, and not with the point of a decimal (a digit, ``.``, and ``following`` starting with a digit)."""
    text = text.rstrip()
    if not text.endswith((".", "?", "!")):
        return False
    decimal = text.endswith(".") and text[-2:-1].isdigit() and following[:1].isdigit()
    return not decimal


def sentence_ids_from_text(token_texts: Sequence[str]) -> list[int]:
    """Sentence index of each token: a new sentence starts after a token that ends one
    (:func:`ends_sentence`, looking at the next token for decimals)."""
    ids, current, so_far = [], 0, ""
    for k, text in enumerate(token_texts):
        ids.append(current)
        so_far = so_far[-1:] + text  # the character before a lone "." token decides a decimal
        if ends_sentence(so_far, token_texts[k + 1] if k + 1 < len(token_texts) else ""):
            current += 1
    return ids


def response_scores(r: ScoredResponse, threshold: float = 0.5) -> tuple[float, float, float]:
    """(token accuracy, sentence accuracy, response correctness) of one response."""
    y = np.asarray(r.labels, dtype=int)
    pred = (np.asarray(r.probs, dtype=float) > threshold).astype(int)
    a_t = float((pred == y).mean())
    sids = np.asarray(r.sentence_ids if r.sentence_ids is not None else np.zeros(len(y), int))
    sentences = [s for s in dict.fromkeys(sids.tolist())]
    a_s = float(np.mean([pred[sids == s].prod() == y[sids == s].prod() for s in sentences]))
    a_r = float(pred.prod() == y.prod())
    return a_t, a_s, a_r


def tldr_metrics(responses: Sequence[ScoredResponse], threshold: float = 0.5, by_taxonomy: bool = True
                 ) -> dict[str, float]:
    """``A_T``, ``A_S``, ``A_R``, ``mAP_neg``, ``mAP_pos`` over ``responses`` (and ``<tag>/...`` per
    taxonomy). An AP whose positive class is absent is left out rather than reported as 0."""
    if not responses:
        raise ValueError("no response to score")
    out = _metrics(responses, threshold)
    if by_taxonomy:
        groups: dict[str, list[ScoredResponse]] = defaultdict(list)
        for r in responses:
            groups[r.taxonomy].append(r)
        for tag, group in sorted(groups.items()):
            out |= {f"{tag}/{k}": v for k, v in _metrics(group, threshold).items()}
    return out


def _metrics(responses: Sequence[ScoredResponse], threshold: float) -> dict[str, float]:
    per = np.array([response_scores(r, threshold) for r in responses])
    labels = np.concatenate([np.asarray(r.labels, dtype=int) for r in responses])
    probs = np.concatenate([np.asarray(r.probs, dtype=float) for r in responses])
    out = {"A_T": float(per[:, 0].mean()), "A_S": float(per[:, 1].mean()), "A_R": float(per[:, 2].mean()),
           "n_responses": len(responses), "n_tokens": int(labels.size)}
    good = np.array([all(r.labels) for r in responses])
    if good.any() and (~good).any():  # the mean of A_R over positives and over negatives
        out["A_R_balanced"] = float((per[good, 2].mean() + per[~good, 2].mean()) / 2)
    if (labels == 0).any():
        out["mAP_neg"] = average_precision(1 - labels, 1 - probs)
    if (labels == 1).any():
        out["mAP_pos"] = average_precision(labels, probs)
    return out


def hallucination_rates(responses: Sequence[ScoredResponse], threshold: float = 0.5) -> dict[str, float]:
    """Share of tokens, sentences and responses flagged as hallucinated by the reward model (the
    paper's Eq. 7 rates, i.e. ``1 - gamma`` with gamma the predicted-good share; labels unused)."""
    if not responses:
        raise ValueError("no response to score")
    tok, sent, resp = [], [], []
    for r in responses:
        bad = np.asarray(r.probs, dtype=float) <= threshold
        sids = np.asarray(r.sentence_ids if r.sentence_ids is not None else np.zeros(len(bad), int))
        tok.append(bad)
        sent += [bool(bad[sids == s].any()) for s in dict.fromkeys(sids.tolist())]
        resp.append(bool(bad.any()))
    return {"token": float(np.concatenate(tok).mean()), "sentence": float(np.mean(sent)),
            "response": float(np.mean(resp))}


def rate_correlation(captioners: dict[str, dict[str, float]]) -> dict[str, float]:
    """Table 3's idea: Pearson r, across captioners, between TLDR's token / sentence / response
    hallucination rates of their captions and the captions' true error (``true_error``). Each value
    of ``captioners`` holds those four rates of one captioner; r is left out where either side is
    constant (undefined)."""
    if len(captioners) < 3:
        raise ValueError(f"a correlation needs at least 3 captioners, got {len(captioners)}")
    truth = np.array([c["true_error"] for c in captioners.values()], dtype=float)
    out: dict[str, float] = {"n_captioners": len(captioners)}
    for rate in ("token", "sentence", "response"):
        x = np.array([c[rate] for c in captioners.values()], dtype=float)
        if np.ptp(x) > 0 and np.ptp(truth) > 0:
            out[f"pearson_{rate}"] = float(np.corrcoef(x, truth)[0, 1])
    return out
