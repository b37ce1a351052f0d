import numpy as np
import pytest
import torch

from groundlab.omg_llava.omg_seg import OMGSegConfig, OMGSegModel, sample_at
from groundlab.omg_llava.segmenter import farthest_interior_point, farthest_interior_points

TINY = dict(image_size=64, dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), dim=32, mask_dim=32, encoder_layers=2,
            encoder_heads=4, encoder_points=2, encoder_ffn=64, groups=8, num_queries=12, decoder_layers=3,
            decoder_heads=4, decoder_ffn=64, num_classes=12, classifier="linear")


def test_release_config_builds_on_meta():
    with torch.device("meta"):
        model = OMGSegModel(OMGSegConfig())
    n = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters())
    assert 195_000_000 < backbone < 200_000_000  # ConvNeXt-L's ~196 M (no head)
    assert n > backbone and len(model.decoder.layers) == 9 and model.decoder.query_feat.weight.shape == (300, 256)


def test_pad_to_square_keeps_the_origin_and_fills_the_mean():
    model = OMGSegModel(OMGSegConfig(**TINY))
    img = np.zeros((20, 40, 3), np.uint8)
    sq, size = model.pad_to_square(img)
    assert sq.shape == (40, 40, 3) and size == (20, 40)
    assert (sq[:20] == 0).all() and (sq[20:] == np.round(np.array(model.config.pixel_mean) * 255)).all()
    x = model.preprocess([img, np.zeros((64, 64, 3), np.uint8)])
    assert x.shape == (2, 3, 64, 64)


def test_queries_and_every_prompt_kind_run_through_the_decoder():
    torch.manual_seed(0)
    model = OMGSegModel(OMGSegConfig(**TINY)).eval()
    enc = model.encode(torch.randn(1, 3, 64, 64))
    assert enc["clip"].shape == (1, 128, 2, 2) and enc["mask_features"].shape == (1, 32, 16, 16)
    preds = model.decode(enc)
    assert len(preds) == 4 and preds[-1].mask_logits.shape == (1, 12, 16, 16)
    pts = torch.tensor([[[10.0, 12.0], [40.0, 50.0]]])
    assert model.run_prompts(enc, "point", pts)[-1].mask_logits.shape == (1, 2, 16, 16)
    boxes = torch.tensor([[[0.0, 0.0, 31.0, 31.0]]])
    out = model.run_prompts(enc, "box", boxes)
    assert out[-1].mask_logits.shape == (1, 1, 16, 16)
    # the box is its centre point with the attention kept to the box: not the point query alone
    centre = model.run_prompts(enc, "point", torch.tensor([[[15.5, 15.5]]]))
    assert not torch.allclose(out[-1].mask_logits, centre[-1].mask_logits, atol=1e-4)
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    mask[0, 0, 40:60, 5:25] = True
    assert model.run_prompts(enc, "mask", mask)[-1].mask_logits.shape == (1, 1, 16, 16)


def test_sample_at_reads_the_features_under_a_point_bilinearly():
    # a 4x4 feature grid over a 16-px input: cell j spans pixels [4j, 4j + 4), its centre at 4j + 2
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    feats = torch.stack([xs, ys])[None]  # channel 0 = the cell's column, 1 = its row
    pts = torch.tensor([[[6.0, 10.0], [8.0, 2.0], [0.0, 16.0]]])
    got = sample_at(feats, pts, 16)
    # (6, 10): the centre of cell (1, 2); (8, 2): half way between columns 1 and 2 on row 0's centre;
    # (0, 16): past the centres at the border, the border cell's value
    assert torch.allclose(got, torch.tensor([[[1.0, 2.0], [1.5, 0.0], [0.0, 3.0]]]))


def test_prompt_features_add_the_mask_features_under_each_prompt_point():
    torch.manual_seed(0)
    plain = OMGSegModel(OMGSegConfig(**TINY)).eval()
    model = OMGSegModel(OMGSegConfig(**TINY, prompt_features=True)).eval()
    model.load_state_dict(plain.state_dict())  # no new parameters: a release checkpoint loads either way
    enc = model.encode(torch.randn(1, 3, 64, 64))
    pts = torch.tensor([[[10.0, 12.0], [40.0, 50.0]]])
    feat0, pos0 = plain.prompt_queries("point", pts, mask_features=enc["mask_features"])
    assert torch.equal(feat0[0, 0], feat0[0, 1])  # the release's: the content query is one for every click
    feat, pos = model.prompt_queries("point", pts, mask_features=enc["mask_features"])
    assert torch.equal(pos, pos0)
    mf = enc["mask_features"][0]  # (32, 16, 16) over the 64-px input: pixel (10, 12) is in cell (2, 3)
    expected = sample_at(enc["mask_features"], pts, 64)
    assert torch.allclose(feat - feat0, expected, atol=1e-6)
    assert torch.allclose(sample_at(enc["mask_features"], torch.tensor([[[10.0, 14.0]]]), 64)[0, 0], mf[:, 3, 2])
    # run_prompts passes the features itself; a box is its centre point, a mask its farthest pixel
    direct = model.run_prompts(enc, "point", pts)[-1].mask_logits
    given = model.run_prompts(enc, "point", pts, queries=(feat, pos))[-1].mask_logits
    assert torch.equal(direct, given) and not torch.allclose(direct, plain.run_prompts(enc, "point", pts)[-1].mask_logits)
    with pytest.raises(ValueError, match="needs the images' mask_features"):
        model.prompt_queries("point", pts)
    with pytest.raises(ValueError, match="2 images of prompts but mask features of 1"):
        model.prompt_queries("point", pts.repeat(2, 1, 1), mask_features=enc["mask_features"])
    with pytest.raises(ValueError, match="mask_dim must equal dim"):
        OMGSegConfig(**(TINY | dict(mask_dim=16)), prompt_features=True)


def test_farthest_interior_point_is_the_centre_of_a_square():
    m = torch.zeros(20, 20, dtype=torch.bool)
    m[4:11, 6:13] = True  # 7 x 7: the centre pixel (9, 7) is the only one at distance 4
    assert farthest_interior_point(m) == (9, 7)
    # several masks at once, of different depths: each its own centre; an empty one is refused
    other = torch.zeros(20, 20, dtype=torch.bool)
    other[15:18, 0:20] = True  # 3 rows: distance 2 along row 16, the first in raster order is (1, 16)
    assert farthest_interior_points(torch.stack([m, other])).tolist() == [[9.0, 7.0], [1.0, 16.0]]
    with pytest.raises(ValueError, match="mask prompt 1 is empty"):
        farthest_interior_points(torch.stack([m, torch.zeros_like(m)]))


def test_perception_prior_by_hand():
    from groundlab.omg_llava.perception import perception_prior, pixel_unshuffle

    # two queries, two classes + background; query 0 owns the left half, query 1 the right half
    cls = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 4.0]])  # query 1 is mostly background
    m = torch.full((2, 4, 4), -8.0)
    m[0, :, :2] = 8.0
    m[1, :, 2:] = 8.0
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    prior, valid = perception_prior(cls, m, q, e, (2, 2))
    s = torch.softmax(cls, -1)[:, :-1].max(-1).values
    p = (0.5 * s + 0.5)[:, None, None] * torch.sigmoid(m)
    p = torch.nn.functional.interpolate(p[None], size=(2, 2), mode="bilinear", align_corners=False)[0]
    w = torch.softmax(p.flatten(1), 0)
    expected = w.T @ torch.cat([q, e], -1)
    assert torch.allclose(prior, expected) and prior.shape == (4, 4)
    assert valid.tolist() == [True, True]  # each wins its half
    cls2 = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    m2 = torch.cat([m, torch.full((1, 4, 4), -8.0)])
    _, valid2 = perception_prior(cls2, m2, torch.zeros(3, 2), torch.zeros(3, 2), (2, 2))
    assert valid2.tolist() == [True, True, False]  # the query with no mask wins nowhere
    x = torch.arange(16.0).view(1, 1, 4, 4)
    tokens = pixel_unshuffle(x, 2)
    assert tokens.shape == (1, 4, 4) and tokens[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    # with two channels: channel-major, then block row, then block column ((c, i, j), F.pixel_unshuffle's)
    x2 = torch.arange(32.0).view(1, 2, 4, 4)
    tokens2 = pixel_unshuffle(x2, 2)
    assert tokens2.shape == (1, 4, 8) and tokens2[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0, 16.0, 17.0, 20.0, 21.0]
    assert tokens2[0, 3].tolist() == [10.0, 11.0, 14.0, 15.0, 26.0, 27.0, 30.0, 31.0]
