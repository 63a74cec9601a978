"""The training data stream: every sample's augmentation seeded from ``(seed, epoch, index)``
(:class:`SeededAugmentation`), a sampler that shuffles from ``(seed, epoch)`` and can start in the middle of an
epoch (:class:`TrainSampler`), and an endless, resumable stream of batches (:class:`TrainBatches`).

Together they make a resumed run see exactly the batches the uninterrupted run would have seen, in one process
or in ``N`` (each rank gets its share of the same global batch), whatever the number of DataLoader workers
(:meth:`~crfrnn_deeplab.TrainTransform.seed_sample` overrides the per-worker seeding).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["derive_seed", "SeededAugmentation", "TrainSampler", "TrainBatches"]


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
