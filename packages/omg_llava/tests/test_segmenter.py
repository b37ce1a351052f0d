import pytest
import torch

from groundlab.omg_llava.segmenter import (
    ConvNeXtBackbone,
    MaskDecoder,
    MSDeformAttn,
    PixelDecoder,
    box_cells,
    ms_deform_sample,
    unmask_full_rows,
)


def bilinear(img, x, y):
    """Sample a (C, H, W) map at continuous pixel coordinates (x, y), zero outside (align_corners=False)."""
    c, h, w = img.shape
    x, y = x - 0.5, y - 0.5
    x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
    out = torch.zeros(c)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += wgt * img[:, yi, xi]
    return out


def test_deformable_sampling_matches_a_direct_bilinear_computation():
    torch.manual_seed(0)
    shapes = [(3, 4), (5, 2)]
    heads, hd, points = 2, 3, 2
    value = torch.randn(1, sum(h * w for h, w in shapes), heads, hd)
    loc = torch.rand(1, 1, heads, 2, points, 2)
    wts = torch.rand(1, 1, heads, 2, points).softmax(-1)
    out = ms_deform_sample(value, shapes, loc, wts)[0, 0]
    levels = value[0].split([h * w for h, w in shapes])
    expected = torch.zeros(heads, hd)
    for hh in range(heads):
        for lvl, (h, w) in enumerate(shapes):
            img = levels[lvl][:, hh].T.reshape(hd, h, w)
            for p in range(points):
                x, y = loc[0, 0, hh, lvl, p].tolist()
                expected[hh] += wts[0, 0, hh, lvl, p] * bilinear(img, x * w, y * h)
    assert torch.allclose(out, expected.flatten(), atol=1e-5)


def test_backbone_pixel_decoder_and_decoder_shapes_and_deep_supervision():
    torch.manual_seed(0)
    dims = (16, 32, 64, 128)
    backbone = ConvNeXtBackbone(dims, depths=(1, 1, 2, 1))
    feats = backbone(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
    pix = PixelDecoder(dims, dim=32, mask_dim=32, layers=2, heads=4, points=2, ffn=64, groups=8)
    mask_features, memory, pos = pix(feats)
    assert mask_features.shape == (2, 32, 16, 16)
    assert [tuple(m.shape[-2:]) for m in memory] == [(2, 2), (4, 4), (8, 8)]
    dec = MaskDecoder(dim=32, num_queries=10, layers=3, heads=4, ffn=64, num_classes=5, mask_dim=32)
    preds = dec(mask_features, memory, pos)
    assert len(preds) == 4  # the head before the first layer, then one per layer
    p = preds[-1]
    assert p.class_logits.shape == (2, 10, 6) and p.mask_logits.shape == (2, 10, 16, 16) and p.iou.shape == (2, 10)


def test_full_rows_are_unmasked_and_fixed_masks_confine_attention():
    m = torch.tensor([[[True, True, True], [True, False, True]]])
    assert unmask_full_rows(m).tolist() == [[[False, False, False], [True, False, True]]]
    torch.manual_seed(0)
    dec = MaskDecoder(dim=16, num_queries=2, layers=2, heads=2, ffn=32, num_classes=3, mask_dim=16, levels=1)
    mask_features = torch.randn(1, 16, 4, 4)
    memory = [torch.randn(1, 16, 4, 4)]
    pos = [torch.zeros(1, 16, 4, 4)]
    q, qp = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    region = torch.zeros(1, 1, 16, dtype=torch.bool)
    region[..., 5:] = True  # the query may only look at positions 0..4
    a = dec.run_queries(q, qp, mask_features, memory, pos, fixed_masks=[region])[-1].query
    changed = memory[0].clone()
    changed.view(1, 16, 16)[..., 5:] += 10.0  # what it may not see changes
    b = dec.run_queries(q, qp, mask_features, [changed], pos, fixed_masks=[region])[-1].query
    assert torch.allclose(a, b, atol=1e-5)
    # a box keeps the attention to the cells it touches, as the release does; the masks are not cropped.
    # Every predicted mask made to cover the whole image, so the box alone decides what is seen:
    with torch.no_grad():
        dec.mask_embed.layers[-1].weight.zero_()
        dec.mask_embed.layers[-1].bias.fill_(1.0)
    ones = torch.ones(1, 16, 4, 4)
    box = torch.tensor([[[0.0, 0.0, 0.45, 0.45]]])  # touches rows and columns 0..1 of the 4x4 grid
    a = dec.run_queries(q, qp, ones, memory, pos, box=box)
    changed = memory[0].clone()
    changed[..., 2:, :] += 10.0
    changed[..., :, 2:] += 10.0
    b = dec.run_queries(q, qp, ones, [changed], pos, box=box)
    assert torch.allclose(a[-1].query, b[-1].query, atol=1e-5)
    assert not torch.allclose(dec.run_queries(q, qp, ones, [changed], pos)[-1].query, a[-1].query, atol=1e-3)
    assert all((p.mask_logits == 16.0).all() for p in a)  # not cropped to the box


def test_box_cells_round_as_the_release_does():
    # 4 x 4 grid: x0 0.1 -> column 0, x1 0.5 -> 2.0 -> column 2 (a box ending on a cell edge keeps the
    # cell after it); y 0.25 -> row 1, 0.6 -> 2.4 -> row 2
    cells = box_cells(torch.tensor([[[0.1, 0.25, 0.5, 0.6]]]), (4, 4))[0, 0]
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 0:3] = True
    assert torch.equal(cells, expected)
    # attention: masked where the predicted mask is off or the cell is outside the box
    logits = torch.full((1, 1, 8, 8), 5.0)
    logits[..., :4, :4] = -5.0  # the mask is off on the top-left quarter: cell (0, 0) of the 2x2 grid
    amask = MaskDecoder.attention_mask(logits, (2, 2), torch.tensor([[[0.0, 0.0, 0.4, 0.9]]]))
    assert amask.view(2, 2).tolist() == [[True, True], [False, True]]


def test_gradients_reach_the_queries_through_a_frozen_decoder():
    torch.manual_seed(0)
    dec = MaskDecoder(dim=16, num_queries=2, layers=2, heads=2, ffn=32, num_classes=3, mask_dim=16, levels=1)
    dec.requires_grad_(False)
    q = torch.randn(1, 1, 16, requires_grad=True)
    qp = torch.randn(1, 1, 16, requires_grad=True)
    preds = dec.run_queries(q, qp, torch.randn(1, 16, 4, 4), [torch.randn(1, 16, 4, 4)], [torch.zeros(1, 16, 4, 4)])
    sum(p.mask_logits.sum() for p in preds).backward()
    assert q.grad.abs().sum() > 0 and qp.grad.abs().sum() > 0
    assert all(p.grad is None for p in dec.parameters())


def test_deform_attn_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(dim=30, heads=8)
