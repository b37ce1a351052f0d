"""Worker of test_evaluation_under_two_processes: a tiny TLDR reward model (random, seeded) scores the
held-out records under torchrun; the predictions file must not depend on the number of processes."""

import sys
from pathlib import Path

from groundlab.shared.testing import finish_worker, worker_args, worker_device
from groundlab.tldr.data import TldrDataset, read_jsonl
from groundlab.tldr.evaluation import predict
from groundlab.tldr.processing import layout_for

sys.path.insert(0, str(Path(__file__).parent))
from zero2_worker import tiny_reward_model  # noqa: E402  (the training worker's tiny model)


def main():
    args, _ = worker_args()
    model, processor = tiny_reward_model()
    model.to(worker_device())
    tok = processor.tokenizer
    data = TldrDataset(read_jsonl(args.data / "tldr_val.jsonl", tok)[:13], args.data, tok, layout_for(processor))
    predict(model, data, processor, args.out / "predictions.jsonl", batch_size=4)
    finish_worker(None, args.out)


if __name__ == "__main__":
    main()
