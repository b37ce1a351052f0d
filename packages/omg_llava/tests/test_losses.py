import torch
import torch.nn.functional as F

from groundlab.omg_llava.losses import dice_loss, hungarian_match, mask_loss, point_sample, set_loss
from groundlab.omg_llava.segmenter import Prediction


def test_point_sample_reads_pixel_centres():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    coords = torch.tensor([[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3]]])
    assert torch.allclose(point_sample(x, coords)[0, 0], torch.tensor([0.0, 11.0]), atol=1e-5)


def test_dice_and_mask_loss():
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    big = torch.tensor([[20.0, 20.0, -20.0, -20.0]])
    assert dice_loss(big, t).item() < 1e-6
    p = torch.sigmoid(torch.tensor([[0.3, -0.2, 0.1, 0.0]]))
    expected = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert torch.isclose(dice_loss(torch.tensor([[0.3, -0.2, 0.1, 0.0]]), t)[0], expected)
    target = torch.zeros(2, 16, 16)
    target[0, :8] = 1
    target[1, :, :4] = 1
    good = (target * 2 - 1) * 20
    # uncertain points sit on the boundaries, where even a sharp prediction is interpolated to ~0
    assert mask_loss(good, target, num_points=64) < 0.2 * mask_loss(-good, target, num_points=64)
    assert mask_loss(torch.zeros(0, 4, 4), torch.zeros(0, 4, 4)).item() == 0.0


def test_hungarian_matching_recovers_the_permutation_and_set_loss_prefers_it():
    torch.manual_seed(0)
    masks = torch.zeros(3, 16, 16)
    masks[0, :5], masks[1, 6:11], masks[2, 12:] = 1, 1, 1
    labels = torch.tensor([2, 0, 1])
    perm = torch.tensor([2, 0, 1])  # query q predicts target perm[q]
    mask_logits = torch.cat([(masks[perm] * 2 - 1) * 10, torch.full((2, 16, 16), -10.0)])
    class_logits = torch.full((5, 4), -5.0)
    class_logits[torch.arange(3), labels[perm]] = 5.0
    class_logits[3:, 3] = 5.0  # no-object
    q, t = hungarian_match(class_logits, mask_logits, labels, masks, num_points=256)
    assert dict(zip(q.tolist(), t.tolist())) == {0: 2, 1: 0, 2: 1}
    good = Prediction(class_logits[None], mask_logits[None], torch.zeros(1, 5), torch.zeros(1, 5, 8))
    bad = Prediction(class_logits[None].roll(1, -1), -mask_logits[None], torch.zeros(1, 5), torch.zeros(1, 5, 8))
    tgt = [{"labels": labels, "masks": masks}]
    assert set_loss([good], tgt, 3, num_points=256)["loss"] < set_loss([bad], tgt, 3, num_points=256)["loss"]


def test_set_loss_batches_images_with_mask2former_normalisation():
    """Images with 3, 1 and 0 targets in one batch: each is matched on its own, the class term is the
    weighted CE over every query of the batch (no-object weight 0.1); inverted masks cost more."""
    torch.manual_seed(0)
    masks = torch.zeros(3, 16, 16)
    masks[0, :5], masks[1, 6:11], masks[2, 12:] = 1, 1, 1
    labels = torch.tensor([2, 0, 1])
    q_per_img, n_cls = 4, 3
    class_logits = torch.full((3, q_per_img, n_cls + 1), -4.0)
    mask_logits = torch.full((3, q_per_img, 16, 16), -10.0)
    # image 0: query q predicts target perm[q] (query 3 no object); image 1: query 2 predicts its one target
    perm = [1, 2, 0]
    for q, t in enumerate(perm):
        class_logits[0, q, labels[t]] = 4.0
        mask_logits[0, q] = (masks[t] * 2 - 1) * 10
    class_logits[0, 3, n_cls] = 4.0
    class_logits[1, :, n_cls] = 4.0
    class_logits[1, 2, n_cls], class_logits[1, 2, 0] = -4.0, 1.0
    mask_logits[1, 2] = (masks[2] * 2 - 1) * 10
    class_logits[2, :, n_cls] = 4.0
    targets = [{"labels": labels, "masks": masks}, {"labels": torch.tensor([0]), "masks": masks[2:]},
               {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16)}]
    pred = Prediction(class_logits, mask_logits, torch.zeros(3, q_per_img), torch.zeros(3, q_per_img, 8))
    out = set_loss([pred, pred], targets, n_cls, num_points=256)
    cls_target = torch.full((3, q_per_img), n_cls)
    cls_target[0, :3] = labels[perm]
    cls_target[1, 2] = 0
    weight = torch.tensor([1.0] * n_cls + [0.1])
    expected = 2.0 * torch.nn.functional.cross_entropy(class_logits.flatten(0, 1), cls_target.flatten(), weight=weight)
    assert torch.isclose(out["class"], 2 * expected, rtol=1e-5)  # two predictions, summed
    inverted = set_loss([Prediction(class_logits, -mask_logits, pred.iou, pred.query)], targets, n_cls, num_points=256)
    assert inverted["mask"] > out["mask"]  # one inverted prediction costs more than both right ones


def test_logits_fitted_to_full_resolution_targets_upsample_onto_them():
    """Targets are point-sampled at their own resolution: logits on a 4x coarser grid fitted with
    ``mask_loss`` and upsampled as evaluation does (bilinear) land on the targets. Shrinking the
    targets to the logits' grid first (nearest, as the segmenter's pre-training once did) shifts and
    coarsens them: the same fit then scores far lower."""
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    targets = torch.stack([((xx - cx) ** 2 + (yy - cy) ** 2 < r * r).float()
                           for cx, cy, r in ((21.3, 37.7, 6), (40.2, 18.9, 9), (10.5, 12.2, 4.5))])

    def fitted_iou(target_for_loss):
        torch.manual_seed(0)
        logits = torch.zeros(3, 16, 16, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=0.1)
        for _ in range(300):
            loss = mask_loss(logits, target_for_loss, 1024)
            opt.zero_grad()
            loss.backward()
            opt.step()
        up = F.interpolate(logits.detach()[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0] > 0
        return ((up & (targets > 0)).sum((1, 2)) / (up | (targets > 0)).sum((1, 2))).mean().item()

    full = fitted_iou(targets)
    shrunk = fitted_iou(F.interpolate(targets[None], size=(16, 16), mode="nearest")[0])
    assert full > 0.95 and shrunk < full - 0.15, (full, shrunk)
