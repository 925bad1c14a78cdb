"""What a teacher cache buys and costs, measured side by side in one run (one CPU thread by default).

    .venv/bin/python benchmarks/teacher_cache.py              # steps/s, bytes per sample, top-k error
    .venv/bin/python benchmarks/teacher_cache.py --steps 3 --teachers resnet50

1. Steps per second of the OFA distillation step (ResNet-18 student, 224 px, batch 16, 5 branches,
   forward + backward + SGD step, float32): the teacher run live against its output read from a
   cache (full logits, and top-20 + lse), for each teacher. Interleaved, median of --steps each.
2. Bytes per sample per epoch of each storage form at C = 1000.
3. The OFA loss of a top-k teacher against the dense one: relative error of the summed branch loss
   and cosine of the student gradient, for k in {5, 10, 20, 50, 100} at C = 1000, over B = 256 rows
   of teacher logits given by --logits (a .pt file [N, 1000] of real teacher outputs) or, without one,
   synthetic peaked logits (said so in the output: not real teacher outputs).
4. With --mnist-teacher (the main job's teacher, OUTPUT/teacher/last.pth): one epoch of the main job's
   OFA student on its 3,000 images, live teacher against a full float32 cache made for it (the
   cache-making time reported too), img/s of each and whether the two runs end with equal parameters.
5. With --mnist-teacher: part 3 on that cache's real teacher outputs (C = 10), k in {1, 2, 3, 5}.
"""
import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ofakd_fast.distill import build_distiller
from ofakd_fast.loss import ofa_loss_multi, sparse_teacher
from ofakd_fast.train.teacher_cache import TeacherCache, index_dtype

IMAGENET = 1000


def build(teacher_name: str):
    import timm

    student = timm.create_model("resnet18", pretrained=False, num_classes=IMAGENET)
    teacher = timm.create_model(teacher_name, pretrained=False, num_classes=IMAGENET)
    distiller = build_distiller("ofa", student, teacher, eps=1.2)
    return distiller, torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9)


def one_step(distiller, optimizer, images, labels, teacher_output) -> float:
    start = time.perf_counter()
    if teacher_output is not None:
        distiller.use_teacher_output(teacher_output)
    _, losses = distiller(images, labels)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    return time.perf_counter() - start


def step_rates(teacher_name: str, batch: int, steps: int) -> dict:
    """Steps/s of live / full-cache / top-20-cache steps, interleaved so machine noise hits all alike."""
    distiller, optimizer = build(teacher_name)
    images, labels = torch.randn(batch, 3, 224, 224), torch.randint(IMAGENET, (batch,))
    with torch.no_grad():
        logits = distiller.teacher.eval()(images)
    sources = {"live": lambda: None, "cache (all logits)": lambda: logits.clone(),
               "cache (top-20)": lambda: sparse_teacher(logits, 20)}
    times = {name: [] for name in sources}
    for repeat in range(steps + 1):
        for name, source in sources.items():
            elapsed = one_step(distiller, optimizer, images, labels, source())
            if repeat:  # the first round warms up
                times[name].append(elapsed)
    return {name: 1 / statistics.median(values) for name, values in times.items()}


def bytes_per_sample(classes: int) -> dict:
    index_bytes = index_dtype(classes)().itemsize
    rows = {"all logits, fp16": 2 * classes, "all logits, fp32": 4 * classes}
    for k in (5, 10, 20, 50, 100):
        rows[f"top-{k}, fp16 + {8 * index_bytes}-bit indices + fp32 lse"] = k * (2 + index_bytes) + 4
    return rows


def synthetic_teacher_logits(rows: int, classes: int) -> torch.Tensor:
    """Peaked logits: one class well ahead, a handful of plausible ones, a long Gaussian tail."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, classes, generator=gen) * 1.5
    top = torch.randint(classes, (rows,), generator=gen)
    logits[torch.arange(rows), top] += 9.0
    near = torch.randint(classes, (rows, 5), generator=gen)
    logits.scatter_add_(1, near, torch.rand(rows, 5, generator=gen) * 6)
    return logits


def top_k_error(teacher_logits: torch.Tensor, ks=(5, 10, 20, 50, 100), branches: int = 5) -> dict:
    gen = torch.Generator().manual_seed(1)
    rows, classes = teacher_logits.shape
    students = [torch.randn(rows, classes, generator=gen).requires_grad_() for _ in range(branches)]
    target = teacher_logits.argmax(dim=1)

    def loss_and_grad(teacher):
        loss = ofa_loss_multi(students, teacher, target, 1.2).sum()
        return loss.item(), torch.cat([g.flatten() for g in torch.autograd.grad(loss, students)])

    dense_loss, dense_grad = loss_and_grad(teacher_logits)
    result = {}
    for k in ks:
        loss, grad = loss_and_grad(sparse_teacher(teacher_logits, k))
        cosine = F.cosine_similarity(grad.double(), dense_grad.double(), dim=0).item()
        result[k] = (abs(loss - dense_loss) / abs(dense_loss), cosine)
    return result


def mnist_runs(teacher_checkpoint: str, root: Path) -> None:
    """The main job's OFA student for one epoch: live teacher, then a full float32 cache (made first)."""
    from ofakd_fast.demo import mnist
    from ofakd_fast.train import parse_args, train
    from ofakd_fast.train.cache_teacher import main as cache_main

    opts = mnist.build_parser().parse_args(["--epochs", "1"])
    flags = {name: mnist.student_argv(opts, "ofa", 0, teacher_checkpoint, root / name) for name in ("live", "cached")}
    start = time.perf_counter()
    cache_main(["--cache-dir", str(root / "cache"), "--cache-dtype", "float32", "--", *flags["live"]])
    cache_seconds = time.perf_counter() - start
    live = train(parse_args(flags["live"]))
    cached = train(parse_args(flags["cached"] + ["--teacher-cache", str(root / "cache")]))
    same = all(torch.equal(a, b) for a, b in zip(live["distiller"].state_dict().values(),
                                                 cached["distiller"].state_dict().values()))
    print(f"4. MNIST main job, OFA student, 1 epoch of {opts.train_subset} images: live {live['img_per_sec']:.1f} img/s, "
          f"from the cache {cached['img_per_sec']:.1f} img/s ({cached['img_per_sec'] / live['img_per_sec']:.2f}x); "
          f"making the cache {cache_seconds:.1f} s; equal parameters: {same}")
    real = TeacherCache(root / "cache").rows(0, np.arange(256))
    print(f"5. top-k OFA loss on the MNIST teacher's real outputs (its cache's first epoch, B = {real.shape[0]}, "
          f"C = {real.shape[1]}) against the dense teacher")
    for k, (error, cosine) in top_k_error(real, ks=(1, 2, 3, 5)).items():
        print(f"   k = {k}: relative loss error {error:.2e}, gradient cosine {cosine:.6f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="*", default=["deit_small_patch16_224", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--logits", default=None, help="a .pt file of real teacher logits [N, 1000]")
    parser.add_argument("--mnist-teacher", default=None, help="the main job's teacher checkpoint (part 4)")
    parser.add_argument("--work-dir", default="runs/teacher_cache_bench", help="part 4's runs and cache")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    print(f"1. OFA step, ResNet-18 student, batch {opts.batch_size} at 224 px, float32, {opts.threads} thread(s), "
          f"median of {opts.steps}")
    for name in opts.teachers:
        rates = step_rates(name, opts.batch_size, opts.steps)
        live = rates["live"]
        print(f"   teacher {name:24s} " + "  ".join(f"{k} {v:.3f} steps/s ({v / live:.2f}x)" for k, v in rates.items()))
    print(f"2. bytes per sample per epoch at C = {IMAGENET}")
    for form, size in bytes_per_sample(IMAGENET).items():
        print(f"   {form:45s} {size:6d} B")
    logits = torch.load(opts.logits)[:256].float() if opts.logits else synthetic_teacher_logits(256, IMAGENET)
    what = f"teacher logits from {opts.logits}" if opts.logits else "SYNTHETIC peaked logits (not a real teacher)"
    print(f"3. top-k OFA loss (eps 1.2, 5 branches, B = {logits.shape[0]}, C = {logits.shape[1]}) against the dense "
          f"teacher; {what}")
    for k, (error, cosine) in top_k_error(logits).items():
        print(f"   k = {k:3d}: relative loss error {error:.2e}, gradient cosine {cosine:.6f}")
    if opts.mnist_teacher:
        shutil.rmtree(opts.work_dir, ignore_errors=True)
        mnist_runs(opts.mnist_teacher, Path(opts.work_dir))


if __name__ == "__main__":
    main()
