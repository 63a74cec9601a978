"""Training infrastructure behind ``train.py``: resumable data streams, the loss, the schedule, RNG state,
signal handling, metric records and sliding-window inference.

Everything here is plain functions and small classes that take explicit arguments; ``train.py`` composes them
and reads the config.

Reproducibility: a training sample's augmentation is seeded from ``(seed, epoch, index)``
(:class:`SeededAugmentation`), the sampler shuffles from ``(seed, epoch)`` and can start in the middle of an
epoch (:class:`TrainBatches`), so a resumed run sees exactly the batches the uninterrupted run would have
seen, in one process or in ``N`` (each rank gets its share of the same global batch), whatever the number of
DataLoader workers (:meth:`~crfrnn_deeplab.TrainTransform.seed_sample` overrides the per-worker seeding).
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from crfrnn_deeplab.models.msc import MSCOutput

__all__ = [
    "SeededAugmentation",
    "TrainSampler",
    "TrainBatches",
    "derive_seed",
    "segmentation_loss",
    "poly_schedule",
    "rng_state",
    "set_rng_state",
    "StopRequest",
    "MetricsWriter",
    "sliding_window_logits",
    "format_table",
]

logger = logging.getLogger(__name__)


def derive_seed(*entropy: int) -> int:
    """A 32-bit seed mixed from integers (``numpy.random.SeedSequence``): independent streams per key."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


class SeededAugmentation(Dataset):
    """``dataset[(epoch, index)]``: the raw sample ``index`` through ``transform`` seeded from
    ``(seed, epoch, index)``, so a sample's augmentation does not depend on what was drawn before it.

    Args:
        dataset: a dataset returning raw sample dicts (built with ``transform=None``).
        transform: a transform with ``seed_sample(int)``, e.g. :class:`~crfrnn_deeplab.TrainTransform`.
        seed: the run's seed.
    """

    def __init__(self, dataset: Dataset, transform: Any, *, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        self.transform.seed_sample(derive_seed(self.seed, epoch, index))
        return self.transform(self.dataset[index])


class TrainSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` (shuffled, ``drop_last``) that yields ``(epoch, index)``
    keys for :class:`SeededAugmentation` and can start ``start`` samples into the epoch (resuming).

    The permutation depends on ``(seed, epoch)`` and the dataset length only, and rank ``r`` of ``N`` gets
    positions ``r, r + N, …``: ``N`` ranks with batch ``B`` together see the same global batches of ``N·B``
    images as one process with batch ``N·B``.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start :]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


class TrainBatches:
    """An endless stream of training batches, epoch after epoch, whose position can be saved and restored.

    Args:
        dataset: a :class:`SeededAugmentation`.
        batch_size: images per batch (per process).
        workers: DataLoader worker processes.
        seed: seeds the shuffling (per epoch, see :class:`TrainSampler`).
        rank, world_size: this process's share (see :class:`TrainSampler`).
        pin_memory: pin batches (CUDA).

    Attributes:
        epoch: the epoch of the next batch.
        batch: how many batches of that epoch have been taken.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        workers: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        self.batch_size = batch_size
        self.sampler = TrainSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
        if self.sampler.num_samples < batch_size:
            raise ValueError(
                f"{len(dataset)} training images are fewer than one batch of {batch_size} per process "
                f"({world_size} process(es)); lower the batch size or add images"
            )
        # The loader's own generator only draws the workers' base seeds, which no sample depends on
        # (SeededAugmentation); it keeps the loader from consuming the global torch RNG that checkpoints restore.
        self._generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            drop_last=True,
            generator=self._generator,
            pin_memory=pin_memory,
        )
        self.epoch, self.batch = 0, 0
        self._iterator: Iterator | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._iterator = None

    def _start_epoch(self) -> None:
        # Every sample's augmentation is seeded from its key, so starting in the middle of an epoch only needs
        # the sampler to skip the batches already taken (the workers' own seeds play no part).
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.batch * self.batch_size
        self._iterator = iter(self.loader)

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._start_epoch()
        batch = next(self._iterator, None)
        if batch is None:  # end of the epoch
            self.epoch, self.batch = self.epoch + 1, 0
            self._start_epoch()
            batch = next(self._iterator)
        self.batch += 1
        return batch

    def close(self) -> None:
        """Stops the worker processes of the current epoch."""
        self._iterator = None


def segmentation_loss(output: Tensor | MSCOutput, label: Tensor, *, normaliser: Tensor | float,
                      ignore_index: int = 255) -> Tensor:
    """Summed pixel cross-entropy divided by ``normaliser``, on the full-resolution logits; for MSC, on the
    fused logits and on each scale's (DeepLab v2 trains every scale).

    Dividing the sum by the number of labelled pixels in the whole (accumulated, all-rank) batch makes the
    gradient independent of how that batch is split into micro-batches and processes.

    Args:
        output: logits Tensor[B, C, H, W] or an :class:`MSCOutput`.
        label: Tensor[B, H, W] int64.
        normaliser: the divisor (e.g. the labelled pixel count of the global batch).
    """
    outputs = [output.fused, *output.per_scale] if isinstance(output, MSCOutput) else [output]
    total = sum(F.cross_entropy(o.float(), label, ignore_index=ignore_index, reduction="sum") for o in outputs)
    return total / normaliser


def poly_schedule(iterations: int, power: float):
    """The poly learning-rate factor of DeepLab: ``(1 - step / iterations) ** power`` (for ``LambdaLR``)."""

    def factor(step: int) -> float:
        return max(0.0, 1.0 - step / max(1, iterations)) ** power

    return factor


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, python) as plain data a ``weights_only`` load accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class StopRequest:
    """SIGINT/SIGTERM ask the training loop to stop: it saves a checkpoint at the next step and exits.

    A second signal of the same kind gets the default behaviour (Ctrl-C twice interrupts at once; the
    checkpoint written last stays intact because writes are atomic). Use as a context manager.

    Attributes:
        signum: the signal received, or None.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        logger.warning("received %s: stopping after the current step", signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl`` (one JSON object a line) and, when the ``tensorboard``
    package is importable, mirrors the numbers to TensorBoard. Only enabled on rank 0.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional
                logger.debug("tensorboard not installed: metrics go to %s only", self.path)
            else:
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, record: dict[str, Any], *, global_step: int | None = None) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None and global_step is not None:
            prefix = f"stage{record.get('stage', 0)}/{record.get('kind', 'train')}"
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key not in ("time", "step", "stage"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, global_step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, list):
            out[f"{prefix}{key}"] = value
    return out


@torch.no_grad()
def sliding_window_logits(network: nn.Module, image: Tensor, *, window: int, stride: int) -> Tensor:
    """Logits of a large image from overlapping ``window × window`` crops, averaged where they overlap.

    Images smaller than the window are padded (bottom/right, with 0 = the mean colour after normalisation)
    and the padding is cropped from the result.

    Args:
        network: maps Tensor[B, 3, h, w] to logits Tensor[B, C, h, w] (eval mode).
        image: Tensor[B, 3, H, W], normalised.
        window: crop side in pixels.
        stride: step between crops.

    Returns:
        Tensor[B, C, H, W] float32.
    """
    b, _, h, w = image.shape
    ph, pw = max(h, window), max(w, window)
    padded = F.pad(image, (0, pw - w, 0, ph - h))

    def starts(size: int) -> list[int]:
        last = size - window
        return sorted(set(list(range(0, last, stride)) + [last]))

    total = count = None
    for y in starts(ph):
        for x in starts(pw):
            logits = network(padded[:, :, y : y + window, x : x + window]).float()
            if total is None:
                total = logits.new_zeros(b, logits.shape[1], ph, pw)
                count = logits.new_zeros(1, 1, ph, pw)
            total[:, :, y : y + window, x : x + window] += logits
            count[:, :, y : y + window, x : x + window] += 1
    return (total / count)[:, :, :h, :w]


def format_table(rows: dict[str, dict[str, Any]], *, widths: Sequence[int] = (2, 5, 10)) -> str:
    """A markdown table of evaluation summaries (percent): mIoU, pixel accuracy, mean class accuracy,
    frequency-weighted IoU and the boundary-band mIoUs."""
    columns = [(" mIoU", "miou"), ("pixel acc", "pixel_acc"), ("mean acc", "mean_class_acc"), (" fwIoU", "fwiou")]
    columns += [(f"mIoU {w}px band", f"boundary_miou_{w}px") for w in widths]
    name_width = max(len("model"), *(len(n) for n in rows))
    lines = [
        f"| {'model':<{name_width}} | " + " | ".join(title for title, _ in columns) + " |",
        f"|{'-' * (name_width + 2)}|" + "|".join("-" * (len(t) + 1) + ":" for t, _ in columns) + "|",
    ]
    for name, r in rows.items():
        cells = []
        for title, key in columns:
            value = r.get(key, math.nan)
            cells.append(f"{100 * value:>{len(title)}.2f}")
        lines.append(f"| {name:<{name_width}} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
