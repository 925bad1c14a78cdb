"""The CUDA kernel against the float64 reference, on two targets with the same checks:

* ``host-emulated``: the kernel's row program (csrc/ofa_loss_cuda_row.cuh) compiled for the host by
  tests/loss/cuda_emulator.cpp, one std::thread per GPU thread, a real barrier and a check of every
  memory access (inside the tensors, 16-byte accesses 16-byte aligned); CPU tensors, runs everywhere.
  The launch plan and the branch/launch splitting are the CUDA host code's own
  (csrc/ofa_loss_cuda_launch.h). Row groups of the planned size (32 .. 512 threads, rows held in
  registers) and of a few threads (rows streamed in chunks) are both run.
* ``gpu``: the compiled kernel on CUDA tensors (skipped without a GPU), with row lengths that cover
  its three launch regimes: C = 37 (one warp per row), C = 1000 (256 threads, the row held in
  registers) and C = 5003 (512 threads, the row streamed in 3 chunks; odd C, so consecutive rows are
  aligned differently). Also the public API, no host synchronisation and agreement with Triton.

The shared checks are those of tests/loss/triton_checks.py, the same the Triton kernel passes. The
sparse-teacher op (fused_forward_sparse) is held to tests/loss/test_sparse_teacher.py's contract there;
here it gets the CUDA-specific regimes: planned group sizes, layouts, two launches, NaN rows for bad
targets and stored classes, 16-byte accesses, no host synchronisation.
"""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import cuda_checks
from ofakd_fast import OFALoss, available_backends, ofa_loss_multi
from ofakd_fast.loss import SparseTeacher, sparse_teacher
from ofakd_fast.loss.backends import backend_error, resolve_backend
from ofakd_fast.loss.extension import cuda_extension_error
from ofakd_fast.loss.reference import ofa_loss_multi_reference
from test_sparse_teacher import reference as sparse_reference

checks = cuda_checks.checks
STREAMED = 3  # threads per emulated row group: C >= 12 (fp32) is streamed in several chunks
GPU_REGIMES = (37, 1000, 5003)


@dataclass(frozen=True)
class Target:
    name: str
    device: torch.device
    kernels: Callable[[], dict]  # id -> kernel adapter (cuda_checks), made once the target is usable
    rows: int                    # B of the parity checks
    row_lengths: tuple           # C of the float32 and other-dtype parity checks
    dtype_row_lengths: tuple
    eps_one_row_lengths: tuple
    many_branch_shapes: tuple    # (B, C) of the K = 34 checks (two launches)
    layout_row_lengths: tuple
    gradcheck_row_lengths: tuple


TARGETS = {
    "host-emulated": Target(
        "host-emulated", torch.device("cpu"),
        lambda: {"planned_group": cuda_checks.EmulatedCudaKernel(),
                 "streamed_rows": cuda_checks.EmulatedCudaKernel(threads=STREAMED)},
        rows=3, row_lengths=(1, 5, 37, 130), dtype_row_lengths=(37, 150), eps_one_row_lengths=(90,),
        many_branch_shapes=((2, 21),), layout_row_lengths=(70,), gradcheck_row_lengths=(5, 9)),
    "gpu": Target(
        "gpu", torch.device("cuda"), lambda: {"compiled": cuda_checks.CompiledCudaOp()},
        rows=5, row_lengths=GPU_REGIMES, dtype_row_lengths=GPU_REGIMES, eps_one_row_lengths=GPU_REGIMES,
        many_branch_shapes=((3, 37), (3, 5003)), layout_row_lengths=GPU_REGIMES,
        gradcheck_row_lengths=(5, 9, 300)),
}


def usable_target(name: str) -> Target:
    """The target, or a skip with the reason it cannot run here."""
    if name == "gpu":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        error = cuda_extension_error()
        assert error is None, f"a GPU is present but the CUDA kernel is not: {error}"
    else:
        reason = cuda_checks.emulator_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    return TARGETS[name]


@dataclass(frozen=True)
class KernelOnTarget:
    target: Target
    kernels: dict  # id -> kernel adapter: every shared check runs on each of them

    @property
    def device(self) -> torch.device:
        return self.target.device


@pytest.fixture(scope="module", params=list(TARGETS))
def on(request) -> KernelOnTarget:
    target = usable_target(request.param)
    return KernelOnTarget(target, target.kernels())


@pytest.fixture(scope="module")
def gpu() -> torch.device:
    return usable_target("gpu").device


@pytest.fixture(scope="module")
def emulated() -> torch.device:
    return usable_target("host-emulated").device


# ----------------------------------------------------------------------------- the shared kernel checks

@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_parity_float32(on, K, T):
    for kernel in on.kernels.values():
        for C in on.target.row_lengths:
            checks.check_parity(kernel, on.device, B=on.target.rows, C=C, K=K, T=T, seed=K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_parity_dtypes(on, dtype):
    for kernel in on.kernels.values():
        for C in on.target.dtype_row_lengths:
            checks.check_parity(kernel, on.device, B=on.target.rows, C=C, K=5, T=1.0, dtype=dtype, seed=11)


def test_parity_all_eps_one(on):
    for kernel in on.kernels.values():
        for C in on.target.eps_one_row_lengths:
            checks.check_parity(kernel, on.device, B=3, C=C, K=3, T=2.0, eps=[1.0, 1.0, 1.0])


def test_parity_repeated_eps(on):
    for kernel in on.kernels.values():
        checks.check_parity(kernel, on.device, B=3, C=45, K=4, T=1.0, eps=[1.3, 1.3, 1.0, 1.3])


def test_more_branches_than_one_launch(on):
    """K = 34 > 32 branches per launch: two launches, the teacher gradient summed across them."""
    for kernel in on.kernels.values():
        for B, C in on.target.many_branch_shapes:
            checks.check_parity(kernel, on.device, B=B, C=C, K=34, T=1.0, layout="stacked")
            checks.check_parity(kernel, on.device, B=B, C=C, K=34, T=1.0, dtype=torch.bfloat16)


@pytest.mark.parametrize("layout", ["stacked", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts(on, layout, dtype):
    """Slices with odd row strides and offsets: rows whose alignment differs from the majority."""
    for kernel in on.kernels.values():
        for C in on.target.layout_row_lengths:
            checks.check_parity(kernel, on.device, B=3, C=C, K=3, T=1.0, dtype=dtype, layout=layout)


def test_optional_outputs(on):
    for kernel in on.kernels.values():
        checks.check_optional_outputs(kernel, on.device)


def test_grad_scale_broadcast(on):
    for kernel in on.kernels.values():
        checks.check_grad_scale_broadcast(kernel, on.device)


def test_gradcheck_float64(on):
    for kernel in on.kernels.values():
        for C in on.target.gradcheck_row_lengths:
            checks.check_gradcheck(kernel, on.device, C=C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T", [0.5, 4.0])
def test_stability_large_logits(on, dtype, T):
    for kernel in on.kernels.values():
        checks.check_stability(kernel, on.device, dtype=dtype, T=T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_target_probability(on, dtype):
    for kernel in on.kernels.values():
        checks.check_tiny_target_probability(kernel, on.device, dtype=dtype)


def test_empty_batch(on):
    for kernel in on.kernels.values():
        checks.check_empty_batch(kernel, on.device)


def test_out_of_range_target_gives_nan_rows(on):
    """A bad target is not checked on the host (no sync on a GPU): its row's loss and gradients are NaN."""
    entries, _, teacher, target = checks.make_inputs(3, 9, 2, torch.float32, on.device, seed=8)
    target = target.clone()
    target[1], target[2] = 9, -1
    eps = torch.tensor([1.0, 2.0], dtype=torch.float64)
    scale = torch.ones(2, 3, device=on.device)
    for kernel in on.kernels.values():
        loss, g_b, g_t = kernel.fused_forward(entries, teacher, target, eps, 1.0, scale, True)
        assert torch.isnan(loss[:, 1:]).all() and torch.isfinite(loss[:, 0]).all()
        assert torch.isnan(g_b[:, 1:]).all() and torch.isfinite(g_b[:, 0]).all()
        assert torch.isnan(g_t[1:]).all() and torch.isfinite(g_t[0]).all()
        if on.device.type == "cuda":  # the shared check: ValueError on CPU, NaN rows on a GPU
            checks.check_bad_target(kernel, on.device)


# ----------------------------------------------------------------------------- host-emulated only

def test_launch_plan_of_the_reference_shapes(emulated):
    """The launch shapes documented in benchmarks/README.md (plan_launch, run on the host)."""
    plan = cuda_checks.launch_plan
    assert plan(5, 128, 100, torch.float32) == dict(threads=32, blocks=128, chunks=1, teacher_workspace=False)
    assert plan(5, 256, 1000, torch.float32) == dict(threads=256, blocks=256, chunks=1, teacher_workspace=False)
    assert plan(5, 256, 1000, torch.bfloat16) == dict(threads=128, blocks=256, chunks=1, teacher_workspace=False)
    assert plan(5, 256, 21841, torch.float32) == dict(threads=512, blocks=256, chunks=11, teacher_workspace=True)
    assert plan(5, 256, 21841, torch.bfloat16) == dict(threads=512, blocks=256, chunks=6, teacher_workspace=True)
    assert plan(40, 4, 100, torch.float32)["teacher_workspace"]  # two launches


def test_parity_planned_block_of_256_threads(emulated):
    """C = 1000: the reference ImageNet-1k row, one 256-thread block, held in registers."""
    assert cuda_checks.launch_plan(3, 2, 1000, torch.float32)["threads"] == 256
    checks.check_parity(cuda_checks.EmulatedCudaKernel(), emulated, B=2, C=1000, K=3, T=1.0)


def test_parity_planned_streamed_rows(emulated):
    """C = 2203 fp32: 512 threads, 2 chunks (the planned streaming path); odd C: rows of varying alignment."""
    assert cuda_checks.launch_plan(2, 3, 2203, torch.float32)["chunks"] == 2
    kernel = cuda_checks.EmulatedCudaKernel()
    checks.check_parity(kernel, emulated, B=3, C=2203, K=2, T=1.0)
    checks.check_parity(kernel, emulated, B=2, C=4403, K=2, T=2.0, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype, C", [(torch.float32, 1000), (torch.float32, 2203), (torch.bfloat16, 4403),
                                      (torch.float64, 301)])
def test_rows_move_in_16_byte_accesses(emulated, dtype, C):
    """Contiguous inputs, B * C a multiple of 8: every row is read and written with 16-byte accesses except
    the partial slots at its two ends, also when C is odd (each row picks its own slot phase)."""
    B, K = 8, 3
    kernel = cuda_checks.EmulatedCudaKernel()
    entries, _, teacher, target = checks.make_inputs(B, C, K, dtype, emulated, seed=3)
    eps = torch.tensor([1.0, 1.5, 1.5], dtype=torch.float64)
    kernel.fused_forward(entries, teacher, target, eps, 1.0, torch.ones(K, B), False)
    bad, vector, element = kernel.last_stats
    width = 16 // teacher.element_size()
    assert bad == 0
    # per row: K + 1 rows read (the streamed path reads the branch rows twice and the teacher 2K + 1
    # times), K rows written, each with at most 2 (W - 1) element accesses at its ends, plus the
    # target's logits (K + 1 reads)
    rows_touched = (1 + 4 * K + K) * B
    assert element <= rows_touched * 2 * (width - 1) + (K + 1) * B
    assert vector >= (K + 1 + K) * B * (C // width - 1)


# ----------------------------------------------------------------------------- the sparse teacher
# (fused_forward_sparse; the contract's parity checks are tests/loss/test_sparse_teacher.py's, these
# add the CUDA launch regimes, layouts, launches and bad rows)

def _sparse_case(B, C, k, K, dtype, device, *, layout="separate", seed=0, T=1.0):
    """(branch entries, branch matrices, SparseTeacher of the top k of random teacher logits, target)."""
    entries, mats, teacher, target = checks.make_inputs(B, C, K, dtype, device, seed=seed, layout=layout)
    top = sparse_teacher(teacher.cpu().double(), k, T)
    acc = cuda_checks.acc_dtype(dtype)
    sparse = SparseTeacher(top.indices.to(device), top.logits.to(acc).to(device), top.lse.to(acc).to(device))
    return entries, mats, sparse, target


def _run_sparse(kernel, entries, teacher, target, eps, T, grad_scale):
    return kernel.fused_forward_sparse(entries, teacher.logits, teacher.indices, teacher.lse, target,
                                       torch.tensor(eps, dtype=torch.float64), float(T), grad_scale)


def check_sparse_parity(kernel, device, *, B, C, k, K, dtype=torch.float32, layout="separate", T=1.0, seed=0):
    """Loss rows and student gradients (non-uniform row factors) against the float64 oracle."""
    entries, mats, teacher, target = _sparse_case(B, C, k, K, dtype, device, layout=layout, seed=seed, T=T)
    eps = checks.branch_eps(K, seed)
    acc = cuda_checks.acc_dtype(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_scale = (torch.rand(K, B, generator=gen, dtype=torch.float64) * 2 - 0.5).to(acc).to(device)
    loss, grads = _run_sparse(kernel, entries, teacher, target, eps, T, grad_scale)
    assert loss.dtype == acc and grads.dtype == dtype and grads.shape == (K, B, C) and grads.is_contiguous()
    ref = sparse_reference(mats, teacher, target, eps, T, grad_scale)
    same = sparse_reference(mats, teacher, target, eps, T, grad_scale, dtype=dtype) if dtype != torch.float64 else ref
    checks.assert_flash_close("sparse loss rows", loss.cpu(), ref[0], same[0], acc)
    checks.assert_flash_close("sparse student grads", grads.cpu(), ref[1], same[1], dtype)


@pytest.mark.parametrize("layout", ["separate", "stacked", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_layouts(on, layout, dtype):
    """Stacked entries, odd row strides and offsets (rows aligned unlike the majority), every row regime."""
    for kernel in on.kernels.values():
        for C in on.target.layout_row_lengths:
            check_sparse_parity(kernel, on.device, B=3, C=C, k=min(C, 17), K=3, dtype=dtype, layout=layout, T=2.0)


def test_sparse_more_branches_than_one_launch(on):
    """K = 34 > 32 branches per launch: two launches, each writing its own loss rows and gradients."""
    for kernel in on.kernels.values():
        for B, C in on.target.many_branch_shapes:
            check_sparse_parity(kernel, on.device, B=B, C=C, k=5, K=34, layout="stacked")


def test_sparse_bad_target_or_class_gives_nan_rows(on):
    """Not checked on the host (no sync on a GPU): a target or a stored class outside [0, C) makes its row's
    loss and gradients NaN, and the class is never read or written (the emulator checks every access)."""
    B, C, K = 5, 9, 2
    entries, _, teacher, target = _sparse_case(B, C, 3, K, torch.float32, on.device, seed=8)
    target, indices = target.clone(), teacher.indices.clone()
    target[1], target[2] = C, -1
    indices[3, 0], indices[4, 2] = C + 100, -7
    teacher = teacher._replace(indices=indices)
    for kernel in on.kernels.values():
        loss, grads = _run_sparse(kernel, entries, teacher, target, [1.0, 1.7], 1.0, torch.ones(K, B, device=on.device))
        assert torch.isnan(loss[:, 1:]).all() and torch.isfinite(loss[:, 0]).all()
        assert torch.isnan(grads[:, 1:]).all() and torch.isfinite(grads[:, 0]).all()


@pytest.mark.parametrize("dtype, C, k", [(torch.float32, 1000, 10), (torch.float32, 2203, 64),
                                         (torch.bfloat16, 4403, 300), (torch.float64, 301, 301)])
def test_sparse_parity_planned_groups(emulated, dtype, C, k):
    """The planned launch: 256 threads with the row held in registers (C = 1000 fp32), 512 threads
    streaming 2 chunks (C = 2203 fp32, odd) and more (bf16), fp64 with k = C (the dense loss)."""
    check_sparse_parity(cuda_checks.EmulatedCudaKernel(), emulated, B=3, C=C, k=k, K=3, dtype=dtype, seed=C)


@pytest.mark.parametrize("dtype, C", [(torch.float32, 1000), (torch.float32, 2203), (torch.bfloat16, 4403)])
def test_sparse_rows_move_in_16_byte_accesses(emulated, dtype, C):
    """Contiguous inputs, B * C a multiple of 8: the branch rows are read and the gradient rows written in
    16-byte accesses but the partial slots at each row's ends and the k stored classes and y."""
    B, K, k = 8, 3, 20
    kernel = cuda_checks.EmulatedCudaKernel()
    entries, _, teacher, target = _sparse_case(B, C, k, K, dtype, emulated, seed=3)
    _run_sparse(kernel, entries, teacher, target, [1.0, 1.5, 1.5], 1.0, torch.ones(K, B))
    bad, vector, element = kernel.last_stats
    width = 16 // entries[0].element_size()
    assert bad == 0
    # per row: the K branch rows read twice (streamed) and K gradient rows written, each with at most
    # 2 (W - 1) element accesses at its ends; per stored class its index, logit and lse in the teacher
    # pass and twice per branch, and per branch 2 reads and a store of the class (and of y)
    ends = (2 * K + K) * B * 2 * (width - 1)
    stored = B * k * 3 * (2 * K + 1) + B * K * (k + 1) * 3
    assert element <= ends + stored
    assert vector >= (K + K) * B * (C // width - 1)


# ----------------------------------------------------------------------------- gpu only: the op

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, C", [(256, 1000), (8, 21841)], ids=["imagenet1k", "imagenet21k_rows"])
def test_parity_reference_shapes(gpu, B, C, dtype):
    checks.check_parity(cuda_checks.CompiledCudaOp(), gpu, B=B, C=C, K=5, T=1.0, dtype=dtype, seed=2)


def test_results_are_deterministic(gpu):
    op = cuda_checks.CompiledCudaOp()
    entries, _, teacher, target = checks.make_inputs(16, 5003, 3, torch.float32, gpu, seed=4)
    eps = torch.tensor([1.0, 1.2, 2.0], dtype=torch.float64)
    scale = torch.rand(3, 16, device=gpu)
    first = op.fused_forward(entries, teacher, target, eps, 1.0, scale, True)
    second = op.fused_forward(entries, teacher, target, eps, 1.0, scale, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_mixed_devices_are_rejected(gpu):
    entries, _, teacher, target = checks.make_inputs(2, 10, 2, torch.float32, gpu, seed=1)
    eps = torch.tensor([1.0, 1.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="target must be on"):
        torch.ops.ofakd_fast_C.fused_forward(entries, teacher, target.cpu(), eps, 1.0, None, False)
    with pytest.raises(RuntimeError, match="every branch must be on"):
        torch.ops.ofakd_fast_C.fused_forward([entries[0].cpu(), entries[1]], teacher, target, eps, 1.0, None, False)


# ----------------------------------------------------------------------------- gpu only: no host sync

def _api_case(B, C, K, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    students = [(torch.randn(B, C, generator=gen, dtype=torch.float64) * 3).to(dtype).to(device).requires_grad_()
                for _ in range(K)]
    teacher = (torch.randn(B, C, generator=gen, dtype=torch.float64) * 3).to(dtype).to(device).requires_grad_()
    target = torch.randint(0, C, (B,), generator=gen).to(device)
    upstream = torch.rand(K, B, generator=gen, dtype=torch.float64).to(device)
    return students, teacher, target, upstream


def _without_host_sync(step):
    """Runs step() once to warm up (the extension's import, OFALoss's per-device weight tensor), then
    again with CUDA's sync debug mode set to raise on any host-device synchronisation."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_op_does_not_synchronise(gpu):
    op = cuda_checks.CompiledCudaOp()
    entries, _, teacher, target = checks.make_inputs(4, 1000, 3, torch.float32, gpu, seed=1)
    eps = torch.tensor([1.0, 1.2, 2.0], dtype=torch.float64)
    scale = torch.ones(3, 4, device=gpu)

    def step():
        for grad_scale, teacher_grad in ((None, False), (scale, False), (scale, True)):
            op.fused_forward(entries, teacher, target, eps, 1.0, grad_scale, teacher_grad)

    _without_host_sync(step)


def test_sparse_op_does_not_synchronise(gpu):
    op = cuda_checks.CompiledCudaOp()
    entries, _, teacher, target = _sparse_case(4, 1000, 20, 3, torch.float32, gpu, seed=1)
    scale = torch.ones(3, 4, device=gpu)

    def step():
        for grad_scale in (None, scale):
            _run_sparse(op, entries, teacher, target, [1.0, 1.2, 2.0], 1.0, grad_scale)

    _without_host_sync(step)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ofa_loss_multi_forward_and_backward_do_not_synchronise(gpu, reduction):
    students, teacher, target, _ = _api_case(4, 1000, 3, torch.float32, gpu, seed=2)

    def step():
        losses = ofa_loss_multi(students, teacher, target, [1.0, 1.2, 2.0], 2.0, reduction=reduction,
                                backend="cuda")
        losses.sum().backward()

    _without_host_sync(step)
    assert all(s.grad is not None for s in students) and teacher.grad is not None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ofa_loss_module_forward_and_backward_do_not_synchronise(gpu, reduction):
    students, teacher, target, _ = _api_case(4, 1000, 3, torch.float32, gpu, seed=3)
    criterion = OFALoss(eps=[1.0, 1.2, 2.0], temperature=2.0, weights=[1.0, 0.5, 0.25], reduction=reduction,
                        backend="cuda")

    def step():
        criterion(students, teacher, target).sum().backward()

    _without_host_sync(step)
    assert all(s.grad is not None for s in students) and teacher.grad is not None


# ----------------------------------------------------------------------------- gpu only: the public API

def test_auto_prefers_the_cuda_kernel(gpu):
    assert available_backends()["cuda"] == "available"
    assert resolve_backend("auto", gpu) == "cuda"


def _loss_and_grads(backend, students, teacher, target, eps, T, upstream):
    s = [x.detach().clone().requires_grad_() for x in students]
    t = teacher.detach().clone().requires_grad_()
    if backend == "reference64":
        rows = ofa_loss_multi_reference([x.double() for x in s], t.double(), target, eps, T, reduction="none")
    else:
        rows = ofa_loss_multi(s, t, target, eps, T, reduction="none", backend=backend)
    (rows * upstream.to(rows.dtype)).sum().backward()
    return [rows.detach(), *[x.grad for x in s], t.grad]


@pytest.mark.parametrize("C", GPU_REGIMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_api_matches_the_reference(gpu, C, dtype):
    """ofa_loss_multi(..., backend='cuda') forward and backward, student and teacher grads."""
    students, teacher, target, upstream = _api_case(6, C, 4, dtype, gpu, seed=C)
    eps, T = [1.0, 1.2, 2.0, 0.7], 2.0
    ours = _loss_and_grads("cuda", students, teacher, target, eps, T, upstream)
    want = _loss_and_grads("reference64", students, teacher, target, eps, T, upstream)
    same = _loss_and_grads("reference", students, teacher, target, eps, T, upstream)
    for what, a, w, s in zip(["loss"] + ["student grad"] * 4 + ["teacher grad"], ours, want, same):
        checks.assert_flash_close(what, a, w, s, a.dtype)


def test_api_gradcheck_float64(gpu):
    students, teacher, target, _ = _api_case(3, 11, 2, torch.float64, gpu, seed=5)
    eps = [0.8, 2.5]

    def fn(t, *s):
        return ofa_loss_multi(list(s), t, target, eps, 0.5, reduction="none", backend="cuda")

    assert torch.autograd.gradcheck(fn, [teacher, *students], eps=1e-6, atol=1e-7, rtol=1e-5)


def test_api_stability_large_logits_and_eps(gpu):
    """Logits of +-1e4 and eps up to 3: finite losses and gradients (the original code gives NaN)."""
    gen = torch.Generator().manual_seed(3)
    students = [((torch.rand(8, 1000, generator=gen) * 2 - 1) * 1e4).to(gpu).requires_grad_() for _ in range(3)]
    teacher = ((torch.rand(8, 1000, generator=gen) * 2 - 1) * 1e4).to(gpu)
    target = torch.randint(0, 1000, (8,), generator=gen).to(gpu)
    loss = ofa_loss_multi(students, teacher, target, [1.0, 2.0, 3.0], backend="cuda")
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(s.grad).all() for s in students)


def test_api_bad_input(gpu):
    students, teacher, target, _ = _api_case(4, 10, 2, torch.float32, gpu)
    with pytest.raises(ValueError, match="eps"):
        ofa_loss_multi(students, teacher, target, [1.0, -1.0], backend="cuda")
    with pytest.raises(ValueError, match="one device"):
        ofa_loss_multi(students, teacher.cpu(), target, 1.0, backend="cuda")
    bad = target.clone()
    bad[2] = 10  # not checked on the host for CUDA tensors (no sync): that row is NaN
    rows = ofa_loss_multi(students, teacher, bad, 1.0, reduction="none", backend="cuda")
    assert torch.isnan(rows[:, 2]).all() and torch.isfinite(rows[:, [0, 1, 3]]).all()


# ----------------------------------------------------------------------------- gpu only: CUDA vs Triton

def _allowed_error(ref64, same_dtype, out_dtype):
    """The error assert_flash_close (tests/loss/triton_checks.py) allows an implementation."""
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
def test_cuda_and_triton_backends_agree(gpu, C, dtype):
    """The same inputs through ofa_loss_multi(..., backend='cuda') and backend='triton'."""
    reason = backend_error("triton", gpu)
    if reason is not None:
        pytest.skip(reason)
    students, teacher, target, upstream = _api_case(4, C, 3, dtype, gpu, seed=7)
    eps, T = [1.0, 1.3, 2.0], 1.0
    cuda = _loss_and_grads("cuda", students, teacher, target, eps, T, upstream)
    triton = _loss_and_grads("triton", students, teacher, target, eps, T, upstream)
    want = _loss_and_grads("reference64", students, teacher, target, eps, T, upstream)
    same = _loss_and_grads("reference", students, teacher, target, eps, T, upstream)
    for what, a, b, w, s in zip(["loss"] + ["student grad"] * 3 + ["teacher grad"], cuda, triton, want, same):
        _assert_agree(what, a, b, w, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, C", [(256, 1000), (16, 21841)], ids=["imagenet1k", "imagenet21k_rows"])
def test_cuda_and_compiled_triton_kernels_agree(gpu, B, C, dtype):
    """Realistic shapes, the compiled Triton kernel (whatever TRITON_INTERPRET this session set)."""
    pytest.importorskip("triton")
    triton_kernel = checks.load_kernel_module(interpret=False)
    if triton_kernel.triton_unavailable_reason(gpu) is not None:
        pytest.skip(triton_kernel.triton_unavailable_reason(gpu))
    entries, mats, teacher, target = checks.make_inputs(B, C, 5, dtype, gpu, seed=9)
    eps = checks.branch_eps(5)
    scale = torch.rand(5, B, device=gpu)
    ours = checks.run(cuda_checks.CompiledCudaOp(), entries, teacher, target, eps, 1.0, scale)
    theirs = checks.run(triton_kernel, entries, teacher, target, eps, 1.0, scale)
    ref = checks.reference(mats, teacher, target, eps, 1.0, scale)
    same = checks.reference(mats, teacher, target, eps, 1.0, scale, dtype=dtype)
    for what, a, b, w, s in zip(("loss rows", "student grads", "teacher grad"), ours, theirs, ref, same):
        _assert_agree(what, a, b, w, s)
