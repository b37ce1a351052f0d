"""IVM evaluation: heatmap quality, REC from the heatmap's box, and downstream VQA with / without IVM.

Two steps, like every groundlab evaluation: :func:`predict_heatmaps` writes the predictions (a JSONL
row per sample: id, instruction, the box of its heatmap at the threshold in pixel edges; the heatmaps themselves,
which the pixel AP needs, in ``<file>.npz`` beside it), then :func:`score_heatmaps` scores that file
against the samples (``groundlab-ivm eval --config ... --predictions FILE`` does it from the command
line).

- heatmap IoU: mean over samples of IoU(heat > threshold, true mask);
- pixel AP: average precision of the heatmap's scores for the true mask's pixels, pooled over samples;
- REC accuracy: the box of ``heat > threshold`` (the whole image when nothing passes) has IoU >= 0.5
  with the true box (Table 7's use of the heatmap), both in pixel edges (a pixel is a unit square);
- downstream VQA: any answerer (a callable ``(images, questions) -> answers``) on the original images
  and on the IVM-masked ones; the tiny LLaVA base by default, a client for a real LMM otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from groundlab.shared.devices import model_device, to_device
from groundlab.shared.distributed import barrier, gather_shards, is_main_process, shard
from groundlab.shared.metrics import average_precision, mask_iou, rec_accuracy
from groundlab.shared.world import Scene

from .data import typed_instructions
from .masking import MODES, apply_mask, box_of, heatmaps, soft_mask
from .processing import policy_inputs, tower_pixels


@dataclass
class GroundingSample:
    id: str
    image: np.ndarray
    instruction: str
    mask: np.ndarray  # (H, W) bool
    n_objects: int = 0
    all_objects: np.ndarray | None = None  # (H, W) bool: every object of the scene (a trivial baseline)
    kind: str = ""
    """The instruction's type (``data.INSTRUCTION_TYPES``; empty when unknown)."""

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The target's box in pixel edges, (x0, y0, x1, y1) with x1, y1 exclusive."""
        b = box_of(self.mask, 0.5)
        if b is None:
            raise ValueError(f"sample {self.id}: empty target mask")
        return edges(b)


def grounding_samples(scenes: Sequence[Scene]) -> list[GroundingSample]:
    """One sample per (scene, target object); the instruction cycles through the target's
    expressions and questions so that every kind is evaluated."""
    out = []
    for scene in scenes:
        for target, instructions in sorted(typed_instructions(scene).items()):
            kind, text = instructions[(scene.index + target) % len(instructions)]
            out.append(GroundingSample(f"{scene.split}-{scene.index}-{target}", scene.image, text,
                                       scene.objects[target].mask, len(scene.objects),
                                       np.any([o.mask for o in scene.objects], axis=0), kind))
    return out


def _scores(heats: Sequence[np.ndarray], samples: Sequence[GroundingSample], threshold: float, name: str
            ) -> dict[str, float]:
    ious, labels, scores = [], [], []
    for h, s in zip(heats, samples, strict=True):
        if h.shape != s.mask.shape:
            raise ValueError(f"sample {s.id}: heatmap {h.shape} vs mask {s.mask.shape}")
        ious.append(mask_iou(h > threshold, s.mask))
        labels.append(s.mask.reshape(-1))
        scores.append(h.reshape(-1))
    rec = rec_accuracy([heatmap_box(h, threshold) for h in heats], [s.box for s in samples])
    out = {f"{name}/mIoU": float(np.mean(ious)), f"{name}/pixel_AP": average_precision(np.concatenate(labels),
           np.concatenate(scores)), f"{name}/rec_acc": rec["acc@0.5"], f"{name}/n": len(samples)}
    for n in sorted({s.n_objects for s in samples if s.n_objects}):  # does the heatmap pick the target?
        out[f"{name}/mIoU_{n}_objects"] = float(np.mean([i for i, s in zip(ious, samples) if s.n_objects == n]))
    for kind in sorted({s.kind for s in samples if s.kind}):  # does it follow every kind of instruction?
        out[f"{name}/mIoU_{kind}"] = float(np.mean([i for i, s in zip(ious, samples) if s.kind == kind]))
        out[f"{name}/n_{kind}"] = sum(s.kind == kind for s in samples)
    return out


def edges(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """An inclusive pixel box -> the same pixels' box in pixel edges (x1, y1 exclusive), the convention
    of continuous box IoU: a one-pixel box has area 1, not 0."""
    x0, y0, x1, y1 = box
    return x0, y0, x1 + 1, y1 + 1


def heatmap_box(heat: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """REC's box from a heatmap, in pixel edges (x1, y1 exclusive): the box of ``heat > threshold``,
    the whole image when nothing passes."""
    box = box_of(heat, threshold)
    return edges(box) if box is not None else (0, 0, heat.shape[1], heat.shape[0])


def predict_heatmaps(model, processor, samples: Sequence[GroundingSample], out_path: str | Path,
                     threshold: float = 0.5) -> Path:
    """The model's heatmap for every sample: ``out_path`` (JSONL: id, instruction, the box at
    ``threshold``) and ``<out_path>.npz`` (the heatmaps, float32, by id). Returns ``out_path``. Under
    torchrun each process predicts its share and the first writes the whole file (the same file)."""
    mine = [samples[i] for i in shard(len(samples))]
    heats = gather_shards([h.numpy() for h in heatmaps(model, processor, [s.image for s in mine],
                                                        [s.instruction for s in mine])])
    if is_main_process():
        write_heatmaps(heats, samples, out_path, threshold)
    barrier()
    return Path(out_path)


def write_heatmaps(heats: Sequence[np.ndarray], samples: Sequence[GroundingSample], out_path: str | Path,
                   threshold: float = 0.5) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as f:
        for h, s in zip(heats, samples, strict=True):
            f.write(json.dumps({"id": s.id, "instruction": s.instruction, "box": heatmap_box(h, threshold)}) + "\n")
    np.savez_compressed(_heatmap_file(out_path), ids=np.array([s.id for s in samples]),
                        heatmaps=np.stack([np.asarray(h, np.float32) for h in heats]))
    return out_path


def _heatmap_file(path: Path) -> Path:
    return path.with_name(path.name + ".npz")


def read_heatmaps(path: str | Path, samples: Sequence[GroundingSample]) -> list[np.ndarray]:
    """The heatmaps of a predictions file (:func:`write_heatmaps`), in the order of ``samples``: every
    sample must have exactly one, and the file nothing else."""
    path = Path(path)
    store = _heatmap_file(path)
    for f in (path, store):
        if not f.is_file():
            raise FileNotFoundError(f"no IVM predictions at {f} (write them with predict_heatmaps)")
    try:
        with np.load(store) as npz:
            ids, heats = [str(i) for i in npz["ids"]], npz["heatmaps"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{store}: not an IVM heatmap file ({err})") from err
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if [r.get("id") for r in rows] != ids:
        raise ValueError(f"{path} and {store} list different samples")
    by_id = dict(zip(ids, heats))
    if len(by_id) != len(ids):
        raise ValueError(f"{store}: a sample appears twice")
    wanted = [s.id for s in samples]
    missing, extra = sorted(set(wanted) - set(by_id)), sorted(set(by_id) - set(wanted))
    if missing or extra:
        raise ValueError(f"{path}: {len(missing)} sample(s) without a prediction {missing[:3]}, "
                         f"{len(extra)} prediction(s) of no sample {extra[:3]}")
    return [by_id[i] for i in wanted]


def score_heatmaps(path: str | Path, samples: Sequence[GroundingSample], threshold: float = 0.5,
                   name: str = "heatmap") -> dict[str, float]:
    """Heatmap mIoU, pixel AP and REC accuracy of a predictions file against the samples' true masks."""
    return _scores(read_heatmaps(path, samples), samples, threshold, name)


@torch.no_grad()
def condition_cosine(model, processor, samples: Sequence[GroundingSample]) -> float:
    """Mean cosine similarity of the condition tokens of different targets' instructions on the same
    image (1.0: the condition does not depend on the instruction)."""
    by_image: dict[str, list[GroundingSample]] = {}
    for s in samples:
        by_image.setdefault(s.id.rsplit("-", 1)[0], []).append(s)
    sims = []
    model.eval()
    for group in by_image.values():
        if len(group) < 2:
            continue
        input_ids, att = policy_inputs(processor.tokenizer, [s.instruction for s in group], model.config.n_image_tokens)
        pixels = tower_pixels(processor.image_processor, [s.image for s in group])
        input_ids, att, pixels = to_device((input_ids, att, pixels), model_device(model))
        c = torch.nn.functional.normalize(model.condition(input_ids, att, pixels)[:, 0].float(), dim=-1)
        sim = c @ c.T
        k = len(group)
        sims.append(float((sim.sum() - sim.diagonal().sum()) / (k * (k - 1))))
    return float(np.mean(sims)) if sims else float("nan")


def heatmap_quality(model, processor, samples: Sequence[GroundingSample], out_path: str | Path,
                    threshold: float = 0.5, name: str = "heatmap") -> dict[str, float]:
    """:func:`predict_heatmaps` to ``out_path``, then :func:`score_heatmaps` of that file."""
    return score_heatmaps(predict_heatmaps(model, processor, samples, out_path, threshold), samples, threshold, name)


def whole_image_baseline(samples: Sequence[GroundingSample], name: str = "baseline/whole_image") -> dict[str, float]:
    """Keep everything: the heatmap is 1 everywhere (what an image without IVM amounts to)."""
    return _scores([np.ones(s.mask.shape, np.float32) for s in samples], samples, 0.5, name)


def all_objects_baseline(samples: Sequence[GroundingSample], name: str = "baseline/all_objects") -> dict[str, float]:
    """Keep every object and drop only the background: the strongest answer that ignores the
    instruction (the union of the scene's objects)."""
    for s in samples:
        if s.all_objects is None:
            raise ValueError(f"sample {s.id}: no all-objects mask (build samples with grounding_samples)")
    return _scores([s.all_objects.astype(np.float32) for s in samples], samples, 0.5, name)


# ----------------------------------------------------------------------------------------------
# downstream VQA


Answerer = Callable[[Sequence[np.ndarray], Sequence[str]], list[str]]


def llava_answerer(model, processor, cfg) -> Answerer:
    """A tiny LLaVA (the ``make bases`` one) as the downstream model: greedy short answers."""
    from groundlab.shared.bases.vlm import generate

    def answer(images, questions):
        ids = generate(model, processor, cfg, [np.ascontiguousarray(x) for x in images], list(questions), max_new_tokens=8)
        return [processor.tokenizer.decode(x).strip() for x in ids]

    return answer


def chat_completions_answerer(base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                              instruction: str = "Answer with one word.") -> Answerer:
    """A real LMM behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, SGLang, a hosted
    API) as the downstream model: each image goes as a base64 PNG ``image_url`` with the question."""
    import base64
    import io
    import urllib.request

    from PIL import Image

    url = base_url.rstrip("/") + "/chat/completions"

    def ask(image: np.ndarray, question: str) -> str:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
        data = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"model": model, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data}},
            {"type": "text", "text": f"{question}\n{instruction}"}]}]}
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            reply = json.loads(resp.read())
        try:
            return reply["choices"][0]["message"]["content"].strip().lower().rstrip(".")
        except (KeyError, IndexError, AttributeError) as err:
            raise ValueError(f"{url}: unexpected reply {str(reply)[:200]}") from err

    def answer(images, questions):
        return [ask(im, q) for im, q in zip(images, questions)]

    return answer


def vqa_questions(scenes: Sequence[Scene], types: tuple[str, ...] = ("colour", "size", "shape")):
    """One question about a single object per scene (cycling through the scene's questions)."""
    out = []
    for scene in scenes:
        qs = [q for q in scene.qa if q.type in types and len(q.objects) == 1]
        if qs:
            q = qs[scene.index % len(qs)]
            out.append((scene, q))
    return out


@torch.no_grad()
def vqa_with_and_without_ivm(answer: Answerer, model, processor, scenes: Sequence[Scene], threshold: float = 0.8,
                             mode: str = "overlay", out_path: str | Path | None = None) -> dict[str, float]:
    """Accuracy of ``answer`` on the original images, on IVM-masked ones, and on images masked with
    the true object mask (the oracle: what a perfect IVM would give)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pairs = vqa_questions(scenes)
    images = [s.image for s, _ in pairs]
    questions = [q.question for _, q in pairs]
    truth = [q.answer for _, q in pairs]
    heats = heatmaps(model, processor, images, questions) if model is not None else None
    variants = {"without_ivm": images}
    if heats is not None:
        variants["with_ivm"] = [apply_mask(im, soft_mask(h, threshold), mode) for im, h in zip(images, heats)]
    variants["oracle_mask"] = [apply_mask(im, soft_mask(torch.from_numpy(s.objects[q.objects[0]].mask.astype(np.float32)),
                                                         0.5), mode) for im, (s, q) in zip(images, pairs)]
    out, rows = {}, {name: answer(ims, questions) for name, ims in variants.items()}
    for name, answers in rows.items():
        out[f"vqa/{name}/accuracy"] = float(np.mean([a == t for a, t in zip(answers, truth)]))
    out["vqa/n"] = len(pairs)
    if out_path is not None:
        with open(out_path, "w") as f:
            for i, (s, q) in enumerate(pairs):
                f.write(json.dumps({"scene": f"{s.split}-{s.index}", "question": q.question, "answer": q.answer,
                                    **{name: rows[name][i] for name in rows}}) + "\n")
    return out
