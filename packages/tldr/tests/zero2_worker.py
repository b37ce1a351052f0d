"""Worker of test_zero2: trains TLDR's reward model (a tiny PaliGemma backbone, LoRA + head) with the
shared ``train`` for a few steps, under DeepSpeed ZeRO-2 when asked, and writes rank 0's per-step
losses. The global batch is the same whatever the number of processes."""



from groundlab.shared.bases.vlm import TinyVLMConfig, build_model, build_processor
from groundlab.shared.distributed import seed_everything
from groundlab.shared.testing import finish_worker, worker_args
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.training import TrainConfig, train
from groundlab.tldr.configuration import TldrConfig
from groundlab.tldr.data import TldrDataset, read_jsonl
from groundlab.tldr.modeling import TldrRewardModel, with_lora
from groundlab.tldr.processing import collator_for, layout_for

GLOBAL_BATCH = 8


def tiny_reward_model():
    """A tiny random PaliGemma backbone (seeded) with TLDR's LoRA and head, and its processor."""
    seed_everything(0)
    tok = load_tokenizer()
    cfg = TinyVLMConfig(kind="paligemma", text_kv_heads=1)
    backbone = build_model(cfg, tok)
    model = with_lora(TldrRewardModel(TldrConfig(backbone_config=backbone.config.to_dict(), lora_r=4, lora_alpha=1)))
    return model, build_processor(cfg, tok)


def main():
    args, world = worker_args()
    model, processor = tiny_reward_model()
    tok = processor.tokenizer
    layout = layout_for(processor)
    data = TldrDataset(read_jsonl(args.data / "tldr_train.jsonl", tok), args.data, tok, layout)
    tc = TrainConfig(max_steps=4, batch_size=GLOBAL_BATCH // world, lr=1e-2, save_steps=100, logging_steps=1,
                     progress_bar=False, deepspeed=args.deepspeed)
    trainer = train(model, data, collator_for(processor, layout), tc, args.out / "checkpoints")
    finish_worker(trainer, args.out)


if __name__ == "__main__":
    main()
