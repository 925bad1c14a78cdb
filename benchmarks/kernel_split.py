"""Where the time of one fused CPU call goes: the C++ kernel alone against the whole Python call.

    .venv/bin/python benchmarks/kernel_split.py [--shape 256x1000x5] [--dtype fp32] [--threads 1 [2]]

Times, interleaved in one process (medians and minimums over --rounds rounds):
  kernel+grad  torch.ops.ofakd_fast_C.fused_forward with the gradient pass (what fwd+bwd runs)
  kernel       the same without gradients (the forward under no_grad)
  call         ofa_loss_multi(...) forward + torch.autograd.grad, as benchmarks/bench_loss.py times it
  floor        the memcpy floor of the case (benchmarks/_common.py: the bytes a fused call must move)
and prints the call's overhead over the kernel (input checks, autograd.Function, autograd engine),
and the kernel's time per student logit. With several --threads, each is timed in the same rounds
(``torch.set_num_threads`` before every call) and the speed-up over the first is printed. Repeated calls
on the same tensors: warm caches.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DTYPES, Case, floor_step, loss_step, make_inputs  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="256x1000x5", help="BxCxK")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts, timed side by side")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    batch, classes, branches = (int(v) for v in args.shape.lower().split("x"))
    case = Case("cpu", batch, classes, branches, args.dtype)

    from ofakd_fast.loss.backends import backend_error
    error = backend_error("cpu", torch.device("cpu"))
    if error:
        sys.exit(f"kernel_split: the CPU kernel cannot run: {error}")
    students, teacher, target = make_inputs(case)
    detached = [s.detach() for s in students]
    kernel = torch.ops.ofakd_fast_C.fused_forward
    eps = torch.full((branches,), 1.2, dtype=torch.float64)
    grad_scale = torch.full((branches, 1), 1.0 / batch)
    steps = {
        "kernel+grad": lambda: kernel(detached, teacher, target, eps, 1.0, grad_scale, False),
        "kernel": lambda: kernel(detached, teacher, target, eps, 1.0, None, False),
        "call": loss_step("fused:cpu", "fwdbwd", students, teacher, target),
        "floor": floor_step(case),
    }
    samples = {(threads, name): [] for threads in args.threads for name in steps}
    for round_index in range(args.rounds + 5):  # 5 warm-up rounds, not kept
        for (threads, name), values in samples.items():
            torch.set_num_threads(threads)
            start = time.perf_counter()
            steps[name]()
            if round_index >= 5:
                values.append(time.perf_counter() - start)

    print(f"{case.shape} {args.dtype}, {args.rounds} rounds, torch {torch.__version__}")
    for threads in args.threads:
        report(samples, threads, batch * classes * branches)
    for threads in args.threads[1:]:
        for name in steps:
            ratio = [f(samples[(args.threads[0], name)]) / f(samples[(threads, name)]) for f in (statistics.median, min)]
            print(f"  {name:12s} {threads} threads over {args.threads[0]}: {ratio[0]:.2f}x faster (min {ratio[1]:.2f}x)")


def report(samples: dict, threads: int, logits: int) -> None:
    """Medians and minimums of one thread count, the call's overhead over the kernel, the time per logit."""
    print(f" {threads} thread(s):")
    for (count, name), values in samples.items():
        if count == threads:
            print(f"  {name:12s} median {statistics.median(values) * 1e3:8.3f} ms   min {min(values) * 1e3:8.3f} ms")
    kernel_ms = statistics.median(samples[(threads, "kernel+grad")]) * 1e3
    call_ms = statistics.median(samples[(threads, "call")]) * 1e3
    print(f"  call overhead over the kernel: {call_ms - kernel_ms:.3f} ms ({(call_ms - kernel_ms) / call_ms:.0%} of the call)")
    print(f"  kernel+grad per student logit: {kernel_ms * 1e6 / logits:.3f} ns")
    floor_ms = statistics.median(samples[(threads, "floor")]) * 1e3
    print(f"  over the memcpy floor: kernel+grad {kernel_ms / floor_ms:.2f}x, call {call_ms / floor_ms:.2f}x")


if __name__ == "__main__":
    main()
