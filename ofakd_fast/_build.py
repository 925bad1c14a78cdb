"""How the C++ (and, where nvcc exists, CUDA) extensions are built.

One place for sources and flags, used by ``setup.py`` at install time and by the
just-in-time build in :mod:`ofakd_fast._extension`, so both produce the same module.
This file imports nothing from the package, so ``setup.py`` can load it by path.
"""
import os
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_EXTENSION = "ofakd_fast._C"
CPU_SOURCES = ["ofa_loss_cpu.cpp"]

# at::vec picks its SIMD implementation from these macros; without them it falls back to
# scalar loops. Build for what this machine's PyTorch reports it can run.
_SIMD_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


def cpu_capability() -> str:
    """The SIMD level the extension is built for: OFAKD_CPU_CAPABILITY, else PyTorch's own."""
    return os.environ.get("OFAKD_CPU_CAPABILITY", torch.backends.cpu.get_cpu_capability())


def cxx_flags() -> list:
    # -fopenmp: at::parallel_for is a header template; without OpenMP it runs on one thread.
    return ["-O3", "-fopenmp", *_SIMD_FLAGS.get(cpu_capability(), ["-DCPU_CAPABILITY=DEFAULT"])]


def link_flags() -> list:
    return ["-fopenmp"]


def cpu_sources(root: Path = CSRC) -> list:
    return [str(root / name) for name in CPU_SOURCES]
