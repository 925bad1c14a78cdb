"""Installs ofakd_fast, its Triton kernels as ofakd_fast.kernels, the C++ CPU extension and, where
nvcc and a CUDA build of PyTorch exist (a GPU is not needed), the CUDA extension.

OFAKD_BUILD_CUDA=0 skips the CUDA extension, OFAKD_BUILD_CUDA=1 makes its absence an error.
Toolkit, wheel headers and GPU architectures are found by ofakd_fast/loss/build.py (no variables to set).
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent


def load_build_config():
    spec = importlib.util.spec_from_file_location("ofakd_build", ROOT / "ofakd_fast" / "loss" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative(paths):
    # Relative source paths: setuptools refuses absolute ones in an editable install.
    return [str(Path(p).relative_to(ROOT)) for p in paths]


build = load_build_config()
ext_modules = [CppExtension(build.CPU_EXTENSION, relative(build.cpu_sources()),
                            extra_compile_args={"cxx": build.cxx_flags()}, extra_link_args=build.link_flags())]

build_cuda, reason = build.cuda_build_decision()
# pip runs this file several times (metadata, then the build): say it once, when building.
BUILDING = any(command in sys.argv for command in
               ("build_ext", "build", "develop", "install", "bdist_wheel", "editable_wheel"))
if build_cuda:
    from torch.utils.cpp_extension import CUDAExtension

    cuda_home = build.configure_cuda_build()
    if BUILDING:
        print(f"ofakd_fast: building the CUDA extension {build.CUDA_EXTENSION} ({reason}; "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, CUDA_HOME={cuda_home})", file=sys.stderr)
    ext_modules.append(CUDAExtension(build.CUDA_EXTENSION, relative(build.cuda_sources()),
                                     extra_compile_args={"cxx": build.cuda_cxx_flags(), "nvcc": build.nvcc_flags()}))
elif BUILDING:
    print(f"ofakd_fast: NOT building the CUDA extension {build.CUDA_EXTENSION}: {reason}. "
          "The 'cuda' backend will be unavailable (the Triton and CPU backends are unaffected).", file=sys.stderr)

setup(
    name="ofakd_fast",
    version="0.1.0",
    description="Fused multi-branch OFA knowledge-distillation loss: C++, Triton and CUDA kernels",
    packages=["ofakd_fast", "ofakd_fast.loss", "ofakd_fast.distill", "ofakd_fast.train", "ofakd_fast.demo",
              "ofakd_fast.kernels"],
    package_dir={"ofakd_fast": "ofakd_fast", "ofakd_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "torchvision", "timm>=1.0", "pyyaml", "safetensors", "numpy"],
    extras_require={"dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib"]},
    package_data={"ofakd_fast.train": ["configs/*.yaml"]},
    entry_points={"console_scripts": ["ofakd-train=ofakd_fast.train.cli:main",
                                      "ofakd-eval=ofakd_fast.train.evaluate:main",
                                      "ofakd-cache-teacher=ofakd_fast.train.cache_teacher:main",
                                      "ofakd-mnist=ofakd_fast.demo.mnist:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
)
