"""Installs ofakd_fast, its Triton kernels as ofakd_fast.kernels, and the C++ CPU extension."""
import importlib.util
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent


def load_build_config():
    spec = importlib.util.spec_from_file_location("ofakd_build", ROOT / "ofakd_fast" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build_config()
# Relative source paths: setuptools refuses absolute ones in an editable install.
sources = [str(Path(p).relative_to(ROOT)) for p in build.cpu_sources()]
ext_modules = [CppExtension(build.CPU_EXTENSION, sources, extra_compile_args={"cxx": build.cxx_flags()},
                            extra_link_args=build.link_flags())]

setup(
    name="ofakd_fast",
    version="0.1.0",
    description="Fused multi-branch OFA knowledge-distillation loss: C++, Triton and CUDA kernels",
    packages=["ofakd_fast", "ofakd_fast.kernels"],
    package_dir={"ofakd_fast": "ofakd_fast", "ofakd_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "timm>=1.0", "pyyaml", "safetensors"],
    extras_require={"dev": ["pytest", "pytest-benchmark", "hypothesis"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
)
