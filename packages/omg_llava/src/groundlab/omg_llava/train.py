"""The OMG-LLaVA run: world data -> segmenter -> stage 1 -> stage 2 -> evaluation.

Stages (each reused on a second run with the same config, recomputed with ``force``):

1. data: the synthetic world exported in every format the model trains on (LLaVA captions and
   questions, REFER, GranD-f GCG, Osprey regions, MDVP points) and read back by the real loaders;
2. segmenter: the tiny OMG-Seg pre-trained on the world (panoptic + point / box / mask prompts), then
   frozen; PQ and prompted mIoU on held-out scenes beside an untrained one (or a given pretrained
   OMG-Seg directory, ``segmenter.pretrained``);
3. stage 1: projector + ``text2vision`` on captions (LLM and segmenter frozen), CE + the
   reconstruction loss;
4. stage 2: LoRA on every Linear of the LLM, token embeddings + LM head + projector + ``text2vision``
   trainable, on the instruction mix (RES, GCG, regions, points, questions); CE + the ``[SEG]`` mask
   loss. The LoRA is merged and the whole model saved with ``save_pretrained``;
5. evaluation on held-out scenes: predictions JSONL then scores, for RES, GCG and region captioning,
   beside the baselines (whole-image mask, random object, constant answer, untrained model).

The LLM is the tiny LLaVA base's language model (``make bases``) with its tokenizer, or any causal LM
directory (``model.llm``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from groundlab.shared.bases import ensure_base
from groundlab.shared.config import RunConfigFile, iter_jsonl, model_overrides, one_of, positive, within
from groundlab.shared.distributed import get_world_size, seed_everything, setup_logging
from groundlab.shared.loading import load_pretrained, load_state, torch_load
from groundlab.shared.lora import apply_lora, linear_names
from groundlab.shared.metrics import seed_summary
from groundlab.shared.recipe import Recipe, train_key
from groundlab.shared.runs import content_hash, point_to_model, weights_hash, write_metrics
from groundlab.shared.training import TrainConfig, train
from groundlab.shared.world import World, WorldConfig
from groundlab.shared.world_io import check_refer

from .configuration import OMGLlavaConfig
from .data import (
    export_world,
    load_world_export,
    names_only_its_object,
    refer_reader,
    res_expression,
    same_category_refs,
)
from .dataset import OMGDataset, PerceptionCache, image_paths
from .evaluation import (
    baseline_predictions,
    object_token_coverage,
    oracle_free_query_predictions,
    oracle_object_token_predictions,
    oracle_query_predictions,
    predict,
    read_predictions,
    res_breakdown,
    res_by_distractor,
    score,
)
from .losses import TARGETS as MASK_TARGETS
from .modeling import OMGLlavaForCausalLM
from .omg_seg import OMGSegConfig, OMGSegModel
from .processing import IMAGE_TOKEN, SPECIAL_TOKENS, TEMPLATES, OMGCollator
from .seg_pretrain import PanopticCollator, SegmenterForTraining, SemanticPretraining, WorldPanopticDataset
from .seg_pretrain import evaluate as evaluate_segmenter
from .segmenter import BOX_PROMPTS

logger = logging.getLogger("groundlab")

TASKS = ("caption", "qa", "res", "gcg", "region", "point")
EVAL_TASKS = ("res", "gcg", "region")


REPEAT = ("res_same_category_repeat", "res_repeat_expressions")
"""The mix's weighting of the RES samples: not part of the exported data's key."""
REFER_EXPORT = {"refer_dataset": "refcoco", "refer_split_by": "unc", "refer_image_dir": None, "res_eval_split": "val"}
"""How the world export writes RES (and what the ``refer_*`` fields of :class:`DataConfig` default to)."""


@dataclass
class DataConfig:
    train_scenes: int = 1500
    val_scenes: int = 100
    world_seed: int = 0
    root: str | None = None
    """A folder in the export's layout (see ``groundlab.omg_llava.data.export_world``) instead of the world."""
    stage1_tasks: tuple[str, ...] = ("caption",)
    stage2_tasks: tuple[str, ...] = ("res", "gcg", "region", "point", "qa")
    qa_per_scene: int | None = None
    """Questions exported per training scene (None: all of them)."""
    eval_tasks: tuple[str, ...] = EVAL_TASKS
    max_length: int = 256
    refer_dataset: str = "refcoco"
    """RES's REFER dataset under ``root``: refcoco, refcoco+, refcocog or refclef."""
    refer_split_by: str = "unc"
    """Its partition (``refs(<split_by>).p``): unc / google for RefCOCO, unc for RefCOCO+, umd / google
    for RefCOCOg, unc / berkeley for RefCLEF."""
    refer_image_dir: str | None = None
    """The REFER images (None: ``<root>/images``, the export's; COCO's ``train2014`` for the real ones)."""
    res_eval_split: str = "val"
    """The REFER split RES is evaluated on (val, testA, testB for RefCOCO / RefCOCO+; val, test for RefCOCOg)."""
    res_same_category_repeat: int = 1
    """RES training samples whose object shares its category with another object of the image
    (:func:`~groundlab.omg_llava.data.same_category_refs`), this many times each in the stage-2 mix:
    the items where the category alone does not find the object (45% of the world's, nearly all of
    RefCOCO's). 1: as read."""
    res_repeat_expressions: str = "all"
    """Which of those samples the repeat takes: ``all``, or ``attribute``: only the expressions that
    describe the object by its own attributes, naming no other object and no extreme position
    (:func:`~groundlab.omg_llava.data.names_only_its_object`; "the yellow triangle", not "the triangle
    below the red triangle" or "the leftmost triangle")."""

    def __post_init__(self) -> None:
        positive(self, "train_scenes", "val_scenes", "qa_per_scene", "max_length", "res_same_category_repeat")
        one_of(self, "res_repeat_expressions", ("all", "attribute"))
        one_of(self, "stage1_tasks", TASKS)
        one_of(self, "stage2_tasks", TASKS)
        one_of(self, "eval_tasks", EVAL_TASKS)
        check_refer(self.refer_dataset, self.refer_split_by)
        if self.root is None and any(getattr(self, k) != v for k, v in REFER_EXPORT.items()):
            raise ValueError(f"the world export holds RES as {REFER_EXPORT}; 'refer_*' and 'res_eval_split' "
                             "choose among real REFER datasets under 'data.root'")

    def refer(self) -> dict:
        """:func:`~groundlab.omg_llava.data.refer_reader`'s arguments."""
        return {"dataset": self.refer_dataset, "split_by": self.refer_split_by, "image_dir": self.refer_image_dir}


@dataclass
class SegmenterConfig:
    pretrained: str | None = None
    """An OMG-Seg ``from_pretrained`` directory; None = pre-train the tiny one below on the world."""
    config: dict = field(default_factory=dict)
    """:class:`OMGSegConfig` arguments over its defaults (the release's OMG-Seg) of the tiny segmenter."""
    scenes: int = 2000
    eval_scenes: int = 100
    num_points: int = 256
    semantic: TrainConfig | None = None
    """The encoder's per-pixel class pre-training before the panoptic one
    (:class:`~groundlab.omg_llava.seg_pretrain.SemanticPretraining`); None: none."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=600, batch_size=16, lr=1e-3,
                                                                   warmup_steps=20))

    def __post_init__(self) -> None:
        positive(self, "scenes", "eval_scenes", "num_points")
        self.config = model_overrides(OMGSegConfig, self.config)


@dataclass
class ModelConfig:
    """The LLM the model starts from, the :class:`OMGLlavaConfig` this run builds, and stage 2's LoRA."""

    llm: str | None = None
    """A causal LM ``from_pretrained`` directory with its tokenizer, or a saved LLaVA (another build of the
    tiny base: its language model is taken); None = the tiny LLaVA base's LM."""
    config: dict = field(default_factory=dict)
    """:class:`OMGLlavaConfig` arguments over its defaults (the release's: InternLM2 template, pixel
    shuffle 2, 12544 mask-loss points, ...); the segmenter, LLM and token ids come from the parts."""
    lora_r: int = 512
    """Stage 2's LoRA on every Linear of the LLM: the paper's r 512 / alpha 256 / dropout 0.05."""
    lora_alpha: int = 256
    lora_dropout: float = 0.05

    def __post_init__(self) -> None:
        self.config = model_overrides(OMGLlavaConfig, self.config, filled=("seg_config", "text_config", "token_ids"))
        positive(self, "lora_r", "lora_alpha")
        within(self, "lora_dropout", 0.0, 0.99)
        template = self.config.get("template")
        if template is not None and template not in TEMPLATES:
            raise ValueError(f"'config.template' must be one of {sorted(TEMPLATES)}, got {template!r}")

    def omg_config(self, seg_config, text_config: dict, token_ids: dict[str, int]) -> OMGLlavaConfig:
        return OMGLlavaConfig(seg_config=seg_config, text_config=text_config, token_ids=token_ids, **self.config)


@dataclass
class EvalConfig:
    max_new_tokens: dict = field(default_factory=lambda: {"res": 8, "gcg": 48, "region": 16})
    """Greedy answer length per task (RES answers are ``It is [SEG].``)."""
    batch_size: int = 32
    res_all_sentences: bool = False
    """Every expression of every object (RefCOCO's protocol), or the first expression of each object."""

    def __post_init__(self) -> None:
        positive(self, "batch_size")
        one_of(self, "max_new_tokens", EVAL_TASKS)
        for task, n in self.max_new_tokens.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"'max_new_tokens' of {task} must be an integer >= 1, got {n!r}")


@dataclass
class RunConfig(RunConfigFile):
    name: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=300, batch_size=32, lr=1e-3))
    stage2: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000, batch_size=16, lr=2e-4))
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
# building the model


def _is_llava(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def llm_from_llava(path: str | Path) -> LlamaForCausalLM:
    """The language model of a saved ``LlavaForConditionalGeneration`` as a causal LM, copied strictly."""
    from transformers import LlavaForConditionalGeneration

    llava = load_pretrained(LlavaForConditionalGeneration, path, "the LLaVA base")
    llm = LlamaForCausalLM(llava.config.text_config)
    src = {}
    for key, value in llava.state_dict().items():
        if key.startswith("model.language_model."):
            src["model." + key[len("model.language_model."):]] = value
        elif key.startswith("lm_head."):
            src[key] = value
    load_state(llm, src, f"{path}: the language model")
    return llm


def add_special_tokens(tokenizer, llm) -> dict[str, int]:
    """Add ``<image>`` (if absent) and the five special tokens; new embedding rows start at the mean
    of the existing ones. Returns their ids."""
    new = [t for t in (IMAGE_TOKEN, *SPECIAL_TOKENS) if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    old = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in (llm.get_input_embeddings(), llm.get_output_embeddings()):
                emb.weight[old:] = emb.weight[:old].mean(0)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, *SPECIAL_TOKENS)}


def build_model(segmenter: OMGSegModel, llm, tokenizer, m: ModelConfig) -> OMGLlavaForCausalLM:
    ids = add_special_tokens(tokenizer, llm)
    llm.config.pad_token_id = tokenizer.pad_token_id
    model = OMGLlavaForCausalLM(m.omg_config(segmenter.config, llm.config.to_dict(), ids))
    load_state(model.segmenter, segmenter.state_dict(), "the segmenter")
    load_state(model.llm, llm.state_dict(), "the LLM")
    model.check_tokenizer(tokenizer)
    return model


def step_loss(ce: torch.Tensor, per_sample: torch.Tensor | None, num_items_in_batch, grad_accum: int = 1
              ) -> torch.Tensor:
    """A stage's loss as the Trainer takes it: the CE (over the step's ``num_items_in_batch`` label
    tokens when the Trainer counts them, every process and accumulated batch) plus a term that is a
    mean over this batch's samples (the mask or reconstruction loss). Given ``num_items_in_batch``,
    the Trainer neither averages accumulated batches nor lets the processes' average stand (it
    multiplies the loss by their count): the per-sample term is divided by both first, so that N
    processes with equal batches train as one process over the same step does."""
    if per_sample is None:
        return ce
    if num_items_in_batch is not None:
        per_sample = per_sample / (get_world_size() * grad_accum)
    return ce + per_sample


class Stage1(nn.Module):
    """Projector + ``text2vision`` train; CE on the answers + the reconstruction loss."""

    def __init__(self, model: OMGLlavaForCausalLM, packed: bool = False, grad_accum: int = 1):
        super().__init__()
        self.model, self.packed, self.grad_accum = model, packed, grad_accum
        model.requires_grad_(False)
        model.projector.requires_grad_(True)
        model.text2vision.requires_grad_(True)

    def forward(self, input_ids, attention_mask, labels, perception, prompts, seg_masks=None, point_seeds=None,
                **loss_kwargs):
        n_items = loss_kwargs.get("num_items_in_batch")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, perception=perception,
                         prompts=prompts, packed=self.packed, num_items_in_batch=n_items)
        return {"loss": step_loss(out.ce_loss, self.model.reconstruction_loss(perception), n_items, self.grad_accum)}


class Stage2(nn.Module):
    """LoRA on every Linear of the LLM; embeddings, LM head, projector and ``text2vision`` train; CE +
    the ``[SEG]`` mask loss. ``[SEG]`` / mask mismatches are counted in ``self.mismatched``."""

    def __init__(self, model: OMGLlavaForCausalLM, r: int, alpha: int, dropout: float, packed: bool = False,
                 grad_accum: int = 1):
        super().__init__()
        model.requires_grad_(False)
        targets = linear_names(model.llm, exclude=r"lm_head$")
        model.llm = apply_lora(model.llm, targets, r=r, alpha=alpha, dropout=dropout)
        for module in (model.llm.get_input_embeddings(), model.llm.get_output_embeddings(), model.projector,
                       model.text2vision):
            module.requires_grad_(True)
        self.model, self.mismatched, self.packed, self.grad_accum = model, 0, packed, grad_accum

    def forward(self, input_ids, attention_mask, labels, perception, prompts, seg_masks, point_seeds=None,
                **loss_kwargs):
        n_items = loss_kwargs.get("num_items_in_batch")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, perception=perception,
                         prompts=prompts, seg_masks=seg_masks, packed=self.packed, point_seeds=point_seeds,
                         num_items_in_batch=n_items)
        if out.seg_mismatched:
            self.mismatched += out.seg_mismatched
            logger.warning("%d sample(s) of this batch have a [SEG] / mask count mismatch: skipped for the mask "
                           "loss (%d so far)", out.seg_mismatched, self.mismatched)
        return {"loss": step_loss(out.ce_loss, out.seg_loss, n_items, self.grad_accum)}

    def merged(self) -> OMGLlavaForCausalLM:
        self.model.llm = self.model.llm.merge_and_unload()
        return self.model


# ----------------------------------------------------------------------------------------------
# the run


def run(cfg: RunConfig, force: bool = False) -> Path:
    """The whole run (see the module docstring); returns the path of its ``metrics.json``."""
    setup_logging()
    seed_everything(cfg.stage2.seed)
    recipe = Recipe("omg_llava", cfg.name, force)
    data = prepare_data(recipe, cfg)
    builder = ModelBuilder(cfg, pretrain_segmenter(recipe, cfg))
    model, tok, cache, s2_dir = train_and_load(recipe, cfg, data, builder)
    point_to_model(recipe.root, s2_dir)  # what `chat` / `segment` load (an ablation's stages sit beside it)
    evaluate_run(recipe, cfg, data, model, tok, builder.fresh(cfg.stage1.seed + 1)[0], cache)
    return recipe.finish(cfg.to_dict(), lambda m: print_table(m, cfg.data.eval_tasks))


def perceive_all(model: OMGLlavaForCausalLM, data: Data, recipe: Recipe) -> PerceptionCache:
    """The frozen segmenter's perception of every image of the run (timed into ``recipe``'s metrics)."""
    t0 = time.time()
    cache = PerceptionCache(model, image_paths(data.stage1 + data.stage2 + [s for v in data.eval.values() for s in v]))
    recipe.metrics["time/perception_s"] = time.time() - t0
    return cache


def train_and_load(recipe: Recipe, cfg: RunConfig, data: Data, builder: ModelBuilder,
                   cache: PerceptionCache | None = None) -> tuple[OMGLlavaForCausalLM, object, PerceptionCache, Path]:
    """Stages 1 and 2 of ``cfg`` (stages of ``recipe``, reused when complete), then the trained model
    loaded back from its directory, its tokenizer, the perception cache of every image (``cache``
    when given: the perception depends on the frozen segmenter alone) and the stage-2 directory."""
    model, tok = builder.fresh(cfg.stage1.seed)
    if cache is None:
        cache = perceive_all(model, data, recipe)
    cache.model = model
    # what the stages are built from, not where it lies: the run's own stage directories are named by
    # their content (``<stage>-<hash>``), so another run name with the same inputs reuses stages 1-2
    stamp = content_hash(asdict(cfg.model), builder.llm_id, builder.seg_path.name, weights_hash(builder.seg_path),
                         str(data.root) if cfg.data.root else data.root.name, cfg.data.max_length)
    s1_dir = train_stage1(recipe, cfg, model, tok, cache, data, stamp)
    s2_dir = train_stage2(recipe, cfg, model, tok, cache, data, stamp, s1_dir)
    model = load_pretrained(OMGLlavaForCausalLM, s2_dir / "model", "OMG-LLaVA")
    tok = AutoTokenizer.from_pretrained(s2_dir / "model")
    model.check_tokenizer(tok)
    cache.model = model
    return model, tok, cache, s2_dir


ABLATION_ARMS = {"full": {}, "no_prior": {"use_prior": False}, "no_object_tokens": {"use_object_tokens": False}}
"""Table 5 at toy scale: the whole model, and each of its two parts taken out alone (the perception
prior zeroed; no object-centric tokens). The paper adds them cumulatively to a baseline without both."""
ABLATION_TASKS = ("res", "gcg")
"""What Table 5 scores (RES cIoU / gIoU, GCG METEOR / mIoU): the arms are evaluated on these tasks only."""
ABLATION_FIGURES = ("res/cIoU", "res/gIoU", "gcg/METEOR", "gcg/CIDEr", "gcg/AP50", "gcg/mIoU", "gcg/recall")


def ablation(cfg: RunConfig, seeds: tuple[int, ...] = (0, 1, 2), arms: tuple[str, ...] | None = None,
             force: bool = False) -> Path:
    """Table 5 over seeds: each arm of :data:`ABLATION_ARMS` (default: all) trains stages 1 and 2 with
    every seed in ``seeds`` (the new parts' initialisation and the data order) on the run's data and
    frozen segmenter, and is scored on the run's held-out samples of :data:`ABLATION_TASKS` (those of
    them the run evaluates); per seed, mean and standard deviation (ddof 1). The stages are the run
    ``cfg.name``'s, keyed by their content (a run of the same config, e.g. ``make train-omg`` when
    ``cfg`` has no schedule overrides, is the full arm's seed 0, reused; ``make ablate-omg`` overrides
    stage 2's schedule, so it trains its own); each arm and seed's predictions and figures land in
    ``runs/omg_llava/<name>/ablation/<arm>_seed<k>/``, the table in ``.../ablation/metrics.json``."""
    setup_logging()
    if len(seeds) < 2:
        raise ValueError(f"an ablation needs at least 2 seeds for a spread, got {list(seeds)}")
    arms = tuple(ABLATION_ARMS) if arms is None else tuple(arms)
    if not arms or any(a not in ABLATION_ARMS for a in arms):
        raise ValueError(f"arms must be a non-empty subset of {list(ABLATION_ARMS)}, got {list(arms)}")
    stages = Recipe("omg_llava", cfg.name, force)
    data = prepare_data(stages, cfg)
    seg_path = pretrain_segmenter(stages, cfg)
    out = Recipe("omg_llava", f"{cfg.name}/ablation")
    # the segmenter is shared and frozen, and the arms act after it (``visual_embeds``): one perception for all
    scored = replace(data, eval={task: s for task, s in data.eval.items() if task in ABLATION_TASKS})
    cache = perceive_all(ModelBuilder(cfg, seg_path).fresh(0)[0], scored, out)
    for arm in arms:
        per_seed = []
        for seed in seeds:
            c = replace(cfg, model=replace(cfg.model, config={**cfg.model.config, **ABLATION_ARMS[arm]}),
                        stage1=replace(cfg.stage1, seed=seed), stage2=replace(cfg.stage2, seed=seed))
            seed_everything(seed)
            one = Recipe("omg_llava", f"{cfg.name}/ablation/{arm}_seed{seed}")
            stages.metrics = one.metrics  # the stages' build times land with the arm that built them
            model, tok, cache, _ = train_and_load(stages, c, data, ModelBuilder(c, seg_path), cache)
            evaluate_run(one, c, scored, model, tok, None, cache, extras=False)
            one.finish(c.to_dict())
            per_seed.append(one.metrics)
            out.metrics |= {f"{arm}/seed_{seed}/{k}": one.metrics[k] for k in ABLATION_FIGURES if k in one.metrics}
        out.metrics |= seed_summary(arm, per_seed, ABLATION_FIGURES)
    out.metrics["seeds"] = len(seeds)
    return out.finish(cfg.to_dict() | {"ablation_seeds": list(seeds), "ablation_arms": list(arms)}, print_ablation)


def print_ablation(m: dict) -> None:
    names = {"full": "full model", "no_prior": "without the perception prior",
             "no_object_tokens": "without object-centric tokens"}
    shown = [arm for arm in names if f"{arm}/mean/res/cIoU" in m]
    print(f"\nTable 5 (mean ± std over {m['seeds']} seeds of stages 1-2; the same data and frozen segmenter)\n"
          "| | " + " | ".join(ABLATION_FIGURES) + " |\n|---|" + "---|" * len(ABLATION_FIGURES))
    for arm in shown:
        print(f"| {names[arm]} | " + " | ".join(
            "-" if f"{arm}/mean/{k}" not in m else f"{m[f'{arm}/mean/{k}']:.3f} ± {m[f'{arm}/std/{k}']:.3f}"
            for k in ABLATION_FIGURES) + " |")
    for arm in shown:
        per_seed = sorted((int(k.split("/")[1].removeprefix("seed_")), v) for k, v in m.items()
                          if k.startswith(f"{arm}/seed_") and k.endswith("/res/cIoU"))
        print(f"RES cIoU per seed, {names[arm]}: " + " / ".join(f"{v:.3f}" for _, v in per_seed))


def score_predictions(cfg: RunConfig, path: Path) -> dict[str, float]:
    """``eval --predictions FILE``: a predictions file of one task (``predictions_<task>.jsonl``, or any
    model's in that format) scored against the run's held-out samples of that task."""
    tasks = {r.get("task") for _, r in iter_jsonl(path, "predictions")}
    if len(tasks) != 1 or None in tasks:
        raise ValueError(f"{path}: a predictions file holds one task's predictions, each with its 'task'; found {sorted(map(str, tasks))}")
    task = tasks.pop()
    data = prepare_data(Recipe("omg_llava", cfg.name), cfg)
    if task not in data.eval:
        raise ValueError(f"{path}: task {task!r} is not evaluated by this run (eval_tasks: {sorted(data.eval)})")
    return {f"{task}/{k}": v for k, v in score(task, path, data.eval[task]).items()}


@dataclass
class Data:
    """The run's exported (or real) data directory and the samples each stage reads from it."""

    root: Path
    stage1: list
    stage2: list
    eval: dict[str, list]
    refer: dict = field(default_factory=dict)
    """:func:`~groundlab.omg_llava.data.refer_reader`'s arguments for RES."""


def prepare_data(recipe: Recipe, cfg: RunConfig) -> Data:
    """1. The world exported in every format the model trains on, read back by the real loaders."""
    world = World(WorldConfig(), seed=cfg.data.world_seed)

    def export(out: Path) -> None:
        counts = export_world(world, out, cfg.data.train_scenes, cfg.data.val_scenes, cfg.data.qa_per_scene)
        write_metrics(out / "counts.json", counts, config=asdict(cfg.data))

    # the export's key leaves out what only names the REFER files read back or weights what is read
    key = {k: v for k, v in asdict(cfg.data).items() if k not in REFER_EXPORT and k not in REPEAT}
    root = Path(cfg.data.root) if cfg.data.root else recipe.stage("data", key, world.config.key(), build=export)
    d, refer = cfg.data, cfg.data.refer()
    stage2 = load_world_export(root, "train", d.stage2_tasks, refer)
    if d.res_same_category_repeat > 1 and "res" in d.stage2_tasks:
        hard = same_category_refs(refer_reader(root, **refer), "train")
        stage2 += [s for s in stage2 if s.task == "res" and s.id.split("-")[0] in hard and (
            d.res_repeat_expressions == "all" or names_only_its_object(res_expression(s)))] * (d.res_same_category_repeat - 1)
    data = Data(root, load_world_export(root, "train", d.stage1_tasks, refer), stage2,
                {t: load_world_export(root, d.res_eval_split if t == "res" else "val", (t,), refer)
                 for t in d.eval_tasks}, refer)
    if "res" in data.eval and not cfg.eval.res_all_sentences:
        first = {}
        for s in data.eval["res"]:  # ids are "<ref_id>-<sent_id>"
            first.setdefault(s.id.split("-")[0], s)
        data.eval["res"] = list(first.values())
    m = recipe.metrics
    m |= {"data/stage1_samples": len(data.stage1), "data/stage2_samples": len(data.stage2)}
    m |= {f"data/stage2/{k}": v for k, v in Counter(s.task for s in data.stage2).items()}
    m |= {f"data/eval/{t}": len(v) for t, v in data.eval.items()}
    return data


def pretrain_segmenter(recipe: Recipe, cfg: RunConfig) -> Path:
    """2. The tiny OMG-Seg pre-trained on the world (panoptic + prompts), or a given pretrained one;
    returns the ``from_pretrained`` directory. Its held-out PQ / prompted mIoU join the run's metrics."""
    s_cfg = cfg.segmenter
    if s_cfg.pretrained:
        return Path(s_cfg.pretrained)
    world = World(WorldConfig(), seed=cfg.data.world_seed)

    def fit(out: Path) -> None:
        torch.manual_seed(s_cfg.train.seed)
        segmenter = OMGSegModel(OMGSegConfig(**s_cfg.config))
        untrained = evaluate_segmenter(segmenter, world, "val", s_cfg.eval_scenes)
        t0 = time.time()
        if s_cfg.semantic is not None:
            train(SemanticPretraining(segmenter),
                  WorldPanopticDataset(world, "train", s_cfg.scenes, seed=s_cfg.semantic.seed),
                  PanopticCollator(segmenter, seed=s_cfg.semantic.seed), s_cfg.semantic, out / "semantic")
        train(SegmenterForTraining(segmenter, s_cfg.num_points),
              WorldPanopticDataset(world, "train", s_cfg.scenes, seed=s_cfg.train.seed),
              PanopticCollator(segmenter, seed=s_cfg.train.seed), s_cfg.train, out / "checkpoints")
        seg_metrics = {"time/train_s": time.time() - t0} | evaluate_segmenter(segmenter, world, "val", s_cfg.eval_scenes)
        seg_metrics |= {f"baseline/untrained/{k}": v for k, v in untrained.items()}
        segmenter.save_pretrained(out / "model")
        write_metrics(out / "metrics.json", seg_metrics, config=asdict(s_cfg))

    # a segmenter without the semantic stage keeps the key it had before the option
    semantic = () if s_cfg.semantic is None else (train_key(s_cfg.semantic),)
    seg_dir = recipe.stage("segmenter", s_cfg.config, s_cfg.scenes, s_cfg.num_points, train_key(s_cfg.train),
                           cfg.data.world_seed, MASK_TARGETS, *semantic, BOX_PROMPTS, build=fit,
                           keep=("checkpoints", "semantic"))
    recipe.metrics |= {f"segmenter/{k}": v for k, v in json.loads((seg_dir / "metrics.json").read_text()).items()
                       if k not in ("config", "git_commit")}
    return seg_dir / "model"


class ModelBuilder:
    """OMG-LLaVA as every stage starts it: the frozen segmenter + the LLM (the tiny LLaVA base's, or
    ``model.llm``) with the special tokens added."""

    def __init__(self, cfg: RunConfig, seg_path: Path):
        self.cfg, self.seg_path = cfg, seg_path
        self.segmenter = load_pretrained(OMGSegModel, seg_path, "the OMG-Seg segmenter")
        self.llm_path = Path(cfg.model.llm) if cfg.model.llm else ensure_base("llava")
        # what stages 1-2 are keyed by: a given LLM by its path, the LLaVA base by its directory's name
        # (``llava-<key of its spec>``), wherever the runs root (GROUNDLAB_RUNS) puts it
        self.llm_id = str(self.llm_path) if cfg.model.llm else self.llm_path.name

    def fresh(self, seed: int) -> tuple[OMGLlavaForCausalLM, object]:
        tok = AutoTokenizer.from_pretrained(self.llm_path)
        torch.manual_seed(seed)
        llm = (llm_from_llava(self.llm_path) if _is_llava(self.llm_path)
               else load_pretrained(AutoModelForCausalLM, self.llm_path, "the LLM"))
        return build_model(self.segmenter, llm, tok, self.cfg.model), tok


def _dataset(cfg: RunConfig, samples, tok, model, cache) -> OMGDataset:
    return OMGDataset(samples, tok, TEMPLATES[model.config.template], model, cache, cfg.data.max_length)


def train_stage1(recipe: Recipe, cfg: RunConfig, model: OMGLlavaForCausalLM, tok, cache, data: Data,
                 stamp: str) -> Path:
    """3. Projector + ``text2vision`` on captions, CE + reconstruction; loaded into ``model``."""
    def fit(out: Path) -> None:
        train(Stage1(model, cfg.stage1.packed, cfg.stage1.grad_accum), _dataset(cfg, data.stage1, tok, model, cache), OMGCollator(tok.pad_token_id),
              cfg.stage1, out / "checkpoints")
        torch.save({"projector": model.projector.state_dict(), "text2vision": model.text2vision.state_dict()},
                   out / "stage1.pt")

    s1_dir = recipe.stage("stage1", stamp, train_key(cfg.stage1), cfg.data.stage1_tasks, build=fit)
    stage1 = torch_load(s1_dir / "stage1.pt", "stage-1 weights")
    load_state(model.projector, stage1["projector"], f"{s1_dir / 'stage1.pt'}: projector")
    load_state(model.text2vision, stage1["text2vision"], f"{s1_dir / 'stage1.pt'}: text2vision")
    return s1_dir


def train_stage2(recipe: Recipe, cfg: RunConfig, model: OMGLlavaForCausalLM, tok, cache, data: Data, stamp: str,
                 s1_dir: Path) -> Path:
    """4. LoRA on every Linear of the LLM + embeddings, LM head, projector, ``text2vision`` on the
    instruction mix; CE + the ``[SEG]`` mask loss; merged and saved whole (``save_pretrained``)."""
    def fit(out: Path) -> None:
        wrapper = Stage2(model, cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout, cfg.stage2.packed,
                         cfg.stage2.grad_accum)
        train(wrapper, _dataset(cfg, data.stage2, tok, model, cache), OMGCollator(tok.pad_token_id), cfg.stage2,
              out / "checkpoints")
        recipe.metrics["stage2/seg_mismatched"] = wrapper.mismatched
        wrapper.merged().save_pretrained(out / "model")
        tok.save_pretrained(out / "model")

    weighting = () if cfg.data.res_same_category_repeat == 1 else (
        {k: getattr(cfg.data, k) for k in REPEAT if k != "res_repeat_expressions" or cfg.data.res_repeat_expressions != "all"},)
    return recipe.stage("stage2", stamp, s1_dir.name, train_key(cfg.stage2), cfg.data.stage2_tasks, cfg.data.refer(),
                        MASK_TARGETS, *weighting, build=fit)


def _instances(data: Data) -> tuple[dict[str, list], dict[str, list]]:
    """Every object's mask and category id of each RES image (for the every-object baseline and the
    breakdowns), each image's decoded once."""
    samples = data.eval.get("res", [])
    if not samples:
        return {}, {}
    refer = refer_reader(data.root, **data.refer)
    ids = refer.image_ids()
    images = [str(image) for image in dict.fromkeys(s.image for s in samples)]
    return ({i: refer.instance_masks(ids[Path(i)]) for i in images},
            {i: refer.instance_categories(ids[Path(i)]) for i in images})


def evaluate_run(recipe: Recipe, cfg: RunConfig, data: Data, model, tok, untrained, cache, extras: bool = True) -> None:
    """5. Predictions JSONL, then scores from the file, for every eval task, the trained and the
    untrained model (``untrained`` None: the trained one only), beside the trivial baselines (whole
    image / random object / every object for RES, the most frequent training answer for the others),
    the oracles and the object-token coverage (``extras``; the ablation's arms skip them)."""
    instances, categories = _instances(data)
    m, root = recipe.metrics, recipe.root
    t0 = time.time()
    for task, samples in data.eval.items():
        ds = _dataset(cfg, samples, tok, model, cache)
        nets = [("", model)] + ([("baseline/untrained/", untrained)] if untrained is not None else [])
        for name, net in nets:
            path = predict(net, ds, tok, root / f"predictions_{name.replace('/', '_')}{task}.jsonl",
                           cfg.eval.batch_size, cfg.eval.max_new_tokens.get(task, 48))
            m |= {f"{name}{task}/{k}": v for k, v in score(task, path, samples).items()}
            if task == "res":
                preds = read_predictions(path, samples)
                m |= {f"{name}res/{k}": v for k, v in res_breakdown(preds, samples, instances).items()}
                if all(c is not None for cats in categories.values() for c in cats):
                    m |= {f"{name}res/{k}": v
                          for k, v in res_by_distractor(preds, samples, instances, categories).items()}
        if not extras:
            continue
        if task == "res":
            for kind in ("whole", "random_object", "largest_object", "union"):
                path = baseline_predictions(samples, kind, root / f"predictions_baseline_{kind}_res.jsonl",
                                            instance_masks=instances)
                m |= {f"baseline/{kind}/res/{k}": v for k, v in score(task, path, samples).items()}
            path = oracle_query_predictions(model.segmenter, samples, root / "predictions_oracle_query_res.jsonl")
            m |= {f"oracle/best_query/res/{k}": v for k, v in score(task, path, samples).items()}
            t1 = time.time()
            for name, oracle in (("object_token", oracle_object_token_predictions),
                                 ("free_query", oracle_free_query_predictions)):
                path = oracle(model, samples, root / f"predictions_oracle_{name}_res.jsonl")
                m |= {f"oracle/{name}/res/{k}": v for k, v in score(task, path, samples).items()}
            m["time/oracles_s"] = time.time() - t1
            m |= {f"perception/{k}": v for k, v in object_token_coverage(model, samples, instances).items()}
        else:
            answers = Counter(s.conversation[-1]["value"] for s in data.stage2 if s.task == task)
            const = answers.most_common(1)[0][0] if answers else ""
            path = baseline_predictions(samples, "constant", root / f"predictions_baseline_constant_{task}.jsonl",
                                        answer=const)
            m |= {f"baseline/constant/{task}/{k}": v for k, v in score(task, path, samples).items()}
    m["time/eval_s"] = time.time() - t0


def print_table(m: dict, tasks) -> None:
    seg = {k: m.get(f"segmenter/{k}") for k in ("panoptic/PQ", "prompt_point/mIoU", "prompt_box/mIoU", "prompt_mask/mIoU",
                                                 "objects/colour_acc", "objects/kind_acc")}
    seg = {k: v for k, v in seg.items() if v is not None or k.startswith("panoptic")}
    if seg["panoptic/PQ"] is not None:
        print("segmenter (held-out)      " + "  ".join(f"{k} {v:.3f}" for k, v in seg.items()))
        print("  untrained               " + "  ".join(
            f"{k} {m.get(f'segmenter/baseline/untrained/{k}', float('nan')):.3f}" for k in seg))
    cols = {"res": ("cIoU", "gIoU"), "gcg": ("METEOR", "CIDEr", "AP50", "mIoU", "recall"), "region": ("METEOR", "CIDEr")}
    rows = [("OMG-LLaVA", ""), ("untrained", "baseline/untrained/"), ("whole image", "baseline/whole/"),
            ("random object", "baseline/random_object/"), ("largest object", "baseline/largest_object/"),
            ("every object", "baseline/union/"),
            ("constant answer", "baseline/constant/"), ("oracle: segmenter query", "oracle/best_query/"),
            ("oracle: object token", "oracle/object_token/"), ("oracle: free query", "oracle/free_query/")]
    for task in tasks:
        print(f"{task:26s}" + "".join(f"{c:>9s}" for c in cols[task]))
        for label, prefix in rows:
            if f"{prefix}{task}/{cols[task][0]}" in m:
                print(f"  {label:24s}" + "".join(f"{m[f'{prefix}{task}/{c}']:9.3f}" for c in cols[task]))
        if task == "res" and "res/right_rate" in m:
            print("  OMG-LLaVA answers: right object {:.3f}, wrong object {:.3f}, poor mask {:.3f}".format(
                m["res/right_rate"], m["res/wrong_object_rate"], m["res/poor_mask_rate"]))
        if task == "res" and "res/same_category/n" in m:
            nan = float("nan")
            print("  right object when another object shares the target's category {:.3f} (n {}), "
                  "when none does {:.3f} (n {})".format(
                      m.get("res/same_category/right_rate", nan), m["res/same_category/n"],
                      m.get("res/unique_category/right_rate", nan), m["res/unique_category/n"]))
        if task == "res" and "perception/coverage" in m:
            print("  targets with an object token: {:.3f} (with perfect masks {:.3f})".format(
                m["perception/coverage"], m["perception/coverage_perfect_masks"]))

