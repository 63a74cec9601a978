"""Metrics against hand-computed values on small confusion matrices."""

import math

import pytest
import torch

from crfrnn_deeplab.training.metrics import ConfusionMatrix, SegmentationMeter, boundary_band, boundary_bands, scores


def test_scores_by_hand():
    # rows: ground truth, columns: prediction
    counts = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    s = scores(counts)
    # IoU_0 = 3 / (4 + 5 - 3) = 0.5 ; IoU_1 = 4 / (6 + 5 - 4) = 4/7 ; class 2 absent -> NaN, not averaged
    assert s["iou"][0] == pytest.approx(0.5) and s["iou"][1] == pytest.approx(4 / 7) and math.isnan(s["iou"][2])
    assert s["miou"] == pytest.approx((0.5 + 4 / 7) / 2)
    assert s["pixel_acc"] == pytest.approx(7 / 10)
    assert s["mean_class_acc"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert s["fwiou"] == pytest.approx(0.4 * 0.5 + 0.6 * 4 / 7)


def test_confusion_matrix_ignores_and_masks():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 1, 255], [2, 2, 1]])
    pred = torch.tensor([[0, 2, 1], [2, 1, 1]])
    cm.update(pred, target)
    expected = torch.zeros(3, 3, dtype=torch.long)
    for t, p in [(0, 0), (1, 2), (2, 2), (2, 1), (1, 1)]:
        expected[t, p] += 1
    assert torch.equal(cm.counts, expected)
    cm2 = ConfusionMatrix(3)
    cm2.update(pred, target, mask=torch.tensor([[True, False, True], [False, False, True]]))
    assert cm2.counts.sum() == 2 and cm2.counts[0, 0] == 1 and cm2.counts[1, 1] == 1


def test_bad_labels():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"labels \[7\] outside \[0, 3\)"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([7, 1]))
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_boundary_band():
    t = torch.zeros(9, 9, dtype=torch.long)
    t[:, 5:] = 1  # one vertical edge between columns 4 and 5
    band1 = boundary_band(t, 1)
    assert band1[:, 4].all() and band1[:, 5].all() and band1.sum() == 18
    band3 = boundary_band(t, 3)
    assert band3[:, 2:8].all() and band3.sum() == 9 * 6
    assert not boundary_band(torch.zeros(5, 5, dtype=torch.long), 2).any()
    batch = boundary_band(torch.stack([t, t.T]), 1)
    assert torch.equal(batch[1], band1.T)


def test_meter_scores_whole_image_and_boundary_bands_by_hand():
    # 6x6 image: class 1 on the right half; the prediction moves the edge one column to the right.
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[:, :, 3:] = 1
    pred = torch.zeros(1, 6, 6, dtype=torch.long)
    pred[:, :, 4:] = 1
    meter = SegmentationMeter(2, widths=(1, 2))
    meter.update(pred, target)
    s = meter.summary()
    # whole image: class 0: tp 18, gt 18, pred 24 -> 18/24; class 1: tp 12, gt 18, pred 12 -> 12/18
    assert s["miou"] == pytest.approx((18 / 24 + 12 / 18) / 2)
    assert s["pixel_acc"] == pytest.approx(30 / 36)
    assert s["mean_class_acc"] == pytest.approx((18 / 18 + 12 / 18) / 2)
    # 1 px band: columns 2 and 3 (6 px each); class 0 right on column 2, column 3 (gt 1) predicted 0
    # class 0: tp 6, gt 6, pred 12 -> 0.5; class 1: tp 0 -> 0
    assert s["boundary_miou_1px"] == pytest.approx(0.25)
    # 2 px band: columns 1..4; class 0: tp 12 (cols 1, 2), gt 12, pred 18 -> 2/3; class 1: tp 6, gt 12, pred 6 -> 1/2
    assert s["boundary_miou_2px"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_meter_ignores_the_ignore_label_and_shares_precomputed_bands():
    target = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 0]]])
    bands = boundary_bands(target, (1,))
    a, b = SegmentationMeter(2, widths=(1,)), SegmentationMeter(2, widths=(1,))
    a.update(pred, target, bands)
    b.update(pred, target)
    assert torch.equal(a.whole.counts, b.whole.counts) and torch.equal(a.bands[1].counts, b.bands[1].counts)
    assert a.whole.counts.sum() == 7  # the ignored pixel is not counted
    assert torch.equal(a.whole.counts, torch.tensor([[2, 1], [1, 3]]))
