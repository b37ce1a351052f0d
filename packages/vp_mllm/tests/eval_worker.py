"""Worker of test_evaluation_under_two_processes: a tiny VP-LLaVA (random, seeded) answers held-out
records under torchrun; the predictions file must not depend on the number of processes."""

import json
import sys
from pathlib import Path

from groundlab.shared.testing import finish_worker, worker_args, worker_device
from groundlab.vp_mllm.evaluation import predict

sys.path.insert(0, str(Path(__file__).parent))
from zero2_worker import tiny_vp_model  # noqa: E402  (the training worker's tiny model)


def main():
    args, _ = worker_args()
    model, processor = tiny_vp_model()
    model.to(worker_device())
    records = json.loads((args.data / "val_eval.json").read_text())[:11]
    predict(model, processor, records, args.data, args.out / "predictions.jsonl", batch_size=4, max_new_tokens=6)
    finish_worker(None, args.out)


if __name__ == "__main__":
    main()
