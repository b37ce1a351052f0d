"""TLDR evaluation in two steps, like LLaVA's: predictions JSONL (per-token probabilities), then scores.

``predict`` writes one line per record: ``{"id", "taxonomy", "task", "tokens", "labels", "probs"}``
(``probs`` is P(good) per response token; for the naive RM one probability, of the whole response).
``score_tldr`` / ``score_naive`` read such a file and compute the metrics of
:mod:`groundlab.tldr.metrics`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from groundlab.shared.config import iter_jsonl
from groundlab.shared.devices import model_device, to_device
from groundlab.shared.distributed import gather_shards, shard, write_jsonl

from .data import TldrDataset
from .metrics import ScoredResponse, sentence_ids_from_text, tldr_metrics
from .processing import collator_for


def _predict(model, dataset: TldrDataset, processor, out_path: str | Path, batch_size: int, token_probs) -> Path:
    """The batched pass both predictors share: ``token_probs(batch) -> (B, T)`` per-position probabilities,
    each record's response span written as its ``probs``. Under torchrun each process scores its share
    and the first writes the whole file (the same file)."""
    model.eval()
    collate = collator_for(processor, dataset.layout)
    head = dataset.layout.head
    mine, rows = shard(len(dataset)), []
    for start in range(mine.start, mine.stop, batch_size):
        idx = list(range(start, min(start + batch_size, mine.stop)))
        batch = collate([dataset[i] for i in idx])
        batch.pop("labels")
        probs = token_probs(to_device(batch, model_device(model)))  # the model may be on a GPU
        for row, i in enumerate(idx):
            rec, enc = dataset.records[i], dataset.encoded[i]
            s, n = enc["response_start"], enc["response_len"]
            p = probs[row, s : s + n].tolist()
            rows.append({"id": rec["id"], "taxonomy": rec["taxonomy"], "task": rec.get("task", ""),
                         "tokens": rec["tokens"], "labels": rec["labels"], "probs": p if head == "token" else [p[-1]]})
    return write_jsonl(gather_shards(rows), out_path)


@torch.no_grad()
def predict(model, dataset: TldrDataset, processor, out_path: str | Path, batch_size: int = 32) -> Path:
    """Score every record of ``dataset`` with a reward model and write the predictions JSONL."""
    return _predict(model, dataset, processor, out_path, batch_size,
                    lambda batch: torch.sigmoid(model(**batch).logits.float()))


@torch.no_grad()
def predict_generator(generator, dataset: TldrDataset, processor, out_path: str | Path, batch_size: int = 32) -> Path:
    """A baseline detector with nothing trained: each response token scored by the generator's own
    probability of it after what precedes it (``P(token k is good) := P_gen(token k | image, prompt,
    tokens < k)``), written as a predictions JSONL that :func:`score_tldr` reads like TLDR's. A word the
    generator would not have said is called bad; its mAP(neg) is what a reward model must beat to have
    learned more than the generator's surprise."""
    if dataset.layout.head != "token":
        raise ValueError("the generator baseline scores every response token: give it a 'token' layout")

    def token_probs(batch):
        log_probs = generator(**batch).logits.float().log_softmax(-1)  # position t predicts token t + 1
        ids = batch["input_ids"][:, 1:, None]
        out = torch.zeros(ids.shape[0], ids.shape[1] + 1, device=log_probs.device)
        out[:, 1:] = log_probs[:, :-1].gather(2, ids)[..., 0].exp()  # at each token: P(it | what precedes)
        return out

    return _predict(generator, dataset, processor, out_path, batch_size, token_probs)


def read_predictions(path: str | Path) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path, "predictions")]


def score_tldr(predictions: list[dict], threshold: float = 0.5) -> dict[str, float]:
    """A_T, A_S, A_R, mAP(neg|pos) overall, per taxonomy and per task (``task:<name>/...``)."""
    responses = [ScoredResponse(p["labels"], p["probs"], sentence_ids_from_text(p["tokens"]), p["taxonomy"])
                 for p in predictions]
    out = tldr_metrics(responses, threshold)
    for task in sorted({p["task"] for p in predictions}):
        sub = [r for r, p in zip(responses, predictions) if p["task"] == task]
        out |= {f"task:{task}/{k}": v for k, v in tldr_metrics(sub, threshold, by_taxonomy=False).items()}
    return out


def score_naive(predictions: list[dict], threshold: float = 0.5) -> dict[str, float]:
    """The naive RM's response accuracy A_R (its single probability against the response label)."""
    right = [(p["probs"][-1] > threshold) == bool(all(p["labels"])) for p in predictions]
    good = np.array([all(p["labels"]) for p in predictions])
    right_arr = np.array(right)
    out = {"A_R": float(right_arr.mean()), "n_responses": len(predictions)}
    if good.any() and (~good).any():
        out["A_R_balanced"] = float((right_arr[good].mean() + right_arr[~good].mean()) / 2)
    for tax in sorted({p["taxonomy"] for p in predictions}):
        out[f"{tax}/A_R"] = float(np.mean([r for r, p in zip(right, predictions) if p["taxonomy"] == tax]))
    return out


def all_good_baseline(predictions: list[dict]) -> dict[str, float]:
    """A predictor that calls every token good: what the class imbalance alone gives."""
    return score_tldr([{**p, "probs": [1.0] * len(p["labels"])} for p in predictions])
