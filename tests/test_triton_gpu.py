"""The Triton OFA kernel compiled for a CUDA GPU: the interpreter test's checks, plus realistic shapes.

Uses its own copy of kernels/ofa_loss.py loaded with TRITON_INTERPRET unset (see
triton_checks.load_kernel_module), so it runs compiled even when conftest or the interpreter test
set TRITON_INTERPRET=1 in the same pytest session.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_checks as checks  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: the compiled Triton kernel runs on CUDA tensors only")
DEVICE = torch.device("cuda")
SMALL_BLOCK = 64


@pytest.fixture(scope="module")
def mod():
    pytest.importorskip("triton")
    module = checks.load_kernel_module(interpret=False)
    reason = module.triton_unavailable_reason(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    return module


@pytest.mark.parametrize("C, max_block", [(37, None), (150, SMALL_BLOCK)], ids=["single_block", "column_loop"])
@pytest.mark.parametrize("K", [1, 6])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_parity_float32(mod, C, max_block, K, T):
    checks.check_parity(mod, DEVICE, B=3, C=C, K=K, T=T, max_block=max_block, seed=K)


@pytest.mark.parametrize("C, max_block", [(37, None), (150, SMALL_BLOCK)], ids=["single_block", "column_loop"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_parity_dtypes(mod, C, max_block, dtype):
    checks.check_parity(mod, DEVICE, B=3, C=C, K=5, T=1.0, dtype=dtype, max_block=max_block, seed=11)


@pytest.mark.parametrize("B, C, K", [(128, 100, 5), (256, 1000, 5), (32, 21841, 5), (8, 21841, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_reference_shapes(mod, B, C, K, dtype):
    """The issue's shapes with the default block table (single block up to C = 1000, loop at 21841)."""
    checks.check_parity(mod, DEVICE, B=B, C=C, K=K, T=1.0, dtype=dtype, seed=B + K)


def test_parity_all_eps_one(mod):
    checks.check_parity(mod, DEVICE, B=3, C=90, K=3, T=2.0, eps=[1.0, 1.0, 1.0], max_block=32)
    checks.check_parity(mod, DEVICE, B=3, C=30, K=3, T=2.0, eps=[1.0, 1.0, 1.0])


def test_more_branches_than_one_launch(mod):
    checks.check_parity(mod, DEVICE, B=2, C=21, K=10, T=1.0, layout="stacked")
    checks.check_parity(mod, DEVICE, B=2, C=21, K=10, T=1.0, dtype=torch.bfloat16)


@pytest.mark.parametrize("layout", ["stacked", "strided"])
def test_layouts(mod, layout):
    checks.check_layouts_match_contiguous(mod, DEVICE, layout=layout)
    checks.check_layouts_match_contiguous(mod, DEVICE, layout=layout, dtype=torch.bfloat16, max_block=16)


def test_strided_parity_column_loop(mod):
    checks.check_parity(mod, DEVICE, B=3, C=70, K=3, T=1.0, max_block=32, layout="strided")


def test_optional_outputs(mod):
    checks.check_optional_outputs(mod, DEVICE)
    checks.check_optional_outputs(mod, DEVICE, max_block=8)


def test_grad_scale_broadcast(mod):
    checks.check_grad_scale_broadcast(mod, DEVICE)


@pytest.mark.parametrize("C, max_block", [(5, None), (9, 4)], ids=["single_block", "column_loop"])
def test_gradcheck_float64(mod, C, max_block):
    checks.check_gradcheck(mod, DEVICE, C=C, max_block=max_block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("max_block", [None, 16], ids=["single_block", "column_loop"])
@pytest.mark.parametrize("T", [0.5, 4.0])
def test_stability_large_logits(mod, dtype, max_block, T):
    checks.check_stability(mod, DEVICE, dtype=dtype, max_block=max_block, T=T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_block", [None, 8], ids=["single_block", "column_loop"])
def test_tiny_target_probability(mod, dtype, max_block):
    checks.check_tiny_target_probability(mod, DEVICE, dtype=dtype, max_block=max_block)


def test_empty_batch(mod):
    checks.check_empty_batch(mod, DEVICE)


def test_bad_target(mod):
    checks.check_bad_target(mod, DEVICE)


def test_launch_table(mod):
    checks.check_launch_table(mod)


def test_unavailable_reason(mod):
    checks.check_unavailable_reason(mod, DEVICE, expect_available=True)
