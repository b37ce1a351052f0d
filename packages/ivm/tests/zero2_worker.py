"""Worker of test_zero2: trains IVM's generator (tiny LLaVA + SAM bases built at random, LoRA, condition
MLP, mask generator) with the shared ``train`` for a few steps, under DeepSpeed ZeRO-2 when asked,
and writes rank 0's per-step losses. The global batch is the same whatever the number of processes."""



from groundlab.ivm.configuration import IVMConfig
from groundlab.ivm.data import IVMDataset, read_split
from groundlab.ivm.modeling import IVMModel
from groundlab.ivm.processing import IVMCollator
from groundlab.ivm.train import GeneratorForTraining, load_llava_into
from groundlab.shared.bases.vlm import TinyVLMConfig, build_model, build_processor
from groundlab.shared.distributed import seed_everything
from groundlab.shared.testing import finish_worker, worker_args
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.training import TrainConfig, train

GLOBAL_BATCH = 8
TINY_SAM = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                global_attn_indexes=(1,), out_chans=32)


def main():
    args, world = worker_args()
    seed_everything(0)
    tok, vcfg = load_tokenizer(), TinyVLMConfig(kind="llava")
    llava = build_model(vcfg, tok)
    model = IVMModel(IVMConfig(vision_config=TINY_SAM, lmm_config=llava.config.to_dict(), condition_hidden=64, decoder_mlp=64,
                               decoder_heads=2, discriminator_hidden=32))
    load_llava_into(model, llava)
    processor = build_processor(vcfg, tok)
    # no augmentation: a random crop would be drawn by whichever process holds the item
    data = IVMDataset(read_split(args.data / "HumanLabelData"), tok, vcfg.n_image_tokens, 64, augment=False)
    tc = TrainConfig(max_steps=4, batch_size=GLOBAL_BATCH // world, lr=1e-3, save_steps=100, logging_steps=1,
                     progress_bar=False, deepspeed=args.deepspeed)
    trainer = train(GeneratorForTraining(model, "uniform"), data, IVMCollator(processor), tc, args.out / "checkpoints")
    finish_worker(trainer, args.out)


if __name__ == "__main__":
    main()
