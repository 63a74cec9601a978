"""train.py end to end on tiny synthetic runs: learning, checkpoints, exact resume, faults, DDP, evaluation."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crfrnn_deeplab import CRFRNN, TORCHVISION_CONVENTION, TrainTransform
from crfrnn_deeplab.data import SyntheticSegmentation
from crfrnn_deeplab.training.config import load_config
from crfrnn_deeplab.training.data_stream import SeededAugmentation, TrainBatches
from crfrnn_deeplab.training.signals import StopRequest
from crfrnn_deeplab.training.evaluation import (Evaluator, NonFiniteLogitsError, collate_by_size,
                                                sliding_window_logits)
from crfrnn_deeplab.weights import load_checkpoint, model_for_checkpoint
from crfrnn_deeplab.weights.checkpoint import remove_stale_temporaries
from train_script import import_train

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


train = import_train()

# 65x65 images, 49x49 crops, an 8-wide ResNet-18: small enough that whole runs fit in a test on a 2-core CPU.
TINY = [
    "data.image_size=65", "data.crop_size=49", "data.train_images=24", "data.val_images=4",
    "model.options.base_width=8", "crf.train_iterations=2", "crf.eval_iterations=2",
    "stage1.batch_size=4", "stage2.batch_size=4", "eval.batch_size=2", "eval.panels=2", "log_every=1",
    "grid_search.held_out_images=2", "grid_search.bilateral_weights=[5]", "grid_search.theta_alphas=[10]",
    "grid_search.theta_betas=[10,30]", "threads=2",
]
BOTH = ["stage1.iterations=7", "stage2.iterations=5", "stage1.eval_every=3", "stage2.eval_every=2",
        "stage1.checkpoint_every=2", "stage2.checkpoint_every=2"]


def weights(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def train_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_parameter_groups_follow_the_model_structure():
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", TINY + ["stage2.lr=0.01", "stage2.crf_lr=0.3"])
    model = CRFRNN(network=train.build_network(cfg), crf=train.build_crf(cfg))
    groups = {g["name"]: g for g in train.build_optimizer(model, cfg.stage2).param_groups}
    assert {n: (g["lr"], g["weight_decay"]) for n, g in groups.items()} == {
        "backbone": (0.01, 5e-4), "head_weights": (0.1, 5e-4), "head_biases": (0.2, 0.0), "crf": (0.3, 0.0)}
    assert all(g["momentum"] == 0.9 for g in groups.values())
    assert {id(p) for p in groups["crf"]["params"]} == {id(p) for p in model.crf.parameters()}
    assert all(p.ndim <= 1 for p in groups["head_biases"]["params"])


def test_a_few_training_steps_lower_the_loss(tmp_path):
    out = tmp_path / "run"
    assert train.main(TINY + ["stage1.iterations=40", "stage2.iterations=0", "grid_search.enabled=false",
                              f"out_dir={out}"]) == 0
    losses = train_losses(out)
    assert len(losses) == 40 and all(map(float.__call__, losses))
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_both_stages_write_self_describing_checkpoints_and_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + BOTH + [f"out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["network alone", "network + initial CRF (fixed)", "network + grid-searched CRF",
                             "joint: network alone", "joint: CRF-as-RNN"]
    for row in results.values():
        assert {"miou", "pixel_acc", "mean_class_acc", "fwiou", "iou", "boundary_miou_2px", "boundary_miou_5px",
                "boundary_miou_10px"} <= set(row)
    assert "| joint: CRF-as-RNN" in printed and (out / "results.md").read_text() in printed + "\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    losses = [e.value for e in events.Scalars("stage1/train/loss")]
    assert losses == pytest.approx(train_losses(out)[:7])  # the same numbers as metrics.jsonl
    assert "stage2/eval/network + CRF/miou" in events.Tags()["scalars"]
    assert (out / "config.yaml").is_file() and load_config(out / "config.yaml").stage2.iterations == 5
    for name in ("stage1/last.pt", "stage1/best.pt", "stage2/last.pt", "stage2/best.pt", "panels/joint.png",
                 "panels/baselines.png", "stage2/panels/step_000002.png"):
        assert (out / name).is_file(), name

    ckpt = load_checkpoint(out / "stage2" / "last.pt")
    assert ckpt["format"] == "crfrnn_deeplab/1" and (ckpt["stage"], ckpt["step"]) == (2, 5)
    assert ckpt["model_config"]["name"] == "deeplabv2_resnet18" and ckpt["model_config"]["crf"]["eval_iterations"] == 2
    assert ckpt["class_names"][0] == "background" and ckpt["config"]["stage2"]["iterations"] == 5
    assert {"optimizer", "scheduler", "rng", "data", "input_convention"} <= set(ckpt)
    assert load_checkpoint(out / "stage1" / "last.pt")["model_config"]["crf"] is None
    model, report = model_for_checkpoint(out / "stage2" / "last.pt")
    assert isinstance(model, CRFRNN) and report.layout == "crfrnn_deeplab"
    assert not [k for k in report.initialised if not k.endswith("num_batches_tracked")]

    # --eval-only on the final checkpoint: its own config, plus the learned CRF row
    capsys.readouterr()
    assert train.main(["--eval-only", str(out / "stage2" / "last.pt")]) == 0
    evaluated = json.loads((out / "eval_last" / "results.json").read_text())["results"]
    assert evaluated["network + learned CRF"]["miou"] == pytest.approx(results["joint: CRF-as-RNN"]["miou"])
    assert evaluated["network alone"]["miou"] == pytest.approx(results["joint: network alone"]["miou"])


def test_resume_after_interruptions_reproduces_the_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(TINY + BOTH + [f"out_dir={straight}"]) == 0
    # stopped in stage 1 (between checkpoints), then across the stage boundary, then to the end
    assert train.main(TINY + BOTH + [f"out_dir={resumed}", "--stop-after", "3"]) == 0
    assert load_checkpoint(resumed / "stage1" / "last.pt")["step"] == 3
    assert train.main(["--resume", str(resumed), "--stop-after", "6"]) == 0
    assert load_checkpoint(resumed / "stage2" / "last.pt")["step"] == 2
    assert train.main(["--resume", str(resumed)]) == 0
    for stage in ("stage1", "stage2"):
        assert_same_weights(weights(straight / stage / "last.pt"), weights(resumed / stage / "last.pt"))
    a, b = (json.loads((d / "results.json").read_text())["results"] for d in (straight, resumed))
    assert a == b
    assert train_losses(straight) == train_losses(resumed)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    frozen = ["model.options.norm=frozen", "stage1.iterations=3", "stage2.iterations=0", "grid_search.enabled=false"]
    assert train.main(TINY + frozen + ["stage1.batch_size=4", f"out_dir={tmp_path / 'big'}"]) == 0
    assert train.main(TINY + frozen + ["stage1.batch_size=2", "stage1.accumulate=2", f"out_dir={tmp_path / 'acc'}"]) == 0
    a, b = weights(tmp_path / "big" / "stage1" / "last.pt"), weights(tmp_path / "acc" / "stage1" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_max_grad_norm_scales_a_larger_gradient_down_to_it():
    # The update's gradient keeps its direction; its global norm is cut to max_grad_norm where larger, and a
    # gradient within the limit is left alone.
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", TINY)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 3, 49, 49, generator=g), "label": torch.randint(0, 6, (2, 49, 49), generator=g)}
    grads = {}
    for limit in (0.0, 1e-3, 1e6):
        torch.manual_seed(0)
        model = train.build_network(cfg)
        stage = dataclasses.replace(cfg.stage1, max_grad_norm=limit)
        optimizer = train.build_optimizer(model, stage)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        with StopRequest() as stop:
            _, problem, _, _ = train.optimizer_step(model, optimizer, scaler, [batch], stage=stage,
                                                 device=torch.device("cpu"), dtype=None, stop=stop)
        assert problem == ""
        grads[limit] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    full = grads[0.0]
    assert full.norm() > 1e-2
    torch.testing.assert_close(grads[1e-3], full * (1e-3 / full.norm()))
    torch.testing.assert_close(grads[1e-3].norm(), torch.tensor(1e-3))
    assert torch.equal(grads[1e6], full)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train.main(TINY + ["stage1.iterations=10", "stage2.iterations=0", "stage1.lr=1e30",
                            "stage1.checkpoint_every=1", f"out_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "stage 1 (DeepLab v2), step 2: the loss is nan (not finite); stopped without applying the update" in err
    assert f"the last good checkpoint is {out / 'stage1' / 'last.pt'} (step 1)" in err
    assert "stage1.lr=1e+29" in err
    ckpt = load_checkpoint(out / "stage1" / "last.pt")
    assert ckpt["step"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_resume_with_a_new_learning_rate_uses_it(tmp_path):
    out = tmp_path / "run"
    args = TINY + ["stage1.iterations=6", "stage2.iterations=0", "grid_search.enabled=false", f"out_dir={out}"]
    assert train.main(args + ["stage1.lr=0.02", "--stop-after", "2"]) == 0
    assert train.main(["--resume", str(out), "stage1.lr=0.001"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    assert lr[2] == pytest.approx(0.02 * (1 - 2 / 6) ** 0.9) and lr[3] == pytest.approx(0.001 * (1 - 3 / 6) ** 0.9)
    assert load_config(out / "config.yaml").stage1.lr == 0.001


@pytest.mark.parametrize(
    "args, message",
    [
        (["stage1.lrr=1"], "error: unknown config key 'stage1.lrr'"),
        (["stage1.iterations=ten"], "error: stage1.iterations: expected int, got str 'ten'"),
        (["data.dataset=cityscapes"], "error: data.root is required for dataset 'cityscapes'"),
        (["--config", "configs/nope.yaml"], "error: config file not found: configs/nope.yaml"),
        (["--resume", "/nonexistent/run"], "error: nothing to resume in /nonexistent/run"),
    ],
)
def test_command_line_errors_are_clear(args, message, capsys):
    assert train.main(args) == 2
    assert message in capsys.readouterr().err


def test_missing_data_root_directory(tmp_path, capsys):
    rc = train.main(["--config", str(ROOT / "configs" / "voc12_deeplabv2.yaml"), f"data.root={tmp_path / 'nope'}",
                     f"out_dir={tmp_path / 'run'}"])
    assert rc == 1 and f"data.root='{tmp_path / 'nope'}' is not a directory" in capsys.readouterr().err


def test_sliding_window_matches_whole_image_for_a_pointwise_network():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 4, 1)
    image = torch.randn(2, 3, 37, 50)
    out = sliding_window_logits(net, image, window=16, stride=10)
    torch.testing.assert_close(out, net(image))
    small = sliding_window_logits(net, image[:, :, :9, :9], window=16, stride=10)  # padded, then cropped
    torch.testing.assert_close(small, net(image[:, :, :9, :9]))


def test_sliding_window_refuses_a_stride_that_leaves_gaps():
    net = torch.nn.Conv2d(3, 4, 1)
    with pytest.raises(ValueError, match=r"stride must be an int in \[1, window=16\]"):
        sliding_window_logits(net, torch.randn(1, 3, 40, 40), window=16, stride=17)
    with pytest.raises(ValueError, match="window must be a positive int"):
        sliding_window_logits(net, torch.randn(1, 3, 40, 40), window=0, stride=1)


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("autocast", [False, True])
def test_evaluation_refuses_logits_that_are_not_finite(window, autocast):
    class Overflowing(torch.nn.Module):  # 2 classes; two logits of the second image overflow
        def forward(self, x):
            logits = x[:, :2].clone()
            if len(x) > 1:
                logits[1, 0, 0, :2] = torch.tensor([float("inf"), float("nan")])
            return logits

    evaluate = Evaluator(num_classes=2, device=torch.device("cpu"), window=window, stride=window)
    image = torch.zeros(2, 3, 20, 24)
    assert torch.isfinite(evaluate.logits(Overflowing(), image[:1])).all()  # the first image alone is scored
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with pytest.raises(NonFiniteLogitsError, match=r"for 2 evaluation image\(s\) hold (\d+) NaN or inf") as e:
            evaluate.logits(Overflowing(), image)
    assert ("under bfloat16 autocast (amp=false evaluates in float32)" in str(e.value)) == autocast
    if window is None:
        assert "hold 2 NaN or infinite value(s) of 1920" in str(e.value)


def test_evaluation_batches_hold_images_of_one_size():
    samples = [{"image": torch.zeros(3, h, 5), "id": str(i)} for i, h in enumerate((4, 4, 6, 4))]
    batches = collate_by_size(samples)
    assert [(b["image"].shape[0], b["image"].shape[2], b["id"]) for b in batches] == [
        (2, 4, ["0", "1"]), (1, 6, ["2"]), (1, 4, ["3"])]  # in order: runs of one size


def test_training_batches_do_not_depend_on_workers_and_restart_mid_epoch():
    raw = SyntheticSegmentation(split="train", num_images=10, seed=3, size=40)
    samples = SeededAugmentation(raw, TrainTransform(TORCHVISION_CONVENTION, crop_size=33, seed=0), seed=5)

    def stream(workers, state=None, count=7):
        batches = TrainBatches(samples, batch_size=3, workers=workers, seed=5)
        if state is not None:
            batches.load_state_dict(state)
        out = [next(batches) for _ in range(count)]
        return out, batches.state_dict()

    plain, state = stream(0)
    assert state == {"epoch": 2, "batch": 1}  # 3 batches per epoch (10 // 3), so two epochs and one batch
    parallel, _ = stream(2)
    resumed, _ = stream(2, state={"epoch": 1, "batch": 2}, count=2)  # batches 6 and 7 of the plain stream
    for a, b in zip(plain, parallel):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    for a, b in zip(plain[5:], resumed):
        assert torch.equal(a["image"], b["image"])
    assert not torch.equal(plain[0]["image"], plain[3]["image"])  # each epoch is shuffled and augmented anew


def _kill_during_saves(path: Path, delay: float) -> None:
    script = (
        "import sys, torch\n"
        "from crfrnn_deeplab.weights.checkpoint import save_checkpoint\n"
        "i = 0\n"
        "while True:\n"
        "    save_checkpoint(sys.argv[1], {'model': {'w': torch.full((2_000_000,), float(i))}, 'step': i})\n"
        "    print(i, flush=True)\n"
        "    i += 1\n"
    )
    proc = subprocess.Popen([PYTHON, "-c", script, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    proc.stdout.readline()  # one complete save
    time.sleep(delay)
    proc.kill()
    proc.wait()
    proc.stdout.close()


@pytest.mark.slow
def test_a_killed_save_never_leaves_a_corrupt_last_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    for delay in (0.0, 0.013, 0.05, 0.11):
        _kill_during_saves(path, delay)
        ckpt = load_checkpoint(path)  # complete, whatever moment the kill hit
        assert torch.equal(ckpt["model"]["w"], torch.full((2_000_000,), float(ckpt["step"])))
    remove_stale_temporaries(tmp_path)  # what a resumed run does with the killed writes' leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    args = TINY + ["stage1.iterations=400", "stage2.iterations=0", "grid_search.enabled=false", "log_every=5",
                   "stage1.checkpoint_every=1000"]
    out = tmp_path / "run"
    proc = subprocess.Popen([PYTHON, "train.py", *args, f"out_dir={out}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM; checkpoint:" in err and f"python train.py --resume {out}" in err
    stopped_at = load_checkpoint(out / "stage1" / "last.pt")["step"]
    assert 0 < stopped_at < 400
    assert train.main(["--resume", str(out)]) == 0
    assert train.main(args + [f"out_dir={tmp_path / 'straight'}"]) == 0
    assert_same_weights(weights(out / "stage1" / "last.pt"), weights(tmp_path / "straight" / "stage1" / "last.pt"))


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    common = TINY + ["model.options.norm=frozen", "stage1.iterations=4", "stage2.iterations=3",
                     "stage1.eval_every=2", "threads=1", "stage1.lr=0.05", "stage2.lr=0.01"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(common + ["stage1.batch_size=4", "stage2.batch_size=4", f"out_dir={one}"]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
         "stage1.batch_size=2", "stage2.batch_size=2", f"out_dir={two}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    # every checkpoint write compares the replicas' parameter checksums and fails if they differ
    assert result.returncode == 0, result.stderr[-3000:]
    init = train.build_network(load_config(ROOT / "configs" / "synthetic.yaml", common)).state_dict()
    for stage in ("stage1", "stage2"):
        a, b = weights(one / stage / "last.pt"), weights(two / stage / "last.pt")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    trained = weights(one / "stage1" / "last.pt")
    moved = max((trained[k] - init[k]).abs().max() for k in init if init[k].is_floating_point())
    assert moved > 1e-2  # the comparison is not vacuous
    assert json.loads((two / "results.json").read_text())["results"].keys() == \
        json.loads((one / "results.json").read_text())["results"].keys()
