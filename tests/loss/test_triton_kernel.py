"""The Triton OFA kernel against the float64 reference, on two targets with the same checks:

* ``interpreter``: Triton's interpreter on CPU tensors (runs everywhere; small shapes and small
  column blocks (max_block) so the column loop runs and the file stays fast);
* ``gpu``: the kernel compiled for a CUDA GPU, with the issue's realistic shapes (skipped without one).

Each target executes its own copy of kernels/ofa_loss.py with TRITON_INTERPRET set as it needs
(triton_checks.load_kernel_module), so both can run in one pytest session on a GPU machine.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_checks as checks  # noqa: E402

pytest.importorskip("triton")
SMALL_BLOCK = 64  # C > 64 runs the two-loop path


@dataclass(frozen=True)
class Target:
    name: str
    device: torch.device
    interpreted: bool
    reference_shapes: tuple  # (B, C, K): few rows under the interpreter, which is ~1000x slower


TARGETS = {
    "interpreter": Target("interpreter", torch.device("cpu"), True, ((4, 1000, 5), (2, 21841, 5))),
    "gpu": Target("gpu", torch.device("cuda"), False, ((128, 100, 5), (256, 1000, 5), (32, 21841, 5), (8, 21841, 1))),
}


@pytest.fixture(scope="module", params=list(TARGETS))
def target(request) -> Target:
    target = TARGETS[request.param]
    if not target.interpreted and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the compiled Triton kernel runs on CUDA tensors only")
    return target


@pytest.fixture(scope="module")
def mod(target):
    module = checks.load_kernel_module(interpret=target.interpreted)
    reason = module.triton_unavailable_reason(target.device)
    if reason is not None:
        pytest.skip(reason)
    return module


# C = 37: one block (not a power of two); C = 150 with blocks of 64: the loop, with a ragged last block.
@pytest.mark.parametrize("C, max_block", [(37, None), (150, SMALL_BLOCK)], ids=["single_block", "column_loop"])
@pytest.mark.parametrize("K", [1, 6])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_parity_float32(mod, target, C, max_block, K, T):
    checks.check_parity(mod, target.device, B=3, C=C, K=K, T=T, max_block=max_block, seed=K)


@pytest.mark.parametrize("C, max_block", [(37, None), (150, SMALL_BLOCK)], ids=["single_block", "column_loop"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_parity_dtypes(mod, target, C, max_block, dtype):
    checks.check_parity(mod, target.device, B=3, C=C, K=5, T=1.0, dtype=dtype, max_block=max_block, seed=11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_reference_shapes(mod, target, dtype):
    """The issue's class counts with the default block table (single block up to C = 1000, loop at 21841)."""
    for B, C, K in target.reference_shapes:
        checks.check_parity(mod, target.device, B=B, C=C, K=K, T=1.0, dtype=dtype, seed=B + K)


def test_parity_all_eps_one(mod, target):
    """eps == 1 for every branch takes the w = p path (no exp per branch)."""
    checks.check_parity(mod, target.device, B=3, C=90, K=3, T=2.0, eps=[1.0, 1.0, 1.0], max_block=32)
    checks.check_parity(mod, target.device, B=3, C=30, K=3, T=2.0, eps=[1.0, 1.0, 1.0])


def test_more_branches_than_one_launch(mod, target):
    """K = 10 > 8: two launches, the teacher gradient accumulated across them (fp32 workspace for bf16)."""
    checks.check_parity(mod, target.device, B=2, C=21, K=10, T=1.0, layout="stacked")
    checks.check_parity(mod, target.device, B=2, C=21, K=10, T=1.0, dtype=torch.bfloat16)


@pytest.mark.parametrize("layout", ["stacked", "strided"])
def test_layouts(mod, target, layout):
    checks.check_layouts_match_contiguous(mod, target.device, layout=layout)
    checks.check_layouts_match_contiguous(mod, target.device, layout=layout, dtype=torch.bfloat16, max_block=16)


def test_strided_parity_column_loop(mod, target):
    checks.check_parity(mod, target.device, B=3, C=70, K=3, T=1.0, max_block=32, layout="strided")


def test_optional_outputs(mod, target):
    checks.check_optional_outputs(mod, target.device)
    checks.check_optional_outputs(mod, target.device, max_block=8)


def test_grad_scale_broadcast(mod, target):
    checks.check_grad_scale_broadcast(mod, target.device)


@pytest.mark.parametrize("C, max_block", [(5, None), (9, 4)], ids=["single_block", "column_loop"])
def test_gradcheck_float64(mod, target, C, max_block):
    """Full Jacobians, except for the interpreted 3-block loop: a random projection (fast_mode) keeps it quick."""
    fast_mode = target.interpreted and max_block is not None
    checks.check_gradcheck(mod, target.device, C=C, max_block=max_block, fast_mode=fast_mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("max_block", [None, 16], ids=["single_block", "column_loop"])
@pytest.mark.parametrize("T", [0.5, 4.0])
def test_stability_large_logits(mod, target, dtype, max_block, T):
    checks.check_stability(mod, target.device, dtype=dtype, max_block=max_block, T=T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_block", [None, 8], ids=["single_block", "column_loop"])
def test_tiny_target_probability(mod, target, dtype, max_block):
    checks.check_tiny_target_probability(mod, target.device, dtype=dtype, max_block=max_block)


def test_empty_batch(mod, target):
    checks.check_empty_batch(mod, target.device)


def test_bad_target(mod, target):
    checks.check_bad_target(mod, target.device)


def test_launch_table(mod):
    checks.check_launch_table(mod)


def test_unavailable_reason(mod, target):
    checks.check_unavailable_reason(mod, target.device, expect_available=True)
    if target.interpreted:  # the compiled copy refuses CPU tensors and says how to interpret instead
        compiled = checks.load_kernel_module(interpret=False)
        assert "TRITON_INTERPRET=1" in compiled.triton_unavailable_reason("cpu")
