"""The post-processing CRF baseline's grid search: it picks the best combination it scored, scores each as the
CRF layer would, and says when the optimum is on the edge of the grid."""

import logging

import pytest
import torch

from crfrnn_deeplab.crf import fixed_crf
from crfrnn_deeplab.training.grid_search import CachedSample, grid_search_crf
from crfrnn_deeplab.training.metrics import ConfusionMatrix
from crf_scenes import scene


def samples():
    out = []
    for seed in (0, 1):
        label, image, logits = scene(seed, 40, 48, 3, noise=2.0)
        out.append(CachedSample(torch.tensor(logits)[None], torch.tensor(image).permute(2, 0, 1)[None].float(),
                                torch.ones(1, 40, 48, dtype=torch.bool), torch.tensor(label)[None]))
    return out


def test_each_trial_is_the_crf_layers_miou_and_the_best_is_chosen(caplog):
    data = samples()
    grid = dict(bilateral_weights=[1.0, 10.0], theta_alphas=[5.0, 40.0], theta_betas=[13.0])
    with caplog.at_level(logging.WARNING):
        result = grid_search_crf(data, num_classes=3, iterations=3, **grid)
    assert len(result.trials) == 4
    for trial in result.trials:
        crf = fixed_crf(num_classes=3, bilateral_weight=trial["bilateral_weight"], theta_alpha=trial["theta_alpha"],
                        theta_beta=trial["theta_beta"], spatial_weight=3.0, theta_gamma=3.0, iterations=3)
        cm = ConfusionMatrix(3)
        with torch.no_grad():
            for s in data:
                cm.update(crf(s.logits, s.raw, s.valid).argmax(1), s.label)
        assert abs(cm.scores()["miou"] - trial["miou"]) < 1e-9
    best = max(result.trials, key=lambda t: t["miou"])
    assert result.miou == best["miou"] and result.params["bilateral_weight"] == best["bilateral_weight"]
    assert len({t["miou"] for t in result.trials}) > 1  # the parameters matter on this data
    # a single-valued axis is never "on the edge"; a best value at the end of a searched axis is
    assert "theta_beta" not in result.at_edge
    assert set(result.at_edge) <= {"bilateral_weight", "theta_alpha"} and bool(result.at_edge)
    assert "edge of the grid" in caplog.text


def test_an_empty_grid_or_no_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="theta_betas is empty"):
        grid_search_crf(samples(), num_classes=3, bilateral_weights=[1.0], theta_alphas=[5.0], theta_betas=[])
    with pytest.raises(ValueError, match="at least one held-out sample"):
        grid_search_crf([], num_classes=3, bilateral_weights=[1.0], theta_alphas=[5.0], theta_betas=[5.0])
