"""Checks of the Triton OFA kernel (kernels/ofa_loss.py), shared by the interpreter and the GPU tests.

Every check takes the kernel module (see :func:`load_kernel_module`) and a device, so
``test_triton_kernel.py`` runs the same code on its two targets: CPU tensors under TRITON_INTERPRET=1
and CUDA tensors, compiled.

Oracle: ``ofakd_fast/reference.py`` (``ofa_loss_log_domain``) in float64 with autograd gradients.
Accuracy for float32/bfloat16/float16 inputs is judged FlashAttention-style: the kernel's error
against the float64 oracle may be at most twice the error plain PyTorch makes running the same
reference in the input dtype, plus the error of merely storing the float64 answer in the output
dtype (no implementation can beat that), plus a float32-roundoff-sized slack.
"""
from typing import Optional

import torch

EPS_CYCLE = (0.7, 1.0, 1.3, 2.0, 3.0, 1.1)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_kernel_module(interpret: bool):
    """A private copy of the Triton kernels, interpreted (CPU tensors) or compiled (see
    :func:`ofakd_fast.kernels.load_private_copy`)."""
    from ofakd_fast.kernels import load_private_copy

    return load_private_copy(interpret)


from ofakd_fast.loss.reference import ofa_loss_log_domain  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Inputs and oracle
# ----------------------------------------------------------------------------------------------
def branch_eps(K: int, offset: int = 0):
    return [EPS_CYCLE[(k + offset) % len(EPS_CYCLE)] for k in range(K)]


def make_inputs(B, C, K, dtype, device, *, scale=3.0, seed=0, layout="separate"):
    """(branch entries, branch matrices, teacher, target): logits ~ N(0, scale^2), made in float64.

    layout: 'separate' (K contiguous [B, C] tensors), 'stacked' (one [K-1, B, C] entry plus one
    [B, C] tensor), 'strided' (every tensor a slice of a larger one: row stride != C, odd offsets).
    """
    gen = torch.Generator().manual_seed(seed)

    def logits(rows=B, cols=C):
        return torch.randn(rows, cols, generator=gen, dtype=torch.float64) * scale

    target = torch.randint(0, C, (B,), generator=gen).to(device) if C > 0 else torch.zeros(B, dtype=torch.long)
    if layout == "separate":
        mats = [logits().to(dtype).to(device) for _ in range(K)]
        teacher = logits().to(dtype).to(device)
        entries = list(mats)
    elif layout == "stacked":
        stack = torch.stack([logits() for _ in range(K - 1)]).to(dtype).to(device)
        last = logits().to(dtype).to(device)
        entries = [stack, last]
        mats = list(stack.unbind(0)) + [last]
        teacher = logits().to(dtype).to(device)
    elif layout == "strided":
        # Branch k: columns [k + 1, k + 1 + C) of a [2B, C + 9] tensor, every other row.
        bigs = [logits(2 * B, C + 9).to(dtype).to(device) for _ in range(K)]
        mats = [big[::2, k + 1:k + 1 + C] for k, big in enumerate(bigs)]
        teacher = logits(B, C + 5).to(dtype).to(device)[:, 3:3 + C]
        entries = list(mats)
    else:
        raise ValueError(layout)
    return entries, mats, teacher, target


def reference(mats, teacher, target, eps, T, grad_scale, dtype=torch.float64):
    """Loss rows [K, B], student grads [K, B, C] and teacher grad [B, C] of the reference in `dtype`."""
    t = teacher.detach().to(dtype).requires_grad_()
    ss = [m.detach().to(dtype).requires_grad_() for m in mats]
    rows = torch.stack([ofa_loss_log_domain(s, t, target, e, T) for s, e in zip(ss, eps)])
    (rows * grad_scale.to(dtype)).sum().backward()
    return rows.detach(), torch.stack([s.grad for s in ss]), t.grad


def run(mod, entries, teacher, target, eps, T, grad_scale, teacher_grad=True, max_block=None):
    return mod.ofa_fused_forward_triton(entries, teacher, target, torch.tensor(eps, dtype=torch.float64), T,
                                        grad_scale, teacher_grad, max_block=max_block)


def assert_same(a: torch.Tensor, b: torch.Tensor):
    """Equal bits on CPU (the interpreter evaluates the same ops in the same order); on a GPU, the
    variants compiled for different layouts/vector widths may order a reduction differently."""
    if a.device.type == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b)


def _max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def assert_flash_close(what, ours, ref64, same_dtype, out_dtype):
    """|ours - ref64| <= 2 |same_dtype - ref64| + |store(ref64) - ref64| + slack (see module doc)."""
    assert ours.shape == ref64.shape, (what, ours.shape, ref64.shape)
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    ref64 = ref64.double()
    err = _max_abs(ours.double() - ref64)
    if out_dtype == torch.float64:
        allowed = 1e-11 * max(1.0, _max_abs(ref64))
        assert err <= allowed, f"{what}: float64 error {err:.3g} > {allowed:.3g}"
        return
    base = _max_abs(same_dtype.double() - ref64)
    storing = _max_abs(ref64.to(out_dtype).double() - ref64)
    slack = 16 * torch.finfo(torch.float32).eps * max(1.0, _max_abs(ref64))
    allowed = 2 * base + storing + slack
    assert err <= allowed, (f"{what}: error {err:.3g} > allowed {allowed:.3g} "
                            f"(PyTorch in {same_dtype.dtype}: {base:.3g}, storing: {storing:.3g})")


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def check_parity(mod, device, *, B, C, K, T, dtype=torch.float32, max_block=None, layout="separate",
                 eps=None, seed=0, scale=3.0):
    """Loss rows, student and teacher gradients (non-uniform grad_scale) against the reference."""
    eps = branch_eps(K, seed) if eps is None else eps
    entries, mats, teacher, target = make_inputs(B, C, K, dtype, device, seed=seed, layout=layout, scale=scale)
    gen = torch.Generator().manual_seed(seed + 1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_scale = (torch.rand(K, B, generator=gen, dtype=torch.float64) * 2 - 0.5).to(acc).to(device)
    loss, g_branches, g_teacher = run(mod, entries, teacher, target, eps, T, grad_scale, max_block=max_block)
    assert loss.dtype == acc and loss.shape == (K, B)
    assert g_branches.dtype == dtype and g_branches.shape == (K, B, C) and g_branches.is_contiguous()
    assert g_teacher.dtype == dtype and g_teacher.shape == (B, C)
    ref = reference(mats, teacher, target, eps, T, grad_scale)
    same = reference(mats, teacher, target, eps, T, grad_scale, dtype=dtype) if dtype != torch.float64 else ref
    assert_flash_close("loss rows", loss, ref[0], same[0], acc)
    assert_flash_close("student grads", g_branches, ref[1], same[1], dtype)
    assert_flash_close("teacher grad", g_teacher, ref[2], same[2], dtype)


def check_optional_outputs(mod, device, max_block=None):
    """No grad_scale: empty grads and the same losses; teacher_grad=False: empty teacher grad."""
    B, C, K, T = 3, 29, 2, 1.0
    eps = [1.0, 1.5]
    entries, mats, teacher, target = make_inputs(B, C, K, torch.float32, device, seed=3)
    grad_scale = torch.rand(K, B, device=device) + 0.5
    loss_g, g_b, g_t = run(mod, entries, teacher, target, eps, T, grad_scale, True, max_block)
    loss_n, g_b_n, g_t_n = run(mod, entries, teacher, target, eps, T, None, True, max_block)
    assert g_b_n.numel() == 0 and g_t_n.numel() == 0
    assert_same(loss_g, loss_n)
    loss_s, g_b_s, g_t_s = run(mod, entries, teacher, target, eps, T, grad_scale, False, max_block)
    assert g_t_s.numel() == 0
    assert_same(loss_s, loss_g)
    assert_same(g_b_s, g_b)


def check_grad_scale_broadcast(mod, device, max_block=None):
    """grad_scale [K, 1], expanded with zero strides and a scalar equal the materialized [K, B]."""
    B, C, K, T = 4, 23, 3, 2.0
    eps = branch_eps(K)
    entries, _, teacher, target = make_inputs(B, C, K, torch.float32, device, seed=4)
    per_branch = torch.tensor([[0.5], [-1.5], [2.0]], device=device)
    full = run(mod, entries, teacher, target, eps, T, per_branch.expand(K, B).contiguous(), True, max_block)
    for scale in (per_branch, per_branch.expand(K, B)):
        got = run(mod, entries, teacher, target, eps, T, scale, True, max_block)
        for a, b in zip(got, full):
            assert_same(a, b)
    scalar = run(mod, entries, teacher, target, eps, T, torch.tensor(0.25, device=device), True, max_block)
    ones = run(mod, entries, teacher, target, eps, T, torch.ones(K, B, device=device), True, max_block)
    torch.testing.assert_close(scalar[1], 0.25 * ones[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scalar[2], 0.25 * ones[2], rtol=1e-6, atol=1e-7)


class _TritonRows(torch.autograd.Function):
    """loss rows [K, B] of the kernel as an autograd function (backward re-runs it with grad_scale)."""

    @staticmethod
    def forward(ctx, mod, eps, T, max_block, target, teacher, *branches):
        loss, _, _ = run(mod, list(branches), teacher, target, eps, T, None, False, max_block)
        ctx.save_for_backward(target, teacher, *branches)
        ctx.args = (mod, eps, T, max_block)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        mod, eps, T, max_block = ctx.args
        target, teacher, *branches = ctx.saved_tensors
        _, g_b, g_t = run(mod, branches, teacher, target, eps, T, grad_rows, ctx.needs_input_grad[5], max_block)
        return (None, None, None, None, None, g_t if ctx.needs_input_grad[5] else None, *g_b.unbind(0))


def check_gradcheck(mod, device, *, B=2, C=5, K=2, T=0.5, max_block=None, fast_mode=False):
    """float64 gradcheck of the loss rows w.r.t. every branch and the teacher."""
    eps = [0.8, 2.5, 1.0, 1.3][:K]
    _, mats, teacher, target = make_inputs(B, C, K, torch.float64, device, seed=5, scale=2.0)
    inputs = [teacher.clone().requires_grad_()] + [m.clone().requires_grad_() for m in mats]
    fn = lambda t, *s: _TritonRows.apply(mod, eps, T, max_block, target, t, *s)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


def check_stability(mod, device, *, dtype=torch.float32, max_block=None, T=1.0):
    """Logits of magnitude up to 1e4 and eps up to 3: finite, and as close as PyTorch gets."""
    B, C, K = 4, 40, 4
    eps = [0.5, 1.0, 2.0, 3.0]
    gen = torch.Generator().manual_seed(6)
    teacher = torch.rand(B, C, generator=gen, dtype=torch.float64) * 2e4 - 1e4
    mats = [torch.rand(B, C, generator=gen, dtype=torch.float64) * 2e4 - 1e4 for _ in range(K)]
    target = torch.randint(0, C, (B,), generator=gen)
    teacher[0], target[0] = -1e4, 7  # teacher all -1e4 but the target: p_y = 1
    teacher[0, 7] = 1e4
    teacher[1], target[1] = 0.0, 2  # uniform teacher, student mass far from the target
    mats[0][1], mats[0][1, 30] = -1e4, 1e4
    teacher[2, target[2]] = -1e4  # p_y underflows: w_y = expm1(eps log1p(0)) = 0
    mats[3][3] = 1e4  # constant student row
    teacher, mats = teacher.to(dtype).to(device), [m.to(dtype).to(device) for m in mats]
    target = target.to(device)
    grad_scale = torch.linspace(0.5, 1.5, K * B, dtype=torch.float64).reshape(K, B)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_scale = grad_scale.to(acc).to(device)
    ref = reference(mats, teacher, target, eps, T, grad_scale)
    assert all(torch.isfinite(x).all() for x in ref), "test case must be finite in the log-domain reference"
    got = run(mod, mats, teacher, target, eps, T, grad_scale, True, max_block)
    same = reference(mats, teacher, target, eps, T, grad_scale, dtype=dtype) if dtype != torch.float64 else ref
    for what, ours, r, s, out in zip(("loss rows", "student grads", "teacher grad"), got, ref, same,
                                     (acc, dtype, dtype)):
        if not torch.isfinite(s).all():  # PyTorch in a 16-bit dtype may itself fail: judge by storing error only
            s = r
        assert_flash_close(what, ours, r, s, out)


def check_tiny_target_probability(mod, device, *, dtype=torch.float32, max_block=None):
    """p_y ~ 1e-12 and q_y ~ 1e-12: the target's gradient (S q_y - w_y) / T needs w_y = expm1(eps log1p(p_y))
    accurate to relative precision (a naive (1 + p_y) ** eps - 1 rounds it to 0)."""
    B, C, K, T = 2, 20, 2, 1.0
    eps = [1.5, 3.0]
    gen = torch.Generator().manual_seed(9)
    teacher = torch.randn(B, C, generator=gen, dtype=torch.float64)
    mats = [torch.randn(B, C, generator=gen, dtype=torch.float64) for _ in range(K)]
    target = torch.tensor([4, 13])
    rows = torch.arange(B)
    teacher[rows, target] = -27.0  # p_y ~ 1e-12 ... 1e-13
    for k, m in enumerate(mats):
        m[rows, target] = -26.5 - k  # q_y of the same order, so S q_y - w_y does not hide w_y
    teacher, mats, target = teacher.to(dtype).to(device), [m.to(dtype).to(device) for m in mats], target.to(device)
    grad_scale = torch.ones(K, B, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    _, g_b, _ = run(mod, mats, teacher, target, eps, T, grad_scale, True, max_block)
    _, ref_b, _ = reference(mats, teacher, target, eps, T, grad_scale)
    rows = rows.to(device)
    got_y = g_b[:, rows, target].double()
    want_y = ref_b[:, rows, target]
    assert (want_y.abs() > 1e-14).all()
    rel = ((got_y - want_y).abs() / want_y.abs()).max().item()
    assert rel < (1e-10 if dtype == torch.float64 else 1e-4), f"relative error of the target gradient {rel:.3g}"


def check_layouts_match_contiguous(mod, device, *, layout, dtype=torch.float32, max_block=None):
    """Stacked entries and slices of larger tensors (odd row strides/offsets) give the contiguous results."""
    B, C, K, T = 3, 37, 3, 1.0
    eps = branch_eps(K, 2)
    entries, mats, teacher, target = make_inputs(B, C, K, dtype, device, seed=7, layout=layout)
    assert layout == "stacked" or not mats[0].is_contiguous()
    grad_scale = torch.rand(K, B, device=device) + 0.5
    got = run(mod, entries, teacher, target, eps, T, grad_scale, True, max_block)
    want = run(mod, [m.contiguous() for m in mats], teacher.contiguous(), target, eps, T, grad_scale, True,
               max_block)
    for a, b in zip(got, want):
        assert_same(a, b)


def check_empty_batch(mod, device, max_block=None):
    """B = 0: empty outputs of the right shapes, no launch."""
    K, C = 3, 11
    entries = [torch.empty(0, C, device=device) for _ in range(K)]
    teacher = torch.empty(0, C, device=device)
    target = torch.empty(0, dtype=torch.long, device=device)
    loss, g_b, g_t = run(mod, entries, teacher, target, [1.0, 1.2, 2.0], 1.0, torch.ones(K, 1, device=device),
                         True, max_block)
    assert loss.shape == (K, 0) and g_b.shape == (K, 0, C) and g_t.shape == (0, C)
    loss, g_b, g_t = run(mod, entries, teacher, target, [1.0, 1.2, 2.0], 1.0, None, False, max_block)
    assert loss.shape == (K, 0) and g_b.numel() == 0 and g_t.numel() == 0


def check_bad_target(mod, device):
    """An out-of-range target: ValueError on CPU (checked for free), NaN rows on a GPU (no host sync)."""
    entries, mats, teacher, target = make_inputs(2, 9, 2, torch.float32, device, seed=8)
    target = target.clone()
    target[1] = 9
    grad_scale = torch.ones(2, 2, device=device)
    if device.type == "cpu":
        try:
            run(mod, entries, teacher, target, [1.0, 2.0], 1.0, grad_scale)
        except ValueError as error:
            assert "target" in str(error)
        else:
            raise AssertionError("an out-of-range target must raise on CPU")
    else:
        loss, g_b, _ = run(mod, entries, teacher, target, [1.0, 2.0], 1.0, grad_scale)
        assert torch.isnan(loss[:, 1]).all() and torch.isfinite(loss[:, 0]).all()
        assert torch.isnan(g_b[:, 1]).all() and torch.isfinite(g_b[:, 0]).all()


def check_launch_table(mod):
    """The documented block/warp choices and vector widths."""
    assert mod.launch_config(100, 5) == (8, 128, 4, True)
    assert mod.launch_config(1000, 5) == (8, 1024, 16, True)
    assert mod.launch_config(21841, 5) == (8, 1024, 16, False)
    assert mod.launch_config(21841, 1) == (1, 4096, 16, False)  # a 1-row column loop: 4096, no spill at 16 warps
    assert mod.launch_config(1000, 5, math_bytes=8) == (8, 256, 8, False)  # float64 tiles: at most 2048
    assert mod.launch_config(1000, 5, max_block=64) == (8, 64, 4, False)
    assert mod.launch_config(1000, 5, max_block=100) == (8, 64, 4, False)
    assert mod.launch_config(1, 1) == (1, 1, 4, True)
    f32, b16 = torch.zeros(4, 1000), torch.zeros(4, 1000, dtype=torch.bfloat16)
    assert mod.vector_width([f32, f32[1:]], 1000) == 4 and mod.vector_width([b16], 1000) == 8
    assert mod.vector_width([torch.zeros(4, 100, dtype=torch.bfloat16)], 100) == 4
    assert mod.vector_width([torch.zeros(4, 21841)], 21841) == 1
    assert mod.vector_width([f32, torch.zeros(4, 1002)[:, 2:]], 1000) == 2  # rows start 8 bytes off
    assert mod.vector_width([f32, torch.zeros(8, 1000)[::2]], 1000) == 4  # row stride 2000
    assert mod.vector_width([f32, torch.zeros(4, 1001)[:, :1000]], 1000) == 1  # row stride 1001


def check_unavailable_reason(mod, device: torch.device, expect_available: bool,
                             other_device: Optional[str] = "meta"):
    assert (mod.triton_unavailable_reason(device) is None) == expect_available
    if other_device is not None:
        reason = mod.triton_unavailable_reason(other_device)
        assert isinstance(reason, str) and reason
