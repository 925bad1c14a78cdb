"""How the C++ (and, where nvcc exists, CUDA) extensions are built.

One place for sources and flags, used by ``setup.py`` at install time and by the
just-in-time build in :mod:`ofakd_fast.loss.extension`, so both produce the same module.
This file imports nothing from the package, so ``setup.py`` can load it by path.

CUDA: the extension ``ofakd_fast._C_cuda`` is built when nvcc is found and PyTorch has CUDA
(``torch.version.cuda``), with or without a GPU attached; ``OFAKD_BUILD_CUDA=0`` skips it and
``OFAKD_BUILD_CUDA=1`` requires it (an error if it cannot be built). Found without any
hand-set variable: the CUDA toolkit (``CUDA_HOME``/``CUDA_PATH``, else the toolkit of the
``nvcc`` on PATH, else ``/usr/local/cuda``), the headers of the ``nvidia`` pip wheels (cuBLAS,
cuSPARSE, ... that a bare toolkit may lack), and the GPU architectures (``TORCH_CUDA_ARCH_LIST``,
else the attached GPUs, else ``DEFAULT_CUDA_ARCH_LIST``).
"""
import glob
import os
import shutil
import site
import sysconfig
from pathlib import Path
from typing import List, Optional, Tuple

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_EXTENSION = "ofakd_fast._C"
CPU_SOURCES = ["ofa_loss_cpu.cpp", "ofa_loss_autograd.cpp"]  # the kernels, the eager autograd op

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


# ----------------------------------------------------------------------------------------- CUDA

CUDA_EXTENSION = "ofakd_fast._C_cuda"
CUDA_SOURCES = ["ofa_loss_cuda.cu", "ofa_loss_cuda_op.cpp"]  # kernel (nvcc), op wrapper (host compiler)
# Without a GPU to query: A100 and H100 machine code, plus sm_90 PTX that the driver compiles for
# newer GPUs (Blackwell) on first use.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
BUILD_CUDA_ENV = "OFAKD_BUILD_CUDA"


def cuda_sources(root: Path = CSRC) -> list:
    return [str(root / name) for name in CUDA_SOURCES]


def _is_toolkit(path: Optional[str]) -> bool:
    """A directory with bin/nvcc and the CUDA runtime headers (a wrapper script's bin/.. is not)."""
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime_api.h"))


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit: $CUDA_HOME / $CUDA_PATH (trusted if it has bin/nvcc), else the toolkit of the
    nvcc on PATH (symlinks resolved; a wrapper such as /usr/local/bin/nvcc has no headers beside it and
    is skipped), else /usr/local/cuda. None if there is no nvcc."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(variable)
        if value and os.path.isfile(os.path.join(value, "bin", "nvcc")):
            return value
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = str(Path(nvcc).resolve().parent.parent)
        if _is_toolkit(home):
            return home
    for home in ("/usr/local/cuda",):
        if os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _site_packages() -> List[str]:
    dirs = [str(Path(torch.__file__).resolve().parent.parent), sysconfig.get_paths()["purelib"],
            sysconfig.get_paths()["platlib"]]
    try:
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # some virtualenv versions lack getsitepackages
        pass
    seen, result = set(), []
    for d in dirs:
        if d and d not in seen and os.path.isdir(d):
            seen.add(d)
            result.append(d)
    return result


def nvidia_include_dirs() -> List[str]:
    """<site-packages>/nvidia/*/include of the CUDA pip wheels torch depends on (cu13 first)."""
    found = []
    for sp in _site_packages():
        dirs = sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
        dirs.sort(key=lambda d: (not Path(d).parent.name.startswith("cu"), d))
        found += [d for d in dirs if d not in found]
    return found


def _gpu_arch_list() -> Optional[str]:
    try:
        if not torch.cuda.is_available():
            return None
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # a broken driver counts as no GPU
        return None
    if not caps:
        return None
    archs = [f"{major}.{minor}" for major, minor in caps]
    archs[-1] += "+PTX"
    return ";".join(archs)


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST if set, else the attached GPUs' architectures, else DEFAULT_CUDA_ARCH_LIST."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or _gpu_arch_list() or DEFAULT_CUDA_ARCH_LIST


def cuda_build_decision() -> Tuple[bool, str]:
    """(build the CUDA extension?, why). Raises if OFAKD_BUILD_CUDA=1 asks for what cannot be built."""
    switch = os.environ.get(BUILD_CUDA_ENV, "").strip()
    if switch == "0":
        return False, f"{BUILD_CUDA_ENV}=0"
    problem = None
    if torch.version.cuda is None:
        problem = f"this PyTorch ({torch.__version__}) has no CUDA support (torch.version.cuda is None)"
    elif find_cuda_home() is None:
        problem = "nvcc was not found (not on PATH, no CUDA_HOME, no /usr/local/cuda)"
    if problem is None:
        return True, f"nvcc {os.path.join(find_cuda_home(), 'bin', 'nvcc')}, CUDA {torch.version.cuda}"
    if switch == "1":
        raise RuntimeError(f"{BUILD_CUDA_ENV}=1 but the CUDA extension cannot be built: {problem}")
    return False, problem


def configure_cuda_build() -> str:
    """Points torch.utils.cpp_extension at the toolkit find_cuda_home() found and sets a default
    TORCH_CUDA_ARCH_LIST (torch's own guesses fail here: CUDA_HOME '/usr/local' from the nvcc wrapper,
    and an empty architecture list without a GPU). Returns the CUDA home."""
    import torch.utils.cpp_extension as cpp_extension

    home = find_cuda_home()
    if home is None:
        raise RuntimeError("nvcc was not found: cannot build the CUDA extension")
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_arch_list())
    return home


def nvcc_threads() -> int:
    """nvcc --threads: the architectures compile in parallel (OFAKD_NVCC_THREADS, default 2)."""
    return max(1, int(os.environ.get("OFAKD_NVCC_THREADS", "2")))


def _system_includes() -> list:
    # -isystem: searched after the toolkit's own include dir (-I), so the wheels only fill gaps.
    return [flag for d in nvidia_include_dirs() for flag in ("-isystem", d)]


def cuda_cxx_flags() -> list:
    return ["-O3", *_system_includes()]


def nvcc_flags() -> list:
    # No --use_fast_math: the kernel needs accurate expf/logf/log1pf/expm1f (tiny target
    # probabilities, logits of 1e4); it is memory-bound anyway.
    return ["-O3", "--threads", str(nvcc_threads()), *_system_includes()]
