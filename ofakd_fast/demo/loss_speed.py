"""A short demo: the fused loss against the per-branch reference loop at ImageNet size.

    python -m ofakd_fast.demo.loss_speed [--batch 256 --classes 1000 --branches 5]
"""
import argparse
import time

import torch

from ..loss import available_backends, ofa_loss_multi
from ..loss.reference import ofa_loss_multi_reference


def median_ms(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--branches", type=int, default=5)
    parser.add_argument("--eps", type=float, default=1.2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    print("backends:", available_backends())
    torch.manual_seed(0)
    branches = [torch.randn(args.batch, args.classes, requires_grad=True) for _ in range(args.branches)]
    teacher = torch.randn(args.batch, args.classes)
    target = torch.randint(0, args.classes, (args.batch,))
    fused = ofa_loss_multi(branches, teacher, target, args.eps)
    reference = ofa_loss_multi_reference(branches, teacher, target, args.eps)
    print(f"losses fused    : {[round(v, 5) for v in fused.tolist()]}")
    print(f"losses reference: {[round(v, 5) for v in reference.tolist()]}")
    timings = {}
    for name, loss_fn in (("fused", ofa_loss_multi), ("reference", ofa_loss_multi_reference)):
        def step():
            torch.autograd.grad(loss_fn(branches, teacher, target, args.eps).sum(), branches)
        timings[name] = median_ms(step, args.repeats)
    print(f"forward+backward {args.batch}x{args.classes}x{args.branches}: fused {timings['fused']:.2f} ms, "
          f"reference {timings['reference']:.2f} ms, speed-up {timings['reference'] / timings['fused']:.1f}x")


if __name__ == "__main__":
    main()
