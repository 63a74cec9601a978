"""Throughput of the training data pipeline (decode + DeepLab v2 augmentation + collation) at 321x321.

Measures images per second through a ``DataLoader`` for
(a) the embedded synthetic dataset rendered at 321x321, and
(b) a VOC-layout folder of ~500x375 JPEGs with palette-PNG labels, which the script writes into a temporary
    directory first (the images are synthetic renders, so they compress like photographs with edges).

Usage::

    python benchmarks/bench_data.py [--workers 2] [--batch-size 10] [--batches 40] [--num-images 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from crfrnn_deeplab.data import SyntheticSegmentation, VOCSegmentation, render_synthetic, voc_colormap
from crfrnn_deeplab.models.conventions import TORCHVISION_CONVENTION
from crfrnn_deeplab.data.transforms import TrainTransform


def write_voc_folder(root: Path, num_images: int, height: int = 375, width: int = 500) -> None:
    """Write ``num_images`` JPEGs and palette PNGs (with a 255 border band) in the VOC 2012 layout."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_colormap().ravel().tolist()
    ids = []
    for i in range(num_images):
        image, label = render_synthetic(np.random.default_rng([12345, i]), height, width)
        border = np.zeros(label.shape, dtype=bool)
        border[:, 1:] |= label[:, 1:] != label[:, :-1]
        border[1:] |= label[1:] != label[:-1]
        label[border] = 255
        name = f"2012_{i:06d}"
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        png = Image.frombytes("P", (width, height), label.tobytes())
        png.putpalette(palette)
        png.save(root / "SegmentationClass" / f"{name}.png")
        ids.append(name)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")


def measure(dataset, *, batch_size: int, workers: int, batches: int) -> tuple[float, float]:
    """Images/s through a shuffled DataLoader: (steady state after the first batch, including start-up)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    n = 0
    start = time.perf_counter()
    it = iter(loader)
    batch = next(it)
    first = time.perf_counter()
    for batch in it:
        n += batch["image"].shape[0]
        if n >= batches * batch_size:
            break
    end = time.perf_counter()
    assert batch["image"].shape[1:] == (3, 321, 321)
    return n / (end - first), (n + batch_size) / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--batches", type=int, default=40, help="timed batches after the first")
    parser.add_argument("--num-images", type=int, default=300, help="JPEGs written for the VOC-layout folder")
    args = parser.parse_args()

    torch.manual_seed(0)
    transform = TrainTransform(TORCHVISION_CONVENTION, crop_size=321)
    total = args.batch_size * (args.batches + 1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.workers} workers, batch {args.batch_size}, "
          f"{args.batches} timed batches, crop 321x321, TrainTransform (scale 0.5-1.5, pad, crop, flip)")

    synthetic = SyntheticSegmentation(num_images=max(total, 1000), size=321, transform=transform)
    steady, overall = measure(synthetic, batch_size=args.batch_size, workers=args.workers, batches=args.batches)
    print(f"(a) synthetic 321x321 rendered on the fly: {steady:7.1f} img/s  ({overall:.1f} img/s with worker start-up)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "VOC2012"
        t0 = time.perf_counter()
        write_voc_folder(root, args.num_images)
        size_mb = sum(p.stat().st_size for p in (root / "JPEGImages").iterdir()) / 2**20
        print(f"    wrote {args.num_images} JPEGs 500x375 ({size_mb:.1f} MiB) + palette PNGs in "
              f"{time.perf_counter() - t0:.1f} s")
        voc = VOCSegmentation(root, split="train", transform=transform)
        batches = min(args.batches, len(voc) // args.batch_size - 1)
        steady, overall = measure(voc, batch_size=args.batch_size, workers=args.workers, batches=batches)
        print(f"(b) VOC-layout JPEG 500x375 + PNG labels:   {steady:7.1f} img/s  ({overall:.1f} img/s with worker "
              f"start-up)")

        # where the time goes, in this process on one thread
        torch.set_num_threads(1)
        plain = VOCSegmentation(root, split="train")
        k = min(50, len(plain))
        t0 = time.perf_counter()
        samples = [plain[i] for i in range(k)]
        t1 = time.perf_counter()
        for s in samples:
            transform(s)
        t2 = time.perf_counter()
        print(f"    per image on one core: decode JPEG + PNG + checks {1e3 * (t1 - t0) / k:.2f} ms, "
              f"augment + to tensors {1e3 * (t2 - t1) / k:.2f} ms")


if __name__ == "__main__":
    main()
