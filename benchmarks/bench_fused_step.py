"""The training iterations as one autograd node (crf/fused_step.py) against the separate operations of autograd.

Forward + backward of the CRF (learned weights and compatibility, symmetric normalisation; bandwidths fixed —
``fixed_bandwidth_iterations`` — or with ``--learned`` learned too — ``learned_iterations``):

- time: fused / separate, both in one process, timed in interleaved pairs (the order alternates), median and
  range of the per-pair ratios;
- memory: peak RSS above the inputs of one forward + backward, each mode in a fresh process.

    python benchmarks/bench_fused_step.py                       # 321×321, batch 4, 21 classes, 2 threads
    python benchmarks/bench_fused_step.py --batch 1 --pairs 12
    python benchmarks/bench_fused_step.py --learned             # the learned-bandwidth node
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_crf import DENSECRF_PARAMS, _high_water_mib, scene  # noqa: E402

from crfrnn_deeplab.allocator import retain_freed_memory  # noqa: E402
from crfrnn_deeplab.crf import MeanFieldCRF, fused_step  # noqa: E402
from crfrnn_deeplab.crf.mean_field import mean_field_steps  # noqa: E402

NODES = (fused_step.applies, fused_step.learned_iterations)


def setup(size: int, batch: int, classes: int, learned: bool):
    """A training-mode CRF (bandwidths learned or fixed), and a step running forward + backward on a batch."""
    image, logits = scene(size, size, classes)
    crf = MeanFieldCRF(num_classes=classes, train_iterations=5, learn_bandwidths=learned, **DENSECRF_PARAMS).train()
    z = torch.from_numpy(logits)[None].repeat(batch, 1, 1, 1).requires_grad_(True)
    im = torch.from_numpy(image).permute(2, 0, 1)[None].float().repeat(batch, 1, 1, 1)

    def step() -> None:
        crf.zero_grad()
        z.grad = None
        crf(z, im).square().mean().backward()

    return step


def use_fused(on: bool) -> None:
    """The layer's iterations as the one node, or (off) as autograd's nodes: mean_field_steps, applies False."""
    fused_step.applies, fused_step.learned_iterations = NODES if on else ((lambda kernels: False), mean_field_steps)


def child_memory(args) -> None:
    """Fresh process: one forward + backward in the mode asked for; prints JSON {peak_mib}."""
    use_fused(args.child_memory == "fused")
    torch.manual_seed(0)
    step = setup(args.size, args.batch, args.classes, args.learned)
    base = _high_water_mib()
    step()
    print(json.dumps({"peak_mib": _high_water_mib() - base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=321)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--learned", action="store_true", help="bandwidths learned (the learned-bandwidth node)")
    parser.add_argument("--child-memory", choices=["fused", "separate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args)
        return
    retain_freed_memory()
    print(f"torch {torch.__version__}, {args.threads} threads; CRF 5 iterations forward+backward, bandwidths "
          f"{'learned' if args.learned else 'fixed'}, {args.size}×{args.size}, batch {args.batch}, {args.classes} "
          "classes")
    step = setup(args.size, args.batch, args.classes, args.learned)
    for on in (True, False, True, False):  # warm-up
        use_fused(on)
        step()
    times, ratios = {True: [], False: []}, []
    for i in range(args.pairs):
        spent = {}
        for on in (True, False) if i % 2 else (False, True):
            use_fused(on)
            start = time.perf_counter()
            step()
            spent[on] = time.perf_counter() - start
            times[on].append(spent[on])
        ratios.append(spent[True] / spent[False])
    use_fused(True)
    fused_ms, separate_ms = (statistics.median(times[on]) * 1e3 for on in (True, False))
    print(f"time: fused {fused_ms:.1f} ms, separate {separate_ms:.1f} ms; fused / separate median "
          f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}), {args.pairs} interleaved pairs")
    peaks = {}
    for mode in ("fused", "separate"):
        cmd = [sys.executable, __file__, "--child-memory", mode, "--size", str(args.size), "--batch", str(args.batch),
               "--classes", str(args.classes), "--threads", str(args.threads)] + (["--learned"] if args.learned else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[mode] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    print(f"peak RSS above the inputs, forward+backward, fresh process: fused {peaks['fused']:.0f} MiB, separate "
          f"{peaks['separate']:.0f} MiB ({peaks['fused'] / peaks['separate']:.2f}×)")


if __name__ == "__main__":
    main()
