"""train.py and its configuration: errors, a short run that learns, checkpoints that reload."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from crfrnn_deeplab import CRFRNN
from crfrnn_deeplab.config import ConfigError, load_config
from crfrnn_deeplab.convert import model_for_checkpoint

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

TINY = [
    "data.image_size=65", "data.crop_size=49", "data.train_images=32", "data.val_images=4", "data.held_out_images=4",
    "data.batch_size=4",
    "model.options={base_width: 8}", "crf.train_iterations=2", "crf.eval_iterations=2", "log_every=5",
]


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'stage1.lrr'"):
        load_config(None, ["stage1.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"stage1.iterations: expected int, got str 'many'"):
        load_config(None, ["stage1.iterations=many"])
    with pytest.raises(ConfigError, match=r"data.root is required for dataset 'voc12_aug'"):
        load_config(None, ["data.dataset=voc12_aug"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nme: x\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.nme'"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    cfg = load_config(None, ["stage2.lr=1e-4", "model.init_from=null"])
    assert cfg.stage2.lr == 1e-4 and cfg.model.init_from is None


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_config(path, ["data.root=/data"])
    assert cfg.stage1.iterations or cfg.stage2.iterations


def test_a_few_steps_lower_the_loss():
    cfg = load_config(None, TINY + ["stage1.iterations=40", "stage1.lr=2.5e-3"])
    torch.manual_seed(0)
    net = train.build_network(cfg)
    train_set, _, _ = train.build_datasets(cfg, net.input_convention)
    loader = torch.utils.data.DataLoader(train_set, batch_size=4, shuffle=True, drop_last=True)
    losses = train.train_steps(net, loader, cfg.stage1, cfg, "test")
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8


@pytest.mark.slow
def test_main_runs_both_stages_and_writes_a_reloadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    results = train.main(TINY + ["stage1.iterations=10", "stage2.iterations=3", f"out_dir={out}"])
    assert set(results) == {
        "network", "network + initial CRF", "network + grid-searched CRF", "joint network", "joint network + learned CRF"
    }
    assert json.loads((out / "results.json").read_text())["network"]["miou"] == results["network"]["miou"]
    assert (out / "config.yaml").is_file() and (out / "results.md").is_file()
    model, report = model_for_checkpoint(out / "final.pt")
    assert isinstance(model, CRFRNN) and report.layout == "crfrnn_deeplab" and not [
        k for k, r in report.initialised.items() if not k.endswith("num_batches_tracked")
    ]


def test_init_from_loads_a_checkpoint(tmp_path):
    cfg = load_config(None, TINY)
    source = train.build_network(cfg)
    with torch.no_grad():
        source.head.branches[0].bias.fill_(0.5)
    train.checkpoint(tmp_path / "stage1.pt", source, cfg, step=1, crf=False)
    cfg = load_config(None, TINY + [f"model.init_from={tmp_path / 'stage1.pt'}"])
    loaded = train.build_network(cfg)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
