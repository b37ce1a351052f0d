"""Tiny pretrained bases: the parts the papers start from, trained on the synthetic world.

Every paper here starts from pretrained parts and freezes some of them; a frozen part with random
weights would make the CPU default meaningless. ``make bases`` (``python -m groundlab.shared.bases
build``) trains three small ones, each in a few minutes on 2 CPU cores:

- ``llava``: a tiny LLaVA (``LlavaForConditionalGeneration`` + ``LlavaProcessor``),
- ``paligemma``: a tiny PaliGemma (``PaliGemmaForConditionalGeneration`` + ``PaliGemmaProcessor``),
- ``sam``: a tiny SAM (segment-anything modules) in the official checkpoint layout.

Each lands in ``runs/bases/<name>-<hash>/`` where the hash covers its config, the world and the
training settings: ``model/`` (what packages load), ``checkpoints/`` (Trainer checkpoints, for resume),
``metrics.json`` (held-out quality next to the untrained model's) and a ``COMPLETE`` marker. A VLM
base's first stage (its vision tower, densely) checkpoints in ``runs/bases/vision/<name>-<hash>/``,
keyed by what precedes the instruction mix only (:meth:`BaseSpec.vision_key`), so bases that differ in
the mix or its length share it. A second build is a no-op; an entry written half-way is detected and
rebuilt (training resumes from its last complete checkpoint), never loaded. Packages call :func:`ensure_base` and then load with the same code
that loads the real checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..attention import cpu_kernel, require_packing_support
from ..distributed import seed_everything, setup_logging
from ..recipe import train_key
from ..runs import content_hash, invalidate, mark_complete, reuse_or_reset, runs_root, write_metrics
from ..tokenizer import fixture_dir, load_tokenizer
from ..training import TrainConfig, train
from ..world import World, WorldConfig

logger = logging.getLogger("groundlab")

BASE_NAMES = ("llava", "paligemma", "sam")
_LATE_OPTIONS = {"multimask_clicks": False, "touching_weight": 1.0, "mask_loss": "bce_dice"}
"""Model options added after bases were cached, and the default that means "as before" (not keyed)."""
VERSION = 3  # bump when a change to this code changes what a base learns or reports
CHECKPOINT_DIRS = ("checkpoints", "vision_checkpoints")


def _train_key(cfg: TrainConfig | None) -> dict | None:
    return None if cfg is None else train_key(cfg)


@dataclass
class BaseSpec:
    """Everything that decides a base's weights (the cache key hashes all of it)."""

    name: str
    model: dict
    train: TrainConfig
    """The main stage: the instruction mix of a VLM base, SAM's own training."""
    world: WorldConfig = field(default_factory=WorldConfig)
    world_seed: int = 0
    train_scenes: int = 20000
    eval_scenes: int = 100
    vision: TrainConfig | None = None
    """VLM bases: the dense pre-training of the vision tower before the mix (see ``bases.vlm``)."""
    vision_scenes: int = 8000
    mix: dict = field(default_factory=dict)
    """VLM bases: ``vlm.MixConfig`` arguments (its defaults when empty)."""
    probe_scenes: tuple[int, int] = (400, 100)
    """LLaVA: training / held-out scenes of the linear probe (``bases.probe``; IVM's numbers)."""
    mix_cpu_attention: str = "sdpa"
    """VLM bases: the CPU attention kernel of the instruction-mix stage (``attention.cpu_kernel``).
    Not in the key, as the kernel never was: every cached base was built on "eager"."""

    def _keyed_model(self) -> dict:
        # the attention kernel is no part of what a base is (every implementation computes the same
        # function, tested): the key reads the value every cached base was keyed with, whatever runs
        model = {**self.model, "attn_implementation": "eager"} if "attn_implementation" in self.model else self.model
        # options added after bases were cached: at their defaults they build what was built before
        return {k: v for k, v in model.items() if k not in _LATE_OPTIONS or v != _LATE_OPTIONS[k]}

    def _tokenizer_hash(self) -> str:
        tokenizer = (fixture_dir() / "tokenizer.json").read_bytes() if self.name in ("llava", "paligemma") else b""
        return hashlib.sha256(tokenizer).hexdigest()

    def key(self) -> str:
        return content_hash(VERSION, self.name, self._keyed_model(), _train_key(self.train), _train_key(self.vision),
                            self.vision_scenes, self.mix, self.world.key(), self.world_seed, self.train_scenes,
                            self.eval_scenes, list(self.probe_scenes), self._tokenizer_hash())

    def vision_key(self) -> str:
        """What decides a VLM base's vision stage: everything the build does before it (the model and
        its initialisation, the seed, the held-out evaluation that precedes it) and the stage's own
        settings, but not the instruction mix or its length. Bases that differ only there (another
        mix, a shorter run) share the stage (:func:`vision_dir`)."""
        if self.vision is None:
            raise ValueError(f"the {self.name!r} base has no vision stage")
        return content_hash(VERSION, self.name, "vision", self._keyed_model(), self.train.seed,
                            _train_key(self.vision), self.vision_scenes, self.world.key(), self.world_seed,
                            self.eval_scenes, self._tokenizer_hash())


def default_spec(name: str) -> BaseSpec:
    """The specs ``make bases`` builds (times in the README)."""
    from .sam import TinySamConfig
    from .vlm import TinyVLMConfig

    vision = TrainConfig(max_steps=2000, batch_size=64, lr=2e-3, warmup_steps=100, bf16="auto", save_steps=500,
                         logging_steps=250)
    if name == "llava":
        # referring expressions -> boxes for every object of a scene, two distinct ones each, in its first
        # conversation; an object sharing its kind with another is asked for by an attribute expression 3
        # times in 4 (rec_contrast: REC's misses were mostly the same kind in another colour). REC 0.711
        # -> 0.771 -> 0.841 with rec_contrast, then rec_per_object (one build each, docs/bases.md); the
        # code without rec_shortest builds 0.692, missing on "the <kind>". rec_shortest=0.5 lifts it to
        # 0.871 / 0.861 (two seeds). It once dropped OMG-LLaVA's RES on the base (0.574 -> 0.389): that
        # segmenter could not tell kinds apart; with one that can, RES on this base is 0.632 against 0.617
        # without it (one run each, within rerun spread; docs/bases.md, "The shortest expression").
        # Packed: these conversations are 32% padding in a padded batch; packed rows make a step 0.87x
        # (``benchmarks/run.py --only vlm_step``), the same function (not part of the key); so are the
        # compiled layers (``--only compiled_step``)
        return BaseSpec("llava", TinyVLMConfig(kind="llava").to_dict(),
                        TrainConfig(max_steps=3000, batch_size=32, lr=1e-3, warmup_steps=100, bf16="auto",
                                    save_steps=500, logging_steps=100, packed=True, compile_layers=True),
                        vision=vision,
                        mix={"rec": 3, "separate_box_tasks": False, "rec_contrast": 0.75, "rec_per_object": 2,
                             "rec_shortest": 0.5})
    if name == "paligemma":
        # 4 KV heads, not Gemma-2B's one (multi-query): at this width one shared key/value head left the
        # model slow to learn to find objects (docs/bases.md)
        # The eager attention (bf16 under autocast) in the mix: with fp32 SDPA `detect` fell 0.917-0.939 ->
        # 0.691 (two builds a side, docs/bases.md), the loss curve the same. In fp32 (an AVX2-only CPU)
        # the same mix built 0.691 too, missing where two objects share a kind; detect_contrast=0.5
        # (half the detect samples of such scenes ask for one of them by colour and kind) built 0.890
        # there (one build; not yet built with bf16)
        return BaseSpec("paligemma", TinyVLMConfig(kind="paligemma", text_kv_heads=4).to_dict(),
                        TrainConfig(max_steps=3000, batch_size=64, lr=1e-3, warmup_steps=100, bf16="auto",
                                    save_steps=500, logging_steps=100, compile_layers=True), vision=vision,
                        mix={"detect": 2, "detect_contrast": 0.5}, mix_cpu_attention="eager")
    if name == "sam":
        # fp32: bf16 autocast slows the small convolutional decoder down on this CPU. Patch 4: a 16x16
        # embedding, so the decoder's 4x upscaled masks are at full resolution; 128-d prompts / embedding
        # (64 before): point / box mIoU 0.92 -> 0.93 / 0.95, IVM's oracle-attribute check 0.90 -> 0.93
        # (docs/bases.md); at this width lr 3e-3 left the decoder untrained (0.51 from clicks and boxes).
        # 6000 steps, not 3000: the loss still fell at 3000; point / box 0.938 / 0.951 -> 0.951 / 0.958,
        # objects that touch another 0.815 / 0.849 -> 0.844 / 0.865 (one rebuild each, docs/bases.md).
        # SAM's own mask loss (mask_loss="focal_dice") built point / box 0.956 / 0.964 in one build
        # (BCE + Dice: 0.947-0.953 from one click); not the default: IVM, which freezes this encoder, does
        # worse on it (DWSL 56.5 +- 2.1 heatmap mIoU against 58.5 +- 0.2 over three seeds; docs/bases.md)
        return BaseSpec("sam", TinySamConfig(patch_size=4, prompt_dim=128, decoder_mlp=512).to_dict(),
                        TrainConfig(max_steps=6000, batch_size=8, lr=1e-3, warmup_steps=50, bf16=False,
                                    save_steps=500, logging_steps=100), eval_scenes=200)
    raise ValueError(f"unknown base {name!r}; known: {BASE_NAMES}")


def smoke_spec(name: str, steps: int = 12, save_steps: int = 4, train_scenes: int = 64, eval_scenes: int = 8,
               **train) -> BaseSpec:
    """:func:`default_spec` cut to a few steps of every stage and a few scenes (tests, smoke runs): the
    same models and code paths, built in seconds."""
    spec = default_spec(name)
    main = replace(spec.train, max_steps=steps, save_steps=save_steps, logging_steps=2, progress_bar=False,
                   warmup_steps=min(2, steps), compile_layers=False, **train)
    vision = None if spec.vision is None else replace(spec.vision, max_steps=4, save_steps=2, logging_steps=2,
                                                      warmup_steps=1, progress_bar=False)
    return replace(spec, train=main, train_scenes=train_scenes, eval_scenes=eval_scenes, vision=vision,
                   vision_scenes=32, probe_scenes=(12, 6))


def base_dir(spec: BaseSpec, root: Path | None = None) -> Path:
    return (root or runs_root() / "bases") / f"{spec.name}-{spec.key()}"


def vision_dir(spec: BaseSpec, root: Path | None = None) -> Path:
    """The checkpoints of a VLM base's vision stage, shared by the bases whose :meth:`BaseSpec.vision_key`
    is the same: a base of another mix (or TLDR's weak captioner, the default LLaVA base cut short)
    resumes the finished stage instead of training it again."""
    return (root or runs_root() / "bases") / "vision" / f"{spec.name}-{spec.vision_key()}"


def model_path(spec: BaseSpec, root: Path | None = None) -> Path:
    """What packages load: a ``from_pretrained`` directory (VLMs) or the SAM checkpoint file."""
    d = base_dir(spec, root) / "model"
    return d / "sam_vit_tiny.pth" if spec.name == "sam" else d


def ensure_base(name_or_spec: str | BaseSpec, root: Path | None = None, force: bool = False,
                callbacks: list | None = None) -> Path:
    """Build the base unless a complete cache entry exists; returns :func:`model_path`."""
    spec = default_spec(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    out = base_dir(spec, root)
    if not reuse_or_reset(out, force, keep=CHECKPOINT_DIRS):
        vision = None if spec.vision is None else vision_dir(spec, root)
        if force and vision is not None:
            invalidate(vision)
        build(spec, out, callbacks=callbacks, vision_checkpoints=vision)
    return model_path(spec, root)


def build(spec: BaseSpec, out: Path, callbacks: list | None = None, vision_checkpoints: Path | None = None) -> dict:
    """Train one base into ``out`` (each stage resuming from its checkpoints), evaluate it next to the
    untrained model and the trivial baselines, save it and mark it complete. Returns its metrics.
    ``vision_checkpoints``: where a VLM base's vision stage checkpoints (:func:`vision_dir` from
    :func:`ensure_base`); ``out / "vision_checkpoints"`` when None."""
    out.mkdir(parents=True, exist_ok=True)
    world = World(spec.world, seed=spec.world_seed)
    seed_everything(spec.train.seed)
    t0 = time.time()
    if spec.name == "sam":
        metrics = _build_sam(spec, world, out, callbacks)
    else:
        metrics = _build_vlm(spec, world, out, callbacks, vision_checkpoints or out / "vision_checkpoints")
    metrics["time/total_s"] = time.time() - t0
    write_metrics(out / "metrics.json", metrics,
                  config={"spec": asdict(spec) | {"world": asdict(spec.world)}, "key": spec.key()})
    mark_complete(out, skip=CHECKPOINT_DIRS)
    return metrics


def _build_vlm(spec: BaseSpec, world: World, out: Path, callbacks, vision_checkpoints: Path) -> dict:
    from . import vlm

    cfg = vlm.TinyVLMConfig(**spec.model)
    mix = vlm.MixConfig(**spec.mix)
    tok = load_tokenizer()
    processor = vlm.build_processor(cfg, tok)
    model = vlm.build_model(cfg, tok)
    metrics = vlm.trivial_baselines(world, n_scenes=spec.eval_scenes)
    t0 = time.time()
    metrics |= {f"baseline/untrained/{k}": v for k, v in
                vlm.evaluate(model, processor, cfg, world, "val", spec.eval_scenes).items()}
    metrics["time/eval_untrained_s"] = time.time() - t0
    if spec.vision is not None:  # 1. the vision tower, densely
        pretrainer = vlm.VisionPretrainer(vlm.vision_tower(model), vlm.dense_classes(world),
                                          drop_first=cfg.kind == "llava")
        collate = vlm.DenseCollator(processor)
        held_out = vlm.DenseVisionDataset(world, "val", spec.eval_scenes, cfg)
        metrics |= {f"baseline/untrained/{k}": v for k, v in pretrainer.evaluate(held_out, collate).items()}
        t0 = time.time()
        _adopt_vision_checkpoints(out / "vision_checkpoints", vision_checkpoints)
        train(pretrainer, vlm.DenseVisionDataset(world, "train", spec.vision_scenes, cfg), collate, spec.vision,
              vision_checkpoints, callbacks=callbacks)
        metrics["time/vision_s"] = time.time() - t0
        metrics |= pretrainer.evaluate(held_out, collate)
        vlm.vision_tower(model).requires_grad_(False)
    t0 = time.time()  # 2. projector + language model on the instruction mix
    data = vlm.WorldVLMDataset(world, "train", spec.train_scenes, processor, cfg, mix, seed=spec.train.seed)
    metrics["data/samples"] = len(data)
    if spec.train.packed:
        require_packing_support(model)
    collate = vlm.VLMCollator(processor, packed=spec.train.packed, labeled_logits_only=True)
    with cpu_kernel(spec.mix_cpu_attention):
        train(model, data, collate, spec.train, out / "checkpoints", callbacks=callbacks)
    metrics["time/train_s"] = time.time() - t0
    t0 = time.time()
    metrics.update(vlm.evaluate(model, processor, cfg, world, "val", spec.eval_scenes))
    if cfg.kind == "llava":
        from .probe import probe

        metrics |= probe(model, processor, world, n_train=spec.probe_scenes[0], n_val=spec.probe_scenes[1])
    metrics["time/eval_s"] = time.time() - t0
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    return metrics


def _adopt_vision_checkpoints(own: Path, shared: Path) -> None:
    """A build stopped before the vision stage was shared left its checkpoints in the base's own
    directory: move them where the stage now resumes (when the shared place has none)."""
    if own == shared or not own.is_dir() or not any(own.iterdir()):
        return
    if shared.exists() and any(shared.iterdir()):
        return
    shared.parent.mkdir(parents=True, exist_ok=True)
    if shared.exists():
        shared.rmdir()
    shutil.move(str(own), str(shared))
    logger.info("moved the vision stage's checkpoints %s -> %s", own, shared)


def _build_sam(spec: BaseSpec, world: World, out: Path, callbacks) -> dict:
    from . import sam as sam_mod

    cfg = sam_mod.TinySamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.model.items()})
    sam = sam_mod.build_tiny_sam(cfg)
    metrics = {}
    before = sam_mod.evaluate(sam, world, "val", spec.eval_scenes)
    metrics |= {f"baseline/untrained/sam/{k}": v for k, v in before.items() if k in ("point/mIoU", "box/mIoU")}
    data = sam_mod.WorldSamDataset(world, "train", spec.train_scenes, seed=spec.train.seed)
    t0 = time.time()
    wrapper = sam_mod.SamForTraining.for_config(sam, cfg, world)
    train(wrapper, data, sam_mod.collate_sam, spec.train, out / "checkpoints", callbacks=callbacks)
    metrics["time/train_s"] = time.time() - t0
    if wrapper.semantic_head is not None:
        metrics["sam/semantic_head/pixel_accuracy"] = sam_mod.semantic_accuracy(wrapper, world, "val", spec.eval_scenes)
    metrics |= _sam_figures(sam_mod.evaluate(sam, world, "val", spec.eval_scenes, cfg.multimask_clicks))
    sam_mod.save_sam_checkpoint(sam, out / "model" / "sam_vit_tiny.pth")
    (out / "model" / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return metrics


def _sam_figures(after: dict) -> dict:
    """``sam.evaluate``'s figures under the names ``metrics.json`` gives them."""
    kept = ("point", "box", "point_isolated", "box_isolated", "point_touching", "box_touching")
    out = {f"sam/{k}/mIoU": after[f"{k}/mIoU"] for k in kept if f"{k}/mIoU" in after}
    out |= {f"sam/{k}": after[k] for k in ("n_objects", "n_touching")}
    out["baseline/oracle_size_disk_at_click/sam/point/mIoU"] = after["disk/mIoU"]
    out["baseline/filled_box/sam/box/mIoU"] = after["filled_box/mIoU"]
    if "point_best_of_3/mIoU" in after:  # the design's upper bound: an oracle picks among the three
        out["oracle/best_of_3_outputs/sam/point/mIoU"] = after["point_best_of_3/mIoU"]
    return out


def evaluate_base(spec: BaseSpec, n_scenes: int, path: str | Path | None = None, root: Path | None = None) -> dict:
    """A built base evaluated again on the first ``n_scenes`` held-out scenes, beside the trivial
    baselines of the same items: what a build reports rests on ``spec.eval_scenes`` (100 scenes, 201
    REC items: a standard error of about 0.03 at 0.8), too few to tell two builds or two recipes apart.
    ``path``: another build of the same kind (a copied ``model`` directory or SAM checkpoint) instead of
    the cached one of ``spec``. The figures are written to ``eval-val-<n>.json`` beside the model
    directory; returns them."""
    path = Path(path) if path is not None else model_path(spec, root)
    if not path.exists():
        raise FileNotFoundError(f"no {spec.name} base at {path}: build it first (make bases)")
    world = World(spec.world, seed=spec.world_seed)
    metrics: dict = {"n_scenes": n_scenes, "path": str(path)}
    if spec.name == "sam":
        from . import sam as sam_mod

        cfg = sam_mod.TinySamConfig.from_json(path.parent / "config.json")
        sam = sam_mod.build_tiny_sam(cfg, checkpoint=path)
        metrics |= _sam_figures(sam_mod.evaluate(sam, world, "val", n_scenes, cfg.multimask_clicks))
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from . import vlm

        cfg = vlm.TinyVLMConfig(**spec.model)
        model = AutoModelForImageTextToText.from_pretrained(path)
        metrics |= vlm.trivial_baselines(world, n_scenes=n_scenes)
        metrics |= vlm.evaluate(model, AutoProcessor.from_pretrained(path), cfg, world, "val", n_scenes)
    write_metrics(path.parent / f"eval-val-{n_scenes}.json", metrics)
    return metrics


def load_tiny_sam(path: str | Path | None = None):
    """The tiny SAM base (built if needed), loaded from its official-layout checkpoint."""
    from .sam import TinySamConfig, build_tiny_sam

    path = Path(path) if path is not None else ensure_base("sam")
    return build_tiny_sam(TinySamConfig.from_json(path.parent / "config.json"), checkpoint=path)


# ----------------------------------------------------------------------------------------------
# command line

FIGURES = {
    "llava": ["vision/object_patch_accuracy", "vision/box_acc50", "caption/token_acc", "caption/exact_match", "qa/accuracy",
              "rec/acc50", "rec/objects_2/acc50", "rec/objects_3/acc50", "rec/several/kind_only/acc50",
              "rec/several/more_than_kind/acc50", "rec/attribute/acc50", "rec/relation/acc50",
              "region/colour_kind", "region_list/colour_kind",
              "grounded/caption_exact", "grounded/box_acc50", "probe/hidden/all", "probe/words/all",
              "probe/hidden/attribute", "probe/words/attribute"],
    "paligemma": ["vision/object_patch_accuracy", "vision/box_acc50", "caption/token_acc", "caption/exact_match", "qa/accuracy",
                  "detect/acc50", "rec/acc50", "region/colour_kind"],
    "sam": ["sam/point/mIoU", "sam/box/mIoU", "sam/point_isolated/mIoU", "sam/box_isolated/mIoU",
            "sam/point_touching/mIoU", "sam/box_touching/mIoU", "sam/semantic_head/pixel_accuracy"],
}
TARGETS = {  # the floors the bases must clear on held-out scenes
    "llava": {"caption/exact_match": 0.70, "qa/accuracy": 0.90, "rec/acc50": 0.80, "region/colour_kind": 0.80},
    "paligemma": {"caption/exact_match": 0.60, "qa/accuracy": 0.85, "detect/acc50": 0.80},
    "sam": {"sam/point/mIoU": 0.95, "sam/box/mIoU": 0.95},
}


def report(name: str, metrics: dict) -> list[str]:
    """The lines ``make bases`` prints for one base: each figure beside the untrained model, the
    trivial baselines of the same items and its target."""
    lines = []
    for key in FIGURES[name]:
        if key not in metrics:
            continue
        extra = [f"untrained {metrics[f'baseline/untrained/{key}']:.3f}"] if f"baseline/untrained/{key}" in metrics else []
        if f"{key}_stderr" in metrics:
            extra.insert(0, f"standard error {metrics[f'{key}_stderr']:.3f}")
        extra += [f"{k.split('/')[1].replace('_', ' ')} {v:.3f}" for k, v in metrics.items()
                  if k.startswith("baseline/") and k.split("/")[1] != "untrained" and k.split("/", 2)[2] == key]
        if key in TARGETS.get(name, {}):
            target = TARGETS[name][key]
            extra.append(f"target >= {target:.2f}: {'met' if metrics[key] >= target else 'NOT MET'}")
        lines.append(f"  {key:32s} {metrics[key]:.3f}   ({'; '.join(extra)})" if extra else
                     f"  {key:32s} {metrics[key]:.3f}")
    times = [f"{k[5:-2]} {v:.0f} s" for k, v in metrics.items() if k.startswith("time/") and k.endswith("_s")]
    if times:
        lines.append("  time: " + ", ".join(times))
    return lines


def _build_in_child(name: str, force: bool) -> int:
    """``build --only name`` in a fresh interpreter (it prints the base's figures); its exit status."""
    cmd = [sys.executable, "-m", "groundlab.shared.bases", "build", "--only", name, *(["--force"] if force else [])]
    return subprocess.run(cmd).returncode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m groundlab.shared.bases")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train (or reuse) the tiny pretrained bases")
    b.add_argument("--only", choices=BASE_NAMES, action="append")
    b.add_argument("--force", action="store_true", help="retrain even when a complete entry exists")
    e = sub.add_parser("evaluate", help="evaluate built bases again on more held-out scenes")
    e.add_argument("--only", choices=BASE_NAMES, action="append")
    e.add_argument("--scenes", type=int, default=500, help="held-out scenes (the build evaluates 100; 200 for SAM)")
    e.add_argument("--path", help="another build's model directory (or SAM checkpoint) of the one --only base")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.cmd == "evaluate":
        names = args.only or list(BASE_NAMES)
        if args.path and len(names) != 1:
            parser.error("--path needs exactly one --only base")
        for name in names:
            metrics = evaluate_base(default_spec(name), args.scenes, path=args.path)
            print(f"\n== base {name} on {args.scenes} held-out scenes: {metrics['path']}")
            print("\n".join(report(name, metrics)))
        return
    names = args.only or list(BASE_NAMES)
    if len(names) > 1:
        # each base in a process of its own: in one process that had trained the two VLM bases, SAM
        # trained 1.27x slower than alone (0.151 against 0.119 s a step; the heap those stages left
        # behind, 31 M page faults over the build)
        for name in names:
            code = _build_in_child(name, args.force)
            if code:
                raise SystemExit(f"building the {name} base failed (exit {code})")
    summary: dict[str, float] = {}
    for name in names:
        spec = default_spec(name)
        if len(names) == 1:
            ensure_base(spec, force=args.force)
            print(f"\n== base {name}: {base_dir(spec)}")
            print("\n".join(report(name, json.loads((base_dir(spec) / "metrics.json").read_text()))))
        metrics = json.loads((base_dir(spec) / "metrics.json").read_text())
        summary |= {f"{name}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        summary[f"{name}/path"] = str(model_path(spec))
    path = write_metrics(runs_root() / "bases" / "metrics.json", summary)
    print(path)
