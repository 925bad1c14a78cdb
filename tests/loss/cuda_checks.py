"""The CUDA kernel's adapters and helpers for ``test_cuda_kernel.py``, whose two targets are the real
kernel on a GPU and its row program emulated on the host.

Both adapters below have the contract of ``ofakd_fast_C::fused_forward`` (method ``fused_forward``; and
of ``fused_forward_sparse``, method ``fused_forward_sparse``) and
the method name the shared checks of ``tests/loss/triton_checks.py`` call
(``ofa_fused_forward_triton``), so the CUDA kernel is held to exactly the same checks as the Triton
kernel:

* :class:`CompiledCudaOp` calls the compiled op (CUDA tensors; target ``gpu``);
* :class:`EmulatedCudaKernel` runs ``csrc/ofa_loss_cuda_row.cuh`` (and, as ``fused_forward_sparse``,
  ``csrc/ofa_loss_cuda_sparse_row.cuh``) on the host through
  ``tests/loss/cuda_emulator.cpp`` (CPU tensors; target ``host-emulated``), with the CUDA host code's
  launch plan (``csrc/ofa_loss_cuda_launch.h``), the same output allocation and a check of every
  memory access.

``max_block`` (a Triton tiling knob the checks pass) is ignored; an emulated kernel takes a row group
size instead (``threads``), small ones make it stream rows in several chunks.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_checks as checks  # noqa: E402,F401  (re-exported for the test modules)

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
EMULATOR_SOURCE = Path(__file__).resolve().parent / "cuda_emulator.cpp"
EMULATED_HEADERS = ("ofa_loss_cuda_launch.h", "ofa_loss_cuda_row.cuh", "ofa_loss_cuda_sparse_row.cuh",
                    "ofa_row_math.h")  # what it includes
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def branch_matrices(branches):
    return [m for entry in branches for m in (entry.unbind(0) if entry.dim() == 3 else [entry])]


class CompiledCudaOp:
    """torch.ops.ofakd_fast_C.fused_forward (and fused_forward_sparse) on CUDA tensors."""

    def ofa_fused_forward_triton(self, branches, teacher, target, eps, temperature, grad_scale, teacher_grad,
                                 max_block=None):
        return self.fused_forward(branches, teacher, target, eps, temperature, grad_scale, teacher_grad)

    def fused_forward(self, branches, teacher, target, eps, temperature, grad_scale, teacher_grad):
        return torch.ops.ofakd_fast_C.fused_forward(list(branches), teacher, target, eps, float(temperature),
                                                    grad_scale, bool(teacher_grad))

    def fused_forward_sparse(self, branches, teacher_logits, teacher_indices, teacher_lse, target, eps, temperature,
                             grad_scale):
        return torch.ops.ofakd_fast_C.fused_forward_sparse(list(branches), teacher_logits, teacher_indices,
                                                           teacher_lse, target, eps, float(temperature), grad_scale)


# ----------------------------------------------------------------------------------- host emulation

def emulator_unavailable_reason() -> Optional[str]:
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++) to build the host emulator of the CUDA row program"
    return None


def _build_emulator() -> Path:
    """Compiles tests/loss/cuda_emulator.cpp (plus the headers it includes) into a cached shared library."""
    sources = [EMULATOR_SOURCE, *(CSRC / name for name in EMULATED_HEADERS)]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + torch.__version__.encode()).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"ofakd_cuda_emulator_{os.getuid()}"
    out_dir.mkdir(exist_ok=True)
    library = out_dir / f"cuda_emulator_{digest}.so"
    if not library.exists():
        torch_include = Path(torch.__file__).resolve().parent / "include"
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([os.environ.get("CXX", "g++"), "-std=c++17", "-O1", "-g", "-shared", "-fPIC", "-Wall",
                        f"-I{CSRC}", f"-I{torch_include}", str(EMULATOR_SOURCE), "-o", str(partial),
                        "-lpthread"], check=True, capture_output=True, text=True)
        partial.replace(library)
    return library


_LIBRARY = None


def emulator_library():
    global _LIBRARY
    if _LIBRARY is None:
        lib = ctypes.CDLL(str(_build_emulator()))
        lib.ofa_emulator_run.restype = ctypes.c_int64
        lib.ofa_emulator_run.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int,
            ctypes.POINTER(ctypes.c_int64)]
        lib.ofa_emulator_run_sparse.restype = ctypes.c_int64
        lib.ofa_emulator_run_sparse.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_double, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int,
            ctypes.POINTER(ctypes.c_int64)]
        lib.ofa_emulator_plan.restype = None
        lib.ofa_emulator_plan.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                          ctypes.POINTER(ctypes.c_int64)]
        _LIBRARY = lib
    return _LIBRARY


def launch_plan(K: int, B: int, C: int, dtype: torch.dtype, threads: int = 0) -> dict:
    """The CUDA host code's launch plan (plan_launch in csrc/ofa_loss_cuda_launch.h); threads > 0 forces
    the row group size."""
    out = (ctypes.c_int64 * 4)()
    emulator_library().ofa_emulator_plan(K, B, C, torch.empty(0, dtype=dtype).element_size(), threads, out)
    return {"threads": out[0], "blocks": out[1], "chunks": out[2], "teacher_workspace": bool(out[3])}


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None or t.numel() == 0 else ctypes.c_void_p(t.data_ptr())


def _regions(inputs, outputs):
    """The emulator's (address, bytes, writable) triples: the whole storage of every non-empty tensor."""
    regions = []
    for tensors, writable in ((inputs, 0), (outputs, 1)):
        for t in tensors:
            if t is not None and t.numel():
                storage = t.untyped_storage()
                regions += [storage.data_ptr(), storage.nbytes(), writable]
    return (ctypes.c_int64 * len(regions))(*regions), len(regions) // 3


def _branch_pointers(mats):
    """Row 0 and the row stride of every branch matrix, as the emulator takes them."""
    return ((ctypes.c_void_p * len(mats))(*[m.data_ptr() for m in mats]),
            (ctypes.c_int64 * len(mats))(*[m.stride(0) for m in mats]))


class EmulatedCudaKernel:
    """The CUDA kernels' row programs on the host, with the contracts of fused_forward and
    fused_forward_sparse (CPU tensors).

    Mirrors fused_forward_cuda / fused_forward_sparse_cuda in csrc/ofa_loss_cuda_op.cpp: the same checks,
    outputs, workspace rule and launch planning. Outputs start as NaN so an element the kernel forgets to
    write is caught.
    """

    def __init__(self, threads: int = 0):
        self.threads = threads  # row group size; 0: the CUDA launch plan's
        self.last_stats = None  # (bad accesses, 16-byte accesses, element accesses) of the last call

    def ofa_fused_forward_triton(self, branches, teacher, target, eps, temperature, grad_scale, teacher_grad,
                                 max_block=None):
        return self.fused_forward(branches, teacher, target, eps, temperature, grad_scale, teacher_grad)

    def fused_forward(self, branches, teacher, target, eps, temperature, grad_scale, teacher_grad):
        mats = branch_matrices(branches)
        K = len(mats)
        B, C = teacher.shape
        dtype, acc = teacher.dtype, acc_dtype(teacher.dtype)
        assert K > 0 and all(m.dtype == dtype and tuple(m.shape) == (B, C) for m in mats)
        assert all(m.stride(1) == 1 or C <= 1 for m in mats) and (teacher.stride(1) == 1 or C <= 1)
        assert eps.dtype == torch.float64 and eps.numel() == K and target.dtype == torch.int64
        want_grad = grad_scale is not None
        want_tgrad = want_grad and teacher_grad
        loss = torch.full((K, B), float("nan"), dtype=acc)
        grad_b = torch.full((K, B, C), float("nan"), dtype=dtype) if want_grad else torch.empty(0, dtype=dtype)
        grad_t = torch.full((B, C), float("nan"), dtype=dtype) if want_tgrad else torch.empty(0, dtype=dtype)
        if B == 0:
            return loss, grad_b, grad_t
        if C == 0:
            return loss.fill_(float("nan")), grad_b, grad_t
        scale = grad_scale.to(acc).expand(K, B) if want_grad else None
        workspace = None
        if want_tgrad and launch_plan(K, B, C, dtype, self.threads)["teacher_workspace"]:
            workspace = grad_t if dtype == acc else torch.full((B, C), float("nan"), dtype=acc)
        target = target.contiguous()
        eps = eps.contiguous()

        region_array, num_regions = _regions([*mats, teacher, target, eps, scale], [loss, grad_b, grad_t, workspace])
        stats = (ctypes.c_int64 * 3)()
        pointers, strides = _branch_pointers(mats)
        result = emulator_library().ofa_emulator_run(
            DTYPE_CODES[dtype], K, pointers, strides, _ptr(teacher), teacher.stride(0), _ptr(target), _ptr(eps),
            float(temperature), _ptr(scale), scale.stride(0) if want_grad else 0, scale.stride(1) if want_grad else 0,
            B, C, _ptr(loss), _ptr(grad_b), _ptr(grad_t), _ptr(workspace), self.threads, region_array,
            num_regions, stats)
        self._check(result, stats)
        return loss, grad_b, grad_t

    def fused_forward_sparse(self, branches, teacher_logits, teacher_indices, teacher_lse, target, eps, temperature,
                             grad_scale):
        """fused_forward_sparse's contract (fused_forward_sparse_cuda in csrc/ofa_loss_cuda_op.cpp):
        loss rows [K, B] and branch gradients [K, B, C] (empty without grad_scale)."""
        mats = branch_matrices(branches)
        K = len(mats)
        B, C = mats[0].shape
        dtype, acc = mats[0].dtype, acc_dtype(mats[0].dtype)
        assert K > 0 and all(m.dtype == dtype and tuple(m.shape) == (B, C) for m in mats)
        assert all(m.stride(1) == 1 or C <= 1 for m in mats)
        k = teacher_logits.shape[1]
        assert teacher_logits.dtype == acc and teacher_lse.dtype == acc and teacher_indices.dtype == torch.int64
        assert tuple(teacher_logits.shape) == tuple(teacher_indices.shape) == (B, k) and k <= C
        assert tuple(teacher_lse.shape) == (B,)
        assert teacher_logits.is_contiguous() and teacher_indices.is_contiguous() and teacher_lse.is_contiguous()
        assert eps.dtype == torch.float64 and eps.numel() == K and target.dtype == torch.int64
        want_grad = grad_scale is not None
        loss = torch.full((K, B), float("nan"), dtype=acc)
        grad_b = torch.full((K, B, C), float("nan"), dtype=dtype) if want_grad else torch.empty(0, dtype=dtype)
        if B == 0 or C == 0:
            return loss, grad_b
        scale = grad_scale.to(acc).expand(K, B) if want_grad else None
        target = target.contiguous()
        eps = eps.contiguous()
        region_array, num_regions = _regions(
            [*mats, teacher_logits, teacher_indices, teacher_lse, target, eps, scale], [loss, grad_b])
        stats = (ctypes.c_int64 * 3)()
        pointers, strides = _branch_pointers(mats)
        result = emulator_library().ofa_emulator_run_sparse(
            DTYPE_CODES[dtype], K, pointers, strides, _ptr(teacher_logits), _ptr(teacher_indices), _ptr(teacher_lse),
            k, _ptr(target), _ptr(eps), float(temperature), _ptr(scale), scale.stride(0) if want_grad else 0,
            scale.stride(1) if want_grad else 0, B, C, _ptr(loss), _ptr(grad_b), self.threads, region_array,
            num_regions, stats)
        self._check(result, stats)
        return loss, grad_b

    def _check(self, result, stats):
        """Keeps the access counts of the call; fails on any bad memory access."""
        self.last_stats = tuple(stats)
        assert result == 0, f"the emulated kernel made {result} out-of-bounds or misaligned memory accesses"
