"""The worked example of the CRF on 3-D volumes (``examples/volumes_3d.py``, shown in README) runs, in its quick
mode, and its metrics mean what they say."""

import importlib.util
import math
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "volumes_3d.py"


def load_example():
    spec = importlib.util.spec_from_file_location("volumes_3d_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_reports_network_fixed_crf_and_joint_training(capsys):
    threads = torch.get_num_threads()
    try:
        results = load_example().main(["--quick"])
    finally:
        torch.set_num_threads(threads)  # the example runs on one thread
    assert list(results) == ["network alone", "network + fixed CRF", "network, trained on", "jointly trained"]
    for scores in results.values():
        assert set(scores) == {"mIoU", "boundary mIoU", "tube IoU"}
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in scores.values()), scores
    out = capsys.readouterr().out
    assert "boundary mIoU" in out and "learned CRF: θα" in out and "spacing (2.0, 1.0, 1.0)" in out


def test_network_predicts_at_stride_4_and_upsamples():
    example = load_example()
    net = example.VolumeNet()
    volume = torch.rand(2, 1, 12, 20, 24)
    assert net(volume).shape == (2, 3, 12, 20, 24)
    assert net.classifier(net.features(volume)).shape == (2, 3, 3, 5, 6)


def test_boundary_band_and_miou():
    example = load_example()
    label = torch.zeros(1, 6, 8, 8, dtype=torch.long)
    label[:, :, :, 4:] = 1
    band = example.boundary_band(label, width=1)
    assert band[0, 0, 0].tolist() == [False, False, True, True, True, True, False, False]
    perfect, per_class = example.miou(label, label)
    assert perfect == 1.0 and per_class[:2] == [1.0, 1.0]
    shifted = torch.zeros_like(label)
    shifted[:, :, :, 5:] = 1  # one column of class 1 lost: IoU 3/4 for class 1, 4/5 for class 0
    score, per_class = example.miou(shifted, label)
    assert per_class[:2] == [0.8, 0.75] and score == (0.8 + 0.75) / 2
