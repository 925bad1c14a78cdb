"""Triton kernels of ofakd_fast, installed as ofakd_fast.kernels."""
import importlib.util
import os
import sys
from pathlib import Path

TRITON_KERNEL_PATH = Path(__file__).resolve().parent / "ofa_loss_triton.py"


def load_private_copy(interpret: bool):
    """A private copy of ofa_loss_triton.py whose kernels are interpreted (CPU tensors) or compiled.

    Triton fixes interpreter vs compiler when a kernel is decorated, i.e. when its module is
    imported, from TRITON_INTERPRET; the package's own copy may already exist in the other mode,
    so tests and tools that need a given mode execute their own copy with the variable set for it.
    """
    name = "_ofa_triton_kernels_" + ("interpreted" if interpret else "compiled")
    if name in sys.modules:
        return sys.modules[name]
    saved = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec = importlib.util.spec_from_file_location(name, TRITON_KERNEL_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module
