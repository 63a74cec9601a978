"""Checkpoints written before the package was split into subpackages still load and compute the same outputs.

``tests/fixtures/legacy_v1_crfrnn.pt`` is a stage-2 checkpoint in the form ``train.py`` wrote at commit
a1b8e45 (every training-state key included), and ``legacy_v1_expected.pt`` what that code computed from it;
``tests/fixtures/make_legacy_checkpoint.py`` wrote both. The network's outputs must be bit-identical; the CRF's
to float32 rounding (its lattice build and filters are free to reorder floating-point sums for speed, and the
same code rounds differently on CPUs with other vector widths), with identical labels.
"""

from pathlib import Path

import torch

from crfrnn_deeplab import CRFRNN, model_for_checkpoint
from crfrnn_deeplab.training.config import config_from_dict
from crfrnn_deeplab.weights.checkpoint import load_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_legacy_checkpoint_gives_identical_outputs():
    model, report = model_for_checkpoint(FIXTURES / "legacy_v1_crfrnn.pt")
    expected = torch.load(FIXTURES / "legacy_v1_expected.pt", weights_only=True)
    assert isinstance(model, CRFRNN)
    assert not report.unexpected and not report.initialised
    model.eval()
    raw = expected["raw"]
    with torch.no_grad():
        out = model(model.preprocess(raw), raw)
    torch.testing.assert_close(out.network, expected["network"], rtol=0, atol=0)
    torch.testing.assert_close(out.crf, expected["crf"], rtol=1e-5, atol=1e-5)
    prediction = model.predict(raw[0].to(torch.uint8))
    assert torch.equal(prediction.labels, expected["labels"])
    torch.testing.assert_close(prediction.probabilities, expected["probabilities"], rtol=1e-5, atol=1e-6)


def test_legacy_checkpoint_config_still_reads():
    checkpoint = load_checkpoint(FIXTURES / "legacy_v1_crfrnn.pt")
    cfg = config_from_dict(checkpoint["config"], source="legacy checkpoint")
    assert cfg.model.name == "deeplabv2_resnet18" and cfg.model.options["base_width"] == 4
    assert cfg.crf.bilateral_weight == 4.0 and cfg.stage2.iterations == 400
