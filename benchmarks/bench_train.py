"""Training throughput (issue #5): images/s of one ``train.py`` optimiser step at 321×321 for
``deeplabv2_resnet101`` alone (stage 1) and with the CRF layer (stage 2, CRF-as-RNN), and the CRF's share.

The step is train.py's own (``optimizer_step``: forward, loss, backward, SGD update with DeepLab's parameter
groups), on synthetic images, so the figures are what a training run pays. Both models are measured in the
same process in rounds, one step of each, in alternating order; the medians of the steps are reported, and the
stage-2 / stage-1 ratio and the CRF's share as the median (range) of the rounds' own.

    python benchmarks/bench_train.py                      # CPU, 2 threads, batch 1
    python benchmarks/bench_train.py --device cuda --batch 10 --repeats 20   # CUDA (mixed precision)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_crf import ratio_range, timed_rounds  # noqa: E402

from crfrnn_deeplab import CRFRNN
from crfrnn_deeplab.training.config import load_config
from crfrnn_deeplab.data.synthetic import render_synthetic
from crfrnn_deeplab.allocator import retain_freed_memory

ROOT = Path(__file__).resolve().parents[1]


def import_train():
    spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module
    spec.loader.exec_module(module)
    return module


def batch_of(size: int, batch: int, num_classes: int, network) -> dict[str, torch.Tensor]:
    """A training batch as train.py's data pipeline delivers it (image, raw, label, valid)."""
    rng = np.random.default_rng(0)
    images, labels = zip(*(render_synthetic(rng, size, size) for _ in range(batch)))
    raw = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    label = torch.from_numpy(np.stack(labels) % num_classes).long()
    return {"image": network.preprocess(raw), "raw": raw, "label": label,
            "valid": torch.ones(batch, size, size, dtype=torch.bool)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=321)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (one step of each model per round)")
    parser.add_argument("--model", default="deeplabv2_resnet101", help="single-scale by default (as the issue)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    train = import_train()
    device = torch.device(args.device)
    cfg = load_config(ROOT / "configs" / "voc12_crfrnn.yaml",
                      [f"model.name={args.model}", f"stage1.batch_size={args.batch}", f"stage2.batch_size={args.batch}",
                       "stage1.iterations=1000", f"amp={device.type == 'cuda'}", "data.root=unused",
                       # a randomly initialised ResNet-101 with frozen BatchNorm diverges at real learning rates;
                       # the cost of a step does not depend on the rate's value
                       "stage1.lr=1e-12", "stage2.lr=1e-12", "stage2.crf_lr=1e-12"])
    network = train.build_network(cfg).to(device)
    models = {"network (stage 1)": network,
              "network + CRF, 5 iterations (stage 2)": CRFRNN(network=network, crf=train.build_crf(cfg)).to(device)}
    batch = batch_of(args.size, args.batch, cfg.model.num_classes, network)
    dtype = train.autocast_dtype(cfg, device)
    steps = {}
    for name, model in models.items():
        stage = cfg.stage1 if name.startswith("network (") else cfg.stage2
        optimizer = train.build_optimizer(model, stage)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        model.train()

        def step(model=model, optimizer=optimizer, scaler=scaler, stage=stage):
            train.optimizer_step(model, optimizer, scaler, [batch], stage=stage, device=device, dtype=dtype,
                                 stop=train.StopRequest())

        step()  # warm-up
        steps[name] = step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = timed_rounds(steps, args.repeats, sync)
    where = f"{torch.cuda.get_device_name(device)}, {dtype}" if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}; {args.model}, {args.size}×{args.size}, batch {args.batch}, {where}; "
          f"{args.repeats} rounds of one train.py optimiser step per model, medians")
    print(f"{'model':<42}{'s/step':>9}{'images/s':>10}")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"{name:<42}{median:>9.3f}{args.batch / median:>10.2f}")
    net_t, crf_t = times.values()
    crf_part = [c - n for c, n in zip(crf_t, net_t)]
    print(f"stage 2 step / stage 1 step, per round: {ratio_range(crf_t, net_t)}; the CRF layer's share of a stage-2 "
          f"step: {ratio_range(crf_part, crf_t, scale=100, digits=1)} %")


if __name__ == "__main__":
    main()
