"""Sampling that makes augmentation a function of (seed, epoch, sample index).

The training sampler yields ``(key, index)`` pairs and :class:`SeededDataset` runs each sample's
transform under its own RNG seed ``key``, so the augmented batches do not depend on the number
of loader workers, and a run resumed in the middle of an epoch sees exactly the batches an
uninterrupted run would (``set_epoch(epoch, skip_batches)``). The main process's RNGs (dropout,
drop-path) are left untouched. Mixup and cutmix, which mix the samples of a batch, draw from the
seed of the batch's place (:class:`KeyedMixup`): a pure function of (seed, epoch, step, rank).
"""
import math
import random
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of one sample's augmentation in one epoch."""
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % (2 ** 63 - 1)


def batch_key(seed: int, epoch: int, step: int, rank: int) -> list:
    """The NumPy seed of one batch's mixing (mixup/cutmix): step `step` of process `rank` in epoch `epoch`."""
    return [value % 2 ** 32 for value in (seed, epoch, step, rank)]


class KeyedMixup:
    """timm's ``Mixup`` (batch mode) whose draws (lambda, mixup or cutmix, the box) come from
    :func:`batch_key` instead of the process's NumPy stream, which is restored after: the mixed batch
    is a function of its place alone, so ``ofakd-cache-teacher`` mixes exactly as the run will, and a
    resumed run needs no saved RNG state for it."""

    def __init__(self, mixup, seed: int):
        self.mixup, self.seed = mixup, seed

    def __call__(self, images: torch.Tensor, target: torch.Tensor, epoch: int, step: int, rank: int):
        saved = np.random.get_state()
        np.random.seed(batch_key(self.seed, epoch, step, rank))
        try:
            return self.mixup(images, target)
        finally:
            np.random.set_state(saved)


def mixing_active(args) -> bool:
    """Whether the run mixes the samples of its batches (``--mixup`` or ``--cutmix`` alpha above 0)."""
    return args.mixup > 0 or args.cutmix > 0


def build_mixup(args, num_classes: int) -> Optional[KeyedMixup]:
    """The run's mixup/cutmix (``--mixup``, ``--cutmix``, ``--mixup-prob``, ``--mixup-switch-prob``, with
    ``--smoothing`` on the mixed targets); None when both alphas are 0."""
    if not mixing_active(args):
        return None
    from timm.data import Mixup

    return KeyedMixup(Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                            switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                            num_classes=num_classes), args.seed)


class EpochSampler(Sampler):
    """This rank's share of one epoch, as ``(augmentation key, index)`` pairs.

    Training (``shuffle=True``): a permutation drawn from ``seed + epoch`` (the same on every rank),
    cut to a multiple of ``num_replicas * batch_size`` (drop_last) and dealt round-robin, as
    ``DistributedSampler`` does. ``set_epoch(epoch, skip_batches)`` starts the next iteration at a
    later batch, for resuming in the middle of an epoch. Evaluation (``shuffle=False``): every
    sample exactly once over all ranks, in order, no padding.

    ``repeats=N`` (N >= 1, ``--aug-repeats``): repeated augmentation with the epoch length and
    sharding of timm's ``RepeatAugSampler``: each index of the permutation is repeated N times in a
    row, the list is dealt round-robin over the ranks (so the copies of a sample go to different
    ranks) and each rank keeps ``floor(len // 256 * 256 / num_replicas)`` of it (``ceil(len /
    num_replicas)`` below 256 samples), then whole batches. Copy r of sample i has the key of the
    virtual index ``i * N + r``: its own augmentation, and still a pure function of (seed, epoch,
    position), so mid-epoch resuming stays exact.
    """

    SELECTED_ROUND = 256  # timm RepeatAugSampler's selected_round

    def __init__(self, length: int, batch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, repeats: int = 0):
        self.length, self.batch_size = length, batch_size
        self.num_replicas, self.rank, self.shuffle, self.seed = num_replicas, rank, shuffle, seed
        self.repeats = int(repeats) if shuffle else 0
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches * self.batch_size

    def samples_per_rank(self) -> int:
        """Training samples of one rank in one epoch, before whole batches are cut."""
        if not self.repeats:
            return self.length // self.num_replicas
        if self.length >= self.SELECTED_ROUND:
            selected = self.length // self.SELECTED_ROUND * self.SELECTED_ROUND // self.num_replicas
        else:
            selected = math.ceil(self.length / self.num_replicas)
        return min(selected, math.ceil(self.length * self.repeats / self.num_replicas))

    def batches_per_epoch(self) -> int:
        if self.shuffle:
            if not self.repeats:
                return self.length // (self.num_replicas * self.batch_size)
            return self.samples_per_rank() // self.batch_size
        return math.ceil(len(range(self.rank, self.length, self.num_replicas)) / self.batch_size)

    def _items(self) -> Sequence[Tuple[int, int]]:
        if not self.shuffle:
            return [(sample_key(self.seed, self.epoch, i), i) for i in range(self.rank, self.length, self.num_replicas)]
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=gen).tolist()
        usable = self.batches_per_epoch() * self.batch_size
        if not self.repeats:
            indices = order[:usable * self.num_replicas][self.rank::self.num_replicas]
            return [(sample_key(self.seed, self.epoch, i), i) for i in indices]
        n, total = self.length * self.repeats, math.ceil(self.length * self.repeats / self.num_replicas) * self.num_replicas
        items = []
        for position in range(self.rank, total, self.num_replicas)[:usable]:
            copy, repeat = divmod(position % n, self.repeats)  # wrapped around (as timm pads) past the end
            index = order[copy]
            items.append((sample_key(self.seed, self.epoch, index * self.repeats + repeat), index))
        return items

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        items = self._items()
        return iter(items[self.skip:] if self.shuffle else items)

    def __len__(self) -> int:
        return len(self._items()) - (self.skip if self.shuffle else 0)


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
                 world_size: int = 1, pin_memory: bool = False, aug_repeats: int = 0) -> DataLoader:
    """A loader over :class:`EpochSampler`; call ``loader.sampler.set_epoch(epoch, skip_batches)`` each epoch."""
    sampler = EpochSampler(len(dataset), batch_size, world_size, rank, shuffle=train, seed=seed, repeats=aug_repeats)
    if train and sampler.batches_per_epoch() == 0:
        raise DataError(f"the training set has {len(dataset)} samples, fewer than one batch of "
                         f"{batch_size} per process x {world_size} processes: lower --batch-size")
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=train, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))  # its own generator: the global RNG is untouched
