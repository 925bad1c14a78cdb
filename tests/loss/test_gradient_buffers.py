"""The CPU kernel's reusable gradient buffers (csrc/reusable_buffer.h).

A returned gradient must not be a view of a much larger buffer left by an earlier, bigger call: it
would pin that buffer and torch.save would write all of it. The steady state of a training loop
(the same shape every step, the previous gradient dropped) must still reuse its buffer.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ofakd_fast
from ofakd_fast import ofa_loss_multi
from ofakd_fast.loss.extension import cpu_extension_error

pytestmark = pytest.mark.skipif(cpu_extension_error() is not None, reason=f"no CPU kernel: {cpu_extension_error()}")

MAX_OVERSIZE = 2  # ReusableBuffers::kMaxOversize


def _inputs(K, B, C, seed=0):
    gen = torch.Generator().manual_seed(seed)
    branches = [torch.randn(B, C, generator=gen) for _ in range(K)]
    teacher = torch.randn(B, C, generator=gen)
    target = torch.randint(0, C, (B,), generator=gen)
    return branches, teacher, target


def _gradients(K, B, C):
    """(grad_branches, grad_teacher) of one fused_forward call with both gradients."""
    branches, teacher, target = _inputs(K, B, C)
    eps = torch.ones(K, dtype=torch.float64)
    _, grad_branches, grad_teacher = torch.ops.ofakd_fast_C.fused_forward(
        branches, teacher, target, eps, 1.0, torch.ones(K, B), True)
    return grad_branches, grad_teacher


def _pinned_bytes_in_a_fresh_process(script: str) -> list:
    """Runs `script` (which prints "nbytes storage_nbytes" lines) in a new interpreter with this module's
    helpers, and returns the pairs. A fresh process because the storage's Python object that
    untyped_storage() creates stays alive as long as the buffer cache holds the storage, so this
    process's cache would count that buffer as in use from then on."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n" \
           "from test_gradient_buffers import _gradients, _inputs\n" + textwrap.dedent(script)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return [tuple(map(int, line.split())) for line in done.stdout.splitlines()]


@pytest.fixture(autouse=True)
def empty_buffer_cache():
    ofakd_fast.empty_cache()
    yield
    ofakd_fast.empty_cache()


def test_small_gradient_after_a_big_call_gets_its_own_buffer():
    pinned = _pinned_bytes_in_a_fresh_process("""
        big = _gradients(5, 256, 20000)  # 102 MB of student gradients, 20 MB of teacher gradient
        del big
        for grad in _gradients(1, 64, 5000):  # 1.28 MB each: above the cache's minimum size
            print(grad.nbytes, grad.untyped_storage().nbytes())
    """)
    assert len(pinned) == 2
    for nbytes, storage_nbytes in pinned:
        assert nbytes >= 1 << 20
        assert storage_nbytes <= MAX_OVERSIZE * nbytes, (storage_nbytes, nbytes)


def test_small_student_gradient_after_a_big_backward_gets_its_own_buffer():
    """The same through the public API: the student's .grad of a K = 1 call."""
    pinned = _pinned_bytes_in_a_fresh_process("""
        from ofakd_fast import ofa_loss_multi
        students, teacher, target = _inputs(5, 256, 20000)
        students = [s.requires_grad_() for s in students]
        ofa_loss_multi(students, teacher, target, 1.2, backend="cpu").sum().backward()
        del students
        (student,), teacher, target = _inputs(1, 64, 5000)
        student.requires_grad_()
        ofa_loss_multi([student], teacher, target, 1.2, backend="cpu").sum().backward()
        print(student.grad.nbytes, student.grad.untyped_storage().nbytes())
    """)
    (nbytes, storage_nbytes), = pinned
    assert storage_nbytes <= MAX_OVERSIZE * nbytes, (storage_nbytes, nbytes)


def test_same_shape_calls_reuse_the_buffer_once_the_gradient_is_dropped():
    grad_branches, grad_teacher = _gradients(3, 64, 5000)
    pointers = grad_branches.data_ptr(), grad_teacher.data_ptr()
    del grad_branches, grad_teacher
    grad_branches, grad_teacher = _gradients(3, 64, 5000)
    assert (grad_branches.data_ptr(), grad_teacher.data_ptr()) == pointers


def test_a_slightly_smaller_call_reuses_the_buffer():
    """The last, smaller batch of an epoch: within kMaxOversize the buffer is reused."""
    grad_branches, _ = _gradients(3, 64, 5000)
    pointer = grad_branches.data_ptr()
    del grad_branches, _
    grad_branches, _ = _gradients(3, 40, 5000)
    assert grad_branches.data_ptr() == pointer


def test_a_held_gradient_is_never_reused():
    held, _ = _gradients(3, 64, 5000)
    fresh, _ = _gradients(3, 64, 5000)
    assert fresh.data_ptr() != held.data_ptr()


def test_training_loop_reuses_the_student_gradient_buffer():
    """ofa_loss_multi + backward, the gradients dropped between steps (optimizer.zero_grad(set_to_none=True))."""
    students, teacher, target = _inputs(3, 64, 5000)
    students = [s.requires_grad_() for s in students]
    pointers = []
    for _ in range(3):
        ofa_loss_multi(students, teacher, target, 1.2, backend="cpu").sum().backward()
        pointers.append(students[0].grad.data_ptr())
        for s in students:
            s.grad = None
    assert pointers[0] == pointers[1] == pointers[2]


STREAM_BYTES = 32 << 20  # kStreamGradBytes (csrc/ofa_loss_cpu_row.h): larger gradients bypass the caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_gradients_equal_the_cached_stores(dtype):
    """Above kStreamGradBytes the gradient rows are written with non-temporal stores, after an ordinary
    head up to the vector alignment and before an ordinary tail (C odd: every row starts elsewhere).
    Each row must equal the same row from a small call, whose gradients are stored through the caches."""
    classes, chunk = 4099, 256
    batch = -(-STREAM_BYTES // (classes * dtype.itemsize)) // chunk * chunk + chunk
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(batch, classes, generator=gen) * 3).to(dtype)
    teacher = (torch.randn(batch, classes, generator=gen) * 3).to(dtype)
    target = torch.randint(0, classes, (batch,), generator=gen)
    eps = torch.full((1,), 1.2, dtype=torch.float64)
    kernel = torch.ops.ofakd_fast_C.fused_forward
    _, streamed, _ = kernel([student], teacher, target, eps, 1.0, torch.ones(1, 1), False)
    assert streamed.nbytes >= STREAM_BYTES
    tolerance = {"rtol": 2 ** -7, "atol": 1e-6} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-9}
    for first in range(0, batch, chunk):
        rows = slice(first, first + chunk)
        _, cached, _ = kernel([student[rows]], teacher[rows], target[rows], eps, 1.0, torch.ones(1, 1), False)
        assert cached.nbytes < STREAM_BYTES
        torch.testing.assert_close(streamed[0, rows].float(), cached[0].float(), **tolerance)
