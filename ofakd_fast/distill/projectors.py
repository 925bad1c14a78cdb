"""OFA projector heads: map one intermediate student feature to class logits.

Two forms, chosen per student family as the original does, else by the form of the student's
features (see ``OFADistiller``):

* :class:`SpatialProjector` for CNN feature maps [B, C, H, W]: the paper's stack of
  depthwise-separable convs, each halving the resolution, down to the last stage's; a 1x1 conv
  when the stage already is the last; then global average pooling and a linear classifier.
* :class:`TokenProjector` for token sequences (ViT, MLP-Mixer, Swin): patch merging toward a 7x7
  grid, the first merge projecting to the output width, transformer blocks over the merged patch
  tokens and the prefix tokens, then a linear classifier.

:func:`init_projector` initializes both as the paper does. The structure follows the original
implementation (Hao840/OFAKD, distillers/ofa.py and distillers/utils.py), cited where it applies.
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
    """The paper's depthwise-separable pair: stride-2 dw3x3, pw1x1, BN, ReLU, then dw3x3, pw1x1, BN, ReLU
    (the original's SepConv, Hao840/OFAKD distillers/utils.py)."""

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
    last stage's resolution; with no halving left a 1x1 conv (with bias) maps to `width`. As the
    original's CNN branch (Hao840/OFAKD distillers/ofa.py, ``OFA.__init__``: ``4 - stage`` SepConvs,
    or a 1x1 conv at stage 4, to max(student, teacher width), pooling, Linear).
    """

    def __init__(self, in_chans: int, num_halvings: int, width: int, num_classes: int):
        if num_halvings == 0:
            layers = [nn.Conv2d(in_chans, width, 1)]
        else:
            chans = [in_chans * 2 ** i for i in range(num_halvings)] + [width]
            layers = [SepConv(c_in, c_out) for c_in, c_out in zip(chans[:-1], chans[1:])]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, num_classes))


class PatchMerging(nn.Module):
    """Concatenates each 2x2 neighbourhood of a [B, H, W, C] grid (zero-padded to even size); LayerNorm, Linear
    (no bias) to `out_dim` (default `dim`), then `act_layer`.

    As the original's PatchMerging (Hao840/OFAKD distillers/utils.py), including the order of the four
    neighbours in the concatenation: (0, 0), (1, 0), (0, 1), (1, 1) as (row, column) offsets. The original
    needs even grids; odd ones are zero-padded here.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None, act_layer=nn.Identity):
        super().__init__()
        out_dim = out_dim or dim
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, dim = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = x.reshape(batch, (height + 1) // 2, 2, (width + 1) // 2, 2, dim)
        x = x.permute(0, 1, 3, 4, 2, 5).flatten(3)  # column offset outer, row offset inner: x0, x1, x2, x3
        return self.act(self.reduction(self.norm(x)))


class TokenProjector(nn.Module):
    """Patch tokens (as a [B, C, H, W] map) plus optional prefix tokens [B, P, out_dim] -> logits [B, num_classes].

    As the original's token branch (Hao840/OFAKD distillers/ofa.py, ``OFA.__init__``, not-CNN student):

    * `num_merges` patch merges; the first one projects `dim` to `out_dim` (default `dim`) and always ends
      in GELU, the later ones keep `out_dim` and end in GELU except the last (Identity);
    * `num_blocks` timm ViT blocks with 4 heads at `out_dim` (2 or 1 where 4 does not divide it);
    * the prefix tokens (class, distillation, register) skip the merging (the original's TokenFnContext)
      and join the patch tokens in front, for the blocks;
    * the classifier (Linear `out_dim` -> `num_classes`) reads the class token (position 0) when
      `use_class_token` and prefix tokens are given (the original's TokenFilter), else the mean of the
      patch tokens (the original's GAP1d). Reading the class token alone also settles a student with a
      distillation token (DeiT distilled: [class, distillation] prefix), where the original leaves a
      todo: the distillation token takes part in the blocks as context only.

    Beyond the original: with no merge and `dim` != `out_dim` (a grid already at or below 7x7, e.g. a
    small input) a token-wise Linear + GELU projects to `out_dim`, where the original's blocks would
    not fit the features.
    """

    def __init__(self, dim: int, num_merges: int, num_blocks: int, num_classes: int, use_class_token: bool,
                 out_dim: Optional[int] = None):
        super().__init__()
        out_dim = out_dim or dim
        merges = [PatchMerging(dim if i == 0 else out_dim, out_dim,
                               nn.GELU if i == 0 or i < num_merges - 1 else nn.Identity)
                  for i in range(num_merges)]
        if not merges and dim != out_dim:
            merges = [nn.Linear(dim, out_dim), nn.GELU()]
        self.merges = nn.Sequential(*merges)
        num_heads = next(h for h in (4, 2, 1) if out_dim % h == 0)  # the original: 4 heads
        self.blocks = nn.Sequential(*[Block(out_dim, num_heads) for _ in range(num_blocks)])
        self.head = nn.Linear(out_dim, num_classes)
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
    """The original's initialization (Hao840/OFAKD distillers/utils.py, ``init_weights``): Kaiming-normal
    (fan_out) conv weights, truncated-normal (std 0.02) linear weights with zero bias, unit BatchNorm
    weights with zero bias; conv biases and LayerNorms keep PyTorch's defaults."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
