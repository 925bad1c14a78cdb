"""Peak extra memory of one forward+backward of each loss variant, as a multiple of the gradient's size.

Each measurement runs ``_memory_probe.py`` in a fresh process (see its docstring for the method:
RSS high-water mark on CPU with a fixed glibc mmap threshold, ``max_memory_allocated`` on CUDA) and
stores the result in the benchmark's ``extra_info``. The time pytest-benchmark shows for this group
is the probe process's wall time (start-up and compilation included), not a measurement.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import _common as C
import _memory_probe

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_memory_probe.py")


def _params():
    params = []
    for device in ("cpu", "cuda"):
        reason = C.no_cuda_reason() if device == "cuda" else None
        if reason:
            params.append(pytest.param(None, "all", id="cuda-all", marks=[pytest.mark.skip(reason=reason)]))
            continue
        for dtype in C.DTYPES:
            for name, (B, Cl, K) in C.NAMED_SHAPES.items():
                case = C.Case(device, B, Cl, K, dtype)
                for variant in C.loss_variants(device):
                    quick = (name, dtype) in C.QUICK_CASES
                    params.append(pytest.param(case, variant, id=f"{case.id()}-{variant}",
                                               marks=[pytest.mark.quick] if quick else []))
    return params


def _probe(spec: dict) -> dict:
    env = {**os.environ, **_memory_probe.MALLOC_ENV}
    done = subprocess.run([sys.executable, PROBE, json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed for {spec}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.memory
@pytest.mark.parametrize("case, variant", _params())
def bench_memory(benchmark, pytestconfig, case, variant):
    benchmark.group = f"memory {case.id()} (probe wall time, not a measurement)"
    spec = {"device": case.device, "B": case.B, "C": case.C, "K": case.K, "dtype": case.dtype, "variant": variant,
            "threads": torch.get_num_threads()}
    result = {}
    benchmark.pedantic(lambda: result.update(_probe(spec)), rounds=1, iterations=1)
    benchmark.extra_info.update({**case.info(), **result, "kind": "memory", "mode": "fwdbwd"})
