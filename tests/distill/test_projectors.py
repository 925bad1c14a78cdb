"""OFA projectors as the original implementation builds them (Hao840/OFAKD distillers/ofa.py, distillers/utils.py,
custom_forward/*.py ``stage_info``): parameter counts of the paper's students at 224 px, stage taps, the token
projector's merges and activations, and which token the classifier reads.

Parameter counts, from the original's structure (num_classes = 1000; d, i, o, w: widths):
  Block(d, 4 heads)   = LN 2d + qkv 3d^2 (no bias) + proj d^2 + d + LN 2d + fc1 4d^2 + 4d + fc2 4d^2 + d
                      = 12d^2 + 10d
  PatchMerging(i, o)  = LN(4i) 8i + Linear(4i, o, no bias) 4io
  head(d)             = Linear(d, 1000) = 1000d + 1000
  SepConv(i, o)       = dw3x3 9i + pw i^2 + BN 2i + dw3x3 9i + pw io + BN 2o = i^2 + io + 20i + 2o
  Conv1x1(i, w)       = iw + w
CNN stage s < 4: SepConvs i -> 2i -> ... -> w (4 - s of them), stage 4: Conv1x1(i, w); then head(w), with
w = max(student num_features, teacher num_features). Token stage s: merges toward 7x7 (the first to the final
width D), max(4 - s, 1) blocks at D, head(D); the teacher's width does not enter.
"""
import functools

import pytest
import timm
import torch
from torch import nn

from ofakd_fast.distill import OFADistiller, stage_indices
from ofakd_fast.distill.ofa import original_family
from ofakd_fast.distill.projectors import PatchMerging, SpatialProjector, TokenProjector

TEACHER_WIDTHS = (384, 768, 2048)

# Shorthand, values used below: Block(192) = 444288, Block(384) = 1773312, Block(768) = 7085568;
# head(192) = 193000, head(384) = 385000, head(512) = 513000, head(768) = 769000, head(1280) = 1281000,
# head(2048) = 2049000.
EXPECTED = {  # student -> teacher width -> parameters of the stage 1, 2, 3, 4 projectors
    # ResNet-18: stages 64@56, 128@28, 256@14, 512@7 (custom_forward/resnet.py); w = 512, 768, 2048.
    # Sep(64,128) = 4096 + 8192 + 1280 + 256 = 13824; Sep(128,256) = 16384 + 32768 + 2560 + 512 = 52224.
    "resnet18": {
        # w = 512: Sep(256,512) = 65536 + 131072 + 5120 + 1024 = 202752, Conv1x1(512,512) = 262656;
        #   s1 = 13824 + 52224 + 202752 + 513000 = 781800, s2 = 52224 + 202752 + 513000 = 767976,
        #   s3 = 202752 + 513000 = 715752, s4 = 262656 + 513000 = 775656
        384: (781800, 767976, 715752, 775656),
        # w = 768: Sep(256,768) = 65536 + 196608 + 5120 + 1536 = 268800, Conv1x1(512,768) = 393984;
        #   s1 = 13824 + 52224 + 268800 + 769000 = 1103848, s2 = 52224 + 268800 + 769000 = 1090024,
        #   s3 = 268800 + 769000 = 1037800, s4 = 393984 + 769000 = 1162984
        768: (1103848, 1090024, 1037800, 1162984),
        # w = 2048: Sep(256,2048) = 65536 + 524288 + 5120 + 4096 = 599040, Conv1x1(512,2048) = 1050624;
        #   s1 = 13824 + 52224 + 599040 + 2049000 = 2714088, s2 = 52224 + 599040 + 2049000 = 2700264,
        #   s3 = 599040 + 2049000 = 2648040, s4 = 1050624 + 2049000 = 3099624
        2048: (2714088, 2700264, 2648040, 3099624),
    },
    # MobileNetV2: stages 24@56, 32@28, 96@14 and the 1280-channel conv_head output @7
    # (custom_forward/efficientnet.py); w = max(1280, teacher) = 1280, 1280, 2048.
    # Sep(24,48) = 576 + 1152 + 480 + 96 = 2304; Sep(48,96) = 2304 + 4608 + 960 + 192 = 8064;
    # Sep(32,64) = 1024 + 2048 + 640 + 128 = 3840.
    "mobilenetv2_100": {
        # w = 1280: Sep(96,1280) = 9216 + 122880 + 1920 + 2560 = 136576, Sep(64,1280) = 4096 + 81920 + 1280
        #   + 2560 = 89856, Conv1x1(1280,1280) = 1639680;
        #   s1 = 2304 + 8064 + 136576 + 1281000 = 1427944, s2 = 3840 + 89856 + 1281000 = 1374696,
        #   s3 = 136576 + 1281000 = 1417576, s4 = 1639680 + 1281000 = 2920680
        384: (1427944, 1374696, 1417576, 2920680),
        768: (1427944, 1374696, 1417576, 2920680),  # max(1280, 768) = 1280: as for 384
        # w = 2048: Sep(96,2048) = 9216 + 196608 + 1920 + 4096 = 211840, Sep(64,2048) = 4096 + 131072 + 1280
        #   + 4096 = 140544, Conv1x1(1280,2048) = 2623488;
        #   s1 = 2304 + 8064 + 211840 + 2049000 = 2271208, s2 = 3840 + 140544 + 2049000 = 2193384,
        #   s3 = 211840 + 2049000 = 2260840, s4 = 2623488 + 2049000 = 4672488
        2048: (2271208, 2193384, 2260840, 4672488),
    },
    # DeiT-T: 14x14 grid at width 192 at every stage (custom_forward/vision_transformer.py): one merge
    # PM(192,192) = 1536 + 147456 = 148992; s1 = 148992 + 3 * 444288 + 193000 = 1674856,
    # s2 = 148992 + 2 * 444288 + 193000 = 1230568, s3 = s4 = 148992 + 444288 + 193000 = 786280.
    "deit_tiny_patch16_224": dict.fromkeys(TEACHER_WIDTHS, (1674856, 1230568, 786280, 786280)),
    # Swin-T: 96@56, 192@28, 384@14, 768@7 (custom_forward/swin_transformer.py), D = 768:
    # PM(96,768) = 768 + 294912 = 295680, PM(192,768) = 1536 + 589824 = 591360,
    # PM(384,768) = 3072 + 1179648 = 1182720, PM(768,768) = 6144 + 2359296 = 2365440;
    # s1 = 295680 + 2 * 2365440 + 3 * 7085568 + 769000 = 27052264
    # s2 = 591360 + 2365440 + 2 * 7085568 + 769000 = 17896936
    # s3 = 1182720 + 7085568 + 769000 = 9037288;  s4 (7x7, no merge) = 7085568 + 769000 = 7854568
    "swin_tiny_patch4_window7_224": dict.fromkeys(TEACHER_WIDTHS, (27052264, 17896936, 9037288, 7854568)),
    # ResMLP-S12: 14x14 at 384 (custom_forward/mlp_mixer.py): PM(384,384) = 3072 + 589824 = 592896;
    # s1 = 592896 + 3 * 1773312 + 385000 = 6297832, s2 = 592896 + 2 * 1773312 + 385000 = 4524520,
    # s3 = s4 = 592896 + 1773312 + 385000 = 2751208.
    "resmlp_12_224": dict.fromkeys(TEACHER_WIDTHS, (6297832, 4524520, 2751208, 2751208)),
    # Mixer-B/16: 14x14 at 768 (custom_forward/mlp_mixer.py): PM(768,768) = 2365440;
    # s1 = 2365440 + 3 * 7085568 + 769000 = 24391144, s2 = 2365440 + 2 * 7085568 + 769000 = 17305576,
    # s3 = s4 = 2365440 + 7085568 + 769000 = 10220008.
    "mixer_b16_224": dict.fromkeys(TEACHER_WIDTHS, (24391144, 17305576, 10220008, 10220008)),
}


class StubTeacher(nn.Module):
    """Just a width and logits: the projectors read the teacher's num_features only."""

    def __init__(self, num_features: int, num_classes: int = 1000):
        super().__init__()
        self.num_features, self.num_classes = num_features, num_classes

    def forward(self, images):
        return torch.zeros(images.shape[0], self.num_classes)


@functools.lru_cache(maxsize=None)
def paper_model(name: str) -> nn.Module:
    """Each paper student built once for the module (pretrained=False, 1000 classes, 224 px)."""
    return timm.create_model(name, pretrained=False, num_classes=1000)


def build_on_meta(student: nn.Module, teacher_width: int, **kwargs) -> OFADistiller:
    """The distiller with its projectors on the meta device: the probe runs on the student's real weights, the
    projectors get shapes but no storage or initialization (their parameter counts are all that is read)."""
    with torch.device("meta"):
        return OFADistiller(student, StubTeacher(teacher_width), input_size=(3, 224, 224), **kwargs)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_parameter_counts_per_stage_match_the_original(name):
    student = paper_model(name)
    projector_type = TokenProjector if original_family(student).tokens else SpatialProjector
    for width, expected in EXPECTED[name].items():
        distiller = build_on_meta(student, width)
        counts = tuple(sum(p.numel() for p in projector.parameters()) for projector in distiller.projectors.values())
        assert counts == expected, (name, width)
        assert all(type(projector) is projector_type for projector in distiller.projectors.values())


def test_swin_token_projector_widths():
    stage1 = build_on_meta(paper_model("swin_tiny_patch4_window7_224"), 2048, stages=(1,)).projectors["stage1"]
    merges = [(m.norm.normalized_shape[0] // 4, m.reduction.out_features, type(m.act)) for m in stage1.merges]
    assert merges == [(96, 768, nn.GELU), (768, 768, nn.GELU), (768, 768, nn.Identity)]
    assert [(block.attn.qkv.in_features, block.attn.num_heads) for block in stage1.blocks] == [(768, 4)] * 3
    assert stage1.head.in_features == 768 and not stage1.use_class_token
    deit = build_on_meta(paper_model("deit_tiny_patch16_224"), 2048)
    for projector in deit.projectors.values():  # 14x14 grid: one merge, ending in GELU
        assert [type(m.act) for m in projector.merges] == [nn.GELU] and projector.use_class_token


def test_mobilenetv2_stage4_is_the_head_conv_output():
    student = paper_model("mobilenetv2_100")
    assert stage_indices(student, (1, 2, 3, 4)) == [1, 2, 3, None]  # None: the final features (conv_head, bn2)
    distiller = OFADistiller(student, StubTeacher(384), stages=(3, 4), input_size=(3, 64, 64))
    final, (stage3, stage4) = distiller._probe((3, 64, 64))
    assert stage3.shape[1] == 96 and stage4.shape[1] == 1280 and stage4 is final
    assert distiller.projectors["stage4"][0].in_channels == 1280
    alone = OFADistiller(student, StubTeacher(384), stages=(4,), input_size=(3, 64, 64))  # no block level requested
    logits, losses = alone(torch.randn(2, 3, 64, 64), torch.tensor([1, 2]))
    assert logits.shape == (2, 1000) and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("num_merges, acts", [(1, [nn.GELU]), (2, [nn.GELU, nn.Identity]),
                                              (3, [nn.GELU, nn.GELU, nn.Identity])])
def test_token_merges_first_always_gelu_last_identity(num_merges, acts):
    projector = TokenProjector(8, num_merges, 1, 5, use_class_token=False, out_dim=16)
    assert [type(m.act) for m in projector.merges] == acts
    assert [(m.norm.normalized_shape[0], m.reduction.out_features) for m in projector.merges] == (
        [(32, 16)] + [(64, 16)] * (num_merges - 1))
    assert projector(torch.randn(2, 8, 28, 28)).shape == (2, 5)


def test_no_merge_with_other_width_projects_tokens():
    projector = TokenProjector(8, 0, 1, 5, use_class_token=False, out_dim=16)
    assert isinstance(projector.merges[0], nn.Linear) and isinstance(projector.merges[1], nn.GELU)
    assert projector(torch.randn(2, 8, 4, 4)).shape == (2, 5)
    assert len(TokenProjector(8, 0, 1, 5, use_class_token=False).merges) == 0


def test_patch_merging_concatenates_in_the_original_order():
    merging = PatchMerging(1, out_dim=4)
    merging.norm = nn.Identity()
    with torch.no_grad():
        merging.reduction.weight.copy_(torch.eye(4))
    grid = torch.arange(16.0).reshape(1, 4, 4, 1)  # value = 4 * row + column
    merged = merging(grid)
    # distillers/utils.py: x0 = x[0::2, 0::2], x1 = x[1::2, 0::2], x2 = x[0::2, 1::2], x3 = x[1::2, 1::2]
    assert merged[0, 0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]
    assert merged[0, 1, 1].tolist() == [10.0, 14.0, 11.0, 15.0]


def small_vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
                             depth=2, embed_dim=32, num_heads=2, **kwargs)


def test_class_token_is_read_whenever_the_student_has_one():
    with_token = OFADistiller(small_vit(global_pool="avg"), StubTeacher(64, 10))  # pools by mean, has a class token
    assert all(p.use_class_token for p in with_token.projectors.values())
    without = OFADistiller(small_vit(class_token=False, global_pool="avg"), StubTeacher(64, 10))
    assert not any(p.use_class_token for p in without.projectors.values())


def test_deit_distillation_token_reads_the_class_token_only():
    student = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, img_size=32,
                                patch_size=4, depth=2, embed_dim=32, num_heads=2)
    distiller = OFADistiller(student, StubTeacher(64, 10), stages=(4,))
    projector = distiller.projectors["stage4"]
    assert projector.use_class_token and projector.head.in_features == 32
    patches, prefix = torch.randn(2, 32, 8, 8), torch.randn(2, 2, 32)  # [class, distillation]
    out = projector((patches, prefix))
    assert out.shape == (2, 10)
    projector.blocks = nn.Identity()  # without the blocks' mixing the classifier sees the class token alone
    other = prefix.clone()
    other[:, 1] += 1.0
    torch.testing.assert_close(projector((patches, prefix)), projector.head(prefix[:, 0]))
    torch.testing.assert_close(projector((torch.randn_like(patches), other)), projector.head(prefix[:, 0]))
    logits, losses = distiller(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert all(torch.isfinite(v) for v in losses.values())


def test_families_the_original_never_covered_keep_the_form_based_choice():
    cnn = timm.create_model("regnetx_002", pretrained=False, num_classes=10)
    assert original_family(cnn) is None
    spatial = OFADistiller(cnn, StubTeacher(64, 10), input_size=(3, 64, 64))
    assert all(isinstance(p, SpatialProjector) for p in spatial.projectors.values())
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
                            depth=2, embed_dim=32, num_heads=2)
    assert original_family(eva) is None
    tokens = OFADistiller(eva, StubTeacher(2048, 10))
    assert all(isinstance(p, TokenProjector) and p.head.in_features == 32 for p in tokens.projectors.values())
