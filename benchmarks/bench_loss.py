"""Time of the OFA loss, forward and forward+backward, every variant side by side, and its memcpy floor.

One benchmark per case and pass. Variants (see ``_common``): every fused backend that runs at speed on
the device ('cpu' on CPU; 'cuda' and 'triton' on a GPU), the per-branch reference loop run eagerly
('eager', as the original code), ``torch.compile`` of that loop ('compile') and, for
forward+backward, the memcpy floor ('floor').

The variants are timed *interleaved*: every round runs each variant (fast ones several times, so
each gets a similar share of the time), so all of them see the same load of a shared machine;
timing them one benchmark after another let a burst of other jobs land on one variant only.
pytest-benchmark's own statistics are those of the first fused backend (one call per round, the
``subject``); ``extra_info['samples_ms']`` holds every call of every variant, and the report builds
its ratios from those (medians and minimums).

Forward: the loss under ``torch.no_grad()``. Forward+backward: leaf branch logits requiring grad,
``torch.autograd.grad(losses.sum(), branches)``. eps = 1.2, T = 1. Every variant is warmed up first
(compilation, first touch of reused buffers). On CUDA each call is timed with CUDA events.
"""
import time

import pytest
import torch

import _common as C

MAX_REPEATS = 10  # calls of a fast variant per round


def _params():
    params = []
    for device in ("cpu", "cuda"):
        reason = C.no_cuda_reason() if device == "cuda" else None
        if reason:
            params.append(pytest.param(None, "all", id="cuda-all",
                                       marks=[pytest.mark.skip(reason=reason), pytest.mark.quick]))
            continue
        for planned in C.loss_plan(device):
            for mode in planned.modes:
                quick = planned.quick and mode == "fwdbwd"
                params.append(pytest.param(planned, mode, id=f"{planned.case.id()}-{mode}",
                                           marks=[pytest.mark.quick] if quick else []))
    return params


class Timed:
    """A variant's step; every call appends its milliseconds (CUDA events on CUDA, else wall clock)."""

    def __init__(self, step, device):
        self.step, self.device, self.ms = step, device, []

    def __call__(self):
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.step()
            end.record()
            torch.cuda.synchronize()
            self.ms.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            self.step()
            self.ms.append((time.perf_counter() - start) * 1e3)


@pytest.mark.loss
@pytest.mark.parametrize("planned, mode", _params())
def bench_loss(benchmark, bench_budget, planned, mode):
    case = planned.case
    device = case.device
    variants = C.loss_variants(device) + (["floor"] if mode == "fwdbwd" else [])
    branches, teacher, target = C.make_inputs(case)
    steps = {v: (C.floor_step(case) if v == "floor" else C.loss_step(v, mode, branches, teacher, target))
             for v in variants}
    seconds = {}
    for variant, step in steps.items():
        step()  # compilation, first touch of any reused buffer
        seconds[variant] = C.seconds_per_call(step, device)
    slowest = max(seconds.values())
    repeats = {v: int(min(MAX_REPEATS, max(1, round(slowest / max(s, 1e-7))))) for v, s in seconds.items()}
    round_seconds = sum(seconds[v] * repeats[v] for v in variants)
    rounds = C.rounds_for(round_seconds, bench_budget * len(variants), lo=3, hi=100)

    timers = {v: Timed(steps[v], device) for v in variants}
    subject = variants[0]  # the first fused backend (or 'eager' where none runs)

    def others():  # untimed by pytest-benchmark; each call timed by its Timed wrapper
        for variant in variants:
            for _ in range(repeats[variant] - (1 if variant == subject else 0)):
                timers[variant]()
        C.synchronize(device)

    benchmark.group = f"loss {case.id()} {mode}"
    benchmark.extra_info.update(kind="loss", mode=mode, subject=subject, sets=list(planned.sets),
                                repeats=repeats, rounds=rounds, **case.info())
    benchmark.pedantic(timers[subject], setup=others, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["samples_ms"] = {v: timers[v].ms for v in variants}
