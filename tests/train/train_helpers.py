"""Shared by the trainer tests: a tiny image-folder tree, a tiny ViT student and ResNet teacher, their flags."""
from pathlib import Path

import numpy as np
import pytest
import torch

from ofakd_fast.train import create_model

IMG = 16
CLASSES = ("cat", "dog", "emu")
STUDENT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=32", "depth=2",
           "num_heads=2"]
TEACHER = ["--teacher", "resnet10t", "--teacher-kwargs", "channels=(8,16,32,64)", "stem_width=8"]


def write_tree(root: Path, per_class_train: int = 4, per_class_val: int = 1, seed: int = 0) -> Path:
    """An ImageNet-layout tree of small random PNGs: root/{train,val}/<class>/*.png."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (IMG + 4, IMG + 4, 3), dtype=np.uint8)
                pixels[..., label] = 255 - 40 * label  # a little class signal
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """Teacher weights as a safetensors file, as a user would pass them."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = create_model("resnet10t", {"channels": (8, 16, 32, 64), "stem_width": 8}, len(CLASSES), 3, IMG,
                           "--teacher")
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    return path


def base_flags(tree: Path, out: Path, *extra) -> list:
    return ["--dataset", "imagefolder", "--data-dir", str(tree), "--img-size", str(IMG), *STUDENT, *TEACHER,
            "--batch-size", "4", "--workers", "0", "--threads", "1", "--log-interval", "1", "--opt", "adamw",
            "--lr", "1e-3", "--weight-decay", "0.05", "--sched", "cosine", "--output", str(out), *extra]
