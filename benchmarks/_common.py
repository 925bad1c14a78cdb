"""Cases, variants and timing helpers shared by the benchmark suites, the memory probe and the report.

Nothing here is installed: ``benchmarks/`` is not a package of ``setup.py``. The suites import this
module by name (pytest puts ``benchmarks/`` on ``sys.path``), the scripts insert their own folder.

Vocabulary
----------
case     one problem: device, B x C x K, dtype.
mode     ``fwd`` (the loss under ``torch.no_grad()``: no gradient is computed, the fused CPU path
         then skips its gradient pass too) or ``fwdbwd`` (the loss of leaf branch logits that
         require grad, then ``torch.autograd.grad(losses.sum(), branches)``).
variant  ``fused:<backend>`` (``ofa_loss_multi`` with that backend), ``eager`` (the per-branch
         reference loop ``ofa_loss_multi_reference``, as the original code runs it), ``compile``
         (``torch.compile`` of that loop, static shapes), ``floor`` (the memcpy below).

The floor
---------
A fused forward+backward must at least read the K + 1 logit tensors and write the K gradient
tensors: (K + 1) * B * C elements read and K * B * C written, (2K + 1) * B * C elements of traffic.
The floor is one ``dst.copy_(src)`` between two pre-touched flat tensors of the case's dtype with
n = ceil((2K + 1) * B * C / 2) elements each: it reads n and writes n elements, the same
(2K + 1) * B * C * itemsize bytes in total, through the same cache hierarchy, with the same kind
of ordinary (write-allocate) stores the kernels use. ``floor_ratio = time / floor time``.
"""
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, List, Optional

import torch

EPS = 1.2           # a typical OFA exponent (the original's published commands use 1.0 to 1.5)
TEMPERATURE = 1.0   # the original code's only temperature

NAMED_SHAPES = {    # (B, C, K)
    "cifar100": (128, 100, 5),
    "imagenet1k": (256, 1000, 5),
    "imagenet21k": (256, 21841, 5),
}
K_SWEEP = (1, 2, 3, 4, 5, 6, 7, 8)                          # at B = 256, C = 1000
C_SWEEP = (100, 256, 1000, 4096, 10000, 21841, 32768)       # at B = 256, K = 5
SWEEP_BATCH = 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwdbwd")

# Trainer benchmark: ResNet-18 student, DeiT-Tiny teacher, 224 px, batch 32, synthetic data.
TRAINER = {"student": "resnet18", "teacher": "deit_tiny_patch16_224", "image_size": 224, "batch": 32,
           "num_classes": 1000, "eps": EPS}


@dataclass(frozen=True)
class Case:
    device: str
    B: int
    C: int
    K: int
    dtype: str  # key of DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def grad_bytes(self) -> int:
        return self.K * self.B * self.C * self.itemsize

    @property
    def floor_elements(self) -> int:
        return ((2 * self.K + 1) * self.B * self.C + 1) // 2

    @property
    def floor_bytes_moved(self) -> int:
        """Bytes read plus bytes written by the floor copy (= the fused call's compulsory traffic, rounded up)."""
        return 2 * self.floor_elements * self.itemsize

    @property
    def shape(self) -> str:
        return f"{self.B}x{self.C}x{self.K}"

    def id(self) -> str:
        return f"{self.device}-{self.shape}-{self.dtype}"

    def info(self) -> dict:
        return {"device": self.device, "B": self.B, "C": self.C, "K": self.K, "dtype": self.dtype,
                "shape": self.shape, "grad_bytes": self.grad_bytes, "floor_bytes_moved": self.floor_bytes_moved}


def make_inputs(case: Case, requires_grad: bool = True, seed: int = 0):
    """K leaf branch logits [B, C] (requiring grad), teacher logits [B, C], int64 targets [B]; logits ~ N(0, 3)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = case.torch_dtype

    def logits():
        return (torch.randn(case.B, case.C, generator=gen) * 3.0).to(device=case.device, dtype=dtype)

    branches = [logits().requires_grad_(requires_grad) for _ in range(case.K)]
    teacher = logits()
    target = torch.randint(0, case.C, (case.B,), generator=gen).to(case.device)
    return branches, teacher, target


# ----------------------------------------------------------------------------- variants

FUSED_ON = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def fused_backends(device: str) -> List[str]:
    """Fused backends that run at speed on `device` here. Triton on CPU tensors (the interpreter) is
    a correctness tool, not a speed backend: never benchmarked on CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        return []
    from ofakd_fast.loss.backends import backend_error

    return [name for name in FUSED_ON[device] if backend_error(name, torch.device(device)) is None]


def loss_variants(device: str) -> List[str]:
    return [f"fused:{name}" for name in fused_backends(device)] + ["eager", "compile"]


def configure_compile():
    """Static shapes, and never a silent fall-back to eager after many recompiles (one per case)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = 4096
    dynamo_config.accumulated_recompile_limit = 1 << 16
    dynamo_config.fail_on_recompile_limit_hit = True


_COMPILED = {}


def loss_function(variant: str) -> Callable:
    """fn(branches, teacher, target) -> [K] branch losses, for a loss variant."""
    from ofakd_fast import ofa_loss_multi
    from ofakd_fast.loss.reference import ofa_loss_multi_reference

    if variant.startswith("fused:"):
        backend = variant.split(":", 1)[1]
        return lambda b, t, y: ofa_loss_multi(b, t, y, EPS, TEMPERATURE, backend=backend)
    if variant == "eager":
        return lambda b, t, y: ofa_loss_multi_reference(b, t, y, EPS, TEMPERATURE)
    if variant == "compile":
        if "compile" not in _COMPILED:
            configure_compile()
            _COMPILED["compile"] = torch.compile(ofa_loss_multi_reference, dynamic=False)
        compiled = _COMPILED["compile"]
        return lambda b, t, y: compiled(b, t, y, EPS, TEMPERATURE)
    raise ValueError(f"unknown loss variant {variant!r}")


def loss_step(variant: str, mode: str, branches, teacher, target) -> Callable[[], object]:
    """A closure running one forward (``fwd``) or forward+backward (``fwdbwd``) of the variant."""
    fn = loss_function(variant)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(branches, teacher, target)
    elif mode == "fwdbwd":
        def step():
            return torch.autograd.grad(fn(branches, teacher, target).sum(), branches)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return step


def floor_step(case: Case) -> Callable[[], object]:
    """The memcpy floor of a case (see the module docstring); both buffers are touched beforehand."""
    n = case.floor_elements
    src = torch.ones(n, dtype=case.torch_dtype, device=case.device)
    dst = torch.zeros(n, dtype=case.torch_dtype, device=case.device)
    dst.copy_(src)
    return lambda: dst.copy_(src)


# ----------------------------------------------------------------------------- timing

def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(step: Callable, device: str, calls: int = 1) -> float:
    """Wall time of `calls` calls (synchronised), for choosing a round count."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def rounds_for(seconds: float, budget: float, lo: int = 3, hi: int = 50) -> int:
    """Rounds that fit `budget` seconds for a call of `seconds`, within [lo, hi]."""
    return int(max(lo, min(hi, budget / max(seconds, 1e-6))))


# ----------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict:
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["loadavg"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        info["loadavg"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    return info


def no_cuda_reason() -> Optional[str]:
    if torch.cuda.is_available():
        return None
    return f"no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False)"


# ----------------------------------------------------------------------------- the loss plan

@dataclass
class PlannedCase:
    case: Case
    modes: tuple
    sets: tuple      # named shapes and sweeps the case belongs to
    quick: bool      # its forward+backward (and floor) are in the --quick subset


QUICK_CASES = {("imagenet1k", "fp32"), ("imagenet21k", "fp32"), ("imagenet21k", "bf16")}


def loss_plan(device: str) -> List[PlannedCase]:
    """Every loss case once, with the modes and sets it serves, in run order.

    Named shapes: fp32 and bf16, forward and forward+backward. The C sweep (K = 5): fp32 and bf16,
    forward+backward. The K sweep (C = 1000): fp32, forward+backward.
    """
    planned = {}

    def add(case, modes, set_name, quick=False):
        entry = planned.setdefault(case, PlannedCase(case, (), (), False))
        entry.modes = tuple(m for m in MODES if m in set(entry.modes) | set(modes))
        entry.sets = entry.sets + (set_name,)
        entry.quick = entry.quick or quick

    for dtype in DTYPES:
        for name, (B, C, K) in NAMED_SHAPES.items():
            add(Case(device, B, C, K, dtype), MODES, name, (name, dtype) in QUICK_CASES)
        for C in C_SWEEP:
            add(Case(device, SWEEP_BATCH, C, 5, dtype), ("fwdbwd",), "c_sweep")
    for K in K_SWEEP:
        add(Case(device, SWEEP_BATCH, 1000, K, "fp32"), ("fwdbwd",), "k_sweep")
    order = list(DTYPES)
    return sorted(planned.values(), key=lambda p: (order.index(p.case.dtype), p.case.C, p.case.K, p.case.B))
