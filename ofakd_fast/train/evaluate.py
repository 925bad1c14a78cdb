"""ofakd-eval: top-1 / top-5 of a checkpoint on a dataset's evaluation split.

    ofakd-eval --checkpoint runs/r18_deit/best.pth --data-dir /data/imagenet
    ofakd-eval --checkpoint deit_t.safetensors --model deit_tiny_patch16_224 --dataset imagefolder --data-dir ...

A checkpoint written by ofakd-train carries its run's flags: model, model kwargs, dataset and image
size default to them (any flag given here wins). Other files (a plain state_dict, a timm checkpoint,
``.pth`` or ``.safetensors``) need ``--model`` and the dataset flags. ``--use-ema`` evaluates the EMA
weights. Runs under torchrun too (each rank evaluates a shard; counts are summed).
"""
import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn

from .checkpoint import load_checkpoint, load_weights
from .flags import MergeKwargs, kwargs_pair, nonneg_int, positive_int
from .data import DATASETS, DataConfig, build_dataset, dataset_info
from .distributed import Distributed
from .errors import UsageError, exit_on_user_error
from .models import create_model
from .sampling import build_loader

INHERITED = ("model", "model_kwargs", "dataset", "data_dir", "img_size", "in_chans", "num_classes", "crop_pct",
             "interpolation")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_ctx: Callable, channels_last: bool,
             ddp: Distributed) -> Dict[str, float]:
    """Top-1, top-5 (in %) and cross-entropy of `model` over the whole loader, summed over ranks.

    The sums stay on the device (one host synchronisation at the end, not one per batch)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for images, target, *_ in loader:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp_ctx():
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(target[:, None])
        totals += torch.stack([nn.functional.cross_entropy(logits, target, reduction="sum").double(),
                               hits[:, :1].any(dim=1).sum().double(), hits.any(dim=1).sum().double(),
                               torch.tensor(float(len(target)), dtype=torch.float64, device=device)])
    model.train(was_training)
    loss_sum, top1, top5, count = ddp.all_sum(totals).tolist()
    count = max(count, 1)
    return {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ofakd-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="ofakd-train checkpoint (or its run dir), state_dict or timm checkpoint")
    add("--model", default=None, help="timm model name (default: the checkpoint's)")
    add("--model-kwargs", type=kwargs_pair, nargs="*", action=MergeKwargs, default=None, metavar="KEY=VALUE")
    add("--use-ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    add("--dataset", default=None, choices=DATASETS)
    add("--data-dir", default=None)
    add("--img-size", type=positive_int, default=None)
    add("--in-chans", type=positive_int, default=None)
    add("--num-classes", type=positive_int, default=None)
    add("--crop-pct", type=float, default=None)
    add("--interpolation", default=None, choices=("bilinear", "bicubic", "nearest"))
    add("--batch-size", "-b", type=positive_int, default=256)
    add("--workers", "-j", type=nonneg_int, default=4)
    add("--amp", action="store_true", help="bfloat16 autocast")
    add("--channels-last", action="store_true")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add("--results-file", default=None, help="also write the results as JSON here")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fills unset flags from the checkpoint's run flags, then the trainer's defaults."""
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / ("best.pth" if (path / "best.pth").is_file() else "last.pth")
    args.checkpoint = str(path)
    saved = {}
    if path.suffix != ".safetensors":
        state = load_checkpoint(path, "--checkpoint")
        saved = state.get("args") or {} if isinstance(state, dict) else {}
    for key in INHERITED:
        if getattr(args, key, None) is None and key in saved:
            setattr(args, key, saved[key])
    defaults = {"dataset": "imagefolder", "img_size": 224, "model_kwargs": {}, "interpolation": "bilinear"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.model:
        raise UsageError(f"--model: {path} carries no model name (not an ofakd-train checkpoint); pass --model")
    return args


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    args = resolve(args)
    ddp = Distributed(args.device)
    try:
        config = DataConfig.from_namespace(args)
        info = dataset_info(config)
        model = create_model(args.model, dict(args.model_kwargs), info.num_classes, info.in_chans, args.img_size,
                             "--model")
        load_weights(model, args.checkpoint, "--checkpoint", "model", prefer_ema=args.use_ema)
        model.to(ddp.device).eval()
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        dataset = build_dataset(config, info, "eval")
        loader = build_loader(dataset, args.batch_size, False, args.workers, 0, ddp.rank, ddp.world_size,
                              ddp.device.type == "cuda")

        def amp_ctx():
            return torch.autocast(ddp.device.type, dtype=torch.bfloat16) if args.amp else nullcontext()

        metrics = evaluate(model, loader, ddp.device, amp_ctx, args.channels_last, ddp)
        result = {"checkpoint": args.checkpoint, "model": args.model, "dataset": args.dataset, "images": len(dataset),
                  **metrics, "seconds": time.perf_counter() - start, "ema": args.use_ema}
        if ddp.main:
            report(result, args.results_file)
        return result
    finally:
        ddp.close()


def report(result: dict, results_file) -> None:
    print(f"{result['checkpoint']}{' (EMA)' if result['ema'] else ''}: {result['model']} on {result['dataset']} "
          f"({result['images']} images): top-1 {result['top1']:.2f} top-5 {result['top5']:.2f} "
          f"loss {result['loss']:.4f} ({result['seconds']:.1f} s)", flush=True)
    if results_file:
        Path(results_file).write_text(json.dumps(result, indent=2))


@exit_on_user_error("ofakd-eval")
def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
