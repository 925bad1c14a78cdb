"""OFA projector heads: map one intermediate student feature to class logits.

Two forms, chosen by the form of the student's features (see ``OFADistiller``):

* :class:`SpatialProjector` for feature maps [B, C, H, W] (CNNs, Swin): the paper's stack of
  depthwise-separable convs, each halving the resolution, down to the last stage's; a 1x1 conv
  when the stage already is the last; then global average pooling and a linear classifier.
* :class:`TokenProjector` for token sequences (ViT, MLP-Mixer): patch merging toward a 7x7 grid,
  transformer blocks over the merged patch tokens and the prefix tokens, then a linear classifier.

:func:`init_projector` initializes both as the paper does.
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

FINAL_GRID = 7  # the paper merges ViT patch grids down to 7x7 (49 tokens)


class SepConv(nn.Sequential):
    """The paper's depthwise-separable pair: stride-2 dw3x3, pw1x1, BN, ReLU, then dw3x3, pw1x1, BN, ReLU."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__(
            nn.Conv2d(in_chans, in_chans, 3, stride=2, padding=1, groups=in_chans, bias=False),
            nn.Conv2d(in_chans, in_chans, 1, bias=False),
            nn.BatchNorm2d(in_chans),
            nn.ReLU(),
            nn.Conv2d(in_chans, in_chans, 3, stride=1, padding=1, groups=in_chans, bias=False),
            nn.Conv2d(in_chans, out_chans, 1, bias=False),
            nn.BatchNorm2d(out_chans),
            nn.ReLU(),
        )


class SpatialProjector(nn.Sequential):
    """Feature map [B, in_chans, H, W] -> logits [B, num_classes].

    `num_halvings` SepConvs (channels doubling, the last one to `width`) bring the map to the
    last stage's resolution; with no halving left a 1x1 conv maps to `width`.
    """

    def __init__(self, in_chans: int, num_halvings: int, width: int, num_classes: int):
        if num_halvings == 0:
            layers = [nn.Conv2d(in_chans, width, 1)]
        else:
            chans = [in_chans * 2 ** i for i in range(num_halvings)] + [width]
            layers = [SepConv(c_in, c_out) for c_in, c_out in zip(chans[:-1], chans[1:])]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, num_classes))


class PatchMerging(nn.Module):
    """Concatenates each 2x2 neighbourhood of a [B, H, W, C] grid (zero-padded to even size); LayerNorm, Linear to C."""

    def __init__(self, dim: int, act_layer=nn.Identity):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, dim, bias=False)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, dim = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = x.reshape(batch, (height + 1) // 2, 2, (width + 1) // 2, 2, dim).permute(0, 1, 3, 2, 4, 5).flatten(3)
        return self.act(self.reduction(self.norm(x)))


class TokenProjector(nn.Module):
    """Patch tokens (as a [B, C, H, W] map) plus optional prefix tokens [B, P, C] -> logits [B, num_classes].

    The patch grid is merged `num_merges` times (GELU between merges, none after the last);
    the prefix tokens (class, distillation, register) skip the merging and join the patch
    tokens in the transformer blocks. The classifier reads the class token when
    `use_class_token` (the student classifies from it), else the mean of the patch tokens.
    """

    def __init__(self, dim: int, num_merges: int, num_blocks: int, num_classes: int, use_class_token: bool):
        super().__init__()
        num_heads = next(h for h in (4, 2, 1) if dim % h == 0)  # the paper uses 4 heads
        self.merges = nn.Sequential(*[PatchMerging(dim, nn.GELU if i < num_merges - 1 else nn.Identity)
                                      for i in range(num_merges)])
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(num_blocks)])
        self.head = nn.Linear(dim, num_classes)
        self.use_class_token = use_class_token

    def forward(self, feature: Union[Tensor, Tuple[Tensor, Optional[Tensor]]]) -> Tensor:
        patches, prefix = feature if isinstance(feature, tuple) else (feature, None)
        patches = self.merges(patches.permute(0, 2, 3, 1)).flatten(1, 2)
        num_prefix = 0 if prefix is None else prefix.shape[1]
        tokens = patches if prefix is None else torch.cat([prefix, patches], dim=1)
        tokens = self.blocks(tokens)
        pooled = tokens[:, 0] if self.use_class_token and num_prefix else tokens[:, num_prefix:].mean(dim=1)
        return self.head(pooled)


def merges_toward_final_grid(grid: int) -> int:
    """How many 2x2 merges bring a `grid` x `grid` patch grid toward 7x7 without going below it."""
    return max(int(math.floor(math.log2(grid / FINAL_GRID))), 0)


def init_projector(module: nn.Module) -> None:
    """The paper's initialization: Kaiming-normal convs, truncated-normal (std 0.02) linears, unit norms, zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)) and m.bias is not None:
            nn.init.zeros_(m.bias)
