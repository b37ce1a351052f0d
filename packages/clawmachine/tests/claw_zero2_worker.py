"""Worker of test_zero2: stage 2 of a tiny ClawMachine (random, seeded) trained with the shared
``train`` for a few steps, under DeepSpeed ZeRO-2 when asked; rank 0 writes its per-step losses. The
global batch is the same whatever the number of processes."""

import torch
from transformers import LlamaConfig

from groundlab.clawmachine.configuration import ClawMachineConfig, VisualTokenizerConfig
from groundlab.clawmachine.data import ClawDataset, read_samples
from groundlab.clawmachine.modeling import ClawMachineForCausalLM, set_trainable
from groundlab.clawmachine.processing import ClawCollator, ClawProcessor, add_tokens
from groundlab.shared.distributed import seed_everything
from groundlab.shared.testing import finish_worker, worker_args
from groundlab.shared.tokenizer import load_tokenizer
from groundlab.shared.training import TrainConfig, train

GLOBAL_BATCH = 8
SAM = dict(img_size=64, patch_size=4, embed_dim=32, depth=1, num_heads=2, window_size=4, global_attn_indexes=(0,),
           out_chans=32)


def tiny_claw_model(codebook_size: int = 64, **config):
    """A tiny random ClawMachine (seeded) over the world tokenizer, and its processor; ``config``:
    :class:`ClawMachineConfig` options (``hybrid``, ``scene_positions``, ...)."""
    seed_everything(0)
    tok = load_tokenizer()
    start, end, offset = add_tokens(tok)
    visual = VisualTokenizerConfig(vision_config=SAM, merger_depth=1, merger_heads=2, mlp_ratio=2.0,
                                   codebook_size=codebook_size, code_dim=8, decoder_depth=1)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=offset + codebook_size, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = ClawMachineConfig(tokenizer_config=visual, text_config=text, image_start_token_id=start,
                            image_end_token_id=end, code_offset=offset, **config)
    model = ClawMachineForCausalLM(cfg)
    return model, ClawProcessor(tok, cfg)


def discrete_twin(model):
    """The plain discrete model with ``model``'s LLM and tokenizer (what it computes without the
    scene's extra inputs), and its processor."""
    twin, processor = tiny_claw_model()
    twin.load_state_dict({k: v for k, v in model.state_dict().items()
                          if k.startswith(("language_model.", "visual_tokenizer."))})
    return twin, processor


def tokens_for(model, root, samples) -> dict:
    """Every image of ``samples`` through the model's (random) tokenizer."""
    import numpy as np

    from groundlab.shared.world_io import load_image

    names = sorted({s["image"] for s in samples if "image" in s})
    pixels = torch.from_numpy(np.stack([np.asarray(load_image(root / n)) for n in names])).permute(0, 3, 1, 2)
    return dict(zip(names, model.tokenize(pixels)))


def main():
    args, world = worker_args()
    model, processor = tiny_claw_model()
    set_trainable(model, "stage2")
    samples = read_samples(args.data / "train_stage2.json", args.data)
    data = ClawDataset(samples, tokens_for(model, args.data, samples), processor)
    tc = TrainConfig(max_steps=4, batch_size=GLOBAL_BATCH // world, lr=1e-2, save_steps=100, logging_steps=1,
                     progress_bar=False, deepspeed=args.deepspeed)
    trainer = train(model, data, ClawCollator(processor.tokenizer.pad_token_id), tc, args.out / "checkpoints")
    finish_worker(trainer, args.out)


if __name__ == "__main__":
    main()
