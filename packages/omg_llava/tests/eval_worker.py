"""Worker of test_evaluation_under_two_processes: a tiny OMG-LLaVA (random, seeded) answers held-out
RES / region / point samples with masks under torchrun; the predictions must not depend on the number
of processes."""

import sys
from pathlib import Path

import torch

from groundlab.omg_llava.data import load_world_export
from groundlab.omg_llava.dataset import OMGDataset, PerceptionCache, image_paths
from groundlab.omg_llava.evaluation import predict
from groundlab.omg_llava.processing import TEMPLATES
from groundlab.shared.testing import finish_worker, worker_args, worker_device

sys.path.insert(0, str(Path(__file__).parent))
from test_modeling import tiny  # noqa: E402  (the tests' tiny model)


def main():
    args, _ = worker_args()
    model, tok = tiny()
    model.to(worker_device())
    seg_id = model.config.token_ids["[SEG]"]
    # answer [SEG] early so that samples have masks to compare, but not at every step
    model.llm.lm_head.register_forward_hook(lambda m, i, o: o.index_add(
        -1, torch.tensor([seg_id], device=o.device), o.std(-1, keepdim=True) * 2.5))
    samples = load_world_export(args.data, "val", ("res", "region", "point"))[:7]
    ds = OMGDataset(samples, tok, TEMPLATES["vicuna"], model, PerceptionCache(model, image_paths(samples)))
    predict(model, ds, tok, args.out / "predictions.jsonl", batch_size=2, max_new_tokens=6)
    finish_worker(None, args.out)


if __name__ == "__main__":
    main()
