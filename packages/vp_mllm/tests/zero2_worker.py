"""Worker of test_zero2: stage 2 of a tiny VP-LLaVA (random, seeded) trained with the shared ``train``
for a few steps, under DeepSpeed ZeRO-2 when asked; rank 0 writes its per-step losses. The global batch
is the same whatever the number of processes."""

from groundlab.shared.bases.vlm import TinyVLMConfig, build_model, build_processor
from groundlab.shared.distributed import seed_everything
from groundlab.shared.testing import finish_worker, worker_args
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.training import TrainConfig, train
from groundlab.vp_mllm.configuration import VPMLLMConfig
from groundlab.vp_mllm.data import MDVPDataset, read_mdvp
from groundlab.vp_mllm.modeling import VPMLLMForConditionalGeneration, set_trainable
from groundlab.vp_mllm.processing import VPCollator, VPProcessor, add_tokens

GLOBAL_BATCH = 8


def tiny_vp_model(views: str = "single", embed_dim: int = 16, **config):
    """A tiny random VP-LLaVA (seeded) on a tiny LLaVA, and its processor; ``config``: more
    :class:`VPMLLMConfig` arguments."""
    seed_everything(0)
    tok = load_tokenizer()
    vlm = TinyVLMConfig(kind="llava", vision_hidden=32, vision_layers=1, vision_ffn=64, text_hidden=32, text_layers=2,
                        text_ffn=64)
    llava = build_model(vlm, tok)
    hf = build_processor(vlm, tok)
    vp_id = add_tokens(tok)
    cfg = VPMLLMConfig(vp_config={"embed_dim": embed_dim}, lmm_config=llava.config.to_dict(), views=views,
                       vp_token_index=vp_id, **config)
    model = VPMLLMForConditionalGeneration(cfg)
    model.lmm.load_state_dict(llava.state_dict())
    return model, VPProcessor(tok, hf.image_processor, cfg)


def main():
    args, world = worker_args()
    model, processor = tiny_vp_model()
    set_trainable(model, "stage2")
    data = MDVPDataset(read_mdvp(args.data / "train_stage2.json", args.data, 10), args.data, processor)
    tc = TrainConfig(max_steps=4, batch_size=GLOBAL_BATCH // world, lr=1e-2, save_steps=100, logging_steps=1,
                     progress_bar=False, deepspeed=args.deepspeed)
    trainer = train(model, data, VPCollator(processor.tokenizer.pad_token_id), tc, args.out / "checkpoints")
    finish_worker(trainer, args.out)


if __name__ == "__main__":
    main()
