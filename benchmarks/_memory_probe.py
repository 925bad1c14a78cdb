"""Peak extra memory of one forward+backward of a loss variant, measured in a fresh process.

    python benchmarks/_memory_probe.py '{"device": "cpu", "B": 256, "C": 21841, "K": 5, "dtype": "fp32", "variant": "eager"}'

prints one JSON line. Run by ``bench_memory.py``; usable alone.

CPU method (no allocator statistics exist for CPU tensors):

1. The parent starts this process with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` fixed
   at 16 KiB, so glibc serves every tensor buffer above 16 KiB with its own mmap and returns it to
   the kernel when it is freed: the resident set size (RSS) follows the live tensors, and a freed
   intermediate cannot be silently reused from a heap that was grown earlier.
2. Inputs are built, the step runs twice (compilation, one-time allocations, OpenMP threads), its
   outputs are dropped and ``ofakd_fast.empty_cache()`` frees the fused path's reusable gradient
   buffer, so the measured call has to allocate its gradient like every other variant.
3. The baseline is VmRSS; writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's RSS
   high-water mark (VmHWM) to it; one forward+backward runs and keeps its gradients; VmHWM - baseline
   is the peak extra memory: everything the call allocated and touched at once, gradients included,
   the inputs not. Repeated ``REPEATS`` times; the largest is reported.
4. ``retained`` is VmRSS after the gradients are dropped minus the baseline: memory a variant keeps
   between calls (the fused CPU path's reusable gradient buffer, until ``ofakd_fast.empty_cache()``).

CUDA method: ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated`` around one call,
minus the memory allocated before it.
"""
import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPEATS = 3
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "16384"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_high_water_mark():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(spec: dict) -> dict:
    import torch

    import _common as C
    import ofakd_fast

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    case = C.Case(spec["device"], spec["B"], spec["C"], spec["K"], spec["dtype"])
    branches, teacher, target = C.make_inputs(case)
    step = C.loss_step(spec["variant"], "fwdbwd", branches, teacher, target)
    for _ in range(2):
        grads = step()
        del grads
    C.synchronize(case.device)

    peaks, retained = [], []
    for _ in range(REPEATS):
        gc.collect()
        ofakd_fast.empty_cache()
        if case.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            grads = step()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
            del grads
            gc.collect()
            retained.append(torch.cuda.memory_allocated() - base)
        else:
            base = _status_kib("VmRSS")
            _reset_high_water_mark()
            grads = step()
            peaks.append((_status_kib("VmHWM") - base) * 1024)
            del grads
            gc.collect()
            retained.append((_status_kib("VmRSS") - base) * 1024)
    method = "cuda max_memory_allocated" if case.device == "cuda" else "VmHWM - VmRSS (clear_refs 5), fixed mmap threshold"
    return {**spec, "peak_extra_bytes": max(peaks), "peaks": peaks, "retained_bytes": max(retained),
            "grad_bytes": case.grad_bytes, "peak_over_grad": max(peaks) / case.grad_bytes,
            "retained_over_grad": max(retained) / case.grad_bytes, "method": method}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
