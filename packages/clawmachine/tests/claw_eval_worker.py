"""Worker of test_evaluation_under_two_processes: a tiny ClawMachine (random, seeded) answers held-out
items under torchrun; the predictions file must not depend on the number of processes."""

import sys
from pathlib import Path

from groundlab.clawmachine.data import read_samples
from groundlab.clawmachine.evaluation import predict, rec_items, record_items
from groundlab.shared.testing import finish_worker, worker_args, worker_device
from groundlab.shared.world_io import Refer

sys.path.insert(0, str(Path(__file__).parent))
from claw_zero2_worker import tiny_claw_model, tokens_for  # noqa: E402  (the training worker's tiny model)


def main():
    args, _ = worker_args()
    model, processor = tiny_claw_model()
    model.to(worker_device())
    records = read_samples(args.data / "val_eval.json", args.data)
    items = rec_items(Refer(args.data / "refer", args.data / "images"), "val", args.data)[:6]
    items += record_items(records, {r["image"]: (64, 64) for r in records})[:5]
    tokens = tokens_for(model, args.data, [{"image": it.image} for it in items])
    predict(model, processor, items, tokens, args.out / "predictions.jsonl", batch_size=4, max_new_tokens=8)
    finish_worker(None, args.out)


if __name__ == "__main__":
    main()
