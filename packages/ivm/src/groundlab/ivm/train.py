"""The IVM run: world data -> DWSL stage I (discriminator) -> stage II arms -> evaluation.

Stages (each reused on a second run with the same config, recomputed with ``force``):

1. data: the synthetic world exported as IVM-Mix (a small clean ``HumanLabelData`` split, a larger
   ``VQAMachineData`` split with corrupted labels), or real IVM-Mix folders (``data.root``);
2. discriminator (DWSL stage I): its own LoRA + head on the LMM, human (1) vs machine (0) triples over
   the label-masked image;
3. generator arms (stage II), same seed, steps and initialisation: ``human_only`` (uniform weights),
   ``mixed_uniform`` (human + machine, no weighting), ``mixed_label`` (``0.2 + 0.8 * is_human``), and
   ``mixed_dwsl`` (``clip(sigmoid(D), 0.1, 0.9)`` from stage I, computed once per item on its label),
   and two diagnostics the world's corruption tags allow: ``mixed_oracle`` (0.9 for every correct
   label, 0.1 for every corrupted one, i.e. DWSL with a perfect discriminator) and ``mixed_clean``
   (the corrupted machine items dropped, the rest uniform: what a perfect filter keeps);
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from groundlab.shared.attention import HF_ATTENTION
from groundlab.shared.bases import ensure_base
from groundlab.shared.bases.sam import TinySamConfig, load_sam_checkpoint
from groundlab.shared.bases.vlm import TinyVLMConfig
from groundlab.shared.config import RunConfigFile, model_overrides, non_negative, one_of, positive, within
from groundlab.shared.distributed import seed_everything, setup_logging
from groundlab.shared.loading import load_pretrained, torch_load
from groundlab.shared.metrics import auroc, seed_summary
from groundlab.shared.recipe import Recipe, train_key
from groundlab.shared.runs import content_hash, write_metrics
from groundlab.shared.training import TrainConfig, train
from groundlab.shared.world import World, WorldConfig

from .checkpoint import load_official, load_part, to_official, trained_keys
from .configuration import IVMConfig
from .data import (
    HUMAN_SPLITS,
    INSTRUCTION_TYPES,
    MACHINE_SPLITS,
    IVMDataset,
    export_heldout_machine,
    export_world,
    read_split,
)
from .evaluation import (
    all_objects_baseline,
    chat_completions_answerer,
    condition_cosine,
    grounding_samples,
    heatmap_quality,
    llava_answerer,
    score_heatmaps,
    vqa_with_and_without_ivm,
    whole_image_baseline,
)
from .masking import MODES
from .modeling import DiscriminatorForTraining, IVMModel, dwsl_weights, label_weights
from .processing import IVMCollator

logger = logging.getLogger("groundlab")

ARMS = ("human_only", "mixed_uniform", "mixed_label", "mixed_dwsl", "mixed_oracle", "mixed_clean")
DIAGNOSTIC_ARMS = ("mixed_oracle", "mixed_clean")  # they read the world's corruption tags
ARM_LABELS = {"human_only": "human only", "mixed_uniform": "human + machine, no DWSL",
              "mixed_label": "human + machine, label weights 0.2 + 0.8 h", "mixed_dwsl": "human + machine, DWSL",
              "mixed_oracle": "human + machine, DWSL with a perfect discriminator (diagnostic)",
              "mixed_clean": "human + the clean machine items only, a perfect filter (diagnostic)"}


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
    human_instructions: tuple[str, ...] = INSTRUCTION_TYPES
    """The instruction types the human items carry (the machine items and the held-out evaluation carry
    every type): a subset makes the human labels scarce in kind, as the release's human split (grounding
    datasets' phrases) is beside its machine splits (VQA and robot instructions)."""
    root: str | None = None
    """Real IVM-Mix data instead of the world: a folder holding split folders (see ``groundlab.ivm.data``)."""

    def __post_init__(self) -> None:
        positive(self, "human_scenes", "eval_scenes", "clutter_scenes")
        non_negative(self, "machine_scenes")
        within(self, "corrupt_prob", 0.0, 1.0)
        self.human_instructions = tuple(self.human_instructions)
        if not self.human_instructions or set(self.human_instructions) - set(INSTRUCTION_TYPES):
            raise ValueError(f"'human_instructions' must be a non-empty subset of {list(INSTRUCTION_TYPES)}, "
                             f"got {list(self.human_instructions)}")
        lo, hi = self.clutter_objects
        if not 1 <= lo <= hi:
            raise ValueError(f"'clutter_objects' must be (lo, hi) with 1 <= lo <= hi, got {self.clutter_objects}")


@dataclass
class ModelConfig:
    """Where the pretrained parts come from, and the :class:`IVMConfig` this run builds on them."""

    llava: str | None = None
    """A LLaVA ``from_pretrained`` directory; None = the tiny LLaVA base of ``make bases``."""
    sam: str | None = None
    """An official-layout SAM checkpoint; None = the tiny SAM base."""
    config: dict = field(default_factory=dict)
    """:class:`IVMConfig` arguments over its defaults (the paper's: LoRA r 8 / alpha 16 / dropout 0.05
    on q/v, 2048-wide condition MLP, ...); ``vision_config`` and ``lmm_config`` come from the checkpoints."""

    def __post_init__(self) -> None:
        self.config = model_overrides(IVMConfig, self.config, filled=("vision_config", "lmm_config"))

    def ivm_config(self, vision_config: dict, lmm_config: dict) -> IVMConfig:
        return IVMConfig(vision_config=vision_config, lmm_config=lmm_config, **self.config)


@dataclass
class RunConfig(RunConfigFile):
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
    vision = dict(img_size=sc.image_size, patch_size=sc.patch_size, embed_dim=sc.encoder_dim, depth=sc.encoder_depth,
                  num_heads=sc.encoder_heads, window_size=sc.window_size, global_attn_indexes=sc.global_attn_indexes,
                  out_chans=sc.prompt_dim)
    model = IVMModel(m.ivm_config(vision, llava.config.to_dict()))
    load_llava_into(model, llava)
    load_sam_checkpoint(model.image_encoder, sam_path, prefix="image_encoder.")
    return model


class GeneratorForTraining(nn.Module):
    """DWSL stage II with one weighting: ``uniform``, ``label`` or ``dwsl`` (a weight per item)."""

    def __init__(self, model: IVMModel, weighting: str, item_weights: torch.Tensor | None = None,
                 packed: bool = False):
        super().__init__()
        if weighting not in ("uniform", "label", "dwsl"):
            raise ValueError(f"weighting must be uniform, label or dwsl, got {weighting!r}")
        if weighting == "dwsl" and item_weights is None:
            raise ValueError("dwsl weighting needs per-item weights (the discriminator's, or the oracle's)")
        self.model, self.weighting, self.packed = model, weighting, packed
        self.register_buffer("item_weights", item_weights if item_weights is not None else torch.ones(0), persistent=False)
        model.set_trainable("generator")

    def forward(self, input_ids, attention_mask, pixel_values, images, masks, is_human, index):
        w = None
        if self.weighting == "label":
            w = label_weights(is_human)
        elif self.weighting == "dwsl":
            w = self.item_weights[index]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         images=images, masks=masks, weights=w, packed=self.packed)
        return {"loss": out.loss, "logits": out.logits}


def corruption_tag(item) -> str:
    """The world export's corruption of an item's label (``"none"`` for a human or clean one); an error
    on real data, which has no tags, since only the diagnostic arms read them."""
    if item.is_human:
        return "none"
    if "corruption" not in item.extra:
        raise ValueError(f"{item.uuid}: the diagnostic arms need the world export's 'corruption' tags on machine items")
    return item.extra["corruption"]


def oracle_weights(items: list, low: float = 0.1, high: float = 0.9) -> torch.Tensor:
    """DWSL's weights from a perfect discriminator: ``high`` for a correct label (human, or a machine
    label the world export left uncorrupted), ``low`` for a corrupted one."""
    return torch.tensor([high if corruption_tag(it) == "none" else low for it in items])


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
    """The whole run (see the module docstring); returns the path of its ``metrics.json``."""
    setup_logging()
    seed_everything(cfg.generator.seed)
    recipe = Recipe("ivm", cfg.name, force)
    bases = Bases.resolve(cfg)
    data = prepare_data(recipe, cfg)
    item_weights, d_dir = None, None
    if "mixed_dwsl" in cfg.arms:
        d_dir = train_discriminator(recipe, cfg, bases, data)
        item_weights = dwsl_item_weights(recipe, cfg, bases, data, d_dir)
    samples = eval_samples(cfg)
    evaluate_baselines(recipe, cfg, bases, samples)
    arm_models = {}
    for arm in cfg.arms:
        arm_dir = train_arm(recipe, cfg, bases, data, arm, item_weights, d_dir)
        arm_models[arm] = evaluate_arm(recipe, cfg, bases, samples, arm, arm_dir)
    downstream_vqa(recipe, cfg, bases, arm_models)
    return recipe.finish(cfg.to_dict(), lambda m: print_table(m, cfg.arms))


ABLATION_FIGURES = ("mIoU", "pixel_AP", "rec_acc", "mIoU_3_objects", "condition_cosine",
                    *(f"mIoU_{t}" for t in INSTRUCTION_TYPES))
DISCRIMINATOR_FIGURES = ("dwsl/mean_weight_human", "dwsl/mean_weight_machine_clean", "dwsl/mean_weight_machine_corrupted",
                         "discriminator/heldout_auroc_clean_vs_corrupted")


def ablation(cfg: RunConfig, seeds: tuple[int, ...] = (0, 1, 2), force: bool = False,
             arms: tuple[str, ...] | None = None) -> Path:
    """The DWSL comparison over seeds: every arm of ``arms`` (default: the config's) trained with each
    seed in ``seeds`` (the generator's initialisation and data order, and the discriminator's, so
    DWSL's spread includes its discriminator's), on the same data and steps; each scored on the same
    held-out scenes. The models are stages of the run ``cfg.name`` (seed 0 is the run's own, reused);
    each seed's figures and predictions land in ``runs/ivm/<name>/ablation/seed<k>/``, the table
    (mean and standard deviation, ddof 1) in ``runs/ivm/<name>/ablation/metrics.json``."""
    setup_logging()
    if len(seeds) < 2:
        raise ValueError(f"an ablation needs at least 2 seeds for a spread, got {list(seeds)}")
    arms = tuple(arms) if arms is not None else tuple(cfg.arms)
    if not arms or any(a not in ARMS for a in arms):
        raise ValueError(f"arms must be a non-empty subset of {list(ARMS)}, got {list(arms)}")
    stages, out = Recipe("ivm", cfg.name, force), Recipe("ivm", f"{cfg.name}/ablation")
    bases = Bases.resolve(cfg)
    data = prepare_data(stages, cfg)
    samples = eval_samples(cfg)
    per_seed: dict[str, list] = {a: [] for a in (*arms, "discriminator")}
    for seed in seeds:
        c = replace(cfg, generator=replace(cfg.generator, seed=seed),
                    discriminator=replace(cfg.discriminator, seed=seed))
        seed_everything(seed)
        scores = Recipe("ivm", f"{cfg.name}/ablation/seed{seed}")
        item_weights, d_dir = None, None
        if "mixed_dwsl" in arms:
            d_dir = train_discriminator(stages, c, bases, data)
            item_weights = dwsl_item_weights(scores, c, bases, data, d_dir)
            per_seed["discriminator"].append(scores.metrics)
        for arm in arms:
            evaluate_arm(scores, c, bases, samples, arm, train_arm(stages, c, bases, data, arm, item_weights, d_dir))
            figures = {k.removeprefix(f"{arm}/"): v for k, v in scores.metrics.items() if k.startswith(f"{arm}/")}
            per_seed[arm].append(figures)
            out.metrics |= {f"{arm}/seed_{seed}/{k}": figures[k] for k in ABLATION_FIGURES if k in figures}
        scores.finish(c.to_dict(), lambda m: print_table(m, arms, downstream=False))
    for arm in arms:
        out.metrics |= seed_summary(arm, per_seed[arm], ABLATION_FIGURES)
    if per_seed["discriminator"]:
        out.metrics |= seed_summary("discriminator", per_seed["discriminator"], DISCRIMINATOR_FIGURES)
    out.metrics |= dwsl_comparisons(out.metrics)
    out.metrics["seeds"] = len(seeds)
    return out.finish(cfg.to_dict() | {"ablation_seeds": list(seeds), "ablation_arms": list(arms)},
                      lambda m: print_ablation(m, arms))


def dwsl_comparisons(m: dict) -> dict[str, float]:
    """The paper's claims over seeds: DWSL's mean mIoU minus uniform mixing's and human only's, each
    beside the larger of the two arms' standard deviations (shown when the gap exceeds it)."""
    out = {}
    for other in ("mixed_uniform", "human_only"):
        if "mixed_dwsl/mean/mIoU" in m and f"{other}/mean/mIoU" in m:
            out[f"dwsl_vs_{other}/mIoU_gap"] = m["mixed_dwsl/mean/mIoU"] - m[f"{other}/mean/mIoU"]
            out[f"dwsl_vs_{other}/larger_std"] = max(m["mixed_dwsl/std/mIoU"], m[f"{other}/std/mIoU"])
    return out


def print_ablation(m: dict, arms=ARMS) -> None:
    def f(arm, k, scale=100.0, fmt="{:.1f}"):
        mean, std = m.get(f"{arm}/mean/{k}"), m.get(f"{arm}/std/{k}")
        return "-" if mean is None else f"{fmt.format(scale * mean)} ± {fmt.format(scale * std)}"

    seeds = m["seeds"]
    print(f"\nThe DWSL comparison (mean ± std over {seeds} seeds; the same data, steps and held-out scenes)\n"
          "| training data / weighting | heatmap mIoU | pixel AP | REC acc | mIoU, 3 objects | condition cosine | "
          "mIoU per seed |\n|---|---|---|---|---|---|---|")
    for arm in arms:
        per = " / ".join(f"{100 * v:.1f}" for k, v in sorted(m.items())
                         if k.startswith(f"{arm}/seed_") and k.endswith("/mIoU"))
        print(f"| {ARM_LABELS[arm]} | {f(arm, 'mIoU')} | {f(arm, 'pixel_AP')} | {f(arm, 'rec_acc')} | "
              f"{f(arm, 'mIoU_3_objects')} | {f(arm, 'condition_cosine', 1.0, '{:.3f}')} | {per} |")
    print("\nheatmap mIoU by instruction type (mean ± std)\n| training data / weighting | "
          + " | ".join(INSTRUCTION_TYPES) + " |\n|---|" + "---|" * len(INSTRUCTION_TYPES))
    for arm in arms:
        print(f"| {ARM_LABELS[arm]} | " + " | ".join(f(arm, f"mIoU_{t}") for t in INSTRUCTION_TYPES) + " |")
    d = "discriminator"
    if f"{d}/mean/dwsl/mean_weight_human" in m:
        print(f"DWSL weights: human {f(d, 'dwsl/mean_weight_human', 1.0, '{:.3f}')}, machine clean "
              f"{f(d, 'dwsl/mean_weight_machine_clean', 1.0, '{:.3f}')}, machine corrupted "
              f"{f(d, 'dwsl/mean_weight_machine_corrupted', 1.0, '{:.3f}')}; discriminator AUROC clean vs "
              f"corrupted, held out {f(d, 'discriminator/heldout_auroc_clean_vs_corrupted', 1.0, '{:.3f}')}")
    for other in ("mixed_uniform", "human_only"):
        key = f"dwsl_vs_{other}"
        if f"{key}/mIoU_gap" in m:
            gap, spread = m[f"{key}/mIoU_gap"], m[f"{key}/larger_std"]
            print(f"DWSL - {ARM_LABELS[other]}: {100 * gap:+.1f} mIoU points; the larger seed std {100 * spread:.1f}: "
                  f"DWSL > {other} {'shown' if gap > spread else 'not shown'}")


def eval_samples(cfg: RunConfig) -> list:
    """The held-out grounding samples every arm is scored on."""
    return grounding_samples(World(WorldConfig(), seed=cfg.data.world_seed).scenes("val", cfg.data.eval_scenes))


def score_predictions(cfg: RunConfig, path: Path) -> dict[str, float]:
    """``eval --predictions FILE``: a heatmap predictions file (``predictions_<arm>.jsonl`` + its
    ``.npz``, or any model's in that format) scored against the run's held-out samples."""
    return score_heatmaps(path, eval_samples(cfg), cfg.threshold, name=Path(path).stem.removeprefix("predictions_"))


@dataclass
class Bases:
    """The pretrained parts a run starts from (the tiny bases of ``make bases`` unless the config
    names others) and the sizes they fix."""

    llava: Path
    sam: Path
    processor: object
    n_image_tokens: int
    image_size: int
    """SAM's input size."""

    @classmethod
    def resolve(cls, cfg: RunConfig) -> Bases:
        llava = Path(cfg.model.llava) if cfg.model.llava else ensure_base("llava")
        sam = Path(cfg.model.sam) if cfg.model.sam else ensure_base("sam")
        vision = AutoConfig.from_pretrained(llava).vision_config
        return cls(llava, sam, AutoProcessor.from_pretrained(llava), (vision.image_size // vision.patch_size) ** 2,
                   TinySamConfig.from_json(sam.parent / "config.json").image_size)

    def stamp(self, cfg: RunConfig, data: Data) -> str:
        """What every model stage starts from: the model config, the bases, the data."""
        return content_hash(asdict(cfg.model), str(self.llava), str(self.sam), str(data.root))

    def fresh(self, cfg: RunConfig) -> IVMModel:
        """The model as every stage starts it (the same initialisation for every arm)."""
        torch.manual_seed(cfg.generator.seed)
        return build_from_bases(self.llava, self.sam, cfg.model)


@dataclass
class Data:
    root: Path
    human: list
    machine: list

    @property
    def mixed(self) -> list:
        return self.human + self.machine


def prepare_data(recipe: Recipe, cfg: RunConfig) -> Data:
    """1. The world exported as IVM-Mix (clean human split, corrupted machine split), or real folders."""
    def export(out: Path) -> None:
        counts = export_world(World(WorldConfig(), seed=cfg.data.world_seed), out, cfg.data.human_scenes,
                              cfg.data.machine_scenes, cfg.data.corrupt_prob, seed=cfg.data.world_seed,
                              human_types=cfg.data.human_instructions)
        write_metrics(out / "counts.json", counts, config=asdict(cfg.data))

    root = Path(cfg.data.root) if cfg.data.root else recipe.stage("data", asdict(cfg.data), build=export)
    human = [it for s in HUMAN_SPLITS if (root / s).is_dir() for it in read_split(root / s)]
    machine = [it for s in MACHINE_SPLITS if (root / s).is_dir() for it in read_split(root / s)]
    if not human:
        raise FileNotFoundError(f"no {HUMAN_SPLITS} split under {root}")
    recipe.metrics |= {"data/human_items": len(human), "data/machine_items": len(machine)}
    if machine and "corruption" in machine[0].extra:
        recipe.metrics["data/machine_corrupted_share"] = float(np.mean([it.extra["corruption"] != "none"
                                                                         for it in machine]))
    return Data(root, human, machine)


def train_discriminator(recipe: Recipe, cfg: RunConfig, bases: Bases, data: Data) -> Path:
    """2. DWSL stage I: the discriminator's LoRA + head, human (1) vs machine (0) label-masked triples."""
    def fit(out: Path) -> None:
        model = bases.fresh(cfg)
        ds = IVMDataset(data.mixed, bases.processor.tokenizer, bases.n_image_tokens, bases.image_size,
                        role="discriminator", augment=True, seed=cfg.discriminator.seed)
        train(DiscriminatorForTraining(model, cfg.discriminator.packed), ds, IVMCollator(bases.processor, role="discriminator"),
              cfg.discriminator, out / "checkpoints")
        state = model.state_dict()
        torch.save({k: state[k] for k in trained_keys(model, "discriminator")}, out / "discriminator.pt")

    return recipe.stage("discriminator", bases.stamp(cfg, data), train_key(cfg.discriminator), build=fit)


def dwsl_item_weights(recipe: Recipe, cfg: RunConfig, bases: Bases, data: Data, d_dir: Path) -> torch.Tensor:
    """DWSL's weight of every item, ``clip(sigmoid(D), 0.1, 0.9)`` of the saved discriminator on its
    label (no augmentation), with how they fall on human, clean and corrupted machine items."""
    model = bases.fresh(cfg)
    load_part(model, torch_load(d_dir / "discriminator.pt", "discriminator weights"),
              trained_keys(model, "discriminator"), str(d_dir / "discriminator.pt"))
    plain = IVMDataset(data.mixed, bases.processor.tokenizer, bases.n_image_tokens, bases.image_size,
                       role="discriminator", augment=False)
    logits = discriminator_scores(model, plain, IVMCollator(bases.processor, role="discriminator"))
    weights = dwsl_weights(logits)
    is_human = torch.tensor([it.is_human for it in data.mixed], dtype=torch.bool)
    m = recipe.metrics
    m["discriminator/train_accuracy"] = float(((logits > 0) == is_human).float().mean())
    m["dwsl/mean_weight_human"] = float(weights[is_human].mean())
    if data.machine:
        m["discriminator/train_auroc_human_vs_machine"] = auroc(is_human.numpy(), logits.float().numpy())
        machine_w = weights[~is_human]
        m["dwsl/mean_weight_machine"] = float(machine_w.mean())
        if "corruption" in data.machine[0].extra:
            clean = torch.tensor([it.extra["corruption"] == "none" for it in data.machine])
            if clean.any():
                m["dwsl/mean_weight_machine_clean"] = float(machine_w[clean].mean())
            if (~clean).any():
                m["dwsl/mean_weight_machine_corrupted"] = float(machine_w[~clean].mean())
            if clean.any() and (~clean).any():
                m["discriminator/train_auroc_clean_vs_corrupted"] = auroc(clean.numpy(), logits[~is_human].float().numpy())
    if cfg.data.root is None and cfg.data.corrupt_prob > 0:
        heldout_auroc(recipe, cfg, bases, model)
    else:
        logger.info("no held-out discriminator AUROC: it needs the world's corrupted held-out items")
    with open(recipe.root / "dwsl_weights.jsonl", "w") as f:
        for it, w, lg in zip(data.mixed, weights.tolist(), logits.tolist()):
            f.write(json.dumps({"uuid": it.uuid, "split": it.split, "weight": w, "logit": lg, **it.extra}) + "\n")
    return weights


def heldout_auroc(recipe: Recipe, cfg: RunConfig, bases: Bases, model: IVMModel) -> None:
    """How well the discriminator tells clean machine labels from corrupted ones on scenes it never
    saw: the world's ``val`` scenes [0, eval_scenes), labelled and corrupted as the training ones."""
    d = cfg.data

    def export(out: Path) -> None:
        counts = export_heldout_machine(World(WorldConfig(), seed=d.world_seed), out, d.eval_scenes, d.corrupt_prob,
                                        seed=d.world_seed + 1)
        write_metrics(out / "counts.json", counts, config=asdict(d))

    root = recipe.stage("heldout_machine", d.world_seed, d.eval_scenes, d.corrupt_prob, build=export)
    items = read_split(root / "VQAMachineData")
    clean = np.array([it.extra["corruption"] == "none" for it in items])
    if clean.all() or not clean.any():
        logger.info("no held-out discriminator AUROC: the held-out items are all %s", "clean" if clean.all() else "corrupted")
        return
    plain = IVMDataset(items, bases.processor.tokenizer, bases.n_image_tokens, bases.image_size,
                       role="discriminator", augment=False)
    logits = discriminator_scores(model, plain, IVMCollator(bases.processor, role="discriminator"))
    recipe.metrics |= {"discriminator/heldout_auroc_clean_vs_corrupted": auroc(clean, logits.float().numpy()),
                       "discriminator/heldout_items": len(items)}


def evaluate_baselines(recipe: Recipe, cfg: RunConfig, bases: Bases, samples) -> None:
    """The whole image, every object, and the untrained IVM on the held-out grounding samples."""
    recipe.metrics |= whole_image_baseline(samples) | all_objects_baseline(samples)
    untrained = bases.fresh(cfg)
    recipe.metrics |= heatmap_quality(untrained, bases.processor, samples, recipe.root / "predictions_untrained.jsonl",
                                      cfg.threshold, name="baseline/untrained")
    recipe.metrics["baseline/untrained/condition_cosine"] = condition_cosine(untrained, bases.processor, samples)


def arm_items(data: Data, arm: str) -> list:
    """The items an arm trains on: the human split alone, human + machine, or (``mixed_clean``) human +
    the machine items whose labels the world export left uncorrupted."""
    if arm == "human_only":
        return data.human
    if arm == "mixed_clean":
        return data.human + [it for it in data.machine if corruption_tag(it) == "none"]
    return data.mixed


ARM_WEIGHTING = {"human_only": "uniform", "mixed_uniform": "uniform", "mixed_label": "label", "mixed_dwsl": "dwsl",
                 "mixed_oracle": "dwsl", "mixed_clean": "uniform"}


def train_arm(recipe: Recipe, cfg: RunConfig, bases: Bases, data: Data, arm: str,
              item_weights: torch.Tensor | None, d_dir: Path | None) -> Path:
    """3. DWSL stage II, one arm (same seed, steps and initialisation for all); saved in the release's
    layout (``ivm.pth``)."""
    def fit(out: Path) -> None:
        model = bases.fresh(cfg)
        items = arm_items(data, arm)
        weights = item_weights if arm == "mixed_dwsl" else None
        if arm == "mixed_oracle":
            weights = oracle_weights(data.mixed)
        ds = IVMDataset(items, bases.processor.tokenizer, bases.n_image_tokens, bases.image_size, role="generator",
                        augment=True, seed=cfg.generator.seed)
        train(GeneratorForTraining(model, ARM_WEIGHTING[arm], weights, cfg.generator.packed), ds,
              IVMCollator(bases.processor),
              cfg.generator, out / "checkpoints")
        torch.save(to_official(model), out / "ivm.pth")

    return recipe.stage(arm, bases.stamp(cfg, data), train_key(cfg.generator), arm,
                        str(d_dir) if arm == "mixed_dwsl" else "", build=fit)


def evaluate_arm(recipe: Recipe, cfg: RunConfig, bases: Bases, samples, arm: str, arm_dir: Path) -> IVMModel:
    """4. The saved arm's heatmaps on the held-out samples (predictions JSONL beside the scores)."""
    model = bases.fresh(cfg)
    load_official(model, arm_dir / "ivm.pth")
    recipe.metrics |= heatmap_quality(model, bases.processor, samples, recipe.root / f"predictions_{arm}.jsonl",
                                      cfg.threshold, name=arm)
    recipe.metrics[f"{arm}/condition_cosine"] = condition_cosine(model, bases.processor, samples)
    return model


def downstream_vqa(recipe: Recipe, cfg: RunConfig, bases: Bases, arm_models: dict[str, IVMModel]) -> None:
    """5. VQA on cluttered scenes without IVM, with the best arm's masks, and with the true masks. The
    diagnostic arms (oracle, clean) never are the IVM of this comparison: a run of them alone skips the step."""
    trained = [a for a in arm_models if a not in DIAGNOSTIC_ARMS]
    if not trained:
        logger.info("downstream VQA skipped: it uses the best trained arm, and this run has only diagnostic arms")
        return
    best = max(trained, key=lambda a: recipe.metrics[f"{a}/mIoU"])
    recipe.metrics["vqa/ivm_arm"] = best
    lo, hi = cfg.data.clutter_objects
    clutter = World(WorldConfig(min_objects=lo, max_objects=hi), seed=cfg.data.world_seed).scenes(
        "test", cfg.data.clutter_scenes)
    if cfg.vqa_url:
        answerer = chat_completions_answerer(cfg.vqa_url, cfg.vqa_model or "default", os.environ.get("IVM_VQA_API_KEY"))
    else:
        vision = AutoConfig.from_pretrained(bases.llava).vision_config
        answerer = llava_answerer(load_pretrained(LlavaForConditionalGeneration, bases.llava, "the LLaVA base",
                                                  attn_implementation=HF_ATTENTION),
                                  bases.processor, TinyVLMConfig(kind="llava", image_size=vision.image_size,
                                                                 patch_size=vision.patch_size))
    recipe.metrics |= vqa_with_and_without_ivm(answerer, arm_models[best], bases.processor, clutter, cfg.vqa_threshold,
                                               cfg.vqa_mode, out_path=recipe.root / "predictions_vqa.jsonl")


def print_table(m: dict, arms=ARMS, downstream: bool = True) -> None:
    """The run's table; ``downstream=False`` (an ablation seed's) leaves out the VQA table."""
    def f(key):
        v = m.get(key)
        return "  -  " if v is None else f"{100 * v:5.1f}"

    def by_count(prefix):
        return " / ".join(f(f"{prefix}/mIoU_{n}_objects").strip() for n in (1, 2, 3))

    def cos(prefix):
        v = m.get(f"{prefix}/condition_cosine")
        return "-" if v is None else f"{v:.4f}"

    def by_type(prefix):
        return " / ".join(f(f"{prefix}/mIoU_{t}").strip() for t in INSTRUCTION_TYPES)

    print("\n| training data / weighting | heatmap mIoU | pixel AP | REC acc | mIoU, 1 / 2 / 3 objects | mIoU, "
          + " / ".join(INSTRUCTION_TYPES) + " | condition cosine |\n|---|---|---|---|---|---|---|")
    for a in arms:
        print(f"| {ARM_LABELS[a]} | {f(a + '/mIoU')} | {f(a + '/pixel_AP')} | {f(a + '/rec_acc')} | {by_count(a)} | "
              f"{by_type(a)} | {cos(a)} |")
    for b, label in (("baseline/untrained", "untrained IVM (baseline)"), ("baseline/whole_image", "whole image (baseline)"),
                     ("baseline/all_objects", "every object, the instruction ignored (baseline)")):
        if f"{b}/mIoU" not in m:
            continue
        print(f"| {label} | {f(b + '/mIoU')} | {f(b + '/pixel_AP')} | {f(b + '/rec_acc')} | {by_count(b)} | "
              f"{by_type(b)} | {cos(b)} |")
    if "dwsl/mean_weight_human" in m:
        print(f"\nDWSL weights: human {m['dwsl/mean_weight_human']:.3f}, machine clean "
              f"{m.get('dwsl/mean_weight_machine_clean', float('nan')):.3f}, machine corrupted "
              f"{m.get('dwsl/mean_weight_machine_corrupted', float('nan')):.3f} "
              f"(discriminator train accuracy {m['discriminator/train_accuracy']:.3f})")
        aurocs = [(k, m[key]) for k, key in (("human vs machine, training items", "discriminator/train_auroc_human_vs_machine"),
                                             ("clean vs corrupted machine labels, training items",
                                              "discriminator/train_auroc_clean_vs_corrupted"),
                                             (f"clean vs corrupted, {m.get('discriminator/heldout_items')} held-out items",
                                              "discriminator/heldout_auroc_clean_vs_corrupted")) if key in m]
        if aurocs:
            print("discriminator AUROC: " + "; ".join(f"{k} {v:.3f}" for k, v in aurocs))
    if not downstream:
        return
    if "vqa/n" not in m:
        print("\ndownstream VQA: not run (it uses the best trained arm; this run has only diagnostic arms)")
        return
    print(f"\n| downstream VQA (tiny LLaVA, cluttered scenes, n={m.get('vqa/n')}) | accuracy |\n|---|---|")
    print(f"| without IVM | {f('vqa/without_ivm/accuracy')} |")
    print(f"| with IVM ({m.get('vqa/ivm_arm')}) | {f('vqa/with_ivm/accuracy')} |")
    print(f"| with the true mask (oracle) | {f('vqa/oracle_mask/accuracy')} |")
