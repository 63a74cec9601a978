"""Time DeepLab v2 ResNet-101 against torchvision's DeepLab v3 ResNet-101 in the same run.

Measures a forward pass (eval mode, no_grad) and a forward+backward pass (train mode, cross-entropy against a
random target) of ``deeplabv2_resnet101`` and of ``torchvision.models.segmentation.deeplabv3_resnet101``
(both randomly initialised, output stride 8, nothing downloaded): warm-up runs, then the median (and the
minimum) of ``--repeats`` timed runs. The timed runs alternate between the two models, each pair in the other
order than the last, so that both see the same machine load; the ratio is the median (and range) of the pairs'
own ratios.

Both models train with frozen BatchNorm (eval-mode statistics, affine parameters not trained): ours does so by
default (DeepLab v2), and torchvision's model is frozen the same way here, which also makes its image-pooling
ASPP branch trainable at batch size 1.

Usage::

    python benchmarks/bench_network.py                     # CPU, 2 threads, 321x321, batch 1
    python benchmarks/bench_network.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_crf import timed_rounds  # noqa: E402

from crfrnn_deeplab.models.registry import get_model  # noqa: E402


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=321, help="image side in pixels (default 321)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (default cpu)")
    return parser.parse_args()


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def _runners(
    model: nn.Module, logits_of: Callable[[Any], torch.Tensor], x: torch.Tensor, target: torch.Tensor
) -> dict[str, Callable[[], None]]:
    """The two measured operations for one model."""

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            logits_of(model(x))

    def forward_backward() -> None:
        model.train()
        _freeze_batchnorm(model)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits_of(model(x)), target).backward()

    return {"forward": forward, "fwd+bwd": forward_backward}


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    torch.manual_seed(0)

    ours = get_model("deeplabv2_resnet101", num_classes=args.num_classes).to(device)
    theirs = torchvision.models.segmentation.deeplabv3_resnet101(
        weights=None, weights_backbone=None, num_classes=args.num_classes, aux_loss=False
    ).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, args.num_classes, (args.batch, args.size, args.size), device=device)

    models = {"crfrnn_deeplab deeplabv2_resnet101": ours, "torchvision deeplabv3_resnet101": theirs}
    runners = {
        "crfrnn_deeplab deeplabv2_resnet101": _runners(ours, lambda out: out, x, target),
        "torchvision deeplabv3_resnet101": _runners(theirs, lambda out: out["out"], x, target),
    }
    # Repeats alternate between the models (each pair in the other order than the last), so that both see the
    # same machine load.
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: dict[str, dict[str, list[float]]] = {m: {} for m in runners}
    for op in ("forward", "fwd+bwd"):
        for _ in range(args.warmup):
            for model_runners in runners.values():
                model_runners[op]()
        sync()
        seconds = timed_rounds({m: r[op] for m, r in runners.items()}, args.repeats, sync)
        for model_name, t in seconds.items():
            times[model_name][op] = [1e3 * x for x in t]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"device: {name} | input {args.batch}x3x{args.size}x{args.size} | {args.num_classes} classes | "
        f"median (min) of {args.repeats} after {args.warmup} warm-up | torch {torch.__version__}"
    )
    print(f"{'model':<37}{'params':>12}{'forward ms':>20}{'fwd+bwd ms':>20}")
    for model_name, t in times.items():
        n_params = sum(p.numel() for p in models[model_name].parameters())
        cells = [f"{statistics.median(t[op]):.1f} ({min(t[op]):.1f})" for op in ("forward", "fwd+bwd")]
        print(f"{model_name:<37}{n_params:>12,}{cells[0]:>20}{cells[1]:>20}")
    ours_t, theirs_t = times.values()
    cells = []
    for op in ("forward", "fwd+bwd"):
        ratios = [o / t for o, t in zip(ours_t[op], theirs_t[op])]
        cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
    print(f"{'ratio ours / torchvision, per pair':<37}{'':>12}{cells[0]:>20}{cells[1]:>20}")


if __name__ == "__main__":
    main()
