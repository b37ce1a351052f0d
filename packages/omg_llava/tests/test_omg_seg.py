import numpy as np
import torch

from groundlab.omg_llava.omg_seg import OMGSegConfig, OMGSegModel
from groundlab.omg_llava.segmenter import farthest_interior_point

TINY = dict(image_size=64, dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), dim=32, mask_dim=32, encoder_layers=2,
            encoder_heads=4, encoder_points=2, encoder_ffn=64, groups=8, num_queries=12, decoder_layers=3,
            decoder_heads=4, decoder_ffn=64, num_classes=12)


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
    assert (out[-1].mask_logits[0, 0, 8:, :] == -100).all() and (out[-1].mask_logits[0, 0, :8, :8] != -100).all()
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    mask[0, 0, 40:60, 5:25] = True
    assert model.run_prompts(enc, "mask", mask)[-1].mask_logits.shape == (1, 1, 16, 16)


def test_farthest_interior_point_is_the_centre_of_a_square():
    m = torch.zeros(20, 20, dtype=torch.bool)
    m[4:11, 6:13] = True  # 7 x 7: the centre pixel (9, 7) is the only one at distance 4
    assert farthest_interior_point(m) == (9, 7)
