"""Prediction throughput (issue #7): images/s at 513×513 for a DeepLab v2 network alone and with the CRF layer
(10 mean-field iterations), eager and under ``torch.compile``.

What is timed is ``model.predict`` (numpy image in, labels and probabilities out, as a user calls it) and, for
the compiled variants, the same computation with ``torch.compile``'d network and CRF modules. Each variant's
first call (with its compilation) is timed apart; then every variant runs once per round, in an order that
rotates from round to round, and the median of the rounds is reported with each variant's time relative to the
eager network's in the same round (median and range).

    python benchmarks/bench_predict.py                       # CPU, 2 threads, deeplabv2_resnet101
    python benchmarks/bench_predict.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_crf import ratio_range, timed_rounds  # noqa: E402

from crfrnn_deeplab import CRFRNN, MeanFieldCRF, get_model
from crfrnn_deeplab.data.synthetic import render_synthetic
from crfrnn_deeplab.allocator import retain_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deeplabv2_resnet101")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (one call of each variant per round)")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    network = get_model(args.model, num_classes=21).eval().to(device)
    model = CRFRNN(network=network, crf=MeanFieldCRF(num_classes=21, eval_iterations=10)).eval().to(device)
    image, _ = render_synthetic(np.random.default_rng(0), args.size, args.size)
    raw = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)

    rows = {
        "network, eager (model.predict)": lambda: model.predict(image, crf=False),
        "network + CRF, eager (model.predict)": lambda: model.predict(image),
    }
    if not args.no_compile:
        compiled_net = torch.compile(network)
        compiled_crf = torch.compile(model.crf)  # graph breaks where the lattice's sizes depend on the data

        @torch.no_grad()
        def compiled(with_crf: bool):
            logits = compiled_net(network.preprocess(raw))
            if with_crf:
                logits = compiled_crf(logits, raw)
            return torch.softmax(logits, 1).argmax(1).cpu()

        rows["network, torch.compile"] = lambda: compiled(False)
        rows["network + CRF, torch.compile (both)"] = lambda: compiled(True)

        @torch.no_grad()
        def compiled_net_eager_crf():
            logits = model.crf(compiled_net(network.preprocess(raw)), raw)
            return torch.softmax(logits, 1).argmax(1).cpu()

        rows["network + CRF, compiled network, eager CRF"] = compiled_net_eager_crf
    first = {}
    for name, fn in rows.items():  # warm-up, and compilation
        start = time.perf_counter()
        fn()
        sync()
        first[name] = time.perf_counter() - start
    times = timed_rounds(rows, args.repeats, sync)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}; {args.model}, {args.size}×{args.size}, 21 classes, CRF 10 iterations, "
          f"{where}; {args.repeats} rounds, medians")
    print(f"{'what':<46}{'s/image':>9}{'images/s':>10}{'× network, eager: median (range)':>36}")
    reference = times["network, eager (model.predict)"]
    for name, t in times.items():
        median = statistics.median(t)
        extra = f"  (first call incl. compilation: {first[name]:.0f} s)" if "compile" in name else ""
        print(f"{name:<46}{median:>9.3f}{1 / median:>10.2f}{ratio_range(t, reference):>36}{extra}")


if __name__ == "__main__":
    main()
