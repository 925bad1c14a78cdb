"""The fused OFA loss against the reference, on every backend that runs on this machine."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BACKENDS_HERE, SLOW_BACKENDS, make_case
from ofakd_fast import OFALoss, ofa_loss, ofa_loss_multi
from ofakd_fast.loss.reference import ofa_loss_log_domain, ofa_loss_multi_reference, ofa_loss_original

EPS_CHOICES = (0.5, 1.0, 1.3, 2.0)


def branch_eps(num_branches, offset=0):
    """Different eps per branch, cycling through the issue's values."""
    return [EPS_CHOICES[(k + offset) % len(EPS_CHOICES)] for k in range(num_branches)]


def grads_of(loss, inputs, upstream):
    return torch.autograd.grad((loss * upstream).sum(), inputs, allow_unused=False)


def assert_matches_reference(students, teacher, target, eps, temperature, backend, reduction="mean",
                             soft_target=None, atol=1e-5, rtol=1e-5):
    """Loss and student gradients (with a non-uniform upstream) equal the float64 reference's."""
    ref_students = [s.detach().double().requires_grad_() for s in students]
    ref_loss = ofa_loss_multi_reference(ref_students, teacher.double(), target, eps, temperature, reduction)
    loss = ofa_loss_multi(students, teacher, soft_target if soft_target is not None else target, eps,
                          temperature, reduction, backend=backend)
    torch.testing.assert_close(loss.double(), ref_loss, atol=atol, rtol=rtol)
    upstream = torch.linspace(0.5, 2.0, ref_loss.numel(), dtype=torch.float64).reshape(ref_loss.shape)
    got = grads_of(loss, students, upstream.to(loss.dtype))
    want = grads_of(ref_loss, ref_students, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol)


def _parity_cases():
    for backend in BACKENDS_HERE:
        for classes, branches in itertools.product((1, 2, 7, 100, 1000, 1001, 21841), range(1, 7)):
            # Triton under the interpreter is ~1000x slower: it gets the small shapes and K in {1, 6}.
            if backend not in SLOW_BACKENDS or (classes <= 1001 and branches in (1, 6)):
                yield backend, classes, branches


@pytest.mark.parametrize("backend,classes,branches", list(_parity_cases()))
def test_parity_with_reference(backend, classes, branches):
    students, teacher, target = make_case(5, classes, branches, seed=classes + branches)
    for case, temperature in enumerate((0.5, 1.0, 4.0)):
        eps = branch_eps(branches, offset=case)
        assert_matches_reference(students, teacher, target, eps, temperature, backend)
        soft = F.one_hot(target, classes).double() * 0.7 + 0.3 / classes  # argmax is still `target`
        assert_matches_reference(students, teacher, target, eps, temperature, backend, soft_target=soft)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_match_reference(backend, reduction):
    students, teacher, target = make_case(6, 37, 3)
    assert_matches_reference(students, teacher, target, [0.7, 1.0, 1.9], 2.0, backend, reduction)


@pytest.mark.parametrize("branches", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(backend, branches, reduction):
    students, teacher, target = make_case(4, 9, branches, dtype=torch.float64, scale=2.0)
    teacher.requires_grad_()
    eps = branch_eps(branches, offset=1)

    def loss_fn(*inputs):
        return ofa_loss_multi(list(inputs[:-1]), inputs[-1], target, eps, 1.5, reduction, backend=backend)

    assert torch.autograd.gradcheck(loss_fn, (*students, teacher))


def test_teacher_gradient_matches_reference(backend):
    students, teacher, target = make_case(5, 33, 3)
    teacher.requires_grad_()
    loss = ofa_loss_multi(students, teacher, target, [0.6, 1.0, 2.5], 2.0, backend=backend)
    ref_teacher = teacher.detach().double().requires_grad_()
    ref = ofa_loss_multi_reference([s.detach().double() for s in students], ref_teacher, target, [0.6, 1.0, 2.5], 2.0)
    upstream = torch.tensor([0.3, 1.0, 2.0])
    got, = torch.autograd.grad((loss * upstream).sum(), teacher)
    want, = torch.autograd.grad((ref * upstream.double()).sum(), ref_teacher)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_pytorch_error(backend, dtype):
    """FlashAttention's rule: our error against float64 stays within 2x (+ slack) of plain PyTorch's in `dtype`."""
    classes = 100 if backend in SLOW_BACKENDS else 1000
    students, teacher, target = make_case(16, classes, 4, dtype=dtype)
    eps = [1.0, 1.3, 2.0, 0.5]
    exact_students = [s.detach().double().requires_grad_() for s in students]
    exact = ofa_loss_multi_reference(exact_students, teacher.double(), target, eps)
    plain_students = [s.detach().clone().requires_grad_() for s in students]
    plain = ofa_loss_multi_reference(plain_students, teacher, target, eps)
    ours = ofa_loss_multi(students, teacher, target, eps, backend=backend)

    def max_error(x, ref):
        return (x.double() - ref).abs().max().item()

    assert max_error(ours, exact) <= 2 * max_error(plain, exact) + 1e-5
    upstream = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    exact_grads = grads_of(exact, exact_students, upstream)
    plain_grads = grads_of(plain, plain_students, upstream.to(plain.dtype))
    our_grads = grads_of(ours, students, upstream.to(ours.dtype))
    for ours_g, plain_g, exact_g in zip(our_grads, plain_grads, exact_grads):
        assert ours_g.dtype == dtype
        assert max_error(ours_g, exact_g) <= 2 * max_error(plain_g, exact_g) + 1e-5


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(0, 6), classes=st.integers(1, 300), branches=st.integers(1, 5),
       eps=st.lists(st.floats(0.25, 3.0), min_size=5, max_size=5), temperature=st.floats(0.25, 5.0),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16))
def test_property_random_problems_match_reference(batch, classes, branches, eps, temperature, dtype, seed):
    for backend in BACKENDS_HERE:
        students, teacher, target = make_case(batch, classes, branches, dtype=dtype, seed=seed)
        assert_matches_reference(students, teacher, target, eps[:branches], temperature, backend, "sum",
                                 atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_stable_for_huge_logits(backend, eps, temperature):
    """Logits up to 1e4: finite losses and gradients wherever the log-domain reference is finite."""
    students, teacher, target = make_case(6, 50, 2, scale=1e4 / 3)
    ref = torch.stack([ofa_loss_log_domain(s.detach().double(), teacher.double(), target, eps, temperature)
                       for s in students])
    assert torch.isfinite(ref).all()
    teacher.requires_grad_()
    loss = ofa_loss_multi(students, teacher, target, eps, temperature, "none", backend=backend)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)
    for grad in torch.autograd.grad(loss.sum(), [*students, teacher]):
        assert torch.isfinite(grad).all()


def test_original_formula_is_nan_where_ours_is_finite(backend):
    """Both distributions underflow on a class: the original computes 0 * log(0) = NaN."""
    student = torch.tensor([[30.0, 0.0, -200.0]], requires_grad=True)
    teacher = torch.tensor([[30.0, 0.0, -200.0]])
    target = torch.tensor([0])
    mask = F.one_hot(target, 3).float()
    original = ofa_loss_original(student, teacher, target, 2.0)
    assert torch.isnan(original).all()
    ours = ofa_loss(student, teacher, mask, 2.0, backend=backend)
    expected = ofa_loss_log_domain(student.detach().double(), teacher.double(), target, 2.0).mean()
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(ours, student)
    assert torch.isfinite(grad).all()


def test_drop_in_matches_original_function(backend):
    students, teacher, target = make_case(8, 100, 1)
    mask = F.one_hot(target, 100).float()
    for eps in (0.8, 1.0, 1.4):
        want = ofa_loss_original(students[0].double(), teacher.double(), target, eps, 2.0).mean()
        got = ofa_loss(students[0], teacher, mask, eps, temperature=2.0, backend=backend)
        assert got.shape == ()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_empty_batch(backend):
    students, teacher, target = make_case(0, 10, 2)
    assert ofa_loss_multi(students, teacher, target, 1.0, reduction="sum", backend=backend).tolist() == [0.0, 0.0]
    assert ofa_loss_multi(students, teacher, target, 1.0, reduction="none", backend=backend).shape == (2, 0)
    mean = ofa_loss_multi(students, teacher, target, 1.0, backend=backend)
    assert torch.isnan(mean).all()  # the mean of no rows, as torch.mean gives


def test_non_contiguous_and_sliced_inputs(backend):
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(3, 12, 40, generator=gen, requires_grad=True)
    students = [big[0, ::2, :31], big[1, 1::2, 5:36], big[2].t()[:31, :6].t()]  # strided rows, offset, column-major
    teacher = torch.randn(40, 12, generator=gen).t()[::2, :31]
    target = torch.randint(0, 31, (6,), generator=gen)
    assert_matches_reference(students, teacher, target, [1.0, 1.5, 0.7], 1.0, backend)


def test_stacked_branches_match_list(backend):
    students, teacher, target = make_case(4, 20, 3)
    stacked = torch.stack([s.detach() for s in students]).requires_grad_()
    from_list = ofa_loss_multi(students, teacher, target, [1.0, 2.0, 0.5], backend=backend)
    from_stack = ofa_loss_multi(stacked, teacher, target, [1.0, 2.0, 0.5], backend=backend)
    torch.testing.assert_close(from_stack, from_list)
    grad_stack, = torch.autograd.grad(from_stack.sum(), stacked)
    grad_list = torch.autograd.grad(from_list.sum(), students)
    torch.testing.assert_close(grad_stack, torch.stack(grad_list))


def test_weighted_module_and_repeated_backward(backend):
    """OFALoss's weighted sum, then a second backward through the same graph and a changed upstream."""
    students, teacher, target = make_case(5, 30, 3)
    weights = [0.1, 0.1, 1.0]
    criterion = OFALoss(eps=[1.2, 1.2, 1.0], temperature=2.0, weights=weights, backend=backend)
    total = criterion(students, teacher, target)
    ref_students = [s.detach().double().requires_grad_() for s in students]
    ref = ofa_loss_multi_reference(ref_students, teacher.double(), target, [1.2, 1.2, 1.0], 2.0)
    torch.testing.assert_close(criterion.last_losses.double(), ref, rtol=1e-5, atol=1e-6)
    want = grads_of(ref, ref_students, torch.tensor(weights, dtype=torch.float64))
    first = torch.autograd.grad(total, students, retain_graph=True)
    second = torch.autograd.grad(3 * total, students)
    for g1, g2, w in zip(first, second, want):
        torch.testing.assert_close(g1.double(), w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g2.double(), 3 * w, rtol=1e-5, atol=1e-7)


def test_kept_gradients_are_not_overwritten_by_later_calls(backend):
    """Gradient buffers are reused across calls only once nobody holds them."""
    students, teacher, target = make_case(64, 5000, 2)
    kept = torch.autograd.grad(ofa_loss_multi(students, teacher, target, 1.0, backend=backend).sum(), students)
    snapshot = [g.clone() for g in kept]
    other_teacher = teacher.flip(1)
    torch.autograd.grad(ofa_loss_multi(students, other_teacher, target, 1.0, backend=backend).sum(), students)
    for g, s in zip(kept, snapshot):
        assert torch.equal(g, s)


def test_no_grad_forward_matches(backend):
    students, teacher, target = make_case(4, 50, 2)
    with torch.no_grad():
        loss = ofa_loss_multi(students, teacher, target, 1.5, backend=backend)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ofa_loss_multi(students, teacher, target, 1.5, backend=backend).detach())


def test_compile_fullgraph_matches_eager():
    """A compiled training-style function (heads -> fused loss) backpropagates like eager."""
    students, teacher, target = make_case(8, 64, 3)
    heads = [torch.nn.Linear(64, 64) for _ in students]

    def weighted_loss(features, teacher, target):
        losses = ofa_loss_multi([head(f) for head, f in zip(heads, features)], teacher, target, [1.0, 1.3, 2.0], 2.0)
        return (losses * torch.tensor([1.0, 0.5, 2.0])).sum()

    compiled = torch.compile(weighted_loss, fullgraph=True)
    features = [s.detach() for s in students]
    params = [p for head in heads for p in head.parameters()]
    eager_grads = torch.autograd.grad(weighted_loss(features, teacher, target), params)
    compiled_loss = compiled(features, teacher, target)
    torch.testing.assert_close(compiled_loss, weighted_loss(features, teacher, target))
    compiled_grads = torch.autograd.grad(compiled_loss, params)
    for g_compiled, g_eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.parametrize("used_weights", [[0.1, 0.1, 1.0], [2.0, 0.5, 1.0]])
def test_grad_weights_hint_keeps_gradients_exact(backend, used_weights):
    """The hint [0.1, 0.1, 1] is right in one case and wrong in the other: both give exact gradients."""
    students, teacher, target = make_case(5, 40, 3)
    losses = ofa_loss_multi(students, teacher, target, 1.3, backend=backend, grad_weights=[0.1, 0.1, 1.0])
    ref_students = [s.detach().double().requires_grad_() for s in students]
    ref = ofa_loss_multi_reference(ref_students, teacher.double(), target, 1.3)
    weights = torch.tensor(used_weights)
    got = grads_of(losses, students, weights)
    want = grads_of(ref, ref_students, weights.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="grad_weights: expected 3 values"):
        ofa_loss_multi(students, teacher, target, 1.3, backend=backend, grad_weights=[1.0])
