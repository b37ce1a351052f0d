"""Worker of test_zero2: trains OMG-LLaVA's stage 2 (a tiny random model: LoRA on the LLM, embeddings,
LM head, projector and text2vision; CE + the [SEG] mask loss) with the shared ``train`` for a few
steps, under DeepSpeed ZeRO-2 when asked, and writes rank 0's per-step losses. The global batch is
the same whatever the number of processes."""

import sys
from pathlib import Path

import torch

from groundlab.omg_llava.data import load_world_export
from groundlab.omg_llava.dataset import OMGDataset, PerceptionCache, image_paths
from groundlab.omg_llava.processing import TEMPLATES, OMGCollator
from groundlab.omg_llava.train import Stage2
from groundlab.shared.testing import finish_worker, worker_args
from groundlab.shared.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from test_modeling import tiny  # noqa: E402  (the tests' tiny model)

GLOBAL_BATCH = 8


def main():
    args, world = worker_args()
    model, tok = tiny()
    samples = load_world_export(args.data, "train", ("res", "gcg", "caption"))[:24]
    data = OMGDataset(samples, tok, TEMPLATES["vicuna"], model, PerceptionCache(model, image_paths(samples)))
    torch.manual_seed(1)  # the LoRA's initialisation
    stage = Stage2(model, r=4, alpha=8, dropout=0.0)
    tc = TrainConfig(max_steps=4, batch_size=GLOBAL_BATCH // world, lr=2e-3, save_steps=100, logging_steps=1,
                     progress_bar=False, deepspeed=args.deepspeed)
    trainer = train(stage, data, OMGCollator(tok.pad_token_id), tc, args.out / "checkpoints")
    finish_worker(trainer, args.out)


if __name__ == "__main__":
    main()
