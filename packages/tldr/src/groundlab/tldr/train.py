"""The TLDR run: data -> TLDR and naive RM training -> evaluation -> captioner hallucination rates.

Stages (each reused on a second run with the same config, recomputed with ``force``):

1. data: the synthetic world exported as TLDR JSONL (train / eval), negatives of all 8 taxonomies;
2. reward models: TLDR (token head) and the naive binary RM (last-token head), same backbone (the
   tiny PaliGemma base), same LoRA, same data and steps;
3. evaluation: predictions JSONL then scores, next to the all-good baseline (Table 1's shape) and the
   generator's own probability of each token (a detector with nothing trained);
4. downstream: two captioners of different quality (the tiny LLaVA base trained for two lengths)
   caption the eval scenes; TLDR's token / sentence / response hallucination rates of their captions
   are set beside the true error rate of each (checked against the scene) (Table 3's shape);
5. likelihood optimisation: the TLDR LoRA merged into the PaliGemma generator at each tau
   (Section 5.3), its captions rated the same way (Table 6's shape; tau = 0 is the base);
6. self-correction: the PaliGemma base, taught the world's rewrite task once, rewrites its own
   captions given TLDR's flags, none, or the oracle's (Table 4's shape; ``correction.py``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from transformers import AutoProcessor

from groundlab.shared.attention import HF_ATTENTION
from groundlab.shared.bases import default_spec, ensure_base, smoke_spec
from groundlab.shared.config import RunConfigFile, model_overrides, one_of, positive, within
from groundlab.shared.distributed import seed_everything, setup_logging
from groundlab.shared.loading import load_pretrained
from groundlab.shared.lora import load_adapter, save_adapter, trainable_report
from groundlab.shared.metrics import seed_summary
from groundlab.shared.recipe import Recipe, train_key
from groundlab.shared.runs import point_to_model, write_metrics
from groundlab.shared.training import TrainConfig, train
from groundlab.shared.world import World, WorldConfig

from .configuration import TldrConfig
from .data import TldrDataset, export_world, read_jsonl
from .evaluation import (
    all_good_baseline,
    predict,
    predict_generator,
    read_predictions,
    score_naive,
    score_tldr,
)
from .metrics import rate_correlation
from .modeling import GENERATORS, TldrRewardModel, backbone_kind, with_lora
from .processing import collator_for, layout_for

logger = logging.getLogger("groundlab")


@dataclass
class DataConfig:
    train_scenes: int = 1200
    eval_scenes: int = 150
    tasks: tuple[str, ...] = ("description", "caption", "vqa")
    image_size: int = 64
    glyph_prob: float = 0.3
    """Letters on some large shapes, so the Text-OCR taxonomy has material."""
    world_seed: int = 0
    train_jsonl: str | None = None
    """Real data instead of the world: TLDR JSONL files (see ``groundlab.tldr.data``) and their image root."""
    eval_jsonl: str | None = None
    image_root: str | None = None

    def __post_init__(self) -> None:
        positive(self, "train_scenes", "eval_scenes", "image_size")
        within(self, "glyph_prob", 0.0, 1.0)
        one_of(self, "tasks", ("description", "caption", "vqa"))
        if not self.tasks:
            raise ValueError("'tasks' is empty")


@dataclass
class ModelConfig:
    """The backbone the reward model starts from and the :class:`TldrConfig` this run builds on it."""

    backbone: str | None = None
    """A PaliGemma ``from_pretrained`` directory; None = the tiny PaliGemma base of ``make bases``."""
    config: dict = field(default_factory=dict)
    """:class:`TldrConfig` arguments over its defaults (the paper's LoRA: r 512, alpha 128, dropout 0.1
    on the projector and every decoder Linear); the backbone and the head come from the recipe."""

    def __post_init__(self) -> None:
        self.config = model_overrides(TldrConfig, self.config,
                                      filled=("backbone_type", "backbone_config", "head", "threshold"))
        lora = TldrConfig(**self.config)
        if not (lora.lora_projector or lora.lora_decoder):
            raise ValueError("LoRA on neither the projector nor the decoder: set lora_projector or lora_decoder")


@dataclass
class CaptionerConfig:
    weak_steps: int = 150
    """Training steps of the weaker captioner (the strong one is the LLaVA base, 1800 steps)."""
    strong_steps: int | None = None
    """None: the LLaVA base of ``make bases`` as it is."""
    train_scenes: int | None = None
    """None: the base's own number of training scenes (tests shrink it)."""
    eval_scenes: int | None = None
    """None: the base's own number of held-out scenes for its printed figures."""
    n_scenes: int = 150
    smoke: bool = False
    """True: every stage of the captioners' bases cut to a few steps (``bases.smoke_spec``; tests)."""

    def __post_init__(self) -> None:
        positive(self, "weak_steps", "strong_steps", "train_scenes", "eval_scenes", "n_scenes")


@dataclass
class LikelihoodConfig:
    """Table 6: the reward model's LoRA merged back into the generator at strength tau."""

    taus: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    """tau = 0 is the base generator itself (the reference row)."""
    n_scenes: int = 150

    def __post_init__(self) -> None:
        positive(self, "n_scenes")
        for tau in self.taus:
            if not 0.0 <= tau <= 1.0:
                raise ValueError(f"'taus' must lie in [0, 1], got {tau!r}")


@dataclass
class CorrectionConfig:
    """Table 4: the rewriter (the PaliGemma base taught the rewrite task) and its evaluation."""

    enabled: bool = True
    train_scenes: int = 1200
    """Training scenes of the rewrite task (two items each: the base's caption and a wrong one)."""
    n_scenes: int = 150
    """Held-out scenes whose base captions are rewritten."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=400, batch_size=32, lr=5e-4, warmup_steps=20, bf16="auto", save_steps=200, logging_steps=50))

    def __post_init__(self) -> None:
        positive(self, "train_scenes", "n_scenes")


@dataclass
class RunConfig(RunConfigFile):
    name: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=1200, batch_size=16, lr=4e-3, warmup_steps=60, bf16="auto", save_steps=300, logging_steps=100))
    naive: bool = True
    captioners: CaptionerConfig = field(default_factory=CaptionerConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)


def run(cfg: RunConfig, force: bool = False) -> Path:
    """The whole run (see the module docstring); returns the path of its ``metrics.json``."""
    setup_logging()
    seed_everything(cfg.train.seed)
    recipe = Recipe("tldr", cfg.name, force)
    pali = Path(cfg.model.backbone) if cfg.model.backbone else ensure_base("paligemma")
    processor = AutoProcessor.from_pretrained(pali)
    data = prepare_data(recipe, cfg, pali, processor.tokenizer)
    heads = {"tldr": "token"} | ({"naive": "last"} if cfg.naive else {})
    models = {tag: train_reward_model(recipe, cfg, pali, processor, data, tag, head) for tag, head in heads.items()}
    # the run's TLDR model, by name: the ablation adds more tldr-* stages to the same directory
    point_to_model(recipe.root, models["tldr"])
    scored = {tag: evaluate_reward_model(recipe, cfg, pali, processor, data, models[tag], tag, head)
              for tag, head in heads.items()}
    generator_baseline(recipe, pali, processor, data)
    if data.real:  # the downstream tables need the world's truth
        return recipe.finish(cfg.to_dict(), print_table)
    reward_model = scored["tldr"]
    rate_captioners(recipe, cfg, processor, reward_model)
    likelihood_optimisation(recipe, cfg, pali, processor, reward_model, models["tldr"])
    recipe.metrics |= {f"correlation/{k}": v for k, v in rate_correlation(_captioner_rows(recipe.metrics)).items()}
    if cfg.correction.enabled:
        correct_captions(recipe, cfg, pali, processor, reward_model)
    return recipe.finish(cfg.to_dict(), print_table)


def score_predictions(cfg: RunConfig, path: Path) -> dict[str, float]:
    """``eval --predictions FILE``: a predictions file of :func:`groundlab.tldr.evaluation.predict`'s
    format (each record carries its labels) scored as TLDR's (a probability per token) or the naive
    RM's (one per response)."""
    preds = read_predictions(path)
    if not preds:
        raise ValueError(f"{path}: no predictions")
    per_token = [len(p["probs"]) == len(p["labels"]) for p in preds]
    if all(per_token):
        return score_tldr(preds)
    if not any(len(p["probs"]) != 1 for p in preds):
        return score_naive(preds)
    bad = next(p["id"] for p, ok in zip(preds, per_token) if not ok and len(p["probs"]) != 1)
    raise ValueError(f"{path}: record {bad} has neither one probability per token nor one per response")


@dataclass
class Data:
    """The run's TLDR JSONL files, their image root and their records."""

    root: Path
    train_file: Path
    eval_file: Path
    real: bool
    train_records: list = field(default_factory=list)
    eval_records: list = field(default_factory=list)


def prepare_data(recipe: Recipe, cfg: RunConfig, pali: Path, tok) -> Data:
    """1. The world exported as TLDR JSONL (train / val, negatives of every taxonomy), or real files."""
    if cfg.data.train_jsonl is not None:
        if not (cfg.data.eval_jsonl and cfg.data.image_root):
            raise ValueError("data.train_jsonl needs data.eval_jsonl and data.image_root too")
        data = Data(Path(cfg.data.image_root), Path(cfg.data.train_jsonl), Path(cfg.data.eval_jsonl), real=True)
    else:
        def export(out: Path) -> None:
            world = World(_world_config(cfg), seed=cfg.data.world_seed)
            counts = {}
            for split, n in (("train", cfg.data.train_scenes), ("val", cfg.data.eval_scenes)):
                _, c = export_world(world, split, n, out, tok, tasks=tuple(cfg.data.tasks))
                counts |= {f"{split}/{k}": v for k, v in c.items()}
            write_metrics(out / "counts.json", counts, config=asdict(cfg.data))

        root = recipe.stage("data", asdict(cfg.data), str(pali), build=export)
        data = Data(root, root / "tldr_train.jsonl", root / "tldr_val.jsonl", real=False)
    data.train_records, data.eval_records = read_jsonl(data.train_file, tok), read_jsonl(data.eval_file, tok)
    recipe.metrics |= {"data/train_records": len(data.train_records), "data/eval_records": len(data.eval_records)}
    return data


def _world_config(cfg: RunConfig) -> WorldConfig:
    return WorldConfig(image_size=cfg.data.image_size, glyph_prob=cfg.data.glyph_prob)


def _reward_model(cfg: RunConfig, pali: Path, head: str = "token") -> TldrRewardModel:
    return TldrRewardModel.from_backbone(str(pali), head=head, **cfg.model.config)


def train_reward_model(recipe: Recipe, cfg: RunConfig, pali: Path, processor, data: Data, tag: str,
                       head: str) -> Path:
    """2. A reward model on the PaliGemma backbone with LoRA: TLDR (``token`` head) or the naive binary
    RM (``last``-token head); the same backbone, LoRA, data and steps. Returns its directory."""

    def fit(out: Path) -> None:
        seed_everything(cfg.train.seed)  # the LoRA's initialisation, whatever ran before
        model = with_lora(_reward_model(cfg, pali, head))
        logger.info("%s trainable parameters:\n%s", tag, trainable_report(model, depth=3))
        layout = layout_for(processor, head)
        train(model, TldrDataset(data.train_records, data.root, processor.tokenizer, layout),
              collator_for(processor, layout, packed=cfg.train.packed), cfg.train, out / "checkpoints")
        save_adapter(model, out / "adapter")
        (out / "model.json").write_text(json.dumps({"backbone": str(Path(pali).resolve()), "head": head}))

    return recipe.stage(tag, asdict(cfg.model), train_key(cfg.train), str(data.root), head, build=fit)


def evaluate_reward_model(recipe: Recipe, cfg: RunConfig, pali: Path, processor, data: Data, model_dir: Path,
                          tag: str, head: str) -> TldrRewardModel:
    """3. Predictions JSONL of the saved model, then scores from the file, next to the all-good
    baseline (Table 1's shape). Returns the loaded model."""
    model, scores, preds = _score_model(cfg, pali, processor, data, model_dir, head,
                                        recipe.root / f"predictions_{tag}.jsonl")
    recipe.metrics |= {f"{tag}/{k}": v for k, v in scores.items()}
    if head == "token":
        recipe.metrics |= {f"baseline/all_good/{k}": v for k, v in all_good_baseline(preds).items()}
    return model


def generator_baseline(recipe: Recipe, pali: Path, processor, data: Data) -> None:
    """3b. The baseline with nothing trained: the backbone's own generator scores each response token by
    its probability of it (:func:`groundlab.tldr.evaluation.predict_generator`), on the same records."""
    kind = backbone_kind(pali)
    generator = load_pretrained(GENERATORS[kind], pali, f"the {kind} generator", attn_implementation=HF_ATTENTION)
    eval_ds = TldrDataset(data.eval_records, data.root, processor.tokenizer, layout_for(processor, "token"))
    preds = read_predictions(predict_generator(generator, eval_ds, processor,
                                               recipe.root / "predictions_generator.jsonl"))
    recipe.metrics |= {f"baseline/generator/{k}": v for k, v in score_tldr(preds).items()}


def _score_model(cfg: RunConfig, pali: Path, processor, data: Data, model_dir: Path, head: str, path: Path):
    """(the loaded model, its scores, its predictions) on the held-out records, the predictions
    written to ``path`` first and scored from the file."""
    model = load_adapter(_reward_model(cfg, pali, head), model_dir / "adapter")
    eval_ds = TldrDataset(data.eval_records, data.root, processor.tokenizer, layout_for(processor, head))
    preds = read_predictions(predict(model, eval_ds, processor, path))
    return model, score_tldr(preds) if head == "token" else score_naive(preds), preds


ABLATION_ARMS = {"projector_decoder": {}, "projector": {"lora_decoder": False}, "decoder": {"lora_projector": False}}
"""Table 2: where TLDR's LoRA goes (the paper's default is both); ``naive`` is the naive RM beside them."""
ABLATION_FIGURES = ("A_T", "A_S", "A_R", "A_R_balanced", "mAP_neg", "mAP_pos")


def ablation(cfg: RunConfig, seeds: tuple[int, ...] = (0, 1, 2), force: bool = False,
             arms: tuple[str, ...] | None = None) -> Path:
    """Table 2 (which parts TLDR's LoRA trains: projector + decoder, projector only, decoder only) and
    the naive RM, each trained with every seed in ``seeds`` (the LoRA's initialisation and the data
    order) on the same data and steps as the run's; per seed, mean and standard deviation (ddof 1).
    The models are stages of the run ``cfg.name`` (its seed-0 TLDR and naive RM are reused); the
    table lands in ``runs/tldr/<name>/ablation/metrics.json``. ``arms``: a subset of
    :data:`ABLATION_ARMS` and ``naive`` (default: all of them)."""
    setup_logging()
    if len(seeds) < 2:
        raise ValueError(f"an ablation needs at least 2 seeds for a spread, got {list(seeds)}")
    known = (*ABLATION_ARMS, "naive")
    if arms is not None and (not arms or any(a not in known for a in arms)):
        raise ValueError(f"arms must be a non-empty subset of {list(known)}, got {list(arms)}")
    if arms is not None and "naive" in arms and not cfg.naive:
        raise ValueError("arm 'naive' asked for, but the config's naive RM is off (naive: false)")
    stages = Recipe("tldr", cfg.name, force)
    out = Recipe("tldr", f"{cfg.name}/ablation")
    pali = Path(cfg.model.backbone) if cfg.model.backbone else ensure_base("paligemma")
    processor = AutoProcessor.from_pretrained(pali)
    data = prepare_data(stages, cfg, pali, processor.tokenizer)
    # TLDR's default and the naive RM first (the comparison of the main table), then the other placements
    runs = [(arm, "token", over) for arm, over in ABLATION_ARMS.items()]
    runs[1:1] = [("naive", "last", {})] if cfg.naive else []
    for arm, head, over in [r for r in runs if arms is None or r[0] in arms]:
        per_seed = []
        for seed in seeds:
            c = replace(cfg, model=ModelConfig(cfg.model.backbone, {**cfg.model.config, **over}),
                        train=replace(cfg.train, seed=seed))
            model_dir = train_reward_model(stages, c, pali, processor, data, "tldr" if head == "token" else "naive", head)
            _, scores, _ = _score_model(c, pali, processor, data, model_dir, head,
                                        out.root / f"predictions_{arm}_seed{seed}.jsonl")
            per_seed.append(scores)
            out.metrics |= {f"{arm}/seed_{seed}/{k}": scores[k] for k in ABLATION_FIGURES if k in scores}
        out.metrics |= seed_summary(arm, per_seed, ABLATION_FIGURES)
    out.metrics["seeds"] = len(seeds)
    return out.finish(cfg.to_dict() | {"ablation_seeds": list(seeds)}, print_ablation)


def print_ablation(m: dict) -> None:
    def f(arm, k):
        mean, std = m.get(f"{arm}/mean/{k}"), m.get(f"{arm}/std/{k}")
        return "-" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}"

    print(f"\nTable 2 (mean ± std over {m['seeds']} seeds; the same data and steps)\n"
          "| model | A_T | A_S | A_R | A_R balanced | mAP(neg) | mAP(pos) |\n|---|---|---|---|---|---|---|")
    names = {"projector_decoder": "TLDR, LoRA on projector + decoder", "projector": "TLDR, projector only",
             "decoder": "TLDR, decoder only", "naive": "naive RM"}
    for arm, name in names.items():
        if f"{arm}/mean/A_R" in m:
            print(f"| {name} | " + " | ".join(f(arm, k) for k in ABLATION_FIGURES) + " |")
    if "naive/mean/A_R_balanced" in m and "projector_decoder/mean/A_R_balanced" in m:
        gap = m["projector_decoder/mean/A_R_balanced"] - m["naive/mean/A_R_balanced"]
        spread = max(m["projector_decoder/std/A_R_balanced"], m["naive/std/A_R_balanced"])
        print(f"balanced A_R, TLDR - naive RM: {100 * gap:+.1f} points; the larger seed std {100 * spread:.1f}")


def _captioner_specs(cfg: RunConfig):
    strong = smoke_spec("llava") if cfg.captioners.smoke else default_spec("llava")
    if cfg.captioners.train_scenes:
        strong = replace(strong, train_scenes=cfg.captioners.train_scenes)
    if cfg.captioners.eval_scenes:
        strong = replace(strong, eval_scenes=cfg.captioners.eval_scenes)
    if cfg.captioners.strong_steps:
        strong = replace(strong, train=replace(strong.train, max_steps=cfg.captioners.strong_steps))
    return {"weak": replace(strong, train=replace(strong.train, max_steps=cfg.captioners.weak_steps)),
            "strong": strong}


def _test_scenes(cfg: RunConfig, n: int):
    """Held-out test scenes of the captioners' own world (no glyphs: they were never taught to read)."""
    return World(replace(_world_config(cfg), glyph_prob=0.0), seed=cfg.data.world_seed).scenes("test", n)


def rate_captioners(recipe: Recipe, cfg: RunConfig, processor, reward_model) -> None:
    """4. Two captioners of different quality (the tiny LLaVA base trained for two lengths) caption the
    test scenes; TLDR's token / sentence / response rates beside each one's true error (Table 3)."""
    from .downstream import captioner_rates

    scenes = _test_scenes(cfg, cfg.captioners.n_scenes)
    for name, spec in _captioner_specs(cfg).items():
        rates = captioner_rates(reward_model, processor, layout_for(processor, "token"), ensure_base(spec), scenes)
        recipe.metrics |= {f"captioner_{name}/{k}": v for k, v in rates.items()}
        recipe.metrics[f"captioner_{name}/train_steps"] = spec.train.max_steps


def likelihood_optimisation(recipe: Recipe, cfg: RunConfig, pali: Path, processor, reward_model,
                            model_dir: Path) -> None:
    """5. The TLDR LoRA merged into the PaliGemma generator at each tau (Section 5.3; tau = 0 is the
    base), its captions rated like the captioners' (Table 6's shape)."""
    from .downstream import rate_captions, restore_generator, tiny_captions

    scenes = _test_scenes(cfg, cfg.likelihood.n_scenes)
    with open(recipe.root / "likelihood_captions.jsonl", "w") as f:
        for tau in cfg.likelihood.taus:
            fresh = load_adapter(_reward_model(cfg, pali), model_dir / "adapter")
            captions = tiny_captions(restore_generator(fresh, tau, original=pali), processor, scenes)
            rates = rate_captions(reward_model, processor, layout_for(processor, "token"), scenes, captions)
            recipe.metrics |= {f"likelihood/tau_{tau:g}/{k}": v for k, v in rates.items()}
            for scene, caption in zip(scenes, captions):
                f.write(json.dumps({"tau": tau, "scene": f"test-{scene.index}", "caption": caption,
                                    "reference": scene.caption}) + "\n")


def _captioner_rows(m: dict) -> dict[str, dict[str, float]]:
    """Every captioner the run rated (the two LLaVA captioners and the generator at each tau), with
    its TLDR rates and true error, for Table 3's correlation."""
    prefixes = sorted({k.rsplit("/", 1)[0] for k in m
                       if k.endswith("/true_error") and k.startswith(("captioner_", "likelihood/"))})
    return {p: {r: m[f"{p}/{r}"] for r in ("token", "sentence", "response", "true_error")} for p in prefixes}


def correct_captions(recipe: Recipe, cfg: RunConfig, pali: Path, processor, reward_model) -> None:
    """6. Table 4: the base's captions of held-out scenes rewritten by the same rewriter under three
    mark sets (none, TLDR's flags, the oracle's); the true caption error before and after each."""
    from transformers import PaliGemmaForConditionalGeneration

    from .correction import REWRITE_TARGETS, rewrite_items, self_correction, train_rewriter
    from .downstream import CAPTION_PROMPT, generator_config, score_texts, tiny_captions

    base = load_pretrained(PaliGemmaForConditionalGeneration, pali, "the PaliGemma base",
                           attn_implementation=HF_ATTENTION)
    world = World(replace(_world_config(cfg), glyph_prob=0.0), seed=cfg.data.world_seed)  # as the captioners'

    def fit(out: Path) -> None:
        scenes = world.scenes("train", cfg.correction.train_scenes)
        items = rewrite_items(scenes, tiny_captions(base, processor, scenes), seed=cfg.correction.train.seed)
        train_rewriter(pali, processor, items, cfg.correction.train, out, seed=cfg.correction.train.seed)

    # what decides the rewriter (not how many held-out captions it rewrites)
    root = recipe.stage("rewriter", cfg.correction.train_scenes, train_key(cfg.correction.train), str(pali),
                        cfg.data.image_size, cfg.data.world_seed, REWRITE_TARGETS, build=fit)
    rewriter = load_pretrained(PaliGemmaForConditionalGeneration, root / "model", "the rewriter",
                               attn_implementation=HF_ATTENTION)
    scenes = _test_scenes(cfg, cfg.correction.n_scenes)
    captions = tiny_captions(base, processor, scenes)
    scores = score_texts(reward_model, processor, layout_for(processor, "token"), [s.image for s in scenes],
                         [CAPTION_PROMPT] * len(scenes), captions)
    result = self_correction(rewriter, processor, generator_config(rewriter), scenes, captions, scores)
    with open(recipe.root / "self_correction.jsonl", "w") as f:
        for i, (scene, caption) in enumerate(zip(scenes, captions)):
            row = {"scene": f"test-{scene.index}", "caption": caption, "truth": scene.caption}
            row |= {mode: result[f"rewrites/{mode}"][i] for mode in ("none", "tldr", "oracle")}
            f.write(json.dumps(row) + "\n")
    recipe.metrics |= {f"correction/{k}": v for k, v in result.items() if not k.startswith("rewrites/")}


def print_table(m: dict) -> None:
    from .perturb import TAXONOMIES

    def f(key):
        v = m.get(key)
        return "  -  " if v is None else f"{100 * v:5.1f}"

    print("\n| model | A_T | A_S | A_R | A_R balanced | mAP(neg) | mAP(pos) |\n|---|---|---|---|---|---|---|")
    print(f"| TLDR | {f('tldr/A_T')} | {f('tldr/A_S')} | {f('tldr/A_R')} | {f('tldr/A_R_balanced')} | "
          f"{f('tldr/mAP_neg')} | {f('tldr/mAP_pos')} |")
    print(f"| naive RM | - | - | {f('naive/A_R')} | {f('naive/A_R_balanced')} | - | - |")
    print(f"| all good (baseline) | {f('baseline/all_good/A_T')} | {f('baseline/all_good/A_S')} | "
          f"{f('baseline/all_good/A_R')} | {f('baseline/all_good/A_R_balanced')} | {f('baseline/all_good/mAP_neg')} | "
          f"{f('baseline/all_good/mAP_pos')} |")
    if "baseline/generator/mAP_neg" in m:
        print(f"| the generator's own P(token) (baseline) | {f('baseline/generator/A_T')} | {f('baseline/generator/A_S')} | "
              f"{f('baseline/generator/A_R')} | {f('baseline/generator/A_R_balanced')} | "
              f"{f('baseline/generator/mAP_neg')} | {f('baseline/generator/mAP_pos')} |")
    print("\n| taxonomy | TLDR A_T | TLDR A_R | TLDR mAP(neg) | naive A_R |\n|---|---|---|---|---|")
    for t in ("original", *TAXONOMIES):
        print(f"| {t} | {f(f'tldr/{t}/A_T')} | {f(f'tldr/{t}/A_R')} | {f(f'tldr/{t}/mAP_neg')} | {f(f'naive/{t}/A_R')} |")
    print("\n| captioner | steps | TLDR token rate % | sentence % | response % | true caption error % |\n|---|---|---|---|---|---|")
    for c in ("weak", "strong"):
        print(f"| {c} | {m.get(f'captioner_{c}/train_steps')} | {f(f'captioner_{c}/token')} | "
              f"{f(f'captioner_{c}/sentence')} | {f(f'captioner_{c}/response')} | {f(f'captioner_{c}/true_error')} |")
    taus = sorted({float(k.split("/")[1][4:]) for k in m if k.startswith("likelihood/tau_")})
    if taus:
        print("\n| generator (PaliGemma base + TLDR LoRA at tau) | TLDR token rate % | sentence % | response % "
              "| true caption error % |\n|---|---|---|---|---|")
        for t in taus:
            k = f"likelihood/tau_{t:g}"
            print(f"| tau = {t:g}{' (base)' if t == 0 else ''} | {f(k + '/token')} | {f(k + '/sentence')} | "
                  f"{f(k + '/response')} | {f(k + '/true_error')} |")
    if "correlation/n_captioners" in m:
        r = {k: m.get(f"correlation/pearson_{k}") for k in ("token", "sentence", "response")}
        print(f"\nTable 3's idea, across the {m['correlation/n_captioners']} captioners above (the two LLaVA ones "
              "and the generator at each tau): Pearson r of TLDR's rate with the true caption error: "
              + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in r.items()))
    if "correction/before/true_error" in m:
        print("\n| PaliGemma base captions, rewritten by the rewriter given | true caption error % | changed % "
              "| fixed % | broken % | marks' recall of wrong tokens % | marks' precision % |\n|---|---|---|---|---|---|---|")
        print(f"| (not rewritten) | {f('correction/before/true_error')} | - | - | - | - | - |")
        for mode, label in (("none", "no marks"), ("tldr", "TLDR's flags"), ("oracle", "oracle marks")):
            k = f"correction/{mode}"
            print(f"| {label} | {f(k + '/true_error')} | {f(k + '/changed')} | {f(k + '/fixed')} | {f(k + '/broken')} "
                  f"| {f(k + '/flag_recall')} | {f(k + '/flag_precision')} |")
