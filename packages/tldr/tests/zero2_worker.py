"""Worker of test_zero2: trains TLDR's reward model (a tiny PaliGemma backbone, LoRA + head) with the
shared ``train`` for a few steps, under DeepSpeed ZeRO-2 when asked, and writes rank 0's per-step
losses. The global batch is the same whatever the number of processes."""

import argparse
import json
import os
from pathlib import Path

import torch

from groundlab.shared.bases.vlm import TinyVLMConfig, build_model, build_processor
from groundlab.shared.distributed import seed_everything
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.training import TrainConfig, train
from groundlab.tldr.configuration import TldrConfig
from groundlab.tldr.data import TldrDataset, read_jsonl
from groundlab.tldr.modeling import TldrRewardModel, with_lora
from groundlab.tldr.processing import collator_for, layout_for

GLOBAL_BATCH = 8


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--deepspeed", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    seed_everything(0)
    tok = load_tokenizer()
    cfg = TinyVLMConfig(kind="paligemma", text_kv_heads=1)
    backbone = build_model(cfg, tok)
    model = with_lora(TldrRewardModel(TldrConfig(backbone_config=backbone.config.to_dict(), lora_r=4, lora_alpha=1)))
    processor = build_processor(cfg, tok)
    layout = layout_for(processor)
    data = TldrDataset(read_jsonl(args.data / "tldr_train.jsonl", tok), args.data, tok, layout)
    tc = TrainConfig(max_steps=4, batch_size=GLOBAL_BATCH // world, lr=1e-2, save_steps=100, logging_steps=1,
                     progress_bar=False, deepspeed=args.deepspeed)
    trainer = train(model, data, collator_for(processor, layout), tc, args.out / "checkpoints")
    if int(os.environ.get("RANK", 0)) == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        (args.out / "losses.json").write_text(json.dumps(losses))
    if torch.distributed.is_initialized():  # leave together (see shared/tests/ds_worker.py)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
