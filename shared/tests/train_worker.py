"""Worker for test_training's kill-and-resume test: trains a tiny Llama (dropout on, shuffled data,
fp32) with the shared ``train`` and writes its final weights; ``--die-at N`` kills the process with
SIGKILL at the end of step N, as a power cut would."""

import argparse
import os
import signal

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from groundlab.shared.distributed import seed_everything
from groundlab.shared.training import TrainConfig, train


class Die(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--die-at", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    seed_everything(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.2)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 64, (12,), generator=g)} for _ in range(40)]

    def collate(batch):
        ids = torch.stack([b["input_ids"] for b in batch])
        return {"input_ids": ids, "labels": ids}

    # 10 batches an epoch: the 24 steps cross two epoch boundaries
    tc = TrainConfig(max_steps=24, batch_size=4, lr=3e-3, warmup_steps=3, save_steps=5, save_total_limit=2,
                     logging_steps=100, progress_bar=False)
    train(model, data, collate, tc, os.path.join(args.out, "checkpoints"),
          callbacks=[Die(args.die_at)] if args.die_at else None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(args.out, "final.safetensors"))


if __name__ == "__main__":
    main()
