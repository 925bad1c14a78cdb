"""Zero spills for the compiled sm_90 (H100/H200) code of both GPU kernels, checked without a GPU.

Triton: every variant the dispatcher launches for the problems of ``benchmarks/resources.py``
``problems(full=False)`` (all dtypes; K = 1, 2, 4, 5, 8, 13; the largest tile of every tile-row
count, single block and column loop, scalar and widest VEC; the reference shapes with every pass; the
sparse-teacher kernel ``_ofa_sparse_kernel`` with k = 200 stored classes and gradients, 4-byte dtypes:
see ``QUICK_SPARSE_DTYPES``) is
compiled for ``GPUTarget("cuda", 90, 32)``; the cubin must have no local memory and no stack.
CUDA: ``csrc/ofa_loss_cuda.cu`` through nvcc for sm_90 with ``-Xptxas -v`` and the build flags;
every dtype's kernel, dense (``ofa_rows_kernel``) and sparse teacher (``ofa_sparse_rows_kernel``),
must report 0 bytes of spill stores and loads. The full table:
``.venv/bin/python benchmarks/resources.py``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import resources  # noqa: E402


# Compiled in a process of its own: this session runs Triton's interpreter for CPU tensors
# (tests/conftest.py), and its patched language leaks into the compilation of later variants.
COMPILE_VARIANTS = """
import json, sys
from dataclasses import asdict
sys.path.insert(0, sys.argv[1])
import resources
found = resources.triton_configs(resources.problems(full=False))
configs = resources.compile_all(found, jobs=int(sys.argv[3]))
open(sys.argv[2], "w").write(json.dumps([asdict(c) for c in configs]))
"""


@pytest.fixture(scope="module")
def triton_variants(tmp_path_factory):
    reason = resources.triton_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("resources") / "triton.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_VARIANTS, str(BENCHMARKS), str(out),
                           str(min(8, os.cpu_count() or 1))], env=env, capture_output=True, text=True, timeout=1500)
    if not out.is_file():
        pytest.fail(f"compiling the Triton variants failed:\n{proc.stderr[-3000:]}")
    return [resources.TritonConfig(**c) for c in json.loads(out.read_text())]


@pytest.fixture(scope="module")
def cuda_kernels():
    if resources.nvcc_path() is None or not os.path.isfile(resources.nvcc_path()):
        pytest.skip("nvcc is not installed (no CUDA toolkit found by ofakd_fast/loss/build.py)")
    try:
        import torch

        if torch.version.cuda is None:
            pytest.skip(f"this PyTorch ({torch.__version__}) has no CUDA headers to build against")
    except ImportError:
        pytest.skip("torch is not importable")
    return resources.cuda_resources(arch=90)


def test_triton_variants_compile_for_sm90(triton_variants):
    failed = [f"{c.name()}: {c.error}" for c in triton_variants if c.error]
    assert not failed, "variants that do not compile for sm_90:\n" + "\n".join(failed)
    assert len(triton_variants) > 20  # the dispatcher's variety is really exercised


def test_triton_variants_do_not_spill(triton_variants):
    spilled = [f"{c.name()} ({c.problems[0]}): {c.regs} registers, local {c.local} B, stack {c.stack} B"
               for c in triton_variants if c.error is None and c.spills]
    assert not spilled, f"{len(spilled)} Triton variant(s) spill on sm_90:\n" + "\n".join(spilled)


def test_triton_reference_shapes_fit(triton_variants):
    """The 256x1000x5 / 256x21841x5 launches: registers and shared memory leave room for a block."""
    labels = {resources.Problem(d, K, C, p, B=B).label() for B, C, K in resources.REFERENCE_SHAPES
              for d in ("fp32", "bf16") for p in resources.PASSES}
    seen = [c for c in triton_variants if labels & set(c.problems)]
    assert seen
    for c in seen:
        assert c.regs <= 255
        assert resources.occupancy(c.regs, c.threads, c.shared)["blocks"] >= 1, c.name()


@pytest.mark.parametrize("kernel", resources.CUDA_KERNELS)
@pytest.mark.parametrize("dtype", resources.DTYPES)
def test_cuda_kernel_does_not_spill(cuda_kernels, kernel, dtype):
    r = cuda_kernels[kernel].get(dtype)
    assert r is not None, f"no {dtype} {kernel} in the ptxas output: {sorted(cuda_kernels[kernel])}"
    assert r.get("spill_stores") == 0 and r.get("spill_loads") == 0, (
        f"CUDA {kernel}<{dtype}> on sm_90: {r.get('regs')} registers, {r.get('spill_stores')} B spill "
        f"stores, {r.get('spill_loads')} B spill loads, {r.get('stack')} B stack")


def test_occupancy_model():
    # 64 registers, 256 threads: 2048 registers per warp -> 32 warps -> 4 blocks of 8 warps.
    assert resources.occupancy(64, 256, 8704)["blocks"] == 4
    # 128 registers, 512 threads: 4096 per warp -> 16 warps -> one 16-warp block.
    assert resources.occupancy(128, 512, 0)["blocks"] == 1
    # shared memory limits: 100 KB blocks -> 2 per SM.
    assert resources.occupancy(32, 128, 100 * 1024)["blocks"] == 2
    t = resources.traffic(256, 1000, 5, "fp32")
    assert t["fwdbwd_bytes"] == 11 * 256 * 1000 * 4
