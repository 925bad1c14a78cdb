"""Input checks, backend selection and the compiled extension's registration."""
import pytest
import torch

import ofakd_fast
from conftest import make_case
from ofakd_fast import ofa_loss_multi
from ofakd_fast.loss.backends import resolve_backend
from ofakd_fast.loss.op import teacher_tensors
from ofakd_fast.loss.sparse import sparse_teacher


def call(students=None, teacher=None, target=None, eps=1.0, temperature=1.0, **kw):
    base_students, base_teacher, base_target = make_case(4, 10, 2)
    return ofa_loss_multi(base_students if students is None else students,
                          base_teacher if teacher is None else teacher,
                          base_target if target is None else target, eps, temperature, **kw)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(students=[torch.randn(4, 10), torch.randn(3, 10)]), ValueError, ["branch_logits[1]", "[4, 10]"]),
    (dict(students=[torch.randn(4, 10), torch.randn(4, 11)]), ValueError, ["branch_logits[1]", "class count"]),
    (dict(students=[torch.randn(4, 10, 2)]), ValueError, ["branch_logits[0]", "[B, C]"]),
    (dict(students=torch.randn(4, 10)), ValueError, ["branch_logits", "[K, B, C]"]),
    (dict(students=[]), ValueError, ["branch_logits", "at least one"]),
    (dict(teacher=torch.randn(4)), ValueError, ["logits_teacher", "[B, C]"]),
    (dict(target=torch.tensor([0, 1, 2, 10])), ValueError, ["target", "[0, 10)", "10"]),
    (dict(target=torch.tensor([0, -1, 2, 3])), ValueError, ["target", "-1"]),
    (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, ["target", "[4]"]),
    (dict(target=torch.zeros(4)), TypeError, ["target", "integer"]),
    (dict(eps=0.0), ValueError, ["eps", "> 0"]),
    (dict(eps=-1.0), ValueError, ["eps", "> 0"]),
    (dict(eps=[1.0, 1.0, 1.0]), ValueError, ["eps", "2 values", "got 3"]),
    (dict(temperature=0.0), ValueError, ["temperature", "> 0"]),
    (dict(students=[torch.randn(4, 10), torch.randn(4, 10, dtype=torch.float64)]), TypeError, ["branch_logits[1]"]),
    (dict(students=[torch.randint(0, 3, (4, 10))]), TypeError, ["branch_logits[0]", "floating-point"]),
    (dict(reduction="avg"), ValueError, ["reduction", "'avg'"]),
    (dict(backend="gpu"), ValueError, ["backend", "'gpu'"]),
])
def test_bad_input_names_the_argument(kwargs, error, words):
    with pytest.raises(error) as info:
        call(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_tensors_on_different_devices_are_rejected():
    students, teacher, target = make_case(2, 5, 1)
    with pytest.raises(ValueError, match="one device"):
        ofa_loss_multi(students, teacher.to("meta"), target, 1.0)
    with pytest.raises(ValueError, match="target"):
        ofa_loss_multi(students, teacher, target.to("meta"), 1.0)


def test_explicit_backend_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run: backend='cuda' needs CUDA tensors"):
        call(backend="cuda")


def test_environment_variable_chooses_backend(monkeypatch):
    monkeypatch.setenv("OFAKD_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("OFAKD_BACKEND", "cpu")
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"  # an explicit argument wins


def test_available_backends_reports_every_backend_with_a_reason():
    report = ofakd_fast.available_backends()
    assert set(report) == {"cpu", "cuda", "triton", "reference"}
    assert report["cpu"] == "available"
    assert report["reference"] == "available"
    if not torch.cuda.is_available():
        assert "CUDA" in report["cuda"]


def test_cpu_extension_registers_the_fused_op():
    schema = str(torch.ops.ofakd_fast_C.fused_forward.default._schema)
    assert schema.startswith("ofakd_fast_C::fused_forward(Tensor[] branches, Tensor teacher, Tensor target, "
                             "Tensor eps, float temperature, Tensor? grad_scale, bool teacher_grad)")
    assert str(torch.ops.ofakd_fast.ofa_loss.default._schema).startswith("ofakd_fast::ofa_loss(Tensor[] branches")


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_teacher", "sparse_teacher"])
def test_custom_ops_pass_opcheck(sparse):
    students, teacher, target = make_case(3, 7, 2)
    teacher = teacher_tensors(sparse_teacher(teacher, 3) if sparse else teacher)
    eps = torch.tensor([1.0, 1.5], dtype=torch.float64)
    torch.library.opcheck(torch.ops.ofakd_fast.ofa_loss.default,
                          ([s.detach() for s in students], teacher, target, eps, 2.0, 1, "cpu", None, False))
    torch.library.opcheck(torch.ops.ofakd_fast.ofa_loss_backward.default,
                          ([s.detach() for s in students], teacher, target, eps, 2.0, 1, "cpu",
                           torch.ones(2), not sparse))


def test_empty_cache_releases_idle_buffers():
    students, teacher, target = make_case(64, 8192, 2)
    torch.autograd.grad(ofa_loss_multi(students, teacher, target, 1.0).sum(), students)
    assert ofakd_fast.empty_cache() >= 2 * 64 * 8192 * 4
    assert ofakd_fast.empty_cache() == 0
