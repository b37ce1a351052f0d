"""The ClawMachine run: data -> visual tokenizer pre-training -> image tokens -> start model ->
stage 1 -> stage 2 -> evaluation.

Stages (each reused on a second run with the same config, recomputed with ``force``):

1. data: the synthetic world in the release's sample format (stage-1 grounded captions, stage-2
   conversations) and held-out REFER / referring / yes-no files, or real files;
2. tokenizer: LaVIT's tokenizer on the SAM base's frozen encoder (16 x 16 cells of the 64-px
   images), pre-trained to reconstruct its features; codebook use and reconstruction are printed
   beside an untrained tokenizer's;
3. tokens: every image tokenized once (the tokenizer is frozen and deterministic from here on);
4. start: the LLM of the LLaVA base, its vocabulary extended by ``[IMG]``, ``[/IMG]`` and the codes,
   with the tokenizer (the "untrained" row);
5. stage 1 (grounded captions) and stage 2 (grounding, referring and yes / no conversations), the
   whole LLM trained in both;
6. evaluation: predictions JSONL per model, then scores from the file: REC acc@0.5 on each held-out
   object's first expression beside the whole image, a random object, the largest object, and two
   upper bounds of the decoder (the box of the region's kept cells, and the decoder on the region's
   true codes); referring METEOR / CIDEr beside the most frequent training answer; yes / no accuracy
   beside the majority answer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

from groundlab.shared.bases import ensure_base
from groundlab.shared.bases.sam import PIXEL_MEAN, PIXEL_STD, TinySamConfig, load_sam_checkpoint
from groundlab.shared.config import RunConfigFile, model_overrides, one_of, positive, within
from groundlab.shared.distributed import seed_everything, setup_logging
from groundlab.shared.loading import load_pretrained, load_state
from groundlab.shared.recipe import Recipe, train_key
from groundlab.shared.training import TrainConfig, train
from groundlab.shared.vision import SamEncoderConfig
from groundlab.shared.world import World, WorldConfig
from groundlab.shared.world_io import Refer, load_image

from .configuration import RELEASE_CONFIGS, ClawMachineConfig, VisualTokenizerConfig
from .data import ClawDataset, export_world, load_tokens, read_samples
from .evaluation import Item, predict, read_predictions, rec_hits, rec_items, record_items, score
from .modeling import ClawMachineForCausalLM, set_trainable
from .processing import (
    ClawCollator,
    ClawProcessor,
    add_tokens,
    cells_box,
    decode_region,
    fetch_region,
    from_square,
    to_square,
)
from .visual_tokenizer import DynamicVisualTokenizer, TokenizerPretrainer

logger = logging.getLogger("groundlab")
TOKENIZER_DIR = "text_tokenizer"
"""Where a saved model keeps its text tokenizer: a folder of its own inside ``model/``, away from the
model's ``config.json``, which ``AutoTokenizer`` would otherwise read and warn about."""


EXPORT_OFF = {("same_kind_repeat", 1), ("rec_contrast", 0.0), ("rec_shortest", 0.0), ("copy_turns", False)}
WORLD_IMAGES = ("train_scenes", "eval_scenes", "image_size", "min_objects", "max_objects", "world_seed")
"""The data options that decide the exported images (the others change only the conversations)."""


@dataclass
class DataConfig:
    train_scenes: int = 1500
    eval_scenes: int = 100
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    world_seed: int = 0
    rec_contrast: float = 0.0
    """The probability that a grounding turn asks for an object whose kind another object of its scene
    shares by one of its attribute expressions (``the red circle`` where two circles are), not by
    any of its expressions (:func:`groundlab.shared.world.draw_expression`; the LLaVA base: 0.75)."""
    rec_shortest: float = 0.0
    """The probability that a grounding turn asks for its object's shortest expression, the one the
    held-out REC asks (the LLaVA base: 0.5). 0 and 0: uniform draws, as the exports made before."""
    copy_turns: bool = False
    """Stage 2's conversations also ask for each object's region to be written back (``Repeat
    <ref_patch>.`` -> the region): the copy a grounding answer makes, taught without the search."""
    same_kind_repeat: int = 1
    """Stage 2 also holds N - 1 more conversations a training scene with objects of a shared kind,
    each only their grounding turns by attribute expressions (``the red circle`` where two circles
    are): the items where the kind alone does not find the object. 1: off."""
    stage1_json: str | None = None
    """Real data instead of the world: sample files, their image root, and a REFER dataset."""
    stage2_json: str | None = None
    eval_json: str | None = None
    image_root: str | None = None
    refer_root: str | None = None
    refer_dataset: str = "refcoco"
    refer_split_by: str = "unc"
    refer_split: str = "val"

    def __post_init__(self) -> None:
        positive(self, "train_scenes", "eval_scenes", "image_size", "min_objects", "max_objects", "same_kind_repeat")
        within(self, "rec_contrast", 0, 1)
        within(self, "rec_shortest", 0, 1)


def _tokenizer_train() -> TrainConfig:
    return TrainConfig(max_steps=400, batch_size=32, lr=1e-3, warmup_steps=12, lr_scheduler="cosine",
                       weight_decay=0.0, grad_clip=1.0, bf16="auto", save_steps=200, logging_steps=100)


@dataclass
class TokenizerConfig:
    """The visual tokenizer over the SAM base's encoder (:class:`VisualTokenizerConfig` sizes) and its
    pre-training."""

    sam: str | None = None
    """An official-layout SAM checkpoint for the frozen encoder; None = the tiny SAM base."""
    pretrained: str | None = None
    """A pre-trained tokenizer instead of pre-training one: the ``.pth`` of ``groundlab-clawmachine
    convert`` (LaVIT's, ``visual_tokenizer.*``), its sizes those of ``release``'s config."""
    release: str = "clawmachine_7b"
    """The :data:`RELEASE_CONFIGS` entry whose tokenizer sizes ``pretrained`` has."""
    merger_depth: int = 2
    merger_heads: int = 4
    mlp_ratio: float = 2.0
    codebook_size: int = 256
    code_dim: int = 8
    keep_ratio: float = 0.3
    decoder_depth: int = 2
    colour_channels: int = 0
    """Each patch's mean colour appended to its SAM feature, repeated to this many channels
    (:class:`VisualTokenizerConfig`); 0 = the SAM features alone, as the release's ViT alone."""
    train: TrainConfig = field(default_factory=_tokenizer_train)

    def __post_init__(self) -> None:
        positive(self, "merger_depth", "merger_heads", "mlp_ratio", "codebook_size", "code_dim", "decoder_depth")
        if self.pretrained and self.colour_channels:
            raise ValueError("tokenizer.colour_channels needs a tokenizer pre-trained here: the release's "
                             f"({self.pretrained}) reads the ViT's features alone")
        within(self, "keep_ratio", 0.01, 1.0)
        one_of(self, "release", tuple(RELEASE_CONFIGS))


@dataclass
class ModelConfig:
    llava: str | None = None
    """A LLaVA ``from_pretrained`` directory whose language model starts the LLM; None = the LLaVA base."""
    llm: str | None = None
    """A causal-LM ``from_pretrained`` directory (with its tokenizer) instead: the release's Llama-2-7B
    (LaVIT's, whose vocabulary already holds ``[IMG]``, ``[/IMG]`` and the codes)."""
    code_embeddings: str = "codebook"
    """How the LLM's new rows for the codes start (input and output embeddings): ``codebook`` (each
    code's codebook vector through a fixed random projection, at the scale of the text rows: codes
    the tokenizer puts close start close) or ``mean`` (all at the text rows' mean, transformers'
    default). The release's LLM (LaVIT's) learned its code rows in LaVIT's pre-training."""
    config: dict = field(default_factory=dict)
    """:class:`ClawMachineConfig` arguments over its defaults (``hybrid``); the rest comes from the
    checkpoints and the tokenizer."""

    def __post_init__(self) -> None:
        one_of(self, "code_embeddings", ("codebook", "mean"))
        self.config = model_overrides(ClawMachineConfig, self.config,
                                      filled=("tokenizer_config", "text_config", "image_start_token_id",
                                              "image_end_token_id", "code_offset"))


@dataclass
class EvalConfig:
    batch_size: int = 32
    max_new_tokens: int = 48
    constrained: bool = True
    """Inside a region only the codes of the sample's own image (off: the LLM's free choice)."""

    def __post_init__(self) -> None:
        positive(self, "batch_size", "max_new_tokens")


def _stage(steps: int, lr: float) -> TrainConfig:
    # the paper: AdamW, warm-up 3 % then cosine, weight decay 0, bf16
    return TrainConfig(max_steps=steps, batch_size=32, lr=lr, warmup_steps=max(1, int(0.03 * steps)),
                       lr_scheduler="cosine", bf16="auto", save_steps=200, logging_steps=50)


@dataclass
class RunConfig(RunConfigFile):
    name: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: TrainConfig = field(default_factory=lambda: _stage(300, 1e-3))
    stage2: TrainConfig = field(default_factory=lambda: _stage(900, 1e-3))
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
# the recipe


def run(cfg: RunConfig, force: bool = False) -> Path:
    """The whole run (see the module docstring); returns the path of its ``metrics.json``."""
    setup_logging()
    seed_everything(cfg.stage1.seed)
    recipe = Recipe("clawmachine", cfg.name, force)
    data = prepare_data(recipe, cfg)
    tokenizer_dir = pretrain_tokenizer(recipe, cfg, data)
    tokens_path = tokenize_images(recipe, cfg, data, tokenizer_dir)
    start = build_start(recipe, cfg, tokenizer_dir)
    stage1 = train_stage(recipe, cfg, data, tokens_path, start, "stage1")
    final = train_stage(recipe, cfg, data, tokens_path, stage1, "stage2")
    tokens = load_tokens(tokens_path)
    items = eval_items(data, tokens)
    grid = VisualTokenizerConfig(**json.loads((tokenizer_dir / "tokenizer_config.json").read_text())).grid
    recipe.metrics |= baselines(data, items, tokens, grid)
    for tag, model_dir in (("untrained", start), ("clawmachine", final)):
        evaluate_model(recipe, cfg, model_dir, items, tokens, tag)
    return recipe.finish(cfg.to_dict(), print_table)


@dataclass
class Data:
    root: Path
    stage1: Path
    stage2: Path
    eval: Path
    refer_root: Path
    refer_dataset: str = "refcoco"
    refer_split_by: str = "unc"
    refer_split: str = "val"
    images_key: object = None
    """What decides the run's images (the tokenizer and the tokens depend on them alone, not on the
    conversations): the world's settings, or the real files' paths."""

    def refer(self) -> Refer:
        return Refer(self.refer_root, self.root / "images", self.refer_dataset, self.refer_split_by)

    def images(self) -> list[str]:
        """Every image the run's files name (relative to the root), sorted."""
        names = set()
        for path in (self.stage1, self.stage2, self.eval):
            names |= {r["image"] for r in json.loads(path.read_text()) if "image" in r}
        names |= {it.image for it in rec_items(self.refer(), self.refer_split, self.root)}
        return sorted(names)


def stage_ref(recipe: Recipe, path: Path) -> str:
    """How a stage's key names the directory it builds on: a stage directory of this run by its name
    (``tokens-<hash>``: the hash stands for what made it, so a stage linked in from another run is
    reused), any other path (real data, a converted tokenizer) as it is."""
    return path.name if path.parent == recipe.root else str(path)


def prepare_data(recipe: Recipe, cfg: RunConfig) -> Data:
    """1. The world in the release's format (train / held-out), or real files."""
    d = cfg.data
    if d.stage1_json is not None:
        if not (d.stage2_json and d.eval_json and d.image_root and d.refer_root):
            raise ValueError("data.stage1_json needs data.stage2_json, data.eval_json, data.image_root and "
                             "data.refer_root too")
        files = (d.image_root, d.stage1_json, d.stage2_json, d.eval_json, d.refer_root)
        return Data(*map(Path, files), d.refer_dataset, d.refer_split_by, d.refer_split,
                    images_key=[str(Path(f).resolve()) for f in files])

    def export(out: Path) -> None:
        world = World(WorldConfig(image_size=d.image_size, min_objects=d.min_objects, max_objects=d.max_objects),
                      seed=d.world_seed)
        counts = (export_world(world, "train", d.train_scenes, out, same_kind_repeat=d.same_kind_repeat,
                               rec_contrast=d.rec_contrast, rec_shortest=d.rec_shortest, copy_turns=d.copy_turns)
                  | export_world(world, "val", d.eval_scenes, out))
        (out / "counts.json").write_text(json.dumps(counts, indent=2))

    # options at their off values leave the key of the exports made before them
    key = {k: v for k, v in asdict(d).items() if (k, v) not in EXPORT_OFF}
    root = recipe.stage("data", key, build=export)
    recipe.metrics |= {f"data/{k}": v for k, v in json.loads((root / "counts.json").read_text()).items()}
    return Data(root, root / "train_stage1.json", root / "train_stage2.json", root / "val_eval.json", root / "refer",
                images_key={k: getattr(d, k) for k in WORLD_IMAGES})


def _sam(cfg: RunConfig) -> tuple[Path, TinySamConfig]:
    path = Path(cfg.tokenizer.sam) if cfg.tokenizer.sam else ensure_base("sam")
    return path, TinySamConfig.from_json(path.parent / "config.json")


def tokenizer_config(cfg: RunConfig) -> VisualTokenizerConfig:
    """The tokenizer over the SAM checkpoint's image encoder (SAM's pixel normalisation)."""
    _, sam = _sam(cfg)
    t = cfg.tokenizer
    vision = SamEncoderConfig(img_size=sam.image_size, patch_size=sam.patch_size, embed_dim=sam.encoder_dim,
                              depth=sam.encoder_depth, num_heads=sam.encoder_heads, window_size=sam.window_size,
                              global_attn_indexes=sam.global_attn_indexes, out_chans=sam.prompt_dim)
    return VisualTokenizerConfig(vision_config=vision, merger_depth=t.merger_depth, merger_heads=t.merger_heads,
                                 mlp_ratio=t.mlp_ratio, codebook_size=t.codebook_size, code_dim=t.code_dim,
                                 keep_ratio=t.keep_ratio, decoder_depth=t.decoder_depth,
                                 colour_channels=t.colour_channels, pixel_mean=tuple(m / 255 for m in PIXEL_MEAN), pixel_std=tuple(s / 255 for s in PIXEL_STD))


def _pixels(root: Path, names: list[str]) -> torch.Tensor:
    arrays = [np.asarray(load_image(root / n).convert("RGB")) for n in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class _Features(torch.utils.data.Dataset):
    def __init__(self, feats: torch.Tensor):
        self.feats = feats

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.feats[i]}


def _stack(samples: list[dict]) -> dict:
    return {"features": torch.stack([s["features"] for s in samples])}


def _features(tokenizer: DynamicVisualTokenizer, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([tokenizer.features(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


@torch.no_grad()
def tokenizer_figures(pretrainer: TokenizerPretrainer, feats: torch.Tensor) -> dict[str, float]:
    """Held-out reconstruction (cosine), keep rate, tokens per image and codebook use."""
    pretrainer.eval()
    tok = pretrainer.tokenizer
    merged, keep, _ = tok.merge(feats, sample=False)
    _, zq, ids = tok.quantise(merged)
    recon = pretrainer.decoder(zq, keep)
    cos = torch.nn.functional.cosine_similarity(recon, tok.standardise(feats), dim=-1).mean()
    used = ids[keep.bool()]
    counts = torch.bincount(used, minlength=tok.config.codebook_size).float()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    return {"reconstruction_cosine": float(cos), "keep_rate": float(keep.mean()),
            "tokens_per_image": float(keep.sum(-1).mean()), "codes_used": int((counts > 0).sum()),
            "codebook_perplexity": float(perplexity)}


def pretrain_tokenizer(recipe: Recipe, cfg: RunConfig, data: Data) -> Path:
    """2. The visual tokenizer pre-trained on the training images' frozen features (saved as
    ``tokenizer.pt`` + ``tokenizer_config.json``), with its figures and an untrained one's."""
    if cfg.tokenizer.pretrained:
        return load_pretrained_tokenizer(recipe, cfg)
    sam_path, _ = _sam(cfg)
    tc = cfg.tokenizer.train

    def build(out: Path) -> None:
        seed_everything(tc.seed)
        config = tokenizer_config(cfg)
        tokenizer = DynamicVisualTokenizer(config)
        load_sam_checkpoint(tokenizer.encoder, sam_path, prefix="image_encoder.")
        pretrainer = TokenizerPretrainer(tokenizer)
        train_names = sorted({r["image"] for r in json.loads(data.stage1.read_text()) if "image" in r})
        held_out = sorted({r["image"] for r in json.loads(data.eval.read_text()) if "image" in r})
        train_feats = _features(tokenizer, _pixels(data.root, train_names))
        val_feats = _features(tokenizer, _pixels(data.root, held_out))
        tokenizer.set_feature_statistics(train_feats)
        pretrainer.init_codebook(train_feats[:64])
        figures = {f"untrained/{k}": v for k, v in tokenizer_figures(pretrainer, val_feats).items()}
        pretrainer.train()
        train(pretrainer, _Features(train_feats), _stack, tc, out / "checkpoints")
        figures |= {f"trained/{k}": v for k, v in tokenizer_figures(pretrainer, val_feats).items()}
        torch.save(tokenizer.state_dict(), out / "tokenizer.pt")
        (out / "tokenizer_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (out / "figures.json").write_text(json.dumps(figures, indent=2))

    out = recipe.stage("tokenizer", asdict(cfg.tokenizer), train_key(tc), str(sam_path), data.images_key, build=build)
    recipe.metrics |= {f"tokenizer/{k}": v for k, v in json.loads((out / "figures.json").read_text()).items()}
    return out


def load_pretrained_tokenizer(recipe: Recipe, cfg: RunConfig) -> Path:
    """2'. A converted pre-trained tokenizer (LaVIT's) in place of pre-training, strictly loaded."""
    source = Path(cfg.tokenizer.pretrained)

    def build(out: Path) -> None:
        config = RELEASE_CONFIGS[cfg.tokenizer.release]().tokenizer_config
        tokenizer = DynamicVisualTokenizer(config)
        state = torch.load(source, weights_only=True) if source.is_file() else None
        if state is None:
            raise FileNotFoundError(f"tokenizer.pretrained: no such file {source}")
        prefix = "visual_tokenizer."
        load_state(tokenizer, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, str(source))
        torch.save(tokenizer.state_dict(), out / "tokenizer.pt")
        (out / "tokenizer_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (out / "figures.json").write_text("{}")

    return recipe.stage("tokenizer", str(source), cfg.tokenizer.release, build=build)


def load_visual_tokenizer(directory: Path) -> DynamicVisualTokenizer:
    config = VisualTokenizerConfig(**json.loads((directory / "tokenizer_config.json").read_text()))
    tokenizer = DynamicVisualTokenizer(config)
    load_state(tokenizer, torch.load(directory / "tokenizer.pt", weights_only=True), f"{directory}/tokenizer.pt")
    return tokenizer.eval()


def tokenize_images(recipe: Recipe, cfg: RunConfig, data: Data, tokenizer_dir: Path) -> Path:
    """3. Every image of the run through the frozen tokenizer, once (``tokens.pt``)."""
    hybrid = bool(cfg.model.config.get("hybrid", False))

    def build(out: Path) -> None:
        tokenizer = load_visual_tokenizer(tokenizer_dir)
        names = data.images()
        tokens = {}
        for i in range(0, len(names), 256):
            chunk = names[i:i + 256]
            for name, t in zip(chunk, tokenizer.tokenize(_pixels(data.root, chunk), sample=False)):
                item = (t.codes.to(torch.int32), t.remained_map.to(torch.int32))
                tokens[name] = item + ((t.features.half(),) if hybrid else ())
        torch.save(tokens, out / "tokens.pt")

    out = recipe.stage("tokens", stage_ref(recipe, tokenizer_dir), data.images_key, hybrid, build=build)
    return out / "tokens.pt"


def build_start(recipe: Recipe, cfg: RunConfig, tokenizer_dir: Path) -> Path:
    """4. The model training starts from: the LLaVA base's LLM over the joint vocabulary + the tokenizer."""
    llava = Path(cfg.model.llm or cfg.model.llava or ensure_base("llava"))

    def build(out: Path) -> None:
        seed_everything(cfg.stage1.seed)
        if cfg.model.llm:
            text_tokenizer = AutoTokenizer.from_pretrained(llava)
            lm = load_pretrained(LlamaForCausalLM, llava, "the LLM")
        else:
            text_tokenizer = AutoProcessor.from_pretrained(llava).tokenizer
            base = load_pretrained(LlavaForConditionalGeneration, llava, "the LLaVA base")
            lm = LlamaForCausalLM(base.config.text_config)
            state = {f"model.{k}": v for k, v in base.model.language_model.state_dict().items()}
            load_state(lm, state | {"lm_head.weight": base.lm_head.weight}, "the LLaVA base's language model")
        start_id, end_id, offset = add_tokens(text_tokenizer)
        visual = load_visual_tokenizer(tokenizer_dir)
        if lm.config.vocab_size < offset + visual.config.codebook_size:
            lm.resize_token_embeddings(offset + visual.config.codebook_size, mean_resizing=True)
            if cfg.model.code_embeddings == "codebook":
                init_code_embeddings(lm, visual, offset)
        config = ClawMachineConfig(tokenizer_config=visual.config, text_config=lm.config.to_dict(),
                                   image_start_token_id=start_id, image_end_token_id=end_id, code_offset=offset,
                                   **cfg.model.config)
        model = ClawMachineForCausalLM(config)
        load_state(model.language_model, lm.state_dict(), "the extended language model")
        load_state(model.visual_tokenizer, visual.state_dict(), "the visual tokenizer")
        model.save_pretrained(out / "model")
        text_tokenizer.save_pretrained(out / "model" / TOKENIZER_DIR)

    return recipe.stage("start", asdict(cfg.model), str(llava), stage_ref(recipe, tokenizer_dir), cfg.stage1.seed,
                        build=build)


@torch.no_grad()
def init_code_embeddings(lm, visual: DynamicVisualTokenizer, offset: int) -> None:
    """The code rows of ``lm``'s input and output embeddings from the codebook (see
    ``ModelConfig.code_embeddings``)."""
    book = visual.quantize.codebook().float()
    n = len(book)
    for emb in {id(e): e for e in (lm.get_input_embeddings(), lm.get_output_embeddings())}.values():
        w = emb.weight
        proj = torch.randn(book.shape[1], w.shape[1], generator=torch.Generator().manual_seed(0))
        rows = book @ proj
        w[offset:offset + n] = rows / rows.std() * w[:offset].std()


def load_model(model_dir: Path) -> tuple[ClawMachineForCausalLM, ClawProcessor]:
    """A saved model and its processor (the tokenizer's ids checked against the model's)."""
    model = load_pretrained(ClawMachineForCausalLM, model_dir / "model", "a ClawMachine model")
    tokenizer_dir = model_dir / "model" / TOKENIZER_DIR
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no text tokenizer at {tokenizer_dir}")
    return model, ClawProcessor(AutoTokenizer.from_pretrained(tokenizer_dir), model.config)


def train_stage(recipe: Recipe, cfg: RunConfig, data: Data, tokens_path: Path, start: Path, stage: str) -> Path:
    """5. One training stage from the model in ``start``; returns its directory."""
    tc: TrainConfig = getattr(cfg, stage)
    source = data.stage1 if stage == "stage1" else data.stage2

    def fit(out: Path) -> None:
        seed_everything(tc.seed)
        model, processor = load_model(start)
        opened = set_trainable(model, stage)
        logger.info("%s: %d trainable tensors, %d parameters", stage, len(opened),
                    sum(p.numel() for p in model.parameters() if p.requires_grad))
        samples = read_samples(source, data.root)
        dataset = ClawDataset(samples, load_tokens(tokens_path), processor, str(source))
        train(model, dataset, ClawCollator(processor.tokenizer.pad_token_id, packed=tc.packed), tc, out / "checkpoints")
        model.save_pretrained(out / "model")
        processor.tokenizer.save_pretrained(out / "model" / TOKENIZER_DIR)

    return recipe.stage(stage, stage_ref(recipe, start), stage_ref(recipe, tokens_path.parent),
                        stage_ref(recipe, source.parent), source.name, train_key(tc), build=fit)


# ----------------------------------------------------------------------------------------------
# evaluation


def eval_items(data: Data, tokens) -> list[Item]:
    """REC items (each held-out object's first expression), then the referring and yes / no items."""
    records = read_samples(data.eval, data.root)
    sizes = {r["image"]: Image.open(data.root / r["image"]).size for r in records}
    return rec_items(data.refer(), data.refer_split, data.root) + record_items(records, sizes)


def evaluate_model(recipe: Recipe, cfg: RunConfig, model_dir: Path, items: list[Item], tokens, tag: str) -> dict:
    """6. Predictions JSONL of a saved model, then its scores from the file."""
    model, processor = load_model(model_dir)
    path = predict(model, processor, items, tokens, recipe.root / f"predictions_{tag}.jsonl",
                   batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                   constrained=cfg.eval.constrained)
    scores = score(read_predictions(path))
    recipe.metrics |= {f"{tag}/{k}": v for k, v in scores.items()}
    return scores


def baselines(data: Data, items: list[Item], tokens, grid: int) -> dict[str, float]:
    """REC: the whole image, a random object (its expectation), the largest object, and the decoder's
    bounds; referring: the most frequent training answer; yes / no: the majority answer."""
    out: dict[str, float] = {}
    rec = [it for it in items if it.task == "rec"]
    if rec:
        targets = [it.target for it in rec]
        objects = [it.objects for it in rec]
        out["baseline/whole_image/rec/acc50"] = float(np.mean(rec_hits([[0, 0, it.width, it.height] for it in rec], targets)))
        out["baseline/largest_object/rec/acc50"] = float(np.mean(rec_hits([max(o, key=lambda b: b[1])[0] for o in objects],
                                                                          targets)))
        out["baseline/random_object/rec/acc50"] = float(np.mean([np.mean(rec_hits([b for b, _ in o], [t] * len(o)))
                                                                 for o, t in zip(objects, targets)]))
        cells_boxes, decoded = [], []
        for it in rec:
            image = tokens[it.image]
            region = [to_square(it.target, it.width, it.height)]
            positions = fetch_region(region, image.remained_map, grid)
            cells = [int(image.remained_map[p]) for p in positions]
            cells_boxes.append(list(from_square(cells_box(cells, grid), it.width, it.height)))
            found = decode_region(image.codes[positions].tolist(), image, grid)
            decoded.append(None if found is None else list(from_square(cells_box(found, grid), it.width, it.height)))
        out["bound/kept_cells/rec/acc50"] = float(np.mean(rec_hits(cells_boxes, targets)))
        out["bound/true_codes/rec/acc50"] = float(np.mean(rec_hits(decoded, targets)))
        out["tokens/eval_tokens_per_image"] = float(np.mean([len(tokens[it.image].codes) for it in rec]))
    train_samples = json.loads(data.stage2.read_text())
    answers = {"reg": [], "yesno": []}
    for rec_ in train_samples:
        conv = rec_["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            task = "reg" if "<ref_patch>" in q["value"] else "yesno" if a["value"] in ("yes", "no") else None
            if task:
                answers[task].append(a["value"])
    for task in ("reg", "yesno"):
        mine = [it for it in items if it.task == task]
        if mine and answers[task]:
            common = max(sorted(set(answers[task])), key=answers[task].count)
            rows = [{"id": it.id, "task": task, "question": it.question, "prediction": common,
                     "references": it.references} for it in mine]
            out |= {f"baseline/majority/{k}": v for k, v in score(rows).items() if not k.endswith("/n")}
    return out


def score_predictions(cfg: RunConfig, path: Path) -> dict[str, float]:
    """``eval --predictions FILE``: a predictions file of :func:`groundlab.clawmachine.evaluation.predict`."""
    return score(read_predictions(path))


def print_table(m: dict) -> None:
    def f(key, pct=True):
        v = m.get(key)
        return "  -  " if v is None else (f"{100 * v:5.1f}" if pct else f"{v:.3f}")

    print("\n| tokenizer (held-out) | reconstruction cos | tokens / image | codes used | codebook perplexity |")
    print("|---|---|---|---|---|")
    for tag in ("trained", "untrained"):
        k = f"tokenizer/{tag}/"
        print(f"| {tag} | {f(k + 'reconstruction_cosine', False)} | {f(k + 'tokens_per_image', False)} | "
              f"{m.get(k + 'codes_used', '-')} | {f(k + 'codebook_perplexity', False)} |")
    print("\n| model | REC acc@0.5 | referring METEOR | CIDEr | yes/no acc. |")
    print("|---|---|---|---|---|")
    rows = [("ClawMachine (stage 1 + 2)", "clawmachine"), ("untrained (start of stage 1)", "untrained"),
            ("whole image", "baseline/whole_image"), ("random object", "baseline/random_object"),
            ("largest object", "baseline/largest_object"), ("most frequent answer", "baseline/majority"),
            ("bound: box of the kept cells", "bound/kept_cells"), ("bound: decoder on the true codes", "bound/true_codes")]
    for name, tag in rows:
        print(f"| {name} | {f(tag + '/rec/acc50')} | {f(tag + '/reg/METEOR', False)} | {f(tag + '/reg/CIDEr', False)} | "
              f"{f(tag + '/yesno/accuracy')} |")
