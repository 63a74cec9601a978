"""The spatial Gaussian's pass along a leading axis on the CPU: banded matrix products against the depthwise
convolution, in the same process.

    python benchmarks/bench_spatial.py [--threads 1] [--pairs 9]

For each shape (images × rows × values per row, the channels-last layout the CRF keeps) and bandwidth, the two
routes of ``crfrnn_deeplab.crf.spatial._leading_axis`` run in interleaved pairs (the order alternating), chosen
by its ``_BAND_MIN_VALUES`` threshold; printed: both medians and the median (range) of the per-pair ratios
banded / convolution, and whether the two outputs are bitwise equal (float32).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from crfrnn_deeplab.allocator import retain_freed_memory
from crfrnn_deeplab.crf import spatial

# (images, rows, pixels per row, channels, θ in pixels, what it is)
CASES = [
    (1, 375, 500, 21, 3.0, "500×375 photo, 21 classes"),
    (1, 375, 500, 16, 3.0, "500×375, 16 channels"),
    (1, 375, 500, 8, 3.0, "500×375, 8 channels"),
    (1, 321, 321, 21, 3.0, "321² crop, 21 classes"),
    (4, 321, 321, 21, 3.0, "321² crops, batch 4"),
    (1, 375, 500, 21, 1.0, "θγ = 1"),
    (1, 375, 500, 21, 8.0, "θγ = 8"),
    (1, 96, 96 * 96, 3, 2.0, "96³ volume, first axis"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=9)
    args = parser.parse_args()
    retain_freed_memory()
    torch.set_num_threads(args.threads)
    threshold = spatial._BAND_MIN_VALUES
    print(f"leading-axis pass, {args.threads} thread(s), {args.pairs} interleaved pairs")
    print(f"{'case':<52}{'conv ms':>9}{'banded ms':>11}{'banded / conv':>22}{'equal':>7}")
    for images, rows, pixels, channels, theta, what in CASES:
        x = torch.rand(images, rows, pixels * channels, generator=torch.Generator().manual_seed(0))
        taps = spatial.gaussian_taps(torch.tensor(theta), rows)

        def run(banded: bool) -> tuple[float, torch.Tensor]:
            spatial._BAND_MIN_VALUES = threshold if banded else 1 << 62
            start = time.perf_counter()
            out = spatial._leading_axis(x, taps, channels).contiguous()
            return time.perf_counter() - start, out

        equal = torch.equal(run(True)[1], run(False)[1])  # (also the warm-up)
        times = {True: [], False: []}
        for i in range(args.pairs):
            for banded in (i % 2 == 0, i % 2 != 0):
                times[banded].append(run(banded)[0])
        ratios = [b / c for b, c in zip(times[True], times[False])]
        spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"{what:<52}{statistics.median(times[False]) * 1e3:>9.2f}{statistics.median(times[True]) * 1e3:>11.2f}"
              f"{spread:>22}{str(equal):>7}")
    spatial._BAND_MIN_VALUES = threshold


if __name__ == "__main__":
    main()
