"""Shared test setup: Triton's interpreter for CPU tensors, and the backends that run here."""
import os

import pytest
import torch

# Without a GPU, Triton's interpreter runs the Triton backend on CPU tensors; it must be set
# before triton is imported. With a GPU the Triton kernels are compiled and run on CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ofakd_fast.loss.backends import BACKENDS, backend_error  # noqa: E402

CPU = torch.device("cpu")
# The fused backends that can run on CPU tensors on this machine, plus the reference.
BACKENDS_HERE = [name for name in BACKENDS if backend_error(name, CPU) is None]
# Triton under the interpreter is ~1000x slower than compiled code: give it the small cases.
SLOW_BACKENDS = {"triton"}


@pytest.fixture(params=BACKENDS_HERE)
def backend(request):
    return request.param


def make_case(batch, classes, branches, dtype=torch.float32, scale=3.0, seed=0, requires_grad=True):
    """Random student branches, teacher, hard targets; logits ~ N(0, scale)."""
    gen = torch.Generator().manual_seed(seed)
    students = [(torch.randn(batch, classes, generator=gen, dtype=torch.float64) * scale).to(dtype)
                .requires_grad_(requires_grad) for _ in range(branches)]
    teacher = (torch.randn(batch, classes, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, max(classes, 1), (batch,), generator=gen)
    return students, teacher, target
