"""Sampling that makes augmentation a function of (seed, epoch, sample index).

The training sampler yields ``(key, index)`` pairs and :class:`SeededDataset` runs each sample's
transform under its own RNG seed ``key``, so the augmented batches do not depend on the number
of loader workers, and a run resumed in the middle of an epoch sees exactly the batches an
uninterrupted run would (``set_epoch(epoch, skip_batches)``). The main process's RNGs (dropout,
mixup) are left untouched.
"""
import math
import random
from typing import Iterator, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of one sample's augmentation in one epoch."""
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % (2 ** 63 - 1)


class EpochSampler(Sampler):
    """This rank's share of one epoch, as ``(augmentation key, index)`` pairs.

    Training (``shuffle=True``): a permutation drawn from ``seed + epoch`` (the same on every rank),
    cut to a multiple of ``num_replicas * batch_size`` (drop_last) and dealt round-robin, as
    ``DistributedSampler`` does. ``set_epoch(epoch, skip_batches)`` starts the next iteration at a
    later batch, for resuming in the middle of an epoch. Evaluation (``shuffle=False``): every
    sample exactly once over all ranks, in order, no padding.
    """

    def __init__(self, length: int, batch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        self.length, self.batch_size = length, batch_size
        self.num_replicas, self.rank, self.shuffle, self.seed = num_replicas, rank, shuffle, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches * self.batch_size

    def batches_per_epoch(self) -> int:
        if self.shuffle:
            return self.length // (self.num_replicas * self.batch_size)
        return math.ceil(len(range(self.rank, self.length, self.num_replicas)) / self.batch_size)

    def _indices(self) -> Sequence[int]:
        if not self.shuffle:
            return range(self.rank, self.length, self.num_replicas)
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=gen)
        usable = self.batches_per_epoch() * self.batch_size * self.num_replicas
        return order[:usable][self.rank::self.num_replicas].tolist()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = self._indices()
        for position in range(self.skip if self.shuffle else 0, len(indices)):
            index = indices[position]
            yield sample_key(self.seed, self.epoch, index), index

    def __len__(self) -> int:
        return len(self._indices()) - (self.skip if self.shuffle else 0)


class SeededDataset(Dataset):
    """Runs ``base[index]`` under the RNG seed ``key`` for items ``(key, index)`` and appends ``index`` to
    the sample; restores the RNGs after."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        if not isinstance(item, tuple):
            return self.base[item]
        key, index = item
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            random.seed(key)
            np.random.seed(key % (2 ** 32))
            try:
                return (*self.base[index], index)  # the index: for distillers keyed by sample (CRD's memory)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)



def build_loader(dataset: Dataset, batch_size: int, train: bool, workers: int, seed: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """A loader over :class:`EpochSampler`; call ``loader.sampler.set_epoch(epoch, skip_batches)`` each epoch."""
    sampler = EpochSampler(len(dataset), batch_size, world_size, rank, shuffle=train, seed=seed)
    if train and sampler.batches_per_epoch() == 0:
        raise DataError(f"the training set has {len(dataset)} samples, fewer than one batch of "
                         f"{batch_size} per process x {world_size} processes: lower --batch-size")
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=train, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))  # its own generator: the global RNG is untouched
