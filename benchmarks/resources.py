"""Compiled resources of the fused OFA loss kernels for sm_90 (H100/H200), without a GPU.

For every launch the Triton dispatcher (``kernels/ofa_loss_triton.py``: ``launch_config``,
``vector_width``, the dtypes, single block or column loop, with/without gradients, teacher gradient,
accumulating launches for K > 8) makes for a grid of problems, this compiles the kernel for
``GPUTarget("cuda", 90, 32)`` (sm_90a; no device is needed) and reads registers, local memory
(stack/spills, ``cuobjdump -res-usage`` of the cubin, Triton's own bundled tool) and shared memory
(``metadata.shared``). The launches are not guessed: the real launcher runs on small CPU tensors with
the kernel replaced by a recorder, and the recorded arguments are specialized by Triton's own binder
for the sm_90 backend, as a launch on a GPU would be.

For the CUDA kernels (``csrc/ofa_loss_cuda.cu``: ``ofa_rows_kernel`` for a dense teacher and
``ofa_sparse_rows_kernel`` for a sparse one, one per dtype each, K and C are runtime values)
nvcc compiles them for sm_90 with ``-Xptxas -v``, the flags of ``ofakd_fast/loss/build.py``
(``nvcc_flags()``) and torch's CUDA include dirs and nvcc defines, as ``setup.py`` would.

From registers and shared memory: the occupancy on sm_90 (65536 registers, 2048 threads, 32 blocks,
64 warps, 228 KB shared memory per SM, 1 KB of it reserved per block; registers allocated per warp
in units of 256). From the shapes: the bytes a forward+backward must move ((K + 1) B C logits read,
K B C gradients written) and the H200 roofline time at 4.8 TB/s.

    .venv/bin/python benchmarks/resources.py            # print the markdown
    .venv/bin/python benchmarks/resources.py --write    # fill the marked section of benchmarks/README.md
    .venv/bin/python benchmarks/resources.py --json out.json --jobs 2

``tests/loss/test_kernel_resources.py`` uses the same functions and fails on any spill.
"""
import argparse
import contextlib
import functools
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCE = ROOT / "csrc" / "ofa_loss_cuda.cu"
README = ROOT / "benchmarks" / "README.md"
START, END = "<!-- resources:start -->", "<!-- resources:end -->"

# sm_90 (H100 / H200) per-SM limits.
SM90 = dict(regs=65536, threads=2048, warps=64, blocks=32, smem=228 * 1024, smem_per_block=227 * 1024,
            smem_reserved=1024, reg_unit=256, max_regs=255)
H200_BW = 4.8e12  # bytes/s (HBM3e)
TRITON_ARCH = 90

DTYPES = ("fp32", "bf16", "fp16", "fp64")
# The problems whose launches are compiled. Every (dtype, K, C, pass) below goes through the real
# launcher. K = 1..8 covers every BRANCH_ROWS and branch count of one launch; 13 = 8 + 5 adds the
# accumulating second launch. C: 100 (small single block), 1000 (ImageNet-1k, vectorized single
# block at K = 5..8), 2048 / 4096 / 8192 (the largest single-block tile of 4, 2 and 1 branch rows
# with the widest VEC), 21841 (ImageNet-21k: column loop, scalar accesses), 32768 (column loop,
# widest VEC).
FULL_KS = (1, 2, 3, 4, 5, 6, 7, 8, 13)
FULL_CS = (100, 1000, 2048, 4096, 8192, 21841, 32768)
# The test's subset: the register-heaviest tile of every BRANCH_ROWS (the 16-elements-per-thread
# tiles of the num_warps table), single block and column loop, scalar and widest VEC.
QUICK_KS = (1, 2, 4, 5, 8, 13)
QUICK_CS = (1000, 8192, 21841, 32768)
PASSES = ("fwd", "grad", "grad+tgrad")  # losses only; student gradients; student + teacher gradients
QUICK_PASSES = ("grad+tgrad",)  # the most code (the reference shapes below get every pass)
REFERENCE_SHAPES = ((256, 1000, 5), (256, 21841, 5))
# The sparse-teacher kernel (_ofa_sparse_kernel): the same K and C with k stored classes (5: one small
# stored block; 200: a stored block of 256 or BLOCK, the register-heaviest), losses only or gradients.
FULL_STORED, QUICK_STORED = (5, 200), (200,)
# The test's sparse dtypes: float64 is left out because one of its variants (K = 1, C = 8192: BLOCK 2048,
# VEC 2, 8 warps) still spills 16-20 B on sm_90 (open; the full table lists it).
QUICK_SPARSE_DTYPES = ("fp32", "bf16", "fp16")
SPARSE_PASSES, QUICK_SPARSE_PASSES = ("fwd", "grad"), ("grad",)


# ----------------------------------------------------------------------------------------------
# Occupancy and traffic
# ----------------------------------------------------------------------------------------------
def occupancy(regs: int, threads: int, smem_bytes: int, limits: dict = SM90) -> dict:
    """Resident blocks and warps per SM for one kernel (the smallest of the four limits)."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / limits["reg_unit"]) * limits["reg_unit"]
    by_regs = (limits["regs"] // regs_per_warp) // warps
    by_threads = limits["threads"] // (warps * 32)
    by_smem = limits["smem"] // (smem_bytes + limits["smem_reserved"]) if smem_bytes else limits["blocks"]
    if smem_bytes > limits["smem_per_block"]:
        by_smem = 0
    blocks = min(by_regs, by_threads, by_smem, limits["blocks"])
    limiter = min((by_regs, "registers"), (by_threads, "threads"), (by_smem, "shared"),
                  (limits["blocks"], "blocks"))[1]
    return {"blocks": blocks, "warps": blocks * warps, "occupancy": blocks * warps / limits["warps"],
            "limiter": limiter}


ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


def traffic(B: int, C: int, K: int, dtype: str) -> dict:
    """Compulsory bytes of one fused call: forward (K + 1) B C read; forward+backward adds K B C written."""
    s = ITEMSIZE[dtype]
    read, write = (K + 1) * B * C * s, K * B * C * s
    return {"fwd_bytes": read, "fwdbwd_bytes": read + write, "fwd_us": read / H200_BW * 1e6,
            "fwdbwd_us": (read + write) / H200_BW * 1e6,
            # the Triton column loop reads the K + 1 rows a second time for the gradients (L2 may serve it)
            "loop_fwdbwd_bytes": 2 * read + write, "loop_fwdbwd_us": (2 * read + write) / H200_BW * 1e6}


# ----------------------------------------------------------------------------------------------
# Triton: record the dispatcher's launches, specialize them, compile for sm_90
# ----------------------------------------------------------------------------------------------
def triton_unavailable() -> Optional[str]:
    """None if the installed Triton can compile the kernel for sm_90 here, else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"Triton with a CUDA backend is not importable ({type(exc).__name__}: {exc})"
    try:
        _backend()
    except Exception as exc:  # noqa: BLE001
        return f"Triton cannot make an sm_90 backend here ({type(exc).__name__}: {exc})"
    return None


def kernel_module():
    """A private compiled (not interpreted) copy of kernels/ofa_loss_triton.py."""
    from ofakd_fast.kernels import load_private_copy

    module = load_private_copy(interpret=False)
    if type(module._ofa_fused_kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("the kernel was built interpreted (TRITON_INTERPRET is set in triton's knobs)")
    return module


@functools.lru_cache(maxsize=1)
def _backend():
    import triton
    from triton.backends.compiler import GPUTarget

    return triton.compiler.make_backend(GPUTarget("cuda", TRITON_ARCH, 32))


class _Recorder:
    """Stands in for the @triton.jit kernel: kernel[grid](*args, **kwargs) records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@dataclass
class Problem:
    dtype: str
    K: int
    C: int
    passes: str  # one of PASSES
    B: int = 16  # divisible by 16 like the real batches (Triton specializes that)
    stored: int = 0  # k stored teacher classes: the sparse-teacher kernel; 0: the dense one

    def label(self) -> str:
        sparse = f" sparse k{self.stored}" if self.stored else ""
        return f"{self.B}x{self.C}x{self.K} {self.dtype} {self.passes}{sparse}"


def record_launches(problem: Problem) -> list:
    """The (args, kwargs) of every kernel launch ofa_fused_forward_triton (ofa_fused_forward_sparse_triton
    for a sparse problem) makes for `problem`."""
    import torch

    mod = kernel_module()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[problem.dtype]
    B, C, K = problem.B, problem.C, problem.K
    branches = [torch.zeros(B, C, dtype=dtype) for _ in range(K)]  # separate heads, as a model's
    teacher = torch.zeros(B, C, dtype=dtype)
    target = torch.zeros(B, dtype=torch.int64)
    eps = torch.full((K,), 1.2, dtype=torch.float64)
    grad_scale = None if problem.passes == "fwd" else torch.full((K, B), 1.0 / B)
    name = _kernel_name(problem.stored)
    recorder, real = _Recorder(), getattr(mod, name)
    setattr(mod, name, recorder)
    try:
        if problem.stored:
            k = problem.stored
            indices = torch.arange(k).expand(B, k).contiguous()
            logits = torch.zeros(B, k, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            mod.ofa_fused_forward_sparse_triton(branches, logits, indices, logits[:, 0].contiguous(), target, eps,
                                                1.0, grad_scale)
        else:
            mod.ofa_fused_forward_triton(branches, teacher, target, eps, 1.0, grad_scale,
                                         problem.passes == "grad+tgrad")
    finally:
        setattr(mod, name, real)
    return recorder.calls


def _kernel_name(stored: int) -> str:
    return "_ofa_sparse_kernel" if stored else "_ofa_fused_kernel"


def specialize(args, kwargs, kernel: str = "_ofa_fused_kernel") -> dict:
    """What a launch of `kernel` compiles: Triton's binder run on the recorded arguments for the sm_90 backend."""
    from triton.runtime.jit import create_function_from_signature

    kern = getattr(kernel_module(), kernel)
    backend = _backend()
    binder = create_function_from_signature(kern.signature, kern.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kern._pack_args(backend, dict(kwargs), bound, specialization, options)
    return {"signature": signature, "constexprs": constexprs, "attrs": attrs, "num_warps": options.num_warps,
            "kernel": kernel}


def _key(spec: dict) -> str:
    return repr((spec["kernel"], sorted(spec["signature"].items()), sorted(spec["constexprs"].items(), key=repr),
                 sorted(spec["attrs"].items(), key=repr), spec["num_warps"]))


@dataclass
class TritonConfig:
    dtype: str
    num_branches: int
    branch_rows: int
    block: int
    single_block: bool
    want_grad: bool
    teacher_grad: bool
    teacher_accumulate: bool
    vec: int
    num_warps: int
    problems: List[str] = field(default_factory=list)  # the problems that launch it
    regs: Optional[int] = None
    stack: Optional[int] = None
    local: Optional[int] = None
    spill_stores: Optional[int] = None  # from the ptxas log when this process compiled it (else None)
    shared: Optional[int] = None
    error: Optional[str] = None
    stored_block: int = 0  # STORED_BLOCK of the sparse-teacher kernel; 0: the dense kernel

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    @property
    def spills(self) -> bool:
        return bool(self.local or self.stack or self.spill_stores)

    def name(self) -> str:
        kind = "single" if self.single_block else "loop"
        flags = "fwd" if not self.want_grad else ("grad+tgrad" if self.teacher_grad else "grad")
        if self.teacher_accumulate:
            flags += "+acc"
        sparse = f"sparse STORED {self.stored_block} " if self.stored_block else ""
        return (f"{sparse}{self.dtype} K{self.num_branches}/R{self.branch_rows} BLOCK {self.block} {kind} VEC {self.vec} "
                f"{flags} w{self.num_warps}")


def triton_configs(problems: Sequence[Problem]) -> Dict[str, Tuple[TritonConfig, dict]]:
    """Unique compiled variants over `problems`: key -> (config, spec)."""
    found: Dict[str, Tuple[TritonConfig, dict]] = {}
    for problem in problems:
        for args, kwargs in record_launches(problem):
            spec = specialize(args, kwargs, _kernel_name(problem.stored))
            key = _key(spec)
            if key not in found:
                k = kwargs
                found[key] = (TritonConfig(problem.dtype, k["NUM_BRANCHES"], k["BRANCH_ROWS"], k["BLOCK"],
                                           bool(k.get("SINGLE_BLOCK")), bool(k["WANT_GRAD"]),
                                           bool(k.get("TEACHER_GRAD")), bool(k.get("TEACHER_ACCUMULATE")), k["VEC"],
                                           k["num_warps"], stored_block=k.get("STORED_BLOCK", 0)), spec)
            found[key][0].problems.append(problem.label())
    return found


def _cuobjdump() -> Optional[str]:
    import triton

    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.isfile(path):
            return path
    except Exception:  # noqa: BLE001 (older Triton: no knobs)
        pass
    bundled = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    return bundled[0] if bundled else shutil.which("cuobjdump")


def _parse_ptxas(log: str) -> dict:
    out = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes smem", log)
    if m:
        out["smem"] = int(m.group(1))
    return out


def compile_triton(spec: dict) -> dict:
    """Compiles one specialized launch for sm_90; returns regs, stack, local, spill_stores, shared."""
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = getattr(kernel_module(), spec["kernel"])
    src = ASTSource(fn=kern, signature=spec["signature"], constexprs=spec["constexprs"], attrs=spec["attrs"])
    options = _backend().parse_options({"num_warps": spec["num_warps"]})
    log = io.StringIO()
    try:
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True  # printed only when ptxas really runs (not on a cache hit)
    except Exception:  # noqa: BLE001
        pass
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", TRITON_ARCH, 32), options=options.__dict__)
    result = {"shared": int(compiled.metadata.shared)}
    result.update({k: v for k, v in _parse_ptxas(log.getvalue()).items() if k in ("regs", "stack", "spill_stores")})
    tool = _cuobjdump()
    if tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
        if m:
            result.update(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(4)))
    if "regs" not in result:
        raise RuntimeError("neither cuobjdump -res-usage nor the ptxas log gave the register count")
    return result


def _compile_worker(spec: dict) -> dict:
    try:
        return compile_triton(spec)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[-700:]}"}


def compile_all(found: Dict[str, Tuple[TritonConfig, dict]], jobs: int = 2) -> List[TritonConfig]:
    specs = [spec for _, spec in found.values()]
    if jobs > 1 and len(specs) > 1:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_worker, specs))
    else:
        results = [_compile_worker(s) for s in specs]
    configs = []
    for (config, _), result in zip(found.values(), results):
        for k, v in result.items():
            setattr(config, k, v)
        configs.append(config)
    return configs


def problems(full: bool = True) -> List[Problem]:
    ks, cs, ps = (FULL_KS, FULL_CS, PASSES) if full else (QUICK_KS, QUICK_CS, QUICK_PASSES)
    out = [Problem(d, K, C, p) for d in DTYPES for K in ks for C in cs for p in ps]
    stored, sparse_ps, sparse_ds = ((FULL_STORED, SPARSE_PASSES, DTYPES) if full
                                    else (QUICK_STORED, QUICK_SPARSE_PASSES, QUICK_SPARSE_DTYPES))
    out += [Problem(d, K, C, p, stored=k) for d in sparse_ds for K in ks for C in cs for k in stored for p in sparse_ps]
    for B, C, K in REFERENCE_SHAPES:  # the reference shapes themselves, with their real batch
        out += [Problem(d, K, C, p, B=B) for d in ("fp32", "bf16") for p in PASSES]
    return out


# ----------------------------------------------------------------------------------------------
# CUDA: nvcc -Xptxas -v for sm_90
# ----------------------------------------------------------------------------------------------
def _build_module():
    spec = importlib.util.spec_from_file_location("ofakd_build_resources", ROOT / "ofakd_fast" / "loss" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvcc_path() -> Optional[str]:
    home = _build_module().find_cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")


def cuda_command(output: str, arch: int = 90) -> List[str]:
    """The nvcc command setup.py's CUDAExtension would run for the kernel, for one architecture, with -Xptxas -v."""
    import torch.utils.cpp_extension as cpp_extension

    build = _build_module()
    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch: include_paths(cuda=True)
        includes = cpp_extension.include_paths(cuda=True)
    return [nvcc_path() or "nvcc", "-c", str(CUDA_SOURCE), "-o", output, *[f"-I{p}" for p in includes],
            *cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", "-std=c++17",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", *build.nvcc_flags(), "-Xptxas", "-v"]


_DTYPE_OF_MANGLED = {"IfE": "fp32", "IdE": "fp64", "IN3c108BFloat16EE": "bf16", "IN3c104HalfEE": "fp16"}
# The __global__ kernels of csrc/ofa_loss_cuda.cu: the dense teacher's and the sparse teacher's.
CUDA_KERNELS = ("ofa_rows_kernel", "ofa_sparse_rows_kernel")


def _kernel_of(entry: str) -> Optional[Tuple[str, str]]:
    """(kernel, dtype) of a mangled entry name such as _ZN5ofakd11cuda_kernel15ofa_rows_kernelIfEEv... (the
    length prefix tells ofa_rows_kernel from ofa_sparse_rows_kernel)."""
    for kernel in CUDA_KERNELS:
        for code, dtype in _DTYPE_OF_MANGLED.items():
            if f"{len(kernel)}{kernel}{code}" in entry:
                return kernel, dtype
    return None


def cuda_resources(arch: int = 90) -> Dict[str, Dict[str, dict]]:
    """{kernel: {dtype: regs, stack, spill_stores, spill_loads, smem (static)}} of the CUDA_KERNELS from ptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = cuda_command(os.path.join(tmp, "k.o"), arch)
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"nvcc failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out: Dict[str, Dict[str, dict]] = {}
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", proc.stderr):
        m = re.search(r"Compiling entry function '(\S+)'", block)
        found = _kernel_of(m.group(1)) if m else None
        if found:
            out.setdefault(found[0], {})[found[1]] = _parse_ptxas(block)
    missing = [kernel for kernel in CUDA_KERNELS if kernel not in out]
    if missing:
        raise RuntimeError(f"no {', '.join(missing)} entry in the ptxas output:\n{proc.stderr[-3000:]}")
    return out


def cuda_launch(C: int, dtype: str) -> dict:
    """plan_launch of csrc/ofa_loss_cuda_launch.h (threads per block, chunks, dynamic shared bytes)."""
    size = ITEMSIZE[dtype]
    W = 16 // size
    slots = (C + 2 * W - 2) // W
    max_threads = 256 if size == 8 else 512  # max_row_threads() of the launch plan
    threads = 32
    while threads < slots and threads < max_threads:
        threads *= 2
    acc = 8 if size == 8 else 4
    return {"threads": threads, "chunks": -(-slots // threads), "dyn_smem": 2 * threads * W * acc}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} B"


def render(configs: List[TritonConfig], cuda: Optional[Dict[str, dict]], cuda_error: Optional[str],
           triton_note: str, env: str) -> str:
    lines = ["## Compiled resources of the GPU kernels (sm_90, H100/H200)", "", f"Generated by `.venv/bin/python benchmarks/resources.py --write` ({env}). sm_90 limits per SM: "
             "65536 registers (allocated per warp in units of 256), 2048 threads, 32 blocks, 228 KB shared "
             "(1 KB reserved per block). Occupancy = resident warps / 64. Spills: ptxas stack/spill bytes "
             "(CUDA), cubin LOCAL/STACK bytes (Triton). Checked by `tests/loss/test_kernel_resources.py`.", ""]
    # Traffic.
    lines += ["**Bytes to move and H200 roofline (4.8 TB/s)**: forward reads (K + 1)·B·C logits, "
              "forward+backward also writes K·B·C gradients (teacher gradient: + B·C). The Triton column loop "
              "(C > BLOCK) reads the logits twice when gradients are wanted (upper bound, if L2 serves nothing).", "",
              "| shape B x C x K | dtype | forward | fwd+bwd | roofline fwd | roofline fwd+bwd | "
              "column loop fwd+bwd (2 reads) |", "|---|---|---|---|---|---|---|"]
    for B, C, K in REFERENCE_SHAPES:
        for dtype in ("fp32", "bf16"):
            t = traffic(B, C, K, dtype)
            loop = f"{t['loop_fwdbwd_bytes'] / 1e6:.1f} MB, {t['loop_fwdbwd_us']:.1f} us" if C > 1024 else "n/a (single block)"
            lines.append(f"| {B} x {C} x {K} | {dtype} | {t['fwd_bytes'] / 1e6:.2f} MB | {t['fwdbwd_bytes'] / 1e6:.2f} MB "
                         f"| {t['fwd_us']:.2f} us | {t['fwdbwd_us']:.2f} us | {loop} |")
    lines.append("")
    # CUDA.
    lines += ["**CUDA kernels** (`ofa_rows_kernel`, dense teacher; `ofa_sparse_rows_kernel`, sparse teacher; "
              "`nvcc -O3 -Xptxas -v` for sm_90 with the flags of "
              "`build.py`; `__launch_bounds__(max_row_threads, MinBlocksPerSM)`: 512 threads, 256 for fp64; shared = "
              "static + `row_scratch_bytes` (dense only)):", ""]
    if cuda is None:
        lines += [f"not compiled: {cuda_error}", ""]
    else:
        lines += ["| kernel | dtype | registers | stack | spill stores / loads | static smem | launch at C = 1000 | "
                  "occupancy | launch at C = 21841 | occupancy |", "|---|---|---|---|---|---|---|---|---|---|"]
        for kernel, dtype in ((kernel, dtype) for kernel in CUDA_KERNELS for dtype in DTYPES):
            r = cuda.get(kernel, {}).get(dtype)
            if r is None:
                continue
            cells = []
            for C in (1000, 21841):
                p = cuda_launch(C, dtype)
                smem = r.get("smem", 0) + (p["dyn_smem"] if kernel == "ofa_rows_kernel" else 0)
                o = occupancy(r["regs"], p["threads"], smem)
                cells += [f"{p['threads']} thr, {p['chunks']} chunk(s), {_kb(smem)} smem",
                          f"{o['blocks']} blk = {o['occupancy']:.0%} ({o['limiter']})"]
            spill = f"{r.get('spill_stores', '?')} / {r.get('spill_loads', '?')} B"
            if r.get("spill_stores"):
                spill = f"**{spill}**"
            lines.append(f"| {kernel} | {dtype} | {r['regs']} | {r.get('stack', '?')} B | {spill} | {r.get('smem', '?')} B | "
                         + " | ".join(cells) + " |")
        lines.append("")
    # Triton: reference shapes.
    lines += [f"**Triton kernel** (`_ofa_fused_kernel`, compiled for `GPUTarget('cuda', 90, 32)` = sm_90a; "
              f"{triton_note}). The dispatcher's launches at the reference shapes:", "",
              "| shape | dtype | pass | BLOCK x rows | kind | VEC | warps | registers | local/stack | shared | occupancy |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    def occ(c):
        o = occupancy(c.regs, c.threads, c.shared)
        return f"{o['blocks']} blk x {c.num_warps} w = {o['occupancy']:.0%} ({o['limiter']})"

    for B, C, K in REFERENCE_SHAPES:
        for dtype in ("fp32", "bf16"):
            for p in PASSES:
                label = Problem(dtype, K, C, p, B=B).label()
                for c in configs:
                    if label in c.problems and c.error is None:
                        lines.append(f"| {B}x{C}x{K} | {dtype} | {p} | {c.block} x {c.branch_rows} | "
                                     f"{'single' if c.single_block else 'loop'} | {c.vec} | {c.num_warps} | {c.regs} | "
                                     f"{c.local or 0} / {c.stack or 0} B | {_kb(c.shared)} | {occ(c)} |")
    lines.append("")
    ok = [c for c in configs if c.error is None]
    bad = [c for c in configs if c.error is not None]
    spilled = [c for c in ok if c.spills]
    lines += [f"**All {len(configs)} Triton variants** the dispatcher picks over dtypes {', '.join(DTYPES)}, "
              f"K in {FULL_KS}, C in {FULL_CS}, passes {', '.join(PASSES)} (B = 16; K = 13 adds the accumulating "
              f"second launch; the sparse-teacher kernel with k in {FULL_STORED}, passes {', '.join(SPARSE_PASSES)}): "
              f"{len(spilled)} spill, {len(bad)} failed to compile; per dtype and tile:", "",
              "| dtype | tile rows x BLOCK (warps) | variants | registers min..max | spills | shared max | "
              "occupancy min..max |", "|---|---|---|---|---|---|---|"]
    groups: Dict[tuple, List[TritonConfig]] = {}
    for c in ok:
        dtype = f"{c.dtype} sparse" if c.stored_block else c.dtype
        groups.setdefault((bool(c.stored_block), DTYPES.index(c.dtype), dtype, c.branch_rows * c.block, c.num_warps),
                          []).append(c)
    for (_, _, dtype, tile, warps), cs in sorted(groups.items()):
        occs = [occupancy(c.regs, c.threads, c.shared)["occupancy"] for c in cs]
        tiles = sorted({f"{c.branch_rows}x{c.block}" for c in cs}, key=lambda s: int(s.split("x")[0]))
        lines.append(f"| {dtype} | {', '.join(tiles)} ({warps}) | {len(cs)} | {min(c.regs for c in cs)}..{max(c.regs for c in cs)} "
                     f"| {sum(c.spills for c in cs)} | {_kb(max(c.shared for c in cs))} | {min(occs):.0%}..{max(occs):.0%} |")
    if spilled or bad:
        lines.append("")
    for c in spilled:
        lines.append(f"* spills: {c.name()}: {c.regs} registers, local {c.local or 0} B, stack {c.stack or 0} B "
                     f"({', '.join(c.problems[:2])})")
    for c in bad:
        lines.append(f"* failed: {c.name()}: {c.error}")
    return "\n".join(lines).rstrip() + "\n"


def write_readme(section: str, path: Path = README) -> None:
    text = path.read_text()
    block = f"{START}\n{section}{END}"
    if START in text and END in text:
        pre, rest = text.split(START, 1)
        post = rest.split(END, 1)[1]
        text = pre + block + post
    else:
        text = text + ("" if text.endswith("\n") else "\n") + "\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="fill the marked section of benchmarks/README.md")
    parser.add_argument("--quick", action="store_true", help="only the test's subset of problems")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel Triton compiles")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)

    import torch
    import triton

    env = f"torch {torch.__version__}, triton {triton.__version__}"
    cuda, cuda_error = None, None
    try:
        cuda = cuda_resources()
        out = subprocess.run([nvcc_path() or "nvcc", "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+)", out)
        env += f", nvcc {m.group(1) if m else '?'}"
    except Exception as exc:  # noqa: BLE001
        cuda_error = f"{type(exc).__name__}: {exc}"
    reason = triton_unavailable()
    configs: List[TritonConfig] = []
    note = "not compiled: " + reason if reason else "registers/LOCAL/STACK from the bundled `cuobjdump -res-usage`"
    if reason is None:
        configs = compile_all(triton_configs(problems(full=not args.quick)), jobs=max(1, args.jobs))
    section = render(configs, cuda, cuda_error, note, env)
    if args.json:
        Path(args.json).write_text(json.dumps({"cuda": cuda, "cuda_error": cuda_error,
                                               "triton": [asdict(c) for c in configs]}, indent=1, default=str))
    if args.write:
        write_readme(section)
        print(f"wrote the resources section of {README}")
    else:
        print(section)
    spills = [c for c in configs if c.spills] + [d for figures in (cuda or {}).values()
                                                  for d, r in figures.items() if r.get("spill_stores")]
    if spills:
        print(f"note: {len(spills)} kernel variant(s) spill", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
