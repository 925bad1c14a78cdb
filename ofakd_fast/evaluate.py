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
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint, load_weights
from .data import DATASETS, build_loader, dataset_info
from .train import (Distributed, MergeKwargs, UsageError, create_model, evaluate, kwargs_pair, nonneg_int,
                    positive_int)

INHERITED = ("model", "model_kwargs", "dataset", "data_dir", "img_size", "in_chans", "num_classes", "crop_pct",
             "interpolation")


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
    # Fields the data helpers read; evaluation uses no augmentation.
    for key, value in {"train_subset": 0, "subset_seed": 0, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3],
                       "hflip": 0.0, "color_jitter": 0.0, "aa": None, "reprob": 0.0}.items():
        setattr(args, key, value)
    return args


def eval_dataset(args, info):
    from .data import (TensorImageDataset, image_folder, image_folder_classes, load_cifar100, small_image_transform,
                       timm_transform, SyntheticDataset)

    if args.dataset == "imagefolder":
        return image_folder(args.data_dir, "val", timm_transform(False, args, info), info.in_chans,
                            image_folder_classes(args.data_dir))
    if args.dataset == "synthetic":
        return SyntheticDataset(256, info.in_chans, args.img_size, info.num_classes, seed=2)
    if args.dataset == "cifar100":
        images, labels = load_cifar100(args.data_dir, "test")
    else:
        from .mnist_data import load_mnist

        images, labels = load_mnist("test", args.data_dir)
    return TensorImageDataset(images, labels, small_image_transform(False, args.img_size, info.native_size, info.mean,
                                                                    info.std, 0.0))


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    args = resolve(args)
    ddp = Distributed(args.device)
    try:
        info = dataset_info(args)
        model = create_model(args.model, dict(args.model_kwargs), info.num_classes, info.in_chans, args.img_size,
                             "--model")
        load_weights(model, args.checkpoint, "--checkpoint", "model", prefer_ema=args.use_ema)
        model.to(ddp.device).eval()
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        dataset = eval_dataset(args, info)
        loader = build_loader(dataset, args.batch_size, False, args.workers, 0, ddp.rank, ddp.world_size,
                              ddp.device.type == "cuda")

        def amp_ctx():
            return torch.autocast(ddp.device.type, dtype=torch.bfloat16) if args.amp else nullcontext()

        metrics = evaluate(model, loader, ddp.device, amp_ctx, args.channels_last, ddp)
        seconds = time.perf_counter() - start
        result = {"checkpoint": args.checkpoint, "model": args.model, "dataset": args.dataset, "images": len(dataset),
                  "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"], "seconds": seconds,
                  "ema": args.use_ema}
        if ddp.main:
            print(f"{args.checkpoint}{' (EMA)' if args.use_ema else ''}: {args.model} on {args.dataset} "
                  f"({len(dataset)} images): top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} "
                  f"loss {metrics['loss']:.4f} ({seconds:.1f} s)", flush=True)
            if args.results_file:
                Path(args.results_file).write_text(json.dumps(result, indent=2))
        return result
    finally:
        ddp.close()


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"ofakd-eval: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
