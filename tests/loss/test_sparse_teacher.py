"""The sparse-teacher mode of the fused loss (top-k teacher logits, their classes, the row's lse) on
every kernel, against the float64 oracle (reference.ofa_loss_log_domain on a SparseTeacher, i.e. the
dense teacher it stands for: stored classes exact, the rest's mass spread evenly).

Kernels (each the contract of ``ofakd_fast_C::fused_forward_sparse``: branches, teacher logits [B, k],
indices [B, k] int64, lse [B], target, eps, T, grad_scale [K, B] or None -> loss rows [K, B], branch
gradients [K, B, C] or empty): ``cpu`` (the C++ kernel), ``triton-interpreter`` (CPU tensors, small
column blocks so the column loop runs), ``cuda-host-emulated`` (the CUDA row program on the host,
tests/loss/cuda_emulator.cpp) and, on a GPU, ``cuda-gpu`` and ``triton-gpu``.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_checks  # noqa: E402

from ofakd_fast.loss import OFALoss, SparseTeacher, ofa_loss_multi, sparse_teacher  # noqa: E402
from ofakd_fast.loss.extension import cpu_extension_error, cuda_extension_error  # noqa: E402
from ofakd_fast.loss.reference import ofa_loss_log_domain  # noqa: E402
from ofakd_fast.loss.sparse import dense_log_probs  # noqa: E402

SMALL_BLOCK = 64


def _cpu_kernel():
    if cpu_extension_error():
        pytest.skip(f"the C++ CPU kernel is unavailable: {cpu_extension_error()}")
    return torch.device("cpu"), torch.ops.ofakd_fast_C.fused_forward_sparse


def _triton_kernel(interpreted: bool):
    def make():
        pytest.importorskip("triton")
        device = torch.device("cpu" if interpreted else "cuda")
        if not interpreted and not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU: the compiled Triton kernel runs on CUDA tensors only")
        module = triton_checks.load_kernel_module(interpret=interpreted)
        reason = module.triton_unavailable_reason(device)
        if reason is not None:
            pytest.skip(reason)
        block = SMALL_BLOCK if interpreted else None
        return device, lambda *args: module.ofa_fused_forward_sparse_triton(*args, max_block=block)
    return make


def _cuda_emulated():
    import cuda_checks

    reason = cuda_checks.emulator_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return torch.device("cpu"), cuda_checks.EmulatedCudaKernel(threads=3).fused_forward_sparse


def _cuda_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the CUDA kernel runs on CUDA tensors only")
    if cuda_extension_error():
        pytest.skip(f"the CUDA extension is unavailable: {cuda_extension_error()}")
    return torch.device("cuda"), torch.ops.ofakd_fast_C.fused_forward_sparse


KERNELS = {"cpu": _cpu_kernel, "triton-interpreter": _triton_kernel(True), "cuda-host-emulated": _cuda_emulated,
           "cuda-gpu": _cuda_gpu, "triton-gpu": _triton_kernel(False)}


@pytest.fixture(scope="module", params=list(KERNELS))
def kernel(request):
    return KERNELS[request.param]()


def make_case(B, C, k, K, dtype, device, *, seed=0, scale=3.0, T=1.0, target_stored=None):
    """Branches [B, C] x K, a SparseTeacher of random teacher logits, targets: in the stored classes
    for even rows, outside them for odd rows (when k < C), unless `target_stored` forces one."""
    gen = torch.Generator().manual_seed(seed)
    branches = [(torch.randn(B, C, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
                for _ in range(K)]
    dense = torch.randn(B, C, generator=gen, dtype=torch.float64) * scale
    teacher = sparse_teacher(dense, k, T)
    target = torch.empty(B, dtype=torch.long)
    for row in range(B):
        stored = set(teacher.indices[row].tolist())
        inside = target_stored if target_stored is not None else (row % 2 == 0 or k == C)
        choices = sorted(stored) if inside or k == C else sorted(set(range(C)) - stored)
        target[row] = choices[int(torch.randint(len(choices), (1,), generator=gen))]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    teacher = SparseTeacher(teacher.indices.to(device), teacher.logits.to(acc).to(device), teacher.lse.to(acc).to(device))
    return branches, teacher, target.to(device)


def reference(branches, teacher, target, eps, T, grad_scale, dtype=torch.float64):
    """Loss rows [K, B] and gradients [K, B, C] of the oracle in `dtype`, for the row factors grad_scale."""
    sparse = SparseTeacher(teacher.indices.cpu(), teacher.logits.cpu().double(), teacher.lse.cpu().double())
    students = [b.detach().cpu().to(dtype).requires_grad_() for b in branches]
    rows = torch.stack([ofa_loss_log_domain(s, sparse, target.cpu(), e, T) for s, e in zip(students, eps)])
    (rows * grad_scale.cpu().to(rows.dtype)).sum().backward()
    return rows.detach(), torch.stack([s.grad for s in students])


def run(fn, branches, teacher, target, eps, T, grad_scale):
    eps_tensor = torch.tensor(eps, dtype=torch.float64)
    return fn(branches, teacher.logits, teacher.indices, teacher.lse, target, eps_tensor, float(T), grad_scale)


def check_parity(kernel, *, B, C, k, K, T=1.0, dtype=torch.float32, seed=0, scale=3.0, eps=None, target_stored=None):
    device, fn = kernel
    eps = eps or [0.8 + 0.25 * i for i in range(K)]
    branches, teacher, target = make_case(B, C, k, K, dtype, device, seed=seed, scale=scale, T=T,
                                          target_stored=target_stored)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_scale = (torch.rand(K, B, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) * 2
                  - 0.5).to(acc).to(device)
    loss, grads = run(fn, branches, teacher, target, eps, T, grad_scale)
    assert loss.dtype == acc and loss.shape == (K, B)
    assert grads.dtype == dtype and grads.shape == (K, B, C)
    ref = reference(branches, teacher, target, eps, T, grad_scale)
    same = reference(branches, teacher, target, eps, T, grad_scale, dtype=dtype) if dtype != torch.float64 else ref
    triton_checks.assert_flash_close("loss rows", loss.cpu(), ref[0], same[0], acc)
    triton_checks.assert_flash_close("student grads", grads.cpu(), ref[1], same[1], dtype)


@pytest.mark.parametrize("C, k", [(7, 1), (7, 3), (37, 5), (150, 20), (150, 150), (1000, 10)])
@pytest.mark.parametrize("K, T", [(1, 1.0), (3, 0.5), (3, 4.0)])
def test_parity_float32(kernel, C, k, K, T):
    check_parity(kernel, B=4, C=C, k=k, K=K, T=T, seed=C + k + K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_parity_dtypes(kernel, dtype):
    check_parity(kernel, B=4, C=150, k=10, K=3, dtype=dtype, seed=5)


@pytest.mark.parametrize("target_stored", [True, False])
def test_target_reweighted_whether_stored_or_not(kernel, target_stored):
    check_parity(kernel, B=3, C=40, k=4, K=2, eps=[1.0, 1.5], target_stored=target_stored, seed=9)


def test_stability_large_logits(kernel):
    """Logits of magnitude 1e4: the stored classes hold all the mass (rest 0, w_rest 0), student rows
    far from their max; losses and gradients stay finite and match the oracle."""
    check_parity(kernel, B=3, C=150, k=5, K=2, scale=3e3, seed=2)


def test_eps_below_one_with_underflowing_rest(kernel):
    check_parity(kernel, B=3, C=150, k=5, K=2, scale=60.0, eps=[0.5, 0.9], seed=4)


def test_full_k_equals_dense_kernel(kernel):
    """k = C: the sparse kernel gives the dense loss (here: the float64 oracle on the dense logits)."""
    device, fn = kernel
    gen = torch.Generator().manual_seed(1)
    B, C, K, eps = 3, 37, 2, [1.2, 0.7]
    branches = [torch.randn(B, C, generator=gen, dtype=torch.float64).to(device) for _ in range(K)]
    dense = torch.randn(B, C, generator=gen, dtype=torch.float64)
    target = torch.randint(C, (B,), generator=gen)
    grad_scale = torch.ones(K, B, dtype=torch.float64, device=device)
    loss, grads = run(fn, branches, _on(sparse_teacher(dense, C), device), target.to(device), eps, 1.0, grad_scale)
    students = [b.detach().cpu().requires_grad_() for b in branches]
    rows = torch.stack([ofa_loss_log_domain(s, dense, target, e) for s, e in zip(students, eps)])
    rows.sum().backward()
    torch.testing.assert_close(loss.cpu(), rows.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads.cpu(), torch.stack([s.grad for s in students]), rtol=1e-12, atol=1e-12)


def test_loss_only_returns_empty_gradients(kernel):
    device, fn = kernel
    branches, teacher, target = make_case(2, 20, 3, 2, torch.float32, device)
    loss, grads = run(fn, branches, teacher, target, [1.0, 1.3], 1.0, None)
    assert loss.shape == (2, 2) and grads.numel() == 0


def _on(teacher: SparseTeacher, device) -> SparseTeacher:
    return SparseTeacher(*(t.to(device) for t in teacher))


# ------------------------------------------------------------------------------ through the public API

def test_reference_full_k_equals_dense():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    t = torch.randn(4, 10, generator=gen, dtype=torch.float64) * 4
    y = torch.randint(10, (4,), generator=gen)
    for T in (0.5, 1.0, 3.0):
        sparse = ofa_loss_log_domain(s, sparse_teacher(t, 10, T), y, 1.3, T)
        torch.testing.assert_close(sparse, ofa_loss_log_domain(s, t, y, 1.3, T), rtol=1e-13, atol=1e-13)


def test_reference_spreads_the_rest_evenly():
    t = torch.tensor([[4.0, 1.0, 0.0, -1.0, 2.0]], dtype=torch.float64)
    log_p = dense_log_probs(sparse_teacher(t, 2), 5)
    p_full = t.softmax(-1)
    assert torch.allclose(log_p.exp()[0, [0, 4]], p_full[0, [0, 4]])
    rest = (1 - p_full[0, [0, 4]].sum()) / 3
    assert torch.allclose(log_p.exp()[0, [1, 2, 3]], rest.expand(3))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_api_matches_reference_and_gradcheck(backend):
    """The public API on CPU tensors (Triton and CUDA are held to the oracle by the kernel tests above)."""
    if backend == "cpu" and cpu_extension_error():
        pytest.skip(f"the C++ CPU kernel is unavailable: {cpu_extension_error()}")
    branches, teacher, target = make_case(3, 30, 4, 2, torch.float64, torch.device("cpu"), seed=3)
    students = [b.requires_grad_() for b in branches]
    loss = ofa_loss_multi(students, teacher, target, [1.2, 0.9], backend=backend)
    expected = ofa_loss_multi(students, teacher, target, [1.2, 0.9], backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: ofa_loss_multi([a, b], teacher, target, [1.2, 0.9], backend=backend), tuple(students))


def test_ofaloss_module_and_weights_with_a_sparse_teacher():
    branches, teacher, target = make_case(4, 25, 3, 3, torch.float32, torch.device("cpu"), seed=6)
    students = [b.requires_grad_() for b in branches]
    criterion = OFALoss(eps=1.3, weights=[1.0, 0.5, 2.0])
    criterion(students, teacher, target).backward()
    fused = [s.grad.clone() for s in students]
    for s in students:
        s.grad = None
    losses = ofa_loss_multi(students, teacher, target, 1.3, backend="reference")
    (losses * torch.tensor([1.0, 0.5, 2.0])).sum().backward()
    for got, want in zip(fused, (s.grad for s in students)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_sparse_teachers_are_named():
    branches, teacher, target = make_case(2, 10, 3, 1, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="distinct"):
        ofa_loss_multi(branches, teacher._replace(indices=teacher.indices[:, [0, 0, 1]]), target, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ofa_loss_multi(branches, teacher._replace(indices=teacher.indices + 10), target, 1.0)
    with pytest.raises(ValueError, match="lse"):
        ofa_loss_multi(branches, teacher._replace(lse=teacher.lse[:1]), target, 1.0)
    with pytest.raises(TypeError, match="indices"):
        ofa_loss_multi(branches, teacher._replace(indices=teacher.indices.float()), target, 1.0)


def test_compile_fullgraph_keeps_the_op_with_a_sparse_teacher():
    if cpu_extension_error():
        pytest.skip(f"the C++ CPU kernel is unavailable: {cpu_extension_error()}")
    branches, teacher, target = make_case(4, 30, 5, 2, torch.float32, torch.device("cpu"), seed=8)
    students = [b.requires_grad_() for b in branches]

    def step(a, b, indices, logits, lse, y):
        return ofa_loss_multi([a, b], SparseTeacher(indices, logits, lse), y, 1.2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(*students, *teacher, target)
    got.backward()
    grads = [s.grad.clone() for s in students]
    for s in students:
        s.grad = None
    step(*students, *teacher, target).backward()
    torch.testing.assert_close(got, step(*students, *teacher, target))
    for a, b in zip(grads, (s.grad for s in students)):
        torch.testing.assert_close(a, b)
