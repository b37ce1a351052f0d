"""The shared training entry: ``transformers.Trainer`` with checkpoints and automatic resume.

``train(model, dataset, collator, TrainConfig(...), output_dir)`` trains for ``max_steps`` with a
progress bar, writes a checkpoint every ``save_steps`` and, when ``output_dir`` already holds a
checkpoint, resumes from the newest one that was written completely: each checkpoint gets a marker
listing its files with their SHA-256 once the Trainer has finished writing it, and one whose marker
is absent or does not verify is skipped. The Trainer restores the data order and RNG on resume, so a
run stopped at any point and started again ends where an uninterrupted run ends.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .loading import load_pretrained, load_state
from .runs import check_complete, mark_complete

logger = logging.getLogger("groundlab")


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage (the YAML ``train:`` block of a package config)."""

    max_steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    grad_accum: int = 1
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 50
    seed: int = 0
    bf16: bool | str = False
    """bf16 autocast: True, False or ``"auto"`` (on where the hardware runs bf16 fast: a CUDA GPU with
    bf16, a CPU with avx512_bf16 / AMX; off elsewhere: on an AVX2-only CPU a bf16 matmul is ~100x
    slower than fp32). Fast for transformer LMs, slow for small convnets even where supported."""
    deepspeed: str | None = None
    """``zero2`` / ``zero3`` (the shared configs) or the path of a DeepSpeed JSON config."""
    progress_bar: bool = True
    packed: bool = False
    """The stage's language model runs on padding-free packed rows (the batch's real tokens end to end,
    the sequences kept apart by the ``groundlab`` attention): the same loss and gradients as padded
    batches (tested per package), no FLOP spent on padding. Not in a stage's cache key."""
    compile_layers: bool = False
    """``torch.compile`` (dynamic shapes) each layer of the model's language model
    (``model.get_decoder().layers``, a transformers model) for this stage, undone when it ends, so that
    evaluation and generation after it run as before: the same function with the element-wise work
    fused (the bases' instruction-mix steps 0.81-0.92x after 5-24 s of compilation:
    ``benchmarks/run.py --only compiled_step``). Not in a stage's cache key."""

    def __post_init__(self) -> None:
        from transformers.trainer_utils import SchedulerType

        from .config import non_negative, one_of, positive, within

        positive(self, "max_steps", "batch_size", "lr", "grad_accum", "save_steps", "save_total_limit",
                 "logging_steps")
        non_negative(self, "warmup_steps", "weight_decay", "grad_clip", "seed")
        within(self, "adam_beta2", 0.0, 0.999999)
        one_of(self, "lr_scheduler", [t.value for t in SchedulerType])
        if self.bf16 not in (True, False, "auto"):
            raise ValueError(f"'bf16' must be true, false or 'auto', got {self.bf16!r}")
        if self.deepspeed not in (None, "zero2", "zero3") and not Path(self.deepspeed).is_file():
            raise ValueError(f"'deepspeed' must be zero2, zero3 or the path of a DeepSpeed JSON config; "
                             f"{self.deepspeed!r} is neither")

    def to_dict(self) -> dict:
        return asdict(self)


def fast_bf16() -> bool:
    """Whether bf16 compute is native here (CUDA with bf16, or a CPU with avx512_bf16 / amx_bf16)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_bf16(value: bool | str) -> bool:
    """A ``TrainConfig.bf16`` value as the bool this machine will use."""
    if value == "auto":
        return fast_bf16()
    if not isinstance(value, bool):
        raise ValueError(f"bf16 must be true, false or 'auto', got {value!r}")
    return value


def training_arguments(cfg: TrainConfig, output_dir: str | Path) -> TrainingArguments:
    deepspeed = cfg.deepspeed
    if deepspeed in ("zero2", "zero3"):  # the shared configs by name
        from .distributed import ds_config_path

        deepspeed = str(ds_config_path(int(deepspeed[-1])))
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        adam_beta2=cfg.adam_beta2,
        max_grad_norm=cfg.grad_clip,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=resolve_bf16(cfg.bf16),
        use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress_bar,
    )


class MarkCheckpoints(TrainerCallback):
    """After the Trainer has written ``checkpoint-N`` (model, optimizer, scheduler, RNG, state), record
    it as complete with a marker listing every file with its size and SHA-256 (see
    :func:`groundlab.shared.runs.mark_complete`). Resume only trusts checkpoints whose marker verifies,
    so a run killed while writing one resumes from the previous one."""

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's shard is on disk
        if state.is_world_process_zero:
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", skip=())
        return control


class EpochToDataset(TrainerCallback):
    """Tell a dataset with ``set_epoch(epoch)`` which epoch starts, on every process (resumed runs
    included): a dataset that draws per-sample randomness from (index, epoch) then draws the same
    whichever process or batch holds the sample. :func:`train` adds it for such datasets."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch + 1e-6) if state.epoch else 0)
        return control


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose marker verifies (every file there, none
    truncated or changed); others are reported and skipped."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = []
    for d in output_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    for _, d in sorted(found, reverse=True):
        ok, why = check_complete(d)
        if ok and (d / "trainer_state.json").is_file():
            return d
        logger.warning("skipping incomplete checkpoint %s: %s", d, why or "no trainer_state.json")
    return None


def train(model, train_dataset, data_collator, cfg: TrainConfig, output_dir: str | Path,
          callbacks: list | None = None, compute_loss_func=None) -> Trainer:
    """Train (resuming from the last complete checkpoint in ``output_dir`` if any); returns the Trainer.
    A dataset with ``set_epoch`` learns each epoch's number (:class:`EpochToDataset`). The Trainer
    trains on a GPU where there is one; the model is then put back where it was (unless ZeRO-3
    partitions it), so that what the caller does next (evaluation, saving) finds it there."""
    from .devices import model_device

    home = model_device(model)
    args = training_arguments(cfg, output_dir)
    own = [MarkCheckpoints()] + ([EpochToDataset(train_dataset)] if hasattr(train_dataset, "set_epoch") else [])
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
                      callbacks=[*own, *(callbacks or [])], compute_loss_func=compute_loss_func)
    resume = last_complete_checkpoint(output_dir)
    if resume is not None:
        logger.info("resuming from %s", resume)
        _load_checkpoint_weights(model, resume)
    compiled = compile_decoder_layers(model) if cfg.compile_layers else []
    key_warnings = _DropKeyWarnings() if resume is not None and _is_pretrained(model) else None
    trainer_logger = logging.getLogger("transformers.trainer")
    if key_warnings:
        trainer_logger.addFilter(key_warnings)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        if key_warnings:
            trainer_logger.removeFilter(key_warnings)
        uncompile_layers(compiled)
    # With bf16, accelerate leaves model.forward wrapped in autocast after training; unwrap it so that
    # what follows (evaluation, saving) sees the model as it will be loaded: in fp32.
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    zero3 = getattr(trainer, "is_deepspeed_enabled", False) and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if model_device(model) != home and not zero3:
        model.to(home)
    return trainer


def compile_decoder_layers(model) -> list:
    """``torch.compile`` each layer of a transformers model's language model in place
    (``nn.Module.compile``: the parameters and state-dict keys stay as they are); returns the layers.
    Undo with :func:`uncompile_layers`, as :func:`train` does when its stage ends."""
    for module in model.modules():  # the model itself, or the first language model inside (a wrapper, a PeftModel)
        layers = _language_model_layers(module)
        if layers is not None:
            break
    else:
        raise ValueError(f"compile_layers needs a language model (output embeddings, and a get_decoder() with "
                         f".layers), or a module holding one; {type(model).__name__} has none")
    for layer in layers:
        layer.compile(dynamic=True)
    return list(layers)


def _language_model_layers(module) -> torch.nn.ModuleList | None:
    """The decoder layers of a language model (one with output embeddings: not, say, a segmenter whose
    ``get_decoder()`` is its mask decoder), or None."""
    if not callable(getattr(module, "get_decoder", None)) or not callable(getattr(module, "get_output_embeddings", None)):
        return None
    if module.get_output_embeddings() is None:
        return None
    layers = getattr(module.get_decoder(), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def uncompile_layers(layers) -> None:
    """Undo :func:`compile_decoder_layers`: each layer runs its eager call again."""
    for layer in layers:
        layer._compiled_call_impl = None  # what nn.Module.compile set


def _is_pretrained(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


class _DropKeyWarnings(logging.Filter):
    """The Trainer's non-strict reload reports every renamed key as missing/unexpected although the
    weights were already loaded strictly by ``_load_checkpoint_weights``: drop only those lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not msg.startswith(("There were missing keys in the checkpoint model loaded",
                                   "There were unexpected keys in the checkpoint model loaded"))


def _load_checkpoint_weights(model, checkpoint: Path) -> None:
    """Load a checkpoint's weights strictly before the Trainer resumes from it.

    ``save_pretrained`` writes some models (Llava, PaliGemma, ...) under their original key names,
    and the Trainer's own resume loads the raw file non-strictly, so those weights would silently stay
    as initialised. ``from_pretrained`` applies the key conversion; the result is copied in strictly.
    The Trainer's own load then finds nothing of its own to change, and restores optimizer,
    scheduler, RNG and data position as usual.
    """
    if not _is_pretrained(model):  # a plain module: its state_dict as the Trainer saved it, strictly
        from safetensors.torch import load_file

        weights = checkpoint / "model.safetensors"
        if weights.is_file():
            load_state(model, load_file(weights), f"checkpoint {checkpoint}")
        return
    reloaded = load_pretrained(type(model), checkpoint, config=model.config)
    load_state(model, reloaded.state_dict(), f"checkpoint {checkpoint}")
