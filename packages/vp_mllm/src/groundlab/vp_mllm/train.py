"""The Draw-and-Understand run: data -> start model -> stage 1 -> stage 2 -> region evaluation.

Stages (each reused on a second run with the same config, recomputed with ``force``):

1. data: the synthetic world exported as MDVP-Instruct-Data (stage-1 labels, stage-2 instruction
   turns, held-out evaluation records), or real MDVP files;
2. start: VP-LLaVA as training starts it: the LLaVA base, a visual prompt encoder initialised from
   the SAM base's ``prompt_encoder.*``, ``vp_proj`` aligned to the base's location tokens (or at
   random: ``model.align_locations``), fresh tags (the "untrained" row);
3. stage 1 (image-visual prompt alignment) and stage 2 (instruction tuning), with the paper's
   trainable sets (``modeling.set_trainable``); the same two stages again with the prompts dropped
   (the no-encoder baseline: trained and evaluated on the text alone);
4. evaluation: predictions JSONL per model, then scores from the file: region label accuracy,
   Semantic Similarity and Semantic IoU, region caption METEOR / CIDEr, regional OCR, per prompt kind,
   beside the majority label.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoProcessor, LlavaForConditionalGeneration

from groundlab.shared.bases import ensure_base
from groundlab.shared.boxes import loc_bins, loc_token_names
from groundlab.shared.config import RunConfigFile, model_overrides, one_of, positive, within
from groundlab.shared.distributed import seed_everything, setup_logging
from groundlab.shared.loading import load_pretrained, torch_load
from groundlab.shared.recipe import Recipe, train_key
from groundlab.shared.training import TrainConfig, train
from groundlab.shared.world import World, WorldConfig

from .configuration import VPMLLMConfig
from .data import (
    EXPORT_VERSION,
    MULTI_MARKED,
    TASKS,
    MDVPDataset,
    eval_records,
    export_world,
    majority_label,
    read_mdvp,
)
from .evaluation import constant_predictions, predict, random_object_scores, read_predictions, score
from .modeling import (
    VPMLLMForConditionalGeneration,
    align_to_locations,
    load_sam_prompt_encoder,
    sam_prompt_dim,
    set_trainable,
)
from .processing import VPCollator, VPProcessor, add_tokens

logger = logging.getLogger("groundlab")
ARMS = ("vp", "no_prompts")


@dataclass
class DataConfig:
    train_scenes: int = 1500
    eval_scenes: int = 100
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 4
    """2-4 shapes a scene: a region's label needs its prompt (with one shape it would not)."""
    glyph_prob: float = 0.3
    """Letters on some large shapes: the regional OCR task's material."""
    world_seed: int = 0
    box_noise: bool = True
    """The paper's box jitter in training (always on there)."""
    locate_prob: float = 0.0
    """The share of stage-2 records with a turn asking for a marked region's box (the LLaVA base's
    grounding prompt and location tokens), the reverse of describing it."""
    label_question_prob: float = 0.0
    """The share of stage-2 records with a ``What is <Region k>?`` turn about one marked region (its
    label): the question that ties ``<Region k>`` to slot k alone, without a list to infer it from."""
    one_marked_share: float | None = None
    """The share of training records that mark a single object (the rest mark two or more); None:
    the number marked is uniform in 1..n (1 for about a third of records on 2-4 objects). A question
    with one region marked teaches reading a slot's content; with several, which slot (README)."""
    multi_marked: str = "subset"
    """With ``one_marked_share``, what the other records mark: ``subset`` (uniform in 2..n objects) or
    ``all`` (every object, as the held-out labels records do)."""
    stage1_json: str | None = None
    """Real data instead of the world: MDVP-Instruct-Data files and their image root."""
    stage2_json: str | None = None
    eval_json: str | None = None
    image_root: str | None = None

    def __post_init__(self) -> None:
        positive(self, "train_scenes", "eval_scenes", "image_size", "min_objects", "max_objects")
        within(self, "glyph_prob", 0.0, 1.0)
        within(self, "locate_prob", 0.0, 1.0)
        within(self, "label_question_prob", 0.0, 1.0)
        one_of(self, "multi_marked", MULTI_MARKED)
        within(self, "one_marked_share", 0.0, 1.0)


@dataclass
class ModelConfig:
    """Where the pretrained parts come from, and the :class:`VPMLLMConfig` this run builds on them."""

    llava: str | None = None
    """A LLaVA ``from_pretrained`` directory; None = the tiny LLaVA base of ``make bases``."""
    sam: str | None = None
    """An official-layout SAM checkpoint for the prompt encoder; None = the tiny SAM base."""
    template: str = "vicuna"
    """The chat layout: ``vicuna`` (the LLaVA base's) or ``sphinx`` (SPHINX-V's)."""
    config: dict = field(default_factory=dict)
    """:class:`VPMLLMConfig` arguments over its defaults (``views``, ``vp_config``: K slots, the +0.5
    flag); ``lmm_config`` and ``vp_token_index`` come from the checkpoint and the tokenizer."""
    align_locations: bool = True
    """Start ``vp_proj`` where the base reads locations (``modeling.align_to_locations``: a box's
    token starts as the sum of its four location tokens' embeddings); needs a base with location
    tokens. False: ``vp_proj`` at random, as the paper (README: the tiny base then never learns to
    read the prompt)."""

    def __post_init__(self) -> None:
        one_of(self, "template", ("vicuna", "sphinx"))
        self.config = model_overrides(VPMLLMConfig, self.config, filled=("lmm_config", "vp_token_index"))


@dataclass
class EvalConfig:
    batch_size: int = 32
    max_new_tokens: int = 48
    tasks: tuple[str, ...] = TASKS
    """``labels`` (every object marked), ``single`` (each alone), ``caption``, ``ocr``."""

    def __post_init__(self) -> None:
        positive(self, "batch_size", "max_new_tokens")
        one_of(self, "tasks", TASKS)


def _stage(steps: int, lr: float) -> TrainConfig:
    # the paper: warm-up 3 % then cosine to 0, AdamW (0.9, 0.95), weight decay 0, clip 8, bf16
    return TrainConfig(max_steps=steps, batch_size=32, lr=lr, warmup_steps=max(1, int(0.03 * steps)),
                       lr_scheduler="cosine", adam_beta2=0.95, grad_clip=8.0, bf16="auto", save_steps=200,
                       logging_steps=50)


@dataclass
class RunConfig(RunConfigFile):
    name: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: TrainConfig = field(default_factory=lambda: _stage(300, 1e-3))
    stage2: TrainConfig = field(default_factory=lambda: _stage(600, 5e-4))
    arms: tuple[str, ...] = ARMS
    """``vp`` (the model) and ``no_prompts`` (the same stages with the prompts dropped)."""
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        one_of(self, "arms", ARMS)
        if "vp" not in self.arms:
            raise ValueError("'arms' must include 'vp'")


# ----------------------------------------------------------------------------------------------
# the recipe


def run(cfg: RunConfig, force: bool = False) -> Path:
    """The whole run (see the module docstring); returns the path of its ``metrics.json``."""
    setup_logging()
    seed_everything(cfg.stage1.seed)
    recipe = Recipe("vp_mllm", cfg.name, force)
    data = prepare_data(recipe, cfg)
    start = build_start(recipe, cfg)
    if (start / "alignment.json").exists():
        fit = json.loads((start / "alignment.json").read_text())
        recipe.metrics |= {f"start/alignment/{k}": v for k, v in fit.items()}
    models = {"untrained": start}
    for arm in cfg.arms:
        stage1 = train_stage(recipe, cfg, data, start, arm, "stage1")
        models[arm] = train_stage(recipe, cfg, data, stage1, arm, "stage2")
    for tag, model_dir in models.items():
        evaluate_model(recipe, cfg, data, model_dir, tag)
    recipe.metrics |= baselines(recipe, cfg, data)
    return recipe.finish(cfg.to_dict(), print_table)


@dataclass
class Data:
    """The run's MDVP files and their image root."""

    root: Path
    stage1: Path
    stage2: Path
    eval: Path


def prepare_data(recipe: Recipe, cfg: RunConfig) -> Data:
    """1. The world exported as MDVP-Instruct-Data (train / held-out), or real files."""
    d = cfg.data
    if d.stage1_json is not None:
        if not (d.stage2_json and d.eval_json and d.image_root):
            raise ValueError("data.stage1_json needs data.stage2_json, data.eval_json and data.image_root too")
        return Data(Path(d.image_root), Path(d.stage1_json), Path(d.stage2_json), Path(d.eval_json))

    def export(out: Path) -> None:
        world = World(world_config(cfg), seed=d.world_seed)
        counts = (export_world(world, "train", d.train_scenes, out, locate=d.locate_prob,
                               files=("stage1", "stage2"), one_marked=d.one_marked_share,
                               label_question=d.label_question_prob, multi_marked=d.multi_marked)
                  | export_world(world, "val", d.eval_scenes, out, files=("eval",)))
        (out / "counts.json").write_text(json.dumps(counts, indent=2))

    root = recipe.stage("data", asdict(d), EXPORT_VERSION, build=export)
    recipe.metrics |= {f"data/{k}": v for k, v in json.loads((root / "counts.json").read_text()).items()}
    return Data(root, root / "train_stage1.json", root / "train_stage2.json", root / "val_eval.json")


def world_config(cfg: RunConfig) -> WorldConfig:
    d = cfg.data
    return WorldConfig(image_size=d.image_size, min_objects=d.min_objects, max_objects=d.max_objects,
                       glyph_prob=d.glyph_prob)


def _parts(cfg: RunConfig) -> tuple[Path, Path]:
    llava = Path(cfg.model.llava) if cfg.model.llava else ensure_base("llava")
    sam = Path(cfg.model.sam) if cfg.model.sam else ensure_base("sam")
    return llava, sam


def build_start(recipe: Recipe, cfg: RunConfig) -> Path:
    """2. The model both arms start from, saved (``from_pretrained`` directory + its processor)."""
    llava, sam = _parts(cfg)

    def build(out: Path) -> None:
        seed_everything(cfg.stage1.seed)
        processor = AutoProcessor.from_pretrained(llava)
        vp_id = add_tokens(processor.tokenizer)
        base = load_pretrained(LlavaForConditionalGeneration, llava, "the LLaVA base")
        overrides = dict(cfg.model.config)
        vp = dict(overrides.pop("vp_config", None) or {})
        sam_state = torch_load(sam, "SAM checkpoint")
        vp.setdefault("embed_dim", sam_prompt_dim(sam_state, sam))  # the encoder is SAM's prompt width
        config = VPMLLMConfig(vp_config=vp, lmm_config=base.config.to_dict(), vp_token_index=vp_id, **overrides)
        model = VPMLLMForConditionalGeneration(config)
        model.lmm.load_state_dict(base.state_dict())
        load_sam_prompt_encoder(model.vp_encoder, sam_state)
        if cfg.model.align_locations:
            names = loc_token_names(loc_bins(processor.tokenizer))
            if not names:
                raise ValueError(f"model.align_locations needs a LLaVA base with location tokens (<loc0000> ...); "
                                 f"the tokenizer of {llava} has none (set model.align_locations: false)")
            table = model.lmm.get_input_embeddings().weight[processor.tokenizer.convert_tokens_to_ids(names)]
            fit = align_to_locations(model, table, seed=cfg.stage1.seed)
            logger.info("vp_proj aligned to the base's %d location tokens: R^2 box %.3f, point %.3f",
                        len(names), fit["r2/box"], fit["r2/point"])
            (out / "alignment.json").write_text(json.dumps(fit, indent=1))
        model.save_pretrained(out / "model")
        processor.save_pretrained(out / "model")

    return recipe.stage("start", asdict(cfg.model), str(llava), str(sam), cfg.stage1.seed, build=build)


def load_model(model_dir: Path, template: str = "vicuna") -> tuple[VPMLLMForConditionalGeneration, VPProcessor]:
    """A saved model and its processor (the tokenizer's ``<vp>`` checked against the model's)."""
    model = load_pretrained(VPMLLMForConditionalGeneration, model_dir / "model", "a VP-MLLM")
    hf = AutoProcessor.from_pretrained(model_dir / "model")
    return model, VPProcessor(hf.tokenizer, hf.image_processor, model.config, template)


def train_stage(recipe: Recipe, cfg: RunConfig, data: Data, start: Path, arm: str, stage: str) -> Path:
    """3. One training stage of one arm from the model in ``start``; returns its directory."""
    tc: TrainConfig = getattr(cfg, stage)
    use_prompts = arm == "vp"

    def fit(out: Path) -> None:
        seed_everything(tc.seed)
        model, processor = load_model(start, cfg.model.template)
        opened = set_trainable(model, stage, aligned=cfg.model.align_locations)
        logger.info("%s %s: %d trainable tensors, %d parameters", arm, stage, len(opened),
                    sum(p.numel() for p in model.parameters() if p.requires_grad))
        source = data.stage1 if stage == "stage1" else data.stage2
        records = read_mdvp(source, data.root, model.config.vp_config.num_slots)
        dataset = MDVPDataset(records, data.root, processor, box_noise=cfg.data.box_noise, use_prompts=use_prompts,
                              seed=tc.seed, source=str(source))
        train(model, dataset, VPCollator(processor.tokenizer.pad_token_id, packed=tc.packed), tc, out / "checkpoints")
        model.save_pretrained(out / "model")
        AutoProcessor.from_pretrained(start / "model").save_pretrained(out / "model")

    # the trainable set differs (set_trainable); without prompts the prompt side gets no gradient either way
    held = stage == "stage1" and cfg.model.align_locations and use_prompts
    return recipe.stage(f"{arm}_{stage}", start.name, train_key(tc), asdict(cfg.data), arm,
                        *(["aligned prompt side held"] if held else []), build=fit)


def evaluate_model(recipe: Recipe, cfg: RunConfig, data: Data, model_dir: Path, tag: str) -> dict:
    """4. Predictions JSONL of a saved model on the held-out records, then its scores from the file."""
    model, processor = load_model(model_dir, cfg.model.template)
    records = eval_records(read_mdvp(data.eval, data.root, model.config.vp_config.num_slots), tuple(cfg.eval.tasks))
    path = predict(model, processor, records, data.root, recipe.root / f"predictions_{tag}.jsonl",
                   batch_size=cfg.eval.batch_size, use_prompts=tag != "no_prompts",
                   max_new_tokens=cfg.eval.max_new_tokens)
    scores = score(read_predictions(path))
    recipe.metrics |= {f"{tag}/{k}": v for k, v in scores.items()}
    return scores


def baselines(recipe: Recipe, cfg: RunConfig, data: Data) -> dict:
    """The majority label of the training regions, as every region's answer; on the world's data also
    a uniformly random object of the region's scene (expected scores)."""
    records = eval_records(json.loads(data.eval.read_text()), ("labels", "single"))
    answer = majority_label(json.loads(data.stage1.read_text()))
    if answer is None or not records:
        logger.info("no majority-label baseline: %s has no region labels or the held-out data no labels task",
                    data.stage1)
        return {}
    out = {f"baseline/majority/{k}": v for k, v in score(constant_predictions(records, answer)).items()}
    if cfg.data.stage1_json is None:  # the world's records: each scene's objects are its labels record's
        out |= {f"baseline/random_object/{k}": v for k, v in random_object_scores(records).items()}
    return out


def score_predictions(cfg: RunConfig, path: Path) -> dict[str, float]:
    """``eval --predictions FILE``: a predictions file of :func:`groundlab.vp_mllm.evaluation.predict`."""
    return score(read_predictions(path))


def print_table(m: dict) -> None:
    def f(key, pct=True):
        v = m.get(key)
        return "  -  " if v is None else (f"{100 * v:5.1f}" if pct else f"{v:.3f}")

    rows = [("VP-LLaVA (stage 1 + 2)", "vp"), ("no prompt encoder (prompts dropped)", "no_prompts"),
            ("untrained (start of stage 1)", "untrained"), ("majority label", "baseline/majority"),
            ("a random object of the scene (expected)", "baseline/random_object")]
    print("\n| model | prompts | label acc. | Semantic Sim. | Semantic IoU | label acc., one marked | caption METEOR "
          "| CIDEr | OCR EM |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, tag in rows:
        for kind in ("box", "point"):
            k = f"{tag}/{kind}"
            if f"{k}/labels/accuracy" not in m:
                continue
            print(f"| {name} | {kind} | {f(k + '/labels/accuracy')} | {f(k + '/labels/semantic_similarity')} | "
                  f"{f(k + '/labels/semantic_iou')} | {f(k + '/single/accuracy')} | {f(k + '/caption/METEOR', False)} | "
                  f"{f(k + '/caption/CIDEr', False)} | {f(k + '/ocr/exact_match')} |")
