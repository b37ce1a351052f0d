"""The IVM run: world data -> DWSL stage I (discriminator) -> stage II arms -> evaluation.

Stages (each reused on a second run with the same config, recomputed with ``force``):

1. data: the synthetic world exported as IVM-Mix (a small clean ``HumanLabelData`` split, a larger
   ``VQAMachineData`` split with corrupted labels), or real IVM-Mix folders (``data.root``);
2. discriminator (DWSL stage I): its own LoRA + head on the LMM, human (1) vs machine (0) triples over
   the label-masked image;
3. generator arms (stage II), same seed, steps and initialisation: ``human_only`` (uniform weights),
   ``mixed_uniform`` (human + machine, no weighting), ``mixed_label`` (``0.2 + 0.8 * is_human``), and
   ``mixed_dwsl`` (``clip(sigmoid(D), 0.1, 0.9)`` from stage I, computed once per item on its label),
   and the diagnostic ``mixed_oracle`` (the world only: 0.9 for every correct label, 0.1 for every
   corrupted one, i.e. DWSL with a perfect discriminator);
4. evaluation on clean held-out scenes: heatmap mIoU / pixel AP / REC accuracy of each arm, beside the
   whole-image and untrained baselines; downstream VQA of the tiny LLaVA base on cluttered scenes
   without IVM, with the best arm's masks, and with the true masks (oracle).

The image encoder and the LMM are the tiny bases of ``make bases`` (SAM and LLaVA), loaded through the
same code that loads the official checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from groundlab.shared.bases import ensure_base
from groundlab.shared.bases.sam import TinySamConfig, load_sam_checkpoint
from groundlab.shared.bases.vlm import TinyVLMConfig
from groundlab.shared.config import load_config, non_negative, one_of, positive, within
from groundlab.shared.distributed import seed_everything, setup_logging
from groundlab.shared.loading import load_pretrained, torch_load
from groundlab.shared.runs import content_hash, mark_complete, reuse_or_reset, runs_root, write_metrics
from groundlab.shared.training import TrainConfig, resolve_bf16, train
from groundlab.shared.world import World, WorldConfig

from .checkpoint import load_official, load_part, to_official, trained_keys
from .configuration import IVMConfig
from .data import HUMAN_SPLITS, MACHINE_SPLITS, IVMCollator, IVMDataset, export_world, read_split
from .evaluation import (
    all_objects_baseline,
    chat_completions_answerer,
    condition_cosine,
    grounding_samples,
    heatmap_quality,
    llava_answerer,
    vqa_with_and_without_ivm,
    whole_image_baseline,
)
from .masking import MODES
from .modeling import DiscriminatorForTraining, IVMModel, dwsl_weights, label_weights

logger = logging.getLogger("groundlab")

ARMS = ("human_only", "mixed_uniform", "mixed_label", "mixed_dwsl", "mixed_oracle")


@dataclass
class DataConfig:
    human_scenes: int = 250
    machine_scenes: int = 750
    corrupt_prob: float = 0.5
    eval_scenes: int = 100
    clutter_scenes: int = 150
    clutter_objects: tuple[int, int] = (4, 6)
    """Objects per cluttered scene for the downstream VQA (the bases saw 1-3)."""
    world_seed: int = 0
    root: str | None = None
    """Real IVM-Mix data instead of the world: a folder holding split folders (see ``groundlab.ivm.data``)."""

    def __post_init__(self) -> None:
        positive(self, "human_scenes", "eval_scenes", "clutter_scenes")
        non_negative(self, "machine_scenes")
        within(self, "corrupt_prob", 0.0, 1.0)
        lo, hi = self.clutter_objects
        if not 1 <= lo <= hi:
            raise ValueError(f"'clutter_objects' must be (lo, hi) with 1 <= lo <= hi, got {self.clutter_objects}")


@dataclass
class ModelConfig:
    llava: str | None = None
    """A LLaVA ``from_pretrained`` directory; None = the tiny LLaVA base of ``make bases``."""
    sam: str | None = None
    """An official-layout SAM checkpoint; None = the tiny SAM base."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """The language model's projections that get LoRA (the paper: q and v)."""
    condition_hidden: int = 128
    decoder_mlp: int = 256
    decoder_heads: int = 4
    discriminator_hidden: int = 64

    def __post_init__(self) -> None:
        positive(self, "lora_r", "lora_alpha", "condition_hidden", "decoder_mlp", "decoder_heads", "discriminator_hidden")
        within(self, "lora_dropout", 0.0, 0.99)
        if not self.lora_targets:
            raise ValueError("'lora_targets' is empty")


@dataclass
class RunConfig:
    name: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    discriminator: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=600, batch_size=32, lr=1e-3, warmup_steps=20, save_steps=200, logging_steps=50))
    generator: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=600, batch_size=32, lr=1e-3, warmup_steps=20, save_steps=200, logging_steps=50))
    arms: tuple[str, ...] = ARMS
    threshold: float = 0.5
    """Heatmap threshold for IoU and REC."""
    vqa_threshold: float = 0.8
    """The paper's threshold for VQA masking."""
    vqa_mode: str = "overlay"
    vqa_url: str | None = None
    """An OpenAI-compatible endpoint (``http://host:port/v1``) of a real LMM to answer the downstream VQA
    instead of the tiny LLaVA base; ``vqa_model`` names the model there (key in $IVM_VQA_API_KEY)."""
    vqa_model: str | None = None


    def __post_init__(self) -> None:
        within(self, "threshold", 0.0, 1.0)
        within(self, "vqa_threshold", 0.0, 1.0)
        one_of(self, "vqa_mode", MODES)
        one_of(self, "arms", ARMS)
        if not self.arms:
            raise ValueError("'arms' is empty")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> RunConfig:
        return load_config(cls, path, overrides)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# building the model from the bases


def load_llava_into(model: IVMModel, llava: LlavaForConditionalGeneration) -> None:
    """Copy a pretrained LLaVA into the LoRA-wrapped ``model.lmm`` strictly: every LLaVA weight lands
    (a LoRA-wrapped Linear keeps its weight under ``base_layer``), every non-LoRA weight is filled."""
    own = model.lmm.state_dict()
    mapped = {}
    for key, value in llava.state_dict().items():
        new = key if key in own else re.sub(r"\.(weight|bias)$", r".base_layer.\1", key)
        if new not in own:
            raise KeyError(f"LLaVA weight {key} has no place in the IVM LMM")
        if own[new].shape != value.shape:
            raise ValueError(f"LLaVA weight {key}: {tuple(value.shape)} vs {tuple(own[new].shape)}")
        mapped[new] = value
    load_part(model.lmm, mapped, [k for k in own if ".lora_" not in k], "the LLaVA checkpoint")


def build_from_bases(llava_path: str | Path, sam_path: str | Path, m: ModelConfig) -> IVMModel:
    llava = load_pretrained(LlavaForConditionalGeneration, llava_path, "the LLaVA base")
    sc = TinySamConfig.from_json(Path(sam_path).parent / "config.json")
    sam = dict(img_size=sc.image_size, patch_size=sc.patch_size, embed_dim=sc.encoder_dim, depth=sc.encoder_depth,
               num_heads=sc.encoder_heads, window_size=sc.window_size, global_attn_indexes=sc.global_attn_indexes,
               out_chans=sc.prompt_dim)
    cfg = IVMConfig(sam=sam, lmm_config=llava.config.to_dict(), lora_r=m.lora_r, lora_alpha=m.lora_alpha,
                    lora_dropout=m.lora_dropout, lora_targets=tuple(m.lora_targets), condition_hidden=m.condition_hidden, decoder_mlp=m.decoder_mlp,
                    decoder_heads=m.decoder_heads, discriminator_hidden=m.discriminator_hidden)
    model = IVMModel(cfg)
    load_llava_into(model, llava)
    load_sam_checkpoint(model.image_encoder, sam_path, prefix="image_encoder.")
    return model


class GeneratorForTraining(nn.Module):
    """DWSL stage II with one weighting: ``uniform``, ``label`` or ``dwsl`` (a weight per item)."""

    def __init__(self, model: IVMModel, weighting: str, item_weights: torch.Tensor | None = None):
        super().__init__()
        if weighting not in ("uniform", "label", "dwsl"):
            raise ValueError(f"weighting must be uniform, label or dwsl, got {weighting!r}")
        if weighting == "dwsl" and item_weights is None:
            raise ValueError("dwsl weighting needs per-item weights (the discriminator's, or the oracle's)")
        self.model, self.weighting = model, weighting
        self.register_buffer("item_weights", item_weights if item_weights is not None else torch.ones(0), persistent=False)
        model.set_trainable("generator")

    def forward(self, input_ids, attention_mask, pixel_values, images, masks, is_human, index):
        w = None
        if self.weighting == "label":
            w = label_weights(is_human)
        elif self.weighting == "dwsl":
            w = self.item_weights[index]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         images=images, masks=masks, weights=w)
        return {"loss": out.loss, "logits": out.logits}


def oracle_weights(items: list, low: float = 0.1, high: float = 0.9) -> torch.Tensor:
    """DWSL's weights from a perfect discriminator: ``high`` for a correct label (human, or a machine
    label the world export left uncorrupted), ``low`` for a corrupted one."""
    if any(not it.is_human and "corruption" not in it.extra for it in items):
        raise ValueError("the oracle arm needs the world export's 'corruption' tags on machine items")
    return torch.tensor([high if it.is_human or it.extra["corruption"] == "none" else low for it in items])


@torch.no_grad()
def discriminator_scores(model: IVMModel, dataset: IVMDataset, collate: IVMCollator, batch_size: int = 64) -> torch.Tensor:
    """D's logit for every item of ``dataset`` (its label-masked image, no augmentation)."""
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out.append(model.discriminate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# the run


def run(cfg: RunConfig, force: bool = False) -> Path:
    setup_logging()
    t_start = time.time()
    root = runs_root() / "ivm" / cfg.name
    seed_everything(cfg.generator.seed)
    llava_path = Path(cfg.model.llava) if cfg.model.llava else ensure_base("llava")
    sam_path = Path(cfg.model.sam) if cfg.model.sam else ensure_base("sam")
    processor = AutoProcessor.from_pretrained(llava_path)
    tok = processor.tokenizer
    metrics: dict[str, float] = {}

    # 1. data
    if cfg.data.root:
        data_dir = Path(cfg.data.root)
    else:
        data_dir = root / f"data-{content_hash(asdict(cfg.data))}"
        if not reuse_or_reset(data_dir, force):
            counts = export_world(World(WorldConfig(), seed=cfg.data.world_seed), data_dir, cfg.data.human_scenes,
                                  cfg.data.machine_scenes, cfg.data.corrupt_prob, seed=cfg.data.world_seed)
            write_metrics(data_dir / "counts.json", counts, config=asdict(cfg.data))
            mark_complete(data_dir)
    human = [it for s in HUMAN_SPLITS if (data_dir / s).is_dir() for it in read_split(data_dir / s)]
    machine = [it for s in MACHINE_SPLITS if (data_dir / s).is_dir() for it in read_split(data_dir / s)]
    if not human:
        raise FileNotFoundError(f"no {HUMAN_SPLITS} split under {data_dir}")
    mixed = human + machine
    metrics |= {"data/human_items": len(human), "data/machine_items": len(machine)}
    if machine and "corruption" in machine[0].extra:
        metrics["data/machine_corrupted_share"] = float(np.mean([it.extra["corruption"] != "none" for it in machine]))

    stamp = content_hash(asdict(cfg.model), str(llava_path), str(sam_path), str(data_dir))

    def fresh() -> IVMModel:
        torch.manual_seed(cfg.generator.seed)  # the same initialisation for every arm
        return build_from_bases(llava_path, sam_path, cfg.model)

    vision = AutoConfig.from_pretrained(llava_path).vision_config  # the LMM's and SAM's input sizes
    n_img = (vision.image_size // vision.patch_size) ** 2
    size = TinySamConfig.from_json(Path(sam_path).parent / "config.json").image_size

    # 2. discriminator (stage I)
    item_weights, d_dir = None, None
    if "mixed_dwsl" in cfg.arms:
        d_dir = root / f"discriminator-{content_hash(stamp, asdict(cfg.discriminator) | {'progress_bar': None, 'bf16': resolve_bf16(cfg.discriminator.bf16)})}"
        model = fresh()
        disc_ds = IVMDataset(mixed, tok, n_img, size, role="discriminator", augment=True, seed=cfg.discriminator.seed)
        collate = IVMCollator(processor, role="discriminator")
        if not reuse_or_reset(d_dir, force):
            t0 = time.time()
            train(DiscriminatorForTraining(model), disc_ds, collate, cfg.discriminator, d_dir / "checkpoints")
            metrics["time/discriminator_train_s"] = time.time() - t0
            state = model.state_dict()
            torch.save({k: state[k] for k in trained_keys(model, "discriminator")}, d_dir / "discriminator.pt")
            mark_complete(d_dir)
        else:
            load_part(model, torch_load(d_dir / "discriminator.pt", "discriminator weights"),
                      trained_keys(model, "discriminator"), str(d_dir / "discriminator.pt"))
        plain = IVMDataset(mixed, tok, n_img, size, role="discriminator", augment=False)
        logits = discriminator_scores(model, plain, collate)
        item_weights = dwsl_weights(logits)
        is_human = torch.tensor([it.is_human for it in mixed], dtype=torch.bool)
        metrics["discriminator/train_accuracy"] = float(((logits > 0) == is_human).float().mean())
        metrics["dwsl/mean_weight_human"] = float(item_weights[is_human].mean())
        if machine:
            metrics["dwsl/mean_weight_machine"] = float(item_weights[~is_human].mean())
            if "corruption" in machine[0].extra:
                clean = torch.tensor([it.extra["corruption"] == "none" for it in machine])
                mw = item_weights[~is_human]
                if clean.any():
                    metrics["dwsl/mean_weight_machine_clean"] = float(mw[clean].mean())
                if (~clean).any():
                    metrics["dwsl/mean_weight_machine_corrupted"] = float(mw[~clean].mean())
        with open(root / "dwsl_weights.jsonl", "w") as f:
            for it, w, lg in zip(mixed, item_weights.tolist(), logits.tolist()):
                f.write(json.dumps({"uuid": it.uuid, "split": it.split, "weight": w, "logit": lg, **it.extra}) + "\n")
        del model

    # 3. generator arms (stage II)
    eval_world = World(WorldConfig(), seed=cfg.data.world_seed)
    samples = grounding_samples(eval_world.scenes("val", cfg.data.eval_scenes))
    metrics |= whole_image_baseline(samples)
    metrics |= all_objects_baseline(samples)
    untrained = fresh()
    metrics |= heatmap_quality(untrained, processor, samples, cfg.threshold, name="baseline/untrained")
    metrics["baseline/untrained/condition_cosine"] = condition_cosine(untrained, processor, samples)
    del untrained
    arm_models = {}
    for arm in cfg.arms:
        items = human if arm == "human_only" else mixed
        weighting = {"human_only": "uniform", "mixed_uniform": "uniform", "mixed_label": "label", "mixed_dwsl": "dwsl",
                     "mixed_oracle": "dwsl"}[arm]
        gen_key = asdict(cfg.generator) | {"progress_bar": None, "bf16": resolve_bf16(cfg.generator.bf16)}
        a_dir = root / f"{arm}-{content_hash(stamp, gen_key, arm, str(d_dir) if arm == 'mixed_dwsl' else '')}"
        model = fresh()
        if not reuse_or_reset(a_dir, force):
            ds = IVMDataset(items, tok, n_img, size, role="generator", augment=True, seed=cfg.generator.seed)
            weights = None
            if arm == "mixed_dwsl":
                weights = item_weights
            elif arm == "mixed_oracle":
                weights = oracle_weights(mixed)
            t0 = time.time()
            train(GeneratorForTraining(model, weighting, weights), ds, IVMCollator(processor), cfg.generator,
                  a_dir / "checkpoints")
            metrics[f"time/{arm}_train_s"] = time.time() - t0
            torch.save(to_official(model), a_dir / "ivm.pth")  # the release's layout
            mark_complete(a_dir)
        else:
            load_official(model, a_dir / "ivm.pth")
        metrics |= heatmap_quality(model, processor, samples, cfg.threshold, name=arm,
                                   out_path=root / f"predictions_{arm}.jsonl")
        metrics[f"{arm}/condition_cosine"] = condition_cosine(model, processor, samples)
        arm_models[arm] = model

    # 4. downstream VQA on cluttered scenes: without IVM, with the best arm, with the true masks
    best = max((a for a in arm_models if a != "mixed_oracle"), key=lambda a: metrics[f"{a}/mIoU"])
    metrics["vqa/ivm_arm"] = best
    lo, hi = cfg.data.clutter_objects
    clutter = World(WorldConfig(min_objects=lo, max_objects=hi), seed=cfg.data.world_seed).scenes("test", cfg.data.clutter_scenes)
    if cfg.vqa_url:
        answerer = chat_completions_answerer(cfg.vqa_url, cfg.vqa_model or "default", os.environ.get("IVM_VQA_API_KEY"))
    else:
        answerer = llava_answerer(load_pretrained(LlavaForConditionalGeneration, llava_path, "the LLaVA base"), processor,
                                  TinyVLMConfig(kind="llava", image_size=vision.image_size, patch_size=vision.patch_size))
    metrics |= vqa_with_and_without_ivm(answerer, arm_models[best], processor, clutter, cfg.vqa_threshold,
                                        cfg.vqa_mode, out_path=root / "predictions_vqa.jsonl")
    metrics["time/total_s"] = time.time() - t_start
    path = write_metrics(root / "metrics.json", metrics, config=cfg.to_dict())
    print_table(metrics, cfg.arms)
    print(path)
    return path


def print_table(m: dict, arms=ARMS) -> None:
    def f(key):
        v = m.get(key)
        return "  -  " if v is None else f"{100 * v:5.1f}"

    def by_count(prefix):
        return " / ".join(f(f"{prefix}/mIoU_{n}_objects").strip() for n in (1, 2, 3))

    def cos(prefix):
        v = m.get(f"{prefix}/condition_cosine")
        return "-" if v is None else f"{v:.4f}"

    print("\n| training data / weighting | heatmap mIoU | pixel AP | REC acc | mIoU, 1 / 2 / 3 objects | condition cosine |"
          "\n|---|---|---|---|---|---|")
    labels = {"human_only": "human only", "mixed_uniform": "human + machine, no DWSL",
              "mixed_label": "human + machine, label weights 0.2 + 0.8 h", "mixed_dwsl": "human + machine, DWSL",
              "mixed_oracle": "human + machine, DWSL with a perfect discriminator (diagnostic)"}
    for a in arms:
        print(f"| {labels[a]} | {f(a + '/mIoU')} | {f(a + '/pixel_AP')} | {f(a + '/rec_acc')} | {by_count(a)} | "
              f"{cos(a)} |")
    for b, label in (("baseline/untrained", "untrained IVM (baseline)"), ("baseline/whole_image", "whole image (baseline)"),
                     ("baseline/all_objects", "every object, the instruction ignored (baseline)")):
        print(f"| {label} | {f(b + '/mIoU')} | {f(b + '/pixel_AP')} | {f(b + '/rec_acc')} | {by_count(b)} | {cos(b)} |")
    if "dwsl/mean_weight_human" in m:
        print(f"\nDWSL weights: human {m['dwsl/mean_weight_human']:.3f}, machine clean "
              f"{m.get('dwsl/mean_weight_machine_clean', float('nan')):.3f}, machine corrupted "
              f"{m.get('dwsl/mean_weight_machine_corrupted', float('nan')):.3f} "
              f"(discriminator train accuracy {m['discriminator/train_accuracy']:.3f})")
    print(f"\n| downstream VQA (tiny LLaVA, cluttered scenes, n={m.get('vqa/n')}) | accuracy |\n|---|---|")
    print(f"| without IVM | {f('vqa/without_ivm/accuracy')} |")
    print(f"| with IVM ({m.get('vqa/ivm_arm')}) | {f('vqa/with_ivm/accuracy')} |")
    print(f"| with the true mask (oracle) | {f('vqa/oracle_mask/accuracy')} |")
