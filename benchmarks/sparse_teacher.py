"""Forward+backward of the fused CPU loss with a sparse (top-k) teacher against the dense teacher.

    .venv/bin/python benchmarks/sparse_teacher.py                      # B=256 C=1000 K=5 k=20, fp32, 1 thread
    .venv/bin/python benchmarks/sparse_teacher.py --shape 256x21841x5 --k 50 --dtype bf16 --threads 2

Two levels, each timed interleaved (dense, sparse, dense, ...) for --reps rounds after a warm-up,
median and minimum in ms:
  op   the C++ ops themselves, ofakd_fast_C::fused_forward and ::fused_forward_sparse, with a grad_scale:
       the loss rows and the branch gradients in one call (what the eager CPU path runs).
  api  ofa_loss_multi(...) then torch.autograd.grad(losses.sum(), branches): the whole public call.
eps = 1.2, T = 1, logits ~ N(0, 3).
"""
import argparse
import statistics
import time

import torch

from ofakd_fast.loss import ofa_loss_multi, sparse_teacher
from ofakd_fast.loss.extension import cpu_extension_error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def make_inputs(B: int, C: int, K: int, k: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    branches = [(torch.randn(B, C, generator=gen) * 3).to(dtype).requires_grad_() for _ in range(K)]
    teacher = (torch.randn(B, C, generator=gen) * 3).to(dtype)
    target = torch.randint(C, (B,), generator=gen)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    top = sparse_teacher(teacher.to(acc), k)
    return branches, teacher, top, target


def op_calls(branches, teacher, top, target):
    """(dense, sparse) closures of the raw ops: loss rows and gradients for the 'mean' row factors."""
    K, B = len(branches), target.shape[0]
    acc = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    eps = torch.full((K,), 1.2, dtype=torch.float64)
    scale = torch.full((K, B), 1.0 / B, dtype=acc)
    rows = [b.detach() for b in branches]
    ops = torch.ops.ofakd_fast_C
    dense = lambda: ops.fused_forward(rows, teacher, target, eps, 1.0, scale, False)  # noqa: E731
    sparse = lambda: ops.fused_forward_sparse(rows, top.logits, top.indices, top.lse, target, eps, 1.0, scale)  # noqa: E731
    return dense, sparse


def api_calls(branches, teacher, top, target):
    """(dense, sparse) closures of the public call, forward then backward."""
    def step(t):
        return lambda: torch.autograd.grad(ofa_loss_multi(branches, t, target, 1.2, backend="cpu").sum(), branches)
    return step(teacher), step(top)


def time_interleaved(calls, reps: int, warmup: int = 3):
    """Per call: the list of its times in ms, the calls taking turns each round."""
    for fn in calls:
        for _ in range(warmup):
            fn()
    samples = [[] for _ in calls]
    for _ in range(reps):
        for fn, out in zip(calls, samples):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="256x1000x5", help="BxCxK")
    parser.add_argument("--k", type=int, default=20, help="stored teacher classes per row")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    if cpu_extension_error():
        raise SystemExit(f"the C++ CPU kernel is unavailable: {cpu_extension_error()}")
    torch.set_num_threads(args.threads)
    B, C, K = (int(v) for v in args.shape.split("x"))
    inputs = make_inputs(B, C, K, args.k, DTYPES[args.dtype])
    print(f"B={B} C={C} K={K} k={args.k} {args.dtype}, {args.threads} thread(s), {args.reps} rounds; ms")
    print(f"{'level':<5} {'dense median':>13} {'sparse median':>14} {'sparse/dense':>13} "
          f"{'dense min':>10} {'sparse min':>11} {'min ratio':>10}")
    for level, make in (("op", op_calls), ("api", api_calls)):
        dense, sparse = time_interleaved(make(*inputs), args.reps)
        d_med, s_med = statistics.median(dense), statistics.median(sparse)
        print(f"{level:<5} {d_med:>13.3f} {s_med:>14.3f} {s_med / d_med:>13.2f} "
              f"{min(dense):>10.3f} {min(sparse):>11.3f} {min(sparse) / min(dense):>10.2f}")


if __name__ == "__main__":
    main()
