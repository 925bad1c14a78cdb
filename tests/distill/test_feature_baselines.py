"""The feature-based baselines FitNet, CC, RKD and CRD: each loss against a hand-computed case, each
distiller on heterogeneous pairs of tiny timm models (CPU, 32x32 images), CRD's state round trip and
its memory bank under DDP (gloo, two processes)."""
import inspect
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ofakd_fast.distill.base import total_loss
from ofakd_fast.distill.correlation import CC, correlation_loss
from ofakd_fast.distill.crd import CRD, ContrastMemory, momentum_update, nce_loss
from ofakd_fast.distill.features import pooled_embedding
from ofakd_fast.distill.fitnet import FitNet, HintAdapter
from ofakd_fast.distill.ofa import stage_indices
from ofakd_fast.distill.rkd import RKD, pairwise_distances, rkd_angle_loss, rkd_distance_loss, triplet_angles
from test_distiller import make_model as make_swin
from test_logit_baselines import BATCH, CLASSES, IMG, make_model as make_small_model

NUM_DATA = 40
INPUT_SIZE = (3, IMG, IMG)


def make_model(family: str) -> nn.Module:
    """Tiny members of each family for 32x32 inputs (pretrained=False): the CNN, ViT and MLP-Mixer of the
    logit-baseline tests, the Swin of the OFA tests (without drop-path)."""
    return make_swin("swin") if family == "swin" else make_small_model(family)


# the six heterogeneous pairings of CNN, ViT and MLP, and Swin on either side
PAIRS = [("cnn", "vit"), ("cnn", "mlp"), ("vit", "cnn"), ("vit", "mlp"), ("mlp", "cnn"), ("mlp", "vit"),
         ("swin", "cnn"), ("vit", "swin")]
SMALL_CRD = {"num_data": NUM_DATA, "k": 16, "feat_dim": 8}
DISTILLERS = {"fitnet": (FitNet, {}), "cc": (CC, {"feat_dim": 16}), "rkd": (RKD, {}), "crd": (CRD, SMALL_CRD)}


def build(name: str, student: str, teacher: str, **kwargs):
    cls, defaults = DISTILLERS[name]
    return cls(make_model(student), make_model(teacher), input_size=INPUT_SIZE, **{**defaults, **kwargs})


def batch(seed: int = 0, size: int = BATCH):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(size, *INPUT_SIZE, generator=gen)
    labels = torch.randint(0, CLASSES, (size,), generator=gen)
    index = torch.randperm(NUM_DATA, generator=gen)[:size]
    return images, labels, index


def run(distiller, images, labels, index):
    return distiller(images, labels, index) if distiller.needs_sample_index else distiller(images, labels)


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# --- the losses against hand-computed cases --------------------------------------------------------

def test_rkd_terms_on_three_points():
    """RKD's distance and angle terms on two triangles, from side lengths and the law of cosines."""
    student = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # sides 3, 4, 5
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # sides 1, 1, sqrt 2

    def sides(points):
        return [[math.dist(p, q) for q in points.tolist()] for p in points.tolist()]

    d_s, d_t = sides(student), sides(teacher)
    mean_s, mean_t = (3 + 4 + 5) / 3, (1 + 1 + math.sqrt(2)) / 3
    distance = sum(smooth_l1(d_s[i][j] / mean_s - d_t[i][j] / mean_t) for i in range(3) for j in range(3)) / 9

    def cosine(d, a, b, c):  # the angle at a of the triangle (a, b, c); 0 where b or c is a
        if a in (b, c):
            return 0.0
        if b == c:
            return 1.0
        return (d[a][b] ** 2 + d[a][c] ** 2 - d[b][c] ** 2) / (2 * d[a][b] * d[a][c])

    angle = sum(smooth_l1(cosine(d_s, a, b, c) - cosine(d_t, a, b, c))
                for a in range(3) for b in range(3) for c in range(3)) / 27
    assert torch.allclose(pairwise_distances(student), torch.tensor(d_s, dtype=torch.float64))
    assert cosine(d_s, 1, 0, 2) == pytest.approx(3 / 5) and cosine(d_s, 0, 1, 2) == pytest.approx(0.0)
    assert triplet_angles(student)[1 * 9 + 0 * 3 + 2].item() == pytest.approx(3 / 5)
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(distance, rel=1e-9)
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(angle, rel=1e-9)
    squared = pairwise_distances(student, squared=True)
    assert squared[1, 2].item() == pytest.approx(25.0) and squared[0, 0].item() == 0.0


def test_correlation_loss_formula():
    """mean_i sum_c |s_ic - t_ic| |s_(i+1)c - t_(i+1)c|, written out."""
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    expected = sum(abs(s[i, c] - t[i, c]) * abs(s[i + 1, c] - t[i + 1, c]) for i in range(4) for c in range(3)) / 4
    assert correlation_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_nce_loss_on_a_tiny_case():
    """CRD's NCE with K=2 negatives and N=4: log x/(x + K/N + eps) and log (K/N)/(x + K/N + eps)."""
    scores = torch.tensor([[0.9, 0.2, 0.1], [0.5, 0.7, 0.3]], dtype=torch.float64)
    noise, eps = 2 / 4, 1e-7
    expected = -sum(math.log(row[0] / (row[0] + noise + eps))
                    + sum(math.log(noise / (x + noise + eps)) for x in row[1:]) for row in scores.tolist()) / 2
    assert nce_loss(scores, num_data=4).item() == pytest.approx(expected, rel=1e-12)


def test_contrast_memory_on_a_tiny_bank():
    """Scores exp(<bank[j], v> / T) / Z with Z = mean * N from the first batch, the positive in column 0,
    negatives from the global RNG, and the momentum update normalise(m * old + (1 - m) * v)."""
    memory = ContrastMemory(feat_dim=2, num_data=5, k=2, temperature=0.5, momentum=0.25)
    bank_s, bank_t = memory.memory_student.clone(), memory.memory_teacher.clone()
    v_s = F.normalize(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), dim=1)
    v_t = F.normalize(torch.tensor([[0.0, 1.0], [3.0, -1.0]]), dim=1)
    index = torch.tensor([3, 0])
    torch.manual_seed(7)
    candidates = torch.randint(0, 5, (2, 3))
    candidates[:, 0] = index
    torch.manual_seed(7)
    out_s, out_t = memory(v_s, v_t, index)
    raw_s = torch.tensor([[math.exp(float(bank_t[j] @ v_s[i]) / 0.5) for j in candidates[i]] for i in range(2)])
    raw_t = torch.tensor([[math.exp(float(bank_s[j] @ v_t[i]) / 0.5) for j in candidates[i]] for i in range(2)])
    z_s, z_t = raw_s.mean().item() * 5, raw_t.mean().item() * 5
    assert torch.allclose(out_s, raw_s / z_s, rtol=1e-5) and torch.allclose(out_t, raw_t / z_t, rtol=1e-5)
    assert torch.allclose(memory.normalizer, torch.tensor([z_s, z_t]), rtol=1e-5)
    for row, i in ((3, 0), (0, 1)):
        new = 0.25 * bank_s[row] + 0.75 * v_s[i]
        assert torch.allclose(memory.memory_student[row], new / new.norm(), atol=1e-6)
        new = 0.25 * bank_t[row] + 0.75 * v_t[i]
        assert torch.allclose(memory.memory_teacher[row], new / new.norm(), atol=1e-6)
    untouched = [1, 2, 4]
    assert torch.equal(memory.memory_student[untouched], bank_s[untouched])
    memory.eval()  # no update and Z kept in eval mode
    before = memory.state_dict()
    memory(v_s, v_t, index)
    assert all(torch.equal(before[k], v) for k, v in memory.state_dict().items())


def test_momentum_update_repeated_index_keeps_the_last_row():
    bank = torch.zeros(3, 2)
    momentum_update(bank, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]]), torch.tensor([1, 1, 2]), 0.0)
    assert torch.equal(bank, torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))


@pytest.mark.parametrize("size", [(2, 2), (4, 4), (8, 8), (3, 5)])
def test_hint_adapter_resamples_to_the_teacher_grid(size):
    """Pooling when the student grid is finer, bilinear interpolation otherwise, the 1x1 conv on either side."""
    adapter = HintAdapter(3, 5)
    x = torch.randn(2, 3, 4, 4)
    out = adapter(x, size)
    assert out.shape == (2, 5, *size)
    mapped = F.conv2d(x, adapter.proj.weight)
    if size == (4, 4):
        expected = mapped
    elif size == (2, 2):
        expected = F.avg_pool2d(mapped, 2)
    else:
        expected = F.interpolate(mapped, size=size, mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)


# --- the distillers on heterogeneous pairs -----------------------------------------------------------

def expected_kd(name, distiller, images):
    """The distillation loss recomputed from the models' own timm calls."""
    with torch.no_grad():
        student, teacher = distiller.student, distiller.teacher
        if name == "fitnet":
            feats_s, feats_t = ([model.forward_intermediates(images, indices=[i], output_fmt="NCHW")[1][0]
                                 for i in stage_indices(model, distiller.stages)] for model in (student, teacher))
            loss = 0.0
            for adapter, f_s, f_t in zip(distiller.adapters.values(), feats_s, feats_t):
                mapped = F.conv2d(f_s, adapter.proj.weight)
                if mapped.shape[-2:] != f_t.shape[-2:]:
                    mapped = F.interpolate(mapped, size=f_t.shape[-2:], mode="bilinear", align_corners=False) \
                        if mapped.shape[-1] < f_t.shape[-1] else F.adaptive_avg_pool2d(mapped, f_t.shape[-2:])
                loss = loss + ((mapped - f_t) ** 2).mean()
            return loss
        e_s = pooled_embedding(student, student.forward_features(images))
        e_t = pooled_embedding(teacher, teacher.forward_features(images))
        if name == "cc":
            return distiller.scale * correlation_loss(distiller.embed_s(e_s), distiller.embed_t(e_t))
        if name == "rkd":
            return 25 * rkd_distance_loss(e_s, e_t) + 50 * rkd_angle_loss(e_s, e_t)
    return None


@pytest.mark.parametrize("student,teacher", PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
@pytest.mark.parametrize("name", list(DISTILLERS))
def test_distiller_step_on_heterogeneous_pairs(name, student, teacher):
    """Loss entries as named and weighted; gradients reach every student parameter and every adapter or
    embedding parameter, none the teacher; teacher and adapters stay out of / in the state as they should."""
    torch.manual_seed(0)
    distiller = build(name, student, teacher, loss_weights={"gt": 0.5})
    key = "fitnet" if name == "fitnet" else "kd"
    images, labels, index = batch()
    distiller.train()
    logits, losses = run(distiller, images, labels, index)
    assert logits.shape == (BATCH, CLASSES)
    assert tuple(losses) == distiller.loss_names == ("loss_gt", f"loss_{key}")
    assert torch.allclose(losses["loss_gt"], 0.5 * F.cross_entropy(logits, labels))
    expected = expected_kd(name, distiller, images)
    if expected is not None:
        assert losses[f"loss_{key}"].item() == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    total_loss(losses).backward()
    for param_name, param in distiller.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    extra = [p for n, p in distiller.named_parameters() if not n.startswith("student.")]
    assert all(p.grad.abs().sum() > 0 for p in extra)
    assert bool(extra) == (name != "rkd")  # RKD relates the embeddings as they are
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert not any(k.startswith("teacher") for k in distiller.state_dict())
    # the distillation loss alone reaches the student's features
    distiller.zero_grad()
    _, losses = run(distiller, images, labels, index)
    losses[f"loss_{key}"].backward()
    assert sum(p.grad.abs().sum() for n, p in distiller.named_parameters()
               if n.startswith("student.") and p.grad is not None) > 0


def test_fitnet_default_stages_and_adapters():
    distiller = build("fitnet", "vit", "swin")
    assert distiller.stages == (1, 2, 3, 4)
    widths = [adapter.proj.out_channels for adapter in distiller.adapters.values()]
    assert widths == [32, 64, 128, 256]  # the teacher's channels at each stage
    assert set(distiller.extra_state()) == {f"adapters.stage{s}.proj.weight" for s in (1, 2, 3, 4)}
    assert build("fitnet", "cnn", "mlp", stages=(2, 4)).stages == (2, 4)


def test_defaults_are_the_original_train_py():
    hp = {cls.__name__: {h.flag: h.default for h in cls.hyper_parameters} for cls in (CC, RKD, CRD)}
    assert hp["CC"] == {"--correlation-scale": 0.02, "--correlation-feat-dim": 128}
    assert hp["RKD"] == {"--rkd-distance-weight": 25, "--rkd-angle-weight": 50, "--rkd-eps": 1e-12,
                         "--rkd-squared": False}
    assert hp["CRD"] == {"--crd-feat-dim": 128, "--crd-k": 16384, "--crd-momentum": 0.5, "--crd-temperature": 0.07}
    assert FitNet.default_loss_weights == {"gt": 1.0, "fitnet": 1.0}
    assert CRD.needs_sample_index and not any(cls.needs_sample_index for cls in (FitNet, CC, RKD))
    # the trainer passes input_size to constructors whose signature names it
    assert all("input_size" in inspect.signature(cls.__init__).parameters for cls in (FitNet, CC, RKD, CRD))


# --- CRD state --------------------------------------------------------------------------------------

def test_crd_state_round_trip_continues_exactly():
    torch.manual_seed(0)
    first = build("crd", "cnn", "vit")
    first.train()
    run(first, *batch(1))  # sets Z and moves the bank
    state = {k: v.clone() for k, v in first.extra_state().items()}
    assert {"contrast.memory_student", "contrast.memory_teacher", "contrast.normalizer"} <= set(state)
    assert (state["contrast.normalizer"] > 0).all()

    torch.manual_seed(123)  # a fresh distiller: other weights and bank
    second = CRD(make_model("cnn"), first.teacher, input_size=INPUT_SIZE, **SMALL_CRD)
    assert not torch.equal(second.contrast.memory_student, state["contrast.memory_student"])
    second.student.load_state_dict(first.student.state_dict())
    second.load_extra_state(state)
    second.train()

    images, labels, index = batch(2)
    torch.manual_seed(99)
    _, losses_first = run(first, images, labels, index)
    torch.manual_seed(99)
    _, losses_second = run(second, images, labels, index)
    for name in CRD.loss_names:
        assert torch.equal(losses_first[name], losses_second[name]), name
    after_first, after_second = first.extra_state(), second.extra_state()
    assert all(torch.equal(after_first[k], after_second[k]) for k in after_first)


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        distiller = build("crd", "vit", "mlp")  # LayerNorm only: an embedding does not depend on the batch
        distiller.train()
        images, labels, _ = batch(10 + rank, size=2 + rank)  # ranks with different batch sizes
        index = torch.arange(2 + rank) + 10 * rank
        torch.manual_seed(rank)
        run(distiller, images, labels, index)
        torch.save(distiller.extra_state(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_crd_bank_updates_are_gathered_under_ddp(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # the same as one process updating with both ranks' samples
    torch.manual_seed(0)
    single = build("crd", "vit", "mlp")
    initial = single.contrast.memory_student.clone()
    single.train()
    parts = [batch(10 + rank, size=2 + rank) for rank in range(2)]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    index = torch.cat([torch.arange(2 + rank) + 10 * rank for rank in range(2)])
    run(single, images, labels, index)
    for key in ("contrast.memory_student", "contrast.memory_teacher"):
        assert torch.allclose(states[0][key], single.extra_state()[key], atol=1e-6), key
    changed = (states[0]["contrast.memory_student"] != initial).any(1)
    assert changed.nonzero().flatten().tolist() == [0, 1, 10, 11, 12]


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs,match", [
    ("cc", {"feat_dim": 0}, "--correlation-feat-dim"),
    ("cc", {"scale": -1.0}, "--correlation-scale"),
    ("rkd", {"eps": 0.0}, "--rkd-eps"),
    ("rkd", {"angle_weight": -2.0}, "--rkd-angle-weight"),
    ("crd", {"k": 0}, "--crd-k"),
    ("crd", {"temperature": 0.0}, "--crd-temperature"),
    ("crd", {"momentum": 1.5}, "--crd-momentum"),
    ("crd", {"momentum": -0.1}, "--crd-momentum"),
    ("crd", {"num_data": None}, "num_data"),
    ("crd", {"num_data": 0}, "num_data"),
    ("fitnet", {"stages": (0, 5)}, "stages"),
    ("fitnet", {"loss_weights": {"kd": 1.0}}, "unknown loss weights"),
])
def test_bad_hyper_parameters_are_refused(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(name, "cnn", "vit", **kwargs)


@pytest.mark.parametrize("name", ["cc", "rkd"])
def test_relational_losses_need_two_samples(name):
    distiller = build(name, "cnn", "mlp")
    distiller.eval()
    images, labels, index = batch(size=1)
    with pytest.raises(ValueError, match="at least 2"):
        run(distiller, images, labels, index)


def test_models_without_timm_features_are_refused():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMG * IMG, CLASSES))
    with pytest.raises(TypeError, match="forward_intermediates"):
        FitNet(make_model("cnn"), plain, input_size=INPUT_SIZE)
    with pytest.raises(TypeError, match="forward_head"):
        CC(plain, make_model("cnn"), input_size=INPUT_SIZE)
