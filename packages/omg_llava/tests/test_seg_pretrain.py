import pytest
import torch

from groundlab.omg_llava.omg_seg import OMGSegConfig, OMGSegModel
from groundlab.omg_llava.seg_pretrain import (
    PanopticCollator,
    SegmenterForTraining,
    SemanticPretraining,
    WorldPanopticDataset,
    class_names,
    evaluate,
    panoptic_quality,
    semantic_map,
)
from groundlab.shared.world import World, WorldConfig

TINY = dict(image_size=64, dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), dim=32, mask_dim=32, encoder_layers=1,
            encoder_heads=4, encoder_points=2, encoder_ffn=64, groups=8, num_queries=8, decoder_layers=3,
            decoder_heads=4, decoder_ffn=64, num_classes=12, classifier="linear")


def test_panoptic_quality_by_hand():
    g = torch.full((4, 4), -1)
    g[:2] = 0
    g[2:] = 1
    p = torch.full((4, 4), -1)
    p[:2] = 0  # matches segment 0 exactly (IoU 1)
    p[2:, :3] = 1  # class 1 segment, IoU 6/8 with segment 1 -> but predicted with the wrong class below
    out = panoptic_quality([(p, [3, 5])], [(g, [3, 4])])
    assert (out["TP"], out["FP"], out["FN"]) == (1, 1, 1)
    assert abs(out["PQ"] - 1.0 * (1 / (1 + 0.5 + 0.5))) < 1e-9
    out = panoptic_quality([(p, [3, 4])], [(g, [3, 4])])
    assert out["TP"] == 2 and abs(out["SQ"] - (1 + 0.75) / 2) < 1e-9 and out["RQ"] == 1.0


def test_segmenter_overfits_a_few_scenes():
    torch.manual_seed(0)
    world = World(WorldConfig(), seed=0)
    assert len(class_names(world)) == 12
    model = OMGSegModel(OMGSegConfig(**TINY))
    before = evaluate(model, world, "train", n_scenes=4)
    ds = WorldPanopticDataset(world, "train", 4)
    wrapper = SegmenterForTraining(model, num_points=256)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        batch = PanopticCollator(model, seed=step)([ds[i] for i in range(4)])
        loss = wrapper(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    # the scenes it fitted: every prompted mask better than the untrained segmenter's
    m = evaluate(model, world, "train", n_scenes=4)
    for k in ("panoptic/PQ", "prompt_point/mIoU", "prompt_box/mIoU", "prompt_mask/mIoU"):
        assert m[k] > before[k] + 0.1, (k, before[k], m[k])


def test_semantic_map_by_hand_and_its_errors():
    a, b = torch.zeros(3, 3, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool)
    a[0], b[2, 1:] = True, True
    out = semantic_map([torch.tensor([4, 7])], [torch.stack([a, b])], background=12)
    assert out.tolist() == [[[4, 4, 4], [12, 12, 12], [12, 7, 7]]]
    with pytest.raises(ValueError, match="image 1 of the batch: masks of \\(2, 2\\)"):
        semantic_map([torch.tensor([4]), torch.tensor([4])], [a[None], torch.zeros(1, 2, 2, dtype=torch.bool)], 12)


def test_semantic_pretraining_learns_the_class_map_of_a_few_scenes():
    """The encoder + a 1x1 head fitted to the per-pixel classes of four scenes: the loss falls, and the
    head's map names the class (kind and colour) of most object pixels, far above the untrained model;
    the objects' recognition figures join the segmenter's evaluation."""
    torch.manual_seed(0)
    world = World(WorldConfig(), seed=0)
    model = OMGSegModel(OMGSegConfig(**TINY))
    ds = WorldPanopticDataset(world, "train", 4)
    wrapper = SemanticPretraining(model)
    batch = PanopticCollator(model, seed=0)([ds[i] for i in range(4)])

    def object_pixel_accuracy() -> float:
        with torch.no_grad():
            logits = wrapper.head(model.encode(batch["pixel_values"])["mask_features"])
            pred = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear").argmax(1)
        target = semantic_map(batch["labels"], batch["masks"], 12)
        objects = target < 12
        return float((pred[objects] == target[objects]).float().mean())

    before = object_pixel_accuracy()
    opt = torch.optim.AdamW(wrapper.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = wrapper(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    after = object_pixel_accuracy()
    assert after > 0.6 and after > before + 0.4, (before, after)
    m = evaluate(model, world, "train", n_scenes=4)
    assert {"objects/class_acc", "objects/colour_acc", "objects/kind_acc"} <= set(m)
    with pytest.raises(ValueError, match="square images"):
        wrapper(batch["pixel_values"], batch["labels"], [m_[:, :, :60] for m_ in batch["masks"]])
