"""groundlab benchmarks: speed ratios measured side by side in one run, written as JSON + a table.

    make bench            # all benchmarks
    python benchmarks/run.py --only attention

attention: a batch of variable-length sequences (lengths drawn like a conversation dataset's, with a
long tail), attended causally (a) padded to the longest with a mask and (b) packed padding-free
through ``groundlab.shared.attention`` (``cu_seqlens``), forward + backward, SDPA on the CPU. Reports
the time of each, their ratio, and the share of the padded FLOPs that packing skips.

sam_decoding: one training step (forward + backward + AdamW) of the SAM base's recipe on a batch of 8
world images with every object prompted, its decoder run (a) once per image and prompt kind through
SAM's own ``MaskDecoder`` (which repeats one image embedding per prompt) and (b) once for the whole
batch (``bases.sam.predict_masks_batched``); the same losses either way.

vlm_step: one training step (forward + backward + AdamW, bf16 autocast where the CPU runs bf16
natively) of each VLM base's instruction mix at its batch size, the same batches through (a)
transformers' eager attention, (b) its SDPA, (c) the shared attention registered as ``groundlab`` on
the padded batch and (d) ``groundlab`` on the batch packed into one padding-free row, and (c) and (d)
again with logits computed where a label follows only (``VLMCollator(labeled_logits_only=True)``, as the
bases train); the arms take
turns on every batch, so a drift of the machine's speed hits them alike. Reports each arm's median
step and its ratio to (a), and the share of padding in the padded batches.

compiled_step: the same training step of each VLM base's mix as the bases train it (``groundlab``
attention, logits where a label follows, packed for LLaVA), on two copies of the same model, (a) eager
and (b) with its language model's layers compiled (``training.compile_decoder_layers``, what
``TrainConfig.compile_layers`` does); the arms take turns on every batch. Reports the compiled arm's
first step (compilation), each arm's median step after it and their ratio.

packed_memory: the LLaVA base's instruction mix trained (forward + backward + AdamW, bf16 autocast
where native) on the same packed batches in fresh processes, (a) with rows of their exact length and
each attention group padded to its exact longest, as before, and (b) as now: rows filled to a
multiple of 256 (``pack_batch(pad_to_multiple_of=)``) and groups to a multiple of 32
(``attention.PACKED_LENGTH_MULTIPLE``); the arms alternate over two rounds. Reports each arm's resident
memory after the warm-up and at the end, its peak, and its median step: exact sizes fragment the CPU
heap, so its memory grows with every step.

world: rendering scenes of the default world (what every base and package draws its data from, on
the fly for the SAM base) with each object's box and area (a) computed once, as ``ShapeObject`` does
and (b) recomputed from the mask at every access, as it did before; the same scenes either way,
the arms taking turns.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from groundlab.shared.attention import attention


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_attention(batch: int = 16, heads: int = 8, dim: int = 64, max_len: int = 512, repeats: int = 5) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = (torch.empty(batch).exponential_(1 / 96.0, generator=g) + 16).clamp(max=max_len).long()
    lengths[0] = max_len  # one long sample sets the padded length, as in a real batch
    n, t = int(lengths.sum()), int(lengths.max())
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    qp, kp, vp = (torch.randn(n, heads, dim, generator=g, requires_grad=True) for _ in range(3))
    qd, kd, vd = (torch.randn(batch, heads, t, dim, generator=g, requires_grad=True) for _ in range(3))
    key_ok = (torch.arange(t)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)

    def padded():
        attention(qd, kd, vd, causal=True, attn_mask=key_ok, implementation="sdpa").sum().backward()

    def packed():
        attention(qp, kp, vp, causal=True, cu_seqlens=cu, implementation="sdpa").sum().backward()

    t_pad, t_pack = _time(padded, repeats), _time(packed, repeats)
    flops_pad = batch * t * t
    flops_pack = int((lengths.float() ** 2).sum())
    return {
        "batch": batch, "heads": heads, "head_dim": dim, "tokens": n, "padded_len": t,
        "padded_s": t_pad, "packed_s": t_pack, "speedup_packed_over_padded": t_pad / t_pack,
        "attention_flops_skipped_by_packing": 1 - flops_pack / flops_pad,
    }


def bench_sam_decoding(batch: int = 8, repeats: int = 10) -> dict:
    import torch.nn.functional as F

    from groundlab.shared.bases import default_spec
    from groundlab.shared.bases import sam as S
    from groundlab.shared.world import World, WorldConfig

    torch.manual_seed(0)
    world = World(WorldConfig(), seed=0)
    sam = S.build_tiny_sam(S.TinySamConfig(**default_spec("sam").model))
    data = S.WorldSamDataset(world, "train", batch)
    images, prompts = S.collate_sam([data[i] for i in range(batch)]).values()
    size = images.shape[-1]
    batched = S.SamForTraining(sam)
    opt = torch.optim.AdamW(sam.parameters(), 1e-5)

    def looped_loss():
        emb = sam.image_encoder(sam.preprocess(images))
        logits, ious, target = [], [], []
        for b, p in enumerate(prompts):
            for use_box in (False, True):
                sel = p["use_box"] == use_box
                if bool(sel.any()):
                    lg, iou = S.predict_masks(sam, emb[b : b + 1], None if use_box else p["points"][sel],
                                              p["boxes"][sel] if use_box else None, size)
                    logits.append(lg)
                    ious.append(iou)
                    target.append(p["masks"][sel])
        logits, ious, target = torch.cat(logits), torch.cat(ious), torch.cat(target)
        achieved = ((logits > 0) & (target > 0.5)).flatten(1).sum(1) / ((logits > 0) | (target > 0.5)).flatten(1).sum(1)
        return (F.binary_cross_entropy_with_logits(logits, target) + S.dice_loss(logits, target)
                + F.mse_loss(ious, achieved.float()))

    def step(loss_fn):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()

    t_loop = _time(lambda: step(looped_loss), repeats)
    t_batch = _time(lambda: step(lambda: batched(images, prompts)["loss"]), repeats)
    return {"images": batch, "prompts": sum(len(p["use_box"]) for p in prompts), "looped_s": t_loop,
            "batched_s": t_batch, "speedup_batched_over_looped": t_loop / t_batch}


def _vlm_mix_batches(kind: str, scenes: int, steps: int):
    """A VLM base's spec, processor and untrained model (its vision tower frozen, as in the mix stage)
    and ``steps`` batches of its instruction mix (lists of samples, a fixed draw)."""
    from groundlab.shared.bases import default_spec, vlm
    from groundlab.shared.tokenizer import load_tokenizer
    from groundlab.shared.world import World

    spec = default_spec(kind)
    cfg, tok = vlm.TinyVLMConfig(**spec.model), load_tokenizer()
    processor = vlm.build_processor(cfg, tok)
    torch.manual_seed(0)
    model = vlm.build_model(cfg, tok)
    vlm.vision_tower(model).requires_grad_(False)
    data = vlm.WorldVLMDataset(World(spec.world, seed=0), "train", scenes, processor, cfg, vlm.MixConfig(**spec.mix))
    bs = spec.train.batch_size
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return spec, processor, model, [[data[int(i)] for i in order[j * bs:(j + 1) * bs]] for j in range(steps)]


def bench_vlm_step(steps: int = 20) -> dict:
    import statistics

    from groundlab.shared.attention import HF_ATTENTION
    from groundlab.shared.bases import vlm
    from groundlab.shared.training import fast_bf16

    out = {"bf16": fast_bf16()}
    arms = {"hf_eager": ("eager", False, False), "hf_sdpa": ("sdpa", False, False),
            "groundlab_padded": (HF_ATTENTION, False, False), "groundlab_packed": (HF_ATTENTION, True, False),
            "groundlab_padded_labeled_logits": (HF_ATTENTION, False, True),
            "groundlab_packed_labeled_logits": (HF_ATTENTION, True, True)}
    for kind in vlm.VLM_KINDS:
        _, processor, model, batches = _vlm_mix_batches(kind, 1200, steps)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        collators = {(packed, labeled): vlm.VLMCollator(processor, packed=packed, labeled_logits_only=labeled)
                     for packed in (False, True) for labeled in (False, True)}
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        model.train()
        for j, samples in enumerate(batches):
            for arm, (impl, packed, labeled) in arms.items():
                for c in (model.config, model.config.text_config, model.config.vision_config):
                    c._attn_implementation = impl
                batch = collators[packed, labeled](samples)
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=out["bf16"]):
                    loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                if j >= 2:  # warm-up
                    times[arm].append(time.perf_counter() - t0)
        padded = [vlm.VLMCollator(processor)(b)["attention_mask"] for b in batches]
        out[f"{kind}/padding_share"] = 1 - sum(float(m.sum()) for m in padded) / sum(m.numel() for m in padded)
        base = statistics.median(times["hf_eager"])
        for arm, ts in times.items():
            out[f"{kind}/{arm}_s"] = statistics.median(ts)
            out[f"{kind}/{arm}_vs_hf_eager"] = statistics.median(ts) / base
    return out


def bench_compiled_step(steps: int = 40) -> dict:
    import copy
    import statistics

    from groundlab.shared.bases import vlm
    from groundlab.shared.training import compile_decoder_layers, fast_bf16

    out = {"bf16": fast_bf16()}
    for kind in vlm.VLM_KINDS:
        spec, processor, eager, samples = _vlm_mix_batches(kind, 2400, steps)
        compiled = copy.deepcopy(eager)
        compile_decoder_layers(compiled)
        collate = vlm.VLMCollator(processor, packed=spec.train.packed, labeled_logits_only=True)
        batches = [collate(batch) for batch in samples]
        arms = {"eager": eager, "compiled": compiled}
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        opts = {arm: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                for arm, m in arms.items()}
        for batch in batches:
            for arm, model in arms.items():
                model.train()
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=out["bf16"]):
                    loss = model(**batch).loss
                loss.backward()
                opts[arm].step()
                opts[arm].zero_grad()
                times[arm].append(time.perf_counter() - t0)
        out[f"{kind}/first_compiled_step_s"] = times["compiled"][0]  # compilation
        for arm, ts in times.items():
            out[f"{kind}/{arm}_s"] = statistics.median(ts[3:])
        out[f"{kind}/compiled_vs_eager"] = out[f"{kind}/compiled_s"] / out[f"{kind}/eager_s"]
    return out


def bench_world(scenes: int = 300, rounds: int = 5) -> dict:
    from groundlab.shared import world as world_mod

    world = world_mod.World(world_mod.WorldConfig(), seed=0)
    cached = {name: world_mod.ShapeObject.__dict__[name] for name in ("bbox", "area")}
    plain = {name: property(c.func) for name, c in cached.items()}

    def render(props):
        for name, prop in props.items():
            setattr(world_mod.ShapeObject, name, prop)
        t0 = time.perf_counter()
        boxes = [o.bbox for i in range(scenes) for o in world.scene("train", i).objects]
        return time.perf_counter() - t0, boxes

    times = {"cached": [], "recomputed": []}
    try:
        for _ in range(rounds):
            for arm, props in (("recomputed", plain), ("cached", cached)):
                dt, boxes = render(props)
                times[arm].append(dt)
                if arm == "recomputed":
                    want = boxes
                elif boxes != want:
                    raise AssertionError("the cached boxes differ from the recomputed ones")
    finally:
        for name, prop in cached.items():
            setattr(world_mod.ShapeObject, name, prop)
    med = {arm: sorted(t)[len(t) // 2] / scenes * 1e3 for arm, t in times.items()}
    return {"scenes": scenes, "recomputed_ms_per_scene": med["recomputed"], "cached_ms_per_scene": med["cached"],
            "speedup": med["recomputed"] / med["cached"]}


def _packed_memory_arm(exact: bool, steps: int, warmup: int) -> dict:
    """One arm of ``packed_memory``, in a process of its own (resident memory is per process)."""
    import resource
    import statistics

    from groundlab.shared import attention as attention_mod
    from groundlab.shared.bases import default_spec, vlm
    from groundlab.shared.tokenizer import load_tokenizer
    from groundlab.shared.training import fast_bf16
    from groundlab.shared.world import World

    def resident_gib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 30

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if exact:
        attention_mod.PACKED_LENGTH_MULTIPLE = 1
    spec = default_spec("llava")
    cfg, tok = vlm.TinyVLMConfig(**spec.model), load_tokenizer()
    processor = vlm.build_processor(cfg, tok)
    torch.manual_seed(0)
    model = vlm.build_model(cfg, tok)
    vlm.vision_tower(model).requires_grad_(False)
    data = vlm.WorldVLMDataset(World(spec.world, seed=0), "train", 1000, processor, cfg, vlm.MixConfig(**spec.mix))
    collate = vlm.VLMCollator(processor, packed=True, row_multiple=1 if exact else 256)
    bs, bf16 = spec.train.batch_size, fast_bf16()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times, after_warmup = [], 0.0
    for j in range(steps):
        batch = collate([data[int(i)] for i in order[(j * bs) % len(data):][:bs]])
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        if j + 1 == warmup:
            after_warmup = resident_gib()
    return {"resident_after_warmup_gib": after_warmup, "resident_end_gib": resident_gib(),
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "step_s": statistics.median(times[warmup:])}


def bench_packed_memory(steps: int = 80, warmup: int = 10, rounds: int = 2) -> dict:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    runs: dict[str, list[dict]] = {"exact": [], "filled": []}
    for _ in range(rounds):
        for arm in runs:
            with ctx.Pool(1) as pool:
                runs[arm].append(pool.apply(_packed_memory_arm, (arm == "exact", steps, warmup)))
    out: dict = {"steps": steps, "warmup_steps": warmup, "rounds": rounds}
    for arm, results in runs.items():
        for key in results[0]:
            out[f"{arm}/{key}"] = sum(r[key] for r in results) / rounds
        out[f"{arm}/growth_after_warmup_gib"] = out[f"{arm}/resident_end_gib"] - out[f"{arm}/resident_after_warmup_gib"]
    out["filled_vs_exact/step"] = out["filled/step_s"] / out["exact/step_s"]
    return out


BENCHES = {"attention": bench_attention, "packed_memory": bench_packed_memory, "sam_decoding": bench_sam_decoding,
           "vlm_step": bench_vlm_step, "compiled_step": bench_compiled_step, "world": bench_world}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(BENCHES), action="append")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "processor": platform.processor()}}
    for name in args.only or sorted(BENCHES):
        results[name] = BENCHES[name]()
        print(f"\n## {name}")
        print("| key | value |\n|---|---|")
        for k, v in results[name].items():
            print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\n{path}")


if __name__ == "__main__":
    main()
