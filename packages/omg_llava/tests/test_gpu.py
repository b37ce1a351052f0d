"""On a GPU (marked ``gpu``; skipped without CUDA): the package's stage-2 training and evaluation give
what they give on the CPU, and the release layout (InternLM2-7B + OMG-Seg) trains and answers with
masks in bf16."""

from pathlib import Path

import numpy as np
import pytest
import torch

from groundlab.omg_llava.data import export_world, load_world_export
from groundlab.omg_llava.evaluation import read_predictions
from groundlab.shared.testing import losses_cpu_and_cuda, outputs_cpu_and_cuda
from groundlab.shared.world import World, WorldConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
HERE = Path(__file__).parent


def test_stage2_training_on_the_gpu_gives_the_cpu_losses(tmp_path):
    export_world(World(WorldConfig(), seed=0), tmp_path / "data", 8, 2)
    losses = losses_cpu_and_cuda(HERE / "zero2_worker.py", ["--data", str(tmp_path / "data")], tmp_path)
    assert len(losses["cuda"]) == 4 and losses["cuda"][-1] < losses["cuda"][0]
    torch.testing.assert_close(torch.tensor(losses["cuda"]), torch.tensor(losses["cpu"]), atol=2e-3, rtol=0)


def test_evaluation_on_the_gpu_predicts_what_the_cpu_does(tmp_path):
    export_world(World(WorldConfig(), seed=0), tmp_path / "data", 2, 4)
    samples = load_world_export(tmp_path / "data", "val", ("res", "region", "point"))[:7]
    dirs = outputs_cpu_and_cuda(HERE / "eval_worker.py", ["--data", str(tmp_path / "data")], tmp_path)
    cpu, cuda = (read_predictions(dirs[d] / "predictions.jsonl", samples) for d in ("cpu", "cuda"))
    assert sum(len(r["masks"]) for r in cpu) >= 4
    for a, b in zip(cpu, cuda):
        assert a["answer"] == b["answer"] and len(a["masks"]) == len(b["masks"])
        for ma, mb in zip(a["masks"], b["masks"]):
            assert (ma != mb).mean() < 0.01


def test_the_release_layout_trains_and_answers_with_masks_in_bf16():
    """InternLM2-7B + OMG-Seg (ConvNeXt-L) at 1024 px, random weights, bf16 on the GPU: perception, a
    training forward with two ``[SEG]`` masks and its backward, and greedy generation with masks."""
    from groundlab.omg_llava.configuration import release

    train_and_answer(release("internlm2_7b"), "cuda", torch.bfloat16)


def train_and_answer(cfg, device, dtype):
    """Build ``cfg`` (random weights) on ``device`` in ``dtype``; perceive a random image, train one
    forward + backward with two ``[SEG]`` masks, answer greedily with masks."""
    from groundlab.omg_llava.configuration import N_SPECIAL
    from groundlab.omg_llava.modeling import OMGLlavaForCausalLM
    from groundlab.omg_llava.processing import IMAGE_TOKEN, SPECIAL_TOKENS
    from groundlab.shared.multimodal import expand_token

    first = cfg.text_config.vocab_size - N_SPECIAL  # the added tokens close the vocabulary
    cfg.token_ids = {t: first + i for i, t in enumerate((IMAGE_TOKEN, *SPECIAL_TOKENS))}
    torch.manual_seed(0)
    with torch.device(device):
        model = OMGLlavaForCausalLM(cfg).to(dtype)
    size = cfg.seg_config.image_size
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    p = model.perceive(model.segmenter.preprocess([image]))[0]
    assert p.pixels.device.type == device and p.pixels.shape[0] == cfg.grid ** 2
    ids = cfg.token_ids
    prompt = [1, ids[IMAGE_TOKEN], 100, 200, 300]
    answer = [400, ids["[SEG]"], 500, ids["[SEG]"], 2]
    n_image = p.num_tokens(cfg.use_object_tokens)
    row = expand_token({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}, ids[IMAGE_TOKEN],
                       n_image)
    input_ids = torch.tensor([row["input_ids"]], device=device)
    labels = torch.tensor([row["labels"]], device=device)
    masks = [torch.zeros(2, size, size, device=device)]
    masks[0][0, : size // 3, : size // 2] = 1
    masks[0][1, size // 2 :, size // 2 :] = 1
    out = model(input_ids, torch.ones_like(input_ids), labels, perception=[p], seg_masks=masks)
    assert torch.isfinite(out.loss) and out.seg_loss is not None and out.seg_mismatched == 0
    out.loss.backward()
    grad = model.text2vision[0].weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)
    model.zero_grad(set_to_none=True)
    prompt_ids = torch.tensor([expand_token({"input_ids": prompt}, ids[IMAGE_TOKEN], n_image)["input_ids"]],
                              device=device)
    (gen, logits), = model.generate_with_masks(prompt_ids, torch.ones_like(prompt_ids), [p], max_new_tokens=4,
                                               eos_token_id=2, pad_token_id=0)
    assert len(gen) <= 4 and logits.device.type == device
