"""ofakd-cache-teacher: run the teacher once over the training set for every epoch of a run, and store
its outputs for ``ofakd-train --teacher-cache DIR`` (format: :mod:`.teacher_cache`).

    ofakd-cache-teacher --cache-dir cache/r50 --cache-topk 20 -- --config imagenet_cnn --data-dir DATA \\
        --model resnet18 --teacher resnet50 --teacher-checkpoint r50.pth --epochs 100
    torchrun --nproc_per_node=4 -m ofakd_fast.train.cache_teacher --cache-dir ... -- ...  # epochs shared out

The flags after ``--`` are the student run's own ofakd-train flags: the cache takes the teacher, data,
seed, augmentation, image size and epochs from them, applies exactly the per-sample augmentation that
run will (keyed by seed, epoch and sample index), and records all of it in the manifest, so a run
whose flags differ is refused by name. With mixup/cutmix or --aug-repeats the cache holds the run's own
batches, mixed as the run mixes them (keyed by seed, epoch, step and process): give the run's process
count as --cache-world-size. A killed job resumes where it stopped (same command).
"""
import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..distill.base import run_teacher
from .cli import parse_args
from .data import DataConfig, build_dataset, dataset_info
from .distributed import Distributed
from .errors import UsageError, exit_on_user_error
from .models import build_teacher
from .rundir import format_seconds
from .sampling import EpochSampler, SeededDataset, build_mixup, sample_key
from .teacher_cache import (DTYPES, EpochWriter, epoch_dir, manifest_mismatches, read_manifest, run_fields,
                            write_manifest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ofakd-cache-teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", required=True, help="where the cache is written (created; resumed if there)")
    parser.add_argument("--cache-topk", type=int, default=0,
                        help="store the top-k logits, their classes and the row's logsumexp (0: all C logits)")
    parser.add_argument("--cache-dtype", default="float16", choices=tuple(DTYPES), help="the stored logits' type")
    parser.add_argument("--cache-temperature", type=float, default=1.0,
                        help="temperature of the stored logsumexp (top-k only): the student run's loss temperature")
    parser.add_argument("--cache-batch-size", type=int, default=256,
                        help="images per teacher forward (with mixup, cutmix or repeats: the run's --batch-size)")
    parser.add_argument("--cache-world-size", type=int, default=1,
                        help="processes of the student run (torchrun's nproc x nnodes); with mixup, cutmix or "
                             "--aug-repeats its batches are cached, so the cache is made for that many")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then the student run's ofakd-train flags")
    return parser


def cache_fields(opts: argparse.Namespace, num_classes: int) -> dict:
    """The manifest fields the cache itself chooses: what is stored and how."""
    if not 0 <= opts.cache_topk <= num_classes:
        raise UsageError(f"--cache-topk {opts.cache_topk}: expected 0 (all) to C = {num_classes}")
    if opts.cache_world_size < 1:
        raise UsageError(f"--cache-world-size {opts.cache_world_size}: expected the student run's process count (>= 1)")
    if not opts.cache_temperature > 0:
        raise UsageError(f"--cache-temperature {opts.cache_temperature}: expected a number > 0")
    topk = 0 if opts.cache_topk == num_classes else opts.cache_topk
    return {"topk": topk, "dtype": opts.cache_dtype, "temperature": opts.cache_temperature if topk else None}


def open_cache(root: Path, manifest: dict, ddp: Distributed) -> None:
    """Writes the manifest of a new cache, or checks that an existing one was made by the same command."""
    saved = read_manifest(root)
    if saved is not None and manifest_mismatches(saved, manifest):
        raise UsageError(f"--cache-dir {root} holds a cache of another run: "
                         + "; ".join(manifest_mismatches(saved, manifest)) + " (choose another --cache-dir)")
    ddp.barrier()
    if saved is None and ddp.main:
        write_manifest(root, manifest)


def epoch_plan(args, manifest: dict, num_samples: int, epoch: int, start_row: int, batch_size: int):
    """The teacher forwards that fill one epoch's rows from `start_row`: (items, (step, rank) to mix the batch
    as that step of that process does, or None). By sample: chunks of the samples in order. By position:
    every process's batches, rank after rank, as :class:`EpochSampler` deals them."""
    if manifest["rows"] == "sample":
        return [([(sample_key(args.seed, epoch, i), i) for i in range(start, min(start + batch_size, num_samples))],
                 None) for start in range(start_row, num_samples, batch_size)]
    plan, batch = [], args.batch_size
    for rank in range(manifest["world_size"]):
        sampler = run_sampler(args, manifest, num_samples, rank)
        sampler.set_epoch(epoch)
        items, steps = list(sampler), sampler.batches_per_epoch()
        plan += [(items[step * batch:(step + 1) * batch], (step, rank)) for step in range(steps)]
    return plan[start_row // batch:]


def run_sampler(args, manifest: dict, num_samples: int, rank: int) -> EpochSampler:
    """The training sampler of process `rank` of the run the cache is made for."""
    return EpochSampler(num_samples, args.batch_size, manifest["world_size"], rank, True, args.seed, args.aug_repeats)


def epoch_rows(args, manifest: dict, num_samples: int) -> int:
    """Rows of one epoch: a sample each, or every process's whole batches."""
    if manifest["rows"] == "sample":
        return num_samples
    return manifest["world_size"] * run_sampler(args, manifest, num_samples, 0).batches_per_epoch() * args.batch_size


def cache_epoch(args, opts, teacher, dataset, root: Path, epoch: int, manifest: dict, log) -> None:
    """Computes (or completes, after a kill) one epoch of the cache and publishes it."""
    rows = epoch_rows(args, manifest, len(dataset))
    writer = EpochWriter(root, epoch, rows, manifest)
    plan = epoch_plan(args, manifest, len(dataset), epoch, writer.rows_done, opts.cache_batch_size)
    loader = DataLoader(SeededDataset(dataset), batch_sampler=[items for items, _ in plan], num_workers=args.workers)
    mixup = build_mixup(args, manifest["num_classes"])
    device, start, done, last_line = next(teacher.parameters()).device, time.perf_counter(), 0, 0.0
    amp = torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype)) if args.amp else torch.autocast(
        device.type, enabled=False)
    for (images, target, _), (_, place) in zip(loader, plan):
        images = images.to(device)
        if place is not None and mixup is not None:
            images, _ = mixup(images, target.to(device), epoch, *place)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), amp:
            logits = run_teacher(teacher, images).float().cpu()
        writer.write(writer.rows_done, logits, opts.cache_temperature, DTYPES[manifest["dtype"]][1])
        done += len(images)
        now = time.perf_counter()
        if now - last_line < 10 and writer.rows_done < rows:
            continue  # a progress line every 10 s
        last_line, rate = now, done / max(now - start, 1e-9)
        log(f"epoch {epoch + 1}/{args.epochs}: {writer.rows_done}/{rows} rows, {rate:.1f} img/s, "
            f"eta {format_seconds((rows - writer.rows_done) / max(rate, 1e-9))} for this epoch")
    writer.finish()


@exit_on_user_error("ofakd-cache-teacher")
def main(argv=None):
    opts = build_parser().parse_args(argv)
    flags = opts.train_flags[1:] if opts.train_flags[:1] == ["--"] else opts.train_flags
    args = parse_args(flags)
    if not args.teacher:
        raise UsageError("the student run's flags after -- must name --teacher (and its weights)")
    if args.threads:
        torch.set_num_threads(args.threads)
    ddp = Distributed(args.device)
    try:
        log = (lambda message: print(message, flush=True)) if ddp.main else (lambda message: None)
        info = dataset_info(DataConfig.from_namespace(args))
        teacher = build_teacher(args, info, log).to(ddp.device).eval().requires_grad_(False)
        if args.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        dataset = build_dataset(DataConfig.from_namespace(args), info, "train")
        root = Path(opts.cache_dir)
        manifest = {**run_fields(args, teacher, len(dataset), info.num_classes, opts.cache_world_size),
                    **cache_fields(opts, info.num_classes)}
        open_cache(root, manifest, ddp)
        for epoch in range(ddp.rank, args.epochs, ddp.world_size):
            if not epoch_dir(root, epoch).is_dir():
                cache_epoch(args, opts, teacher, dataset, root, epoch, manifest, print)
        ddp.barrier()
        log(f"teacher cache complete: {root} ({args.epochs} epochs of {len(dataset)} samples)")
    finally:
        ddp.close()


if __name__ == "__main__":
    main()
