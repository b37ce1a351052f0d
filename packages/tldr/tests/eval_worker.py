"""Worker of test_evaluation_under_two_processes: a tiny TLDR reward model (random, seeded) scores the
held-out records under torchrun; the predictions file must not depend on the number of processes."""

from groundlab.shared.bases.vlm import TinyVLMConfig, build_model, build_processor
from groundlab.shared.distributed import seed_everything
from groundlab.shared.testing import finish_worker, worker_args
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.tldr.configuration import TldrConfig
from groundlab.tldr.data import TldrDataset, read_jsonl
from groundlab.tldr.evaluation import predict
from groundlab.tldr.modeling import TldrRewardModel, with_lora
from groundlab.tldr.processing import layout_for


def main():
    args, _ = worker_args()
    seed_everything(0)
    tok = load_tokenizer()
    cfg = TinyVLMConfig(kind="paligemma", text_kv_heads=1)
    backbone = build_model(cfg, tok)
    model = with_lora(TldrRewardModel(TldrConfig(backbone_config=backbone.config.to_dict(), lora_r=4, lora_alpha=1)))
    processor = build_processor(cfg, tok)
    data = TldrDataset(read_jsonl(args.data / "tldr_val.jsonl", tok)[:13], args.data, tok, layout_for(processor))
    predict(model, data, processor, args.out / "predictions.jsonl", batch_size=4)
    finish_worker(None, args.out)


if __name__ == "__main__":
    main()
