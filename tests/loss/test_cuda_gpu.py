"""The CUDA kernel on a GPU: the shared kernel checks (tests/triton_checks.py, the same the Triton kernel
passes), the public API against the reference, float64 gradcheck, stability, bad input, no host
synchronisation, and agreement with the Triton backend. Skipped without a GPU.

Row lengths cover the three launch regimes: C = 37 (one warp per row), C = 1000 (256 threads, the row
held in registers) and C = 5003 (512 threads, the row streamed in 3 chunks; odd C, so consecutive rows
are aligned differently).
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import cuda_checks  # noqa: E402
from ofakd_fast import available_backends, ofa_loss_multi  # noqa: E402
from ofakd_fast.loss.extension import cuda_extension_error  # noqa: E402
from ofakd_fast.loss.backends import backend_error, resolve_backend  # noqa: E402
from ofakd_fast.loss.reference import ofa_loss_multi_reference  # noqa: E402

checks = cuda_checks.checks
DEVICE = torch.device("cuda")
C_REGIMES = [37, 1000, 5003]
op = cuda_checks.CompiledCudaOp()


@pytest.fixture(scope="module", autouse=True)
def cuda_kernel_built():
    error = cuda_extension_error()
    assert error is None, f"a GPU is present but the CUDA kernel is not: {error}"


# ----------------------------------------------------------------------------- the shared kernel checks

@pytest.mark.parametrize("C", C_REGIMES)
@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_parity_float32(C, K, T):
    checks.check_parity(op, DEVICE, B=5, C=C, K=K, T=T, seed=K)


@pytest.mark.parametrize("C", C_REGIMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_parity_dtypes(C, dtype):
    checks.check_parity(op, DEVICE, B=5, C=C, K=5, T=1.0, dtype=dtype, seed=11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, C", [(256, 1000), (8, 21841)], ids=["imagenet1k", "imagenet21k_rows"])
def test_parity_reference_shapes(B, C, dtype):
    checks.check_parity(op, DEVICE, B=B, C=C, K=5, T=1.0, dtype=dtype, seed=2)


def test_parity_all_eps_one():
    for C in C_REGIMES:
        checks.check_parity(op, DEVICE, B=3, C=C, K=3, T=2.0, eps=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("C", [37, 5003])
def test_more_branches_than_one_launch(C):
    """K = 34 > 32 branches per launch: the teacher gradient is summed across two launches."""
    checks.check_parity(op, DEVICE, B=3, C=C, K=34, T=1.0, layout="stacked")
    checks.check_parity(op, DEVICE, B=3, C=C, K=34, T=1.0, dtype=torch.bfloat16)


@pytest.mark.parametrize("C", C_REGIMES)
@pytest.mark.parametrize("layout", ["stacked", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts(C, layout, dtype):
    checks.check_parity(op, DEVICE, B=3, C=C, K=3, T=1.0, dtype=dtype, layout=layout)


def test_optional_outputs():
    checks.check_optional_outputs(op, DEVICE)


def test_grad_scale_broadcast():
    checks.check_grad_scale_broadcast(op, DEVICE)


@pytest.mark.parametrize("C", [5, 9, 300])
def test_gradcheck_float64(C):
    checks.check_gradcheck(op, DEVICE, C=C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T", [0.5, 4.0])
def test_stability_large_logits(dtype, T):
    checks.check_stability(op, DEVICE, dtype=dtype, T=T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_target_probability(dtype):
    checks.check_tiny_target_probability(op, DEVICE, dtype=dtype)


def test_empty_batch():
    checks.check_empty_batch(op, DEVICE)


def test_bad_target_gives_nan_rows():
    checks.check_bad_target(op, DEVICE)


# ----------------------------------------------------------------------------- the op on the GPU

def test_no_host_synchronisation():
    entries, _, teacher, target = checks.make_inputs(4, 1000, 3, torch.float32, DEVICE, seed=1)
    eps = torch.tensor([1.0, 1.2, 2.0], dtype=torch.float64)
    scale = torch.ones(3, 4, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for grad_scale, teacher_grad in ((None, False), (scale, False), (scale, True)):
            op.ofa_fused_forward_triton(entries, teacher, target, eps, 1.0, grad_scale, teacher_grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_results_are_deterministic():
    entries, _, teacher, target = checks.make_inputs(16, 5003, 3, torch.float32, DEVICE, seed=4)
    eps = torch.tensor([1.0, 1.2, 2.0], dtype=torch.float64)
    scale = torch.rand(3, 16, device=DEVICE)
    first = op.ofa_fused_forward_triton(entries, teacher, target, eps, 1.0, scale, True)
    second = op.ofa_fused_forward_triton(entries, teacher, target, eps, 1.0, scale, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_mixed_devices_are_rejected():
    entries, _, teacher, target = checks.make_inputs(2, 10, 2, torch.float32, DEVICE, seed=1)
    eps = torch.tensor([1.0, 1.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="target must be on"):
        torch.ops.ofakd_fast_C.fused_forward(entries, teacher, target.cpu(), eps, 1.0, None, False)
    with pytest.raises(RuntimeError, match="every branch must be on"):
        torch.ops.ofakd_fast_C.fused_forward([entries[0].cpu(), entries[1]], teacher, target, eps, 1.0, None, False)


# ----------------------------------------------------------------------------- the public API

def test_auto_prefers_the_cuda_kernel():
    assert available_backends()["cuda"] == "available"
    assert resolve_backend("auto", DEVICE) == "cuda"


def _api_case(B, C, K, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    students = [(torch.randn(B, C, generator=gen, dtype=torch.float64) * 3).to(dtype).to(DEVICE).requires_grad_()
                for _ in range(K)]
    teacher = (torch.randn(B, C, generator=gen, dtype=torch.float64) * 3).to(dtype).to(DEVICE).requires_grad_()
    target = torch.randint(0, C, (B,), generator=gen).to(DEVICE)
    upstream = torch.rand(K, B, generator=gen, dtype=torch.float64).to(DEVICE)
    return students, teacher, target, upstream


def _loss_and_grads(backend, students, teacher, target, eps, T, upstream):
    s = [x.detach().clone().requires_grad_() for x in students]
    t = teacher.detach().clone().requires_grad_()
    if backend == "reference64":
        rows = ofa_loss_multi_reference([x.double() for x in s], t.double(), target, eps, T, reduction="none")
    else:
        rows = ofa_loss_multi(s, t, target, eps, T, reduction="none", backend=backend)
    (rows * upstream.to(rows.dtype)).sum().backward()
    return [rows.detach(), *[x.grad for x in s], t.grad]


@pytest.mark.parametrize("C", C_REGIMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_api_matches_the_reference(C, dtype):
    """ofa_loss_multi(..., backend='cuda') forward and backward, student and teacher grads."""
    students, teacher, target, upstream = _api_case(6, C, 4, dtype, seed=C)
    eps, T = [1.0, 1.2, 2.0, 0.7], 2.0
    ours = _loss_and_grads("cuda", students, teacher, target, eps, T, upstream)
    want = _loss_and_grads("reference64", students, teacher, target, eps, T, upstream)
    same = _loss_and_grads("reference", students, teacher, target, eps, T, upstream)
    for what, a, w, s in zip(["loss"] + ["student grad"] * 4 + ["teacher grad"], ours, want, same):
        checks.assert_flash_close(what, a, w, s, a.dtype)


def test_api_gradcheck_float64():
    students, teacher, target, _ = _api_case(3, 11, 2, torch.float64, seed=5)
    eps = [0.8, 2.5]

    def fn(t, *s):
        return ofa_loss_multi(list(s), t, target, eps, 0.5, reduction="none", backend="cuda")

    assert torch.autograd.gradcheck(fn, [teacher, *students], eps=1e-6, atol=1e-7, rtol=1e-5)


def test_api_stability_large_logits_and_eps():
    """Logits of +-1e4 and eps up to 3: finite losses and gradients (the original code gives NaN)."""
    gen = torch.Generator().manual_seed(3)
    students = [((torch.rand(8, 1000, generator=gen) * 2 - 1) * 1e4).to(DEVICE).requires_grad_() for _ in range(3)]
    teacher = ((torch.rand(8, 1000, generator=gen) * 2 - 1) * 1e4).to(DEVICE)
    target = torch.randint(0, 1000, (8,), generator=gen).to(DEVICE)
    loss = ofa_loss_multi(students, teacher, target, [1.0, 2.0, 3.0], backend="cuda")
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(s.grad).all() for s in students)


def test_api_bad_input():
    students, teacher, target, _ = _api_case(4, 10, 2, torch.float32)
    with pytest.raises(ValueError, match="eps"):
        ofa_loss_multi(students, teacher, target, [1.0, -1.0], backend="cuda")
    with pytest.raises(ValueError, match="one device"):
        ofa_loss_multi(students, teacher.cpu(), target, 1.0, backend="cuda")
    bad = target.clone()
    bad[2] = 10  # not checked on the host for CUDA tensors (no sync): that row is NaN
    rows = ofa_loss_multi(students, teacher, bad, 1.0, reduction="none", backend="cuda")
    assert torch.isnan(rows[:, 2]).all() and torch.isfinite(rows[:, [0, 1, 3]]).all()


# ----------------------------------------------------------------------------- CUDA vs Triton

def _allowed_error(ref64, same_dtype, out_dtype):
    """The error assert_flash_close (tests/triton_checks.py) allows an implementation."""
    if out_dtype == torch.float64:
        return 1e-11 * max(1.0, ref64.abs().max().item())
    base = (same_dtype.double() - ref64).abs().max().item()
    storing = (ref64.to(out_dtype).double() - ref64).abs().max().item()
    return 2 * base + storing + 16 * torch.finfo(torch.float32).eps * max(1.0, ref64.abs().max().item())


def _assert_agree(what, ours, theirs, ref64, same_dtype):
    """CUDA within the allowed error of the float64 answer, Triton within twice that of CUDA."""
    checks.assert_flash_close(what + " (cuda)", ours, ref64, same_dtype, ours.dtype)
    assert theirs.shape == ours.shape and theirs.dtype == ours.dtype, (what, theirs.shape, theirs.dtype)
    limit = 2 * _allowed_error(ref64.double(), same_dtype, ours.dtype)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=0, atol=limit)


@pytest.mark.parametrize("C", [37, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_and_triton_backends_agree(C, dtype):
    """The same inputs through ofa_loss_multi(..., backend='cuda') and backend='triton'."""
    reason = backend_error("triton", DEVICE)
    if reason is not None:
        pytest.skip(reason)
    students, teacher, target, upstream = _api_case(4, C, 3, dtype, seed=7)
    eps, T = [1.0, 1.3, 2.0], 1.0
    cuda = _loss_and_grads("cuda", students, teacher, target, eps, T, upstream)
    triton = _loss_and_grads("triton", students, teacher, target, eps, T, upstream)
    want = _loss_and_grads("reference64", students, teacher, target, eps, T, upstream)
    same = _loss_and_grads("reference", students, teacher, target, eps, T, upstream)
    for what, a, b, w, s in zip(["loss"] + ["student grad"] * 3 + ["teacher grad"], cuda, triton, want, same):
        _assert_agree(what, a, b, w, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, C", [(256, 1000), (16, 21841)], ids=["imagenet1k", "imagenet21k_rows"])
def test_cuda_and_compiled_triton_kernels_agree(B, C, dtype):
    """Realistic shapes, the compiled Triton kernel (whatever TRITON_INTERPRET this session set)."""
    pytest.importorskip("triton")
    triton_kernel = checks.load_kernel_module(interpret=False)
    if triton_kernel.triton_unavailable_reason(DEVICE) is not None:
        pytest.skip(triton_kernel.triton_unavailable_reason(DEVICE))
    entries, mats, teacher, target = checks.make_inputs(B, C, 5, dtype, DEVICE, seed=9)
    eps = checks.branch_eps(5)
    scale = torch.rand(5, B, device=DEVICE)
    ours = checks.run(op, entries, teacher, target, eps, 1.0, scale)
    theirs = checks.run(triton_kernel, entries, teacher, target, eps, 1.0, scale)
    ref = checks.reference(mats, teacher, target, eps, 1.0, scale)
    same = checks.reference(mats, teacher, target, eps, 1.0, scale, dtype=dtype)
    for what, a, b, w, s in zip(("loss rows", "student grads", "teacher grad"), ours, theirs, ref, same):
        _assert_agree(what, a, b, w, s)
