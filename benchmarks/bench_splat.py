"""The lattice's splat, blocked (``BlockedRows``, what the CPU build makes above 16 384 points) against the plain
one-pass splat (``SparseRows``) of the same lattice, timed in interleaved pairs.

    python benchmarks/bench_splat.py                 # 1 thread
    python benchmarks/bench_splat.py --threads 2

Cases: the 500×375 synthetic scene of ``bench_crf.py`` (densecrf's parameters; 21 channels as in inference, 1 as
for the normaliser) and its 96³ volume (3 channels). Prints, per case, the median ms of each and the median and
range of the per-pair ratios blocked / plain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_crf import DENSECRF_PARAMS, VOLUME_PARAMS, scene, timed_pairs, volume_scene  # noqa: E402

from crfrnn_deeplab.allocator import retain_freed_memory  # noqa: E402
from crfrnn_deeplab.crf import MeanFieldCRF  # noqa: E402
from crfrnn_deeplab.crf import lattice as permutohedral  # noqa: E402


def splats(crf: MeanFieldCRF, guidance: torch.Tensor):
    """The splat of the batch's lattice as built (blocked) and with blocking off (plain)."""
    with torch.no_grad():
        blocked = crf.kernels(guidance).lattice.splat
        saved = permutohedral._SPLAT_BLOCK
        permutohedral._SPLAT_BLOCK = 2**62  # every lattice fits one block: the plain splat
        try:
            plain = crf.kernels(guidance).lattice.splat
        finally:
            permutohedral._SPLAT_BLOCK = saved
    return blocked, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()

    image, _ = scene(375, 500, 21)
    photo = MeanFieldCRF(num_classes=21, **DENSECRF_PARAMS).eval()
    volume, _ = volume_scene((96, 96, 96))
    cube = MeanFieldCRF(num_classes=3, spatial_dims=3, guidance_groups=(1,), **VOLUME_PARAMS).eval()
    photo_splats = splats(photo, torch.from_numpy(image).permute(2, 0, 1)[None].float())
    cases = [
        ("500×375, 21 channels", photo_splats, 21),
        ("500×375, 1 channel", photo_splats, 1),
        ("96³, 3 channels", splats(cube, torch.from_numpy(volume)[None, None]), 3),
    ]
    print(f"splat, {args.threads} thread(s), {args.repeats} interleaved pairs")
    print(f"{'case':<24}{'parts':>8}{'plain ms':>10}{'blocked ms':>12}{'ratio':>8}{'range':>13}")
    for name, (blocked, plain), channels in cases:
        values = torch.rand(plain.num_columns, channels)
        torch.testing.assert_close(blocked @ values, plain @ values, rtol=1e-5, atol=1e-5)
        t_plain, t_blocked, ratios = timed_pairs(lambda: plain @ values, lambda: blocked @ values, args.repeats, 1)
        parts = getattr(blocked, "parts", blocked).num_rows
        print(f"{name:<24}{parts:>8}{t_plain * 1e3:>10.2f}{t_blocked * 1e3:>12.2f}{statistics.median(ratios):>8.2f}"
              f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>13}")


if __name__ == "__main__":
    main()
