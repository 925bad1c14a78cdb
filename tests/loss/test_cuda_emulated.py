"""The CUDA kernel's row program (csrc/ofa_loss_cuda_row.cuh) run on the host, against the float64 reference.

No GPU is needed: tests/cuda_emulator.cpp runs each row with one std::thread per GPU thread, a real
barrier and a check of every memory access (inside the tensors, 16-byte accesses 16-byte aligned). The
launch plan and the branch/launch splitting are the CUDA host code's own. Row groups of the planned
size (32 .. 512 threads, rows held in registers) and of a few threads (rows streamed in chunks) are
both run, with the shared checks of tests/triton_checks.py.
"""
import pytest
import torch

import cuda_checks

reason = cuda_checks.emulator_unavailable_reason()
if reason is not None:
    pytest.skip(reason, allow_module_level=True)

checks = cuda_checks.checks
DEVICE = torch.device("cpu")
STREAMED = 3  # threads per row group: C >= 12 (fp32) is streamed in several chunks


@pytest.fixture(scope="module", params=[0, STREAMED], ids=["planned_group", "streamed_rows"])
def kernel(request):
    return cuda_checks.EmulatedCudaKernel(threads=request.param)


@pytest.mark.parametrize("C", [1, 5, 37, 130], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_parity_float32(kernel, C, K, T):
    checks.check_parity(kernel, DEVICE, B=3, C=C, K=K, T=T, seed=K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("C", [37, 150])
def test_parity_dtypes(kernel, C, dtype):
    checks.check_parity(kernel, DEVICE, B=3, C=C, K=5, T=1.0, dtype=dtype, seed=11)


def test_parity_planned_block_of_256_threads():
    """C = 1000: the reference ImageNet-1k row, one 256-thread block, held in registers."""
    assert cuda_checks.launch_plan(3, 2, 1000, torch.float32)["threads"] == 256
    checks.check_parity(cuda_checks.EmulatedCudaKernel(), DEVICE, B=2, C=1000, K=3, T=1.0)


def test_parity_planned_streamed_rows():
    """C = 2203 fp32: 512 threads, 2 chunks (the planned streaming path); odd C: rows of varying alignment."""
    assert cuda_checks.launch_plan(2, 3, 2203, torch.float32)["chunks"] == 2
    kernel = cuda_checks.EmulatedCudaKernel()
    checks.check_parity(kernel, DEVICE, B=3, C=2203, K=2, T=1.0)
    checks.check_parity(kernel, DEVICE, B=2, C=4403, K=2, T=2.0, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype, C", [(torch.float32, 1000), (torch.float32, 2203), (torch.bfloat16, 4403),
                                      (torch.float64, 301)])
def test_rows_move_in_16_byte_accesses(dtype, C):
    """Contiguous inputs, B * C a multiple of 8: every row is read and written with 16-byte accesses except
    the partial slots at its two ends, also when C is odd (each row picks its own slot phase)."""
    B, K = 8, 3
    kernel = cuda_checks.EmulatedCudaKernel()
    entries, _, teacher, target = checks.make_inputs(B, C, K, dtype, DEVICE, seed=3)
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


def test_parity_all_eps_one(kernel):
    checks.check_parity(kernel, DEVICE, B=3, C=90, K=3, T=2.0, eps=[1.0, 1.0, 1.0])


def test_parity_repeated_eps(kernel):
    checks.check_parity(kernel, DEVICE, B=3, C=45, K=4, T=1.0, eps=[1.3, 1.3, 1.0, 1.3])


def test_more_branches_than_one_launch(kernel):
    """K = 34 > 32 branches per launch: two launches, the teacher gradient summed across them."""
    checks.check_parity(kernel, DEVICE, B=2, C=21, K=34, T=1.0, layout="stacked")
    checks.check_parity(kernel, DEVICE, B=2, C=21, K=34, T=1.0, dtype=torch.bfloat16)


@pytest.mark.parametrize("layout", ["stacked", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts(kernel, layout, dtype):
    """Slices with odd row strides and offsets: rows whose alignment differs from the majority."""
    checks.check_parity(kernel, DEVICE, B=3, C=70, K=3, T=1.0, dtype=dtype, layout=layout)


def test_optional_outputs(kernel):
    checks.check_optional_outputs(kernel, DEVICE)


def test_grad_scale_broadcast(kernel):
    checks.check_grad_scale_broadcast(kernel, DEVICE)


@pytest.mark.parametrize("C", [5, 9])
def test_gradcheck_float64(kernel, C):
    checks.check_gradcheck(kernel, DEVICE, C=C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T", [0.5, 4.0])
def test_stability_large_logits(kernel, dtype, T):
    checks.check_stability(kernel, DEVICE, dtype=dtype, T=T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_target_probability(kernel, dtype):
    checks.check_tiny_target_probability(kernel, DEVICE, dtype=dtype)


def test_empty_batch(kernel):
    checks.check_empty_batch(kernel, DEVICE)


def test_out_of_range_target_gives_nan_rows(kernel):
    """On the GPU a bad target is not checked on the host (no sync): its row's loss and gradients are NaN."""
    entries, _, teacher, target = checks.make_inputs(3, 9, 2, torch.float32, DEVICE, seed=8)
    target = target.clone()
    target[1], target[2] = 9, -1
    eps = torch.tensor([1.0, 2.0], dtype=torch.float64)
    loss, g_b, g_t = kernel.fused_forward(entries, teacher, target, eps, 1.0, torch.ones(2, 3), True)
    assert torch.isnan(loss[:, 1:]).all() and torch.isfinite(loss[:, 0]).all()
    assert torch.isnan(g_b[:, 1:]).all() and torch.isfinite(g_b[:, 0]).all()
    assert torch.isnan(g_t[1:]).all() and torch.isfinite(g_t[0]).all()


def test_launch_plan_of_the_reference_shapes():
    """The launch shapes documented in csrc/ofa_loss_cuda.cu."""
    plan = cuda_checks.launch_plan
    assert plan(5, 128, 100, torch.float32) == dict(threads=32, blocks=128, chunks=1, teacher_workspace=False)
    assert plan(5, 256, 1000, torch.float32) == dict(threads=256, blocks=256, chunks=1, teacher_workspace=False)
    assert plan(5, 256, 1000, torch.bfloat16) == dict(threads=128, blocks=256, chunks=1, teacher_workspace=False)
    assert plan(5, 256, 21841, torch.float32) == dict(threads=512, blocks=256, chunks=11, teacher_workspace=True)
    assert plan(5, 256, 21841, torch.bfloat16) == dict(threads=512, blocks=256, chunks=6, teacher_workspace=True)
    assert plan(40, 4, 100, torch.float32)["teacher_workspace"]  # two launches
