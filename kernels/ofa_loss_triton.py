"""Fused multi-branch OFA loss in Triton: K student branches against one teacher, forward and gradients.

Contract: the same as the C++ CPU op ``torch.ops.ofakd_fast_C.fused_forward`` (see
``shared/docs/ofa-loss.md`` for the math). :func:`ofa_fused_forward_triton` returns the per-row
losses ``[K, B]`` and, when ``grad_scale`` is given, the student gradients ``[K, B, C]`` already
multiplied by ``grad_scale[k, b]`` and optionally the teacher gradient ``[B, C]``.

:func:`ofa_fused_forward_sparse_triton` is the contract of ``fused_forward_sparse``: a sparse (top-k)
teacher, shared/docs/ofa-loss.md "A sparse teacher". Its kernel ``_ofa_sparse_kernel`` reuses the
helpers below and the same one-program-per-row tile: a pass over the student rows (max, sum-exp and the
gap G = sum_c (max_x - x_c), merged over blocks about the larger max), a pass over the stored classes
(gathered student logits), and for gradients a dense store of (S q_c - w_rest) * scale / T (w_y at y),
``tl.debug_barrier()``, then the stored classes' values scattered over it. No dense teacher row exists.

Layout (as in Liger-Kernel's ops): constants, the ``@triton.jit`` helpers and the kernels, then
the plain-Python launchers and :func:`triton_unavailable_reason`.

Design
------
* **One program per batch row.** It reads the teacher row once for all of its branches and
  handles every branch of the launch as one 2-D tile ``[BRANCH_ROWS, BLOCK]`` (row k of the tile is
  branch k), so per-branch statistics are small ``[BRANCH_ROWS]`` vectors, the teacher gradient is a
  sum over the tile's rows, and all K + 1 logit rows are in flight together.
* **Branch logits are read in place.** Triton has no arrays of pointers, but it takes tuples as
  kernel arguments: the kernel gets a tuple of the launch's branch tensors and one of their row
  strides (each element specialized like a plain argument), and builds the tile's row pointers with
  a chain of selects unrolled over the constexpr branch count (``tl.static_range``). Compared with
  the alternatives: a table of addresses cast to pointers (grouped-GEMM style) costs a device copy
  of the table per call, and a ``torch.stack`` of the branches costs a full extra read and write of
  K B C logits. Stacked ``[k, B, C]`` entries are split into k views; any row stride works. A launch
  takes at most ``MAX_BRANCHES_PER_LAUNCH`` (8) branches (tile rows, registers and the number of
  compiled variants stay bounded); more are handled by launching once per group of 8: the teacher
  row is then read once per group and the teacher gradient accumulated across the launches (in an
  fp32/fp64 workspace for 16-bit inputs).
  OFA uses K = 4 to 6, so the usual call is one launch. ``BRANCH_ROWS`` is the next power of two
  >= the branch count (Triton tiles are powers of two); padding rows are masked (no memory
  traffic) and their results discarded.
* **Vector loads and stores.** A select of pointers loses their alignment, and a row stride or C
  that is not a multiple of 16 (C = 1000) hides it too; a masked load ``cols < C`` with such a C is
  never vectorized. The launcher therefore computes ``VEC`` (constexpr, :func:`vector_width`): the
  largest power of two <= 16 bytes / element size dividing C and every row start; the kernel puts
  ``tl.multiple_of`` hints on the row pointers and writes the column mask as
  ``(cols // VEC) * VEC < C`` (exact since VEC divides C). C = 1000 then gets 16-byte accesses in
  fp32 and bf16 (checked in the PTX); C = 21841 (odd) gets scalar, still coalesced, accesses.
* **Per-branch eps and 1/T are data**, loaded from a small device tensor ``[eps_0 .. eps_{K-1},
  1/T]`` in the math dtype (Triton passes Python floats as fp32, which would round them for fp64
  inputs): no recompilation per value. A runtime (not constexpr) test ``all eps == 1`` reuses the
  teacher probabilities as weights instead of computing ``exp(eps * log_p)`` per branch.
* **SINGLE_BLOCK** (constexpr): when ``C <= BLOCK`` the whole row is one tile held in registers:
  the logits are read once, the statistics come from one sweep and the gradients reuse its
  exponentials (q = e_s / d_s, w = u * exp(-eps * log d_t), p = e_t / d_t): no exp is computed twice.
  Otherwise a first loop over column blocks gathers every statistic online (running maxima,
  rescaled sums; the weighted gap ``sum_c w_c (max_x - x_c)`` is rebased on each max change so all
  its terms stay non-negative) and, when gradients are wanted, a second loop recomputes the
  exponentials and writes the gradients. ``WANT_GRAD`` / ``TEACHER_GRAD`` / ``TEACHER_ACCUMULATE``
  are constexpr flags of the same kernel, not copies of it.
* **Numerics**: float32 math (float64 for float64 inputs), loads cast before any arithmetic,
  gradients stored in the input dtype. Everything is in the log domain: ``w_c = exp(eps * log_p_c)``,
  ``w_y = expm1(eps * log1p(p_y))`` (accurate log1p/expm1 from log/exp by the Goldberg/Kahan
  ratio trick, since libdevice calls are unavailable in the interpreter), and the row loss
  ``l = sum_{c != y} w_c (max_x - x_c) + S_nt log(sum_c exp(x_c - max_x)) + w_y (-log q_y)`` has no
  cancelling terms. The teacher gradient uses ``p_c * dl/dp_c = -eps w_c log q_c`` (c != y), so no
  ``p ** (eps - 1)`` (which overflows for eps < 1 where p underflows) is ever formed, and
  ``sum_c p_c dl/dp_c = eps * l_nontarget + h_y`` comes from the loss statistics, not an extra pass.
  Logits up to +-1e4 and eps up to 3 give finite results. An out-of-range target makes that row's
  loss and gradients NaN instead of reading out of bounds (no host sync to check it on GPU).

Memory traffic (what the kernel must move; the [K, B] losses and per-row scalars are negligible)
-------------------------------------------------------------------------------------------------
Read (K + 1) B C logits, write K B C gradients (4 bytes each in fp32, 2 in bf16).
  256 x 1000 x 5:  fp32 6.14 MB read + 5.12 MB written = 11.26 MB -> 3.75 us at 3 TB/s;
                   bf16 5.63 MB -> 1.88 us. SINGLE_BLOCK moves exactly this (one read, one write).
  256 x 21841 x 5: fp32 134.2 MB read + 111.8 MB written = 246.0 MB -> 82.0 us at 3 TB/s;
                   bf16 123.0 MB -> 41.0 us. The column loop reads the logits a second time for
                   the gradients (the K + 1 rows of one batch row are 524 KB in fp32, too much to
                   keep on chip), so it moves up to 380.2 MB -> 126.7 us in fp32 (bf16 63.4 us),
                   less when that second read hits L2.
A teacher gradient adds B C written (22.4 MB fp32 at 256 x 21841). Exponentials per column:
1 + K (+ K when some eps != 1) per pass; the loop makes two passes when gradients are wanted.

Block size and warps (Liger-style table, on the tile's element count ``BRANCH_ROWS * BLOCK``)
----------------------------------------------------------------------------------------------
``BLOCK = min(MAX_TILE_ELEMENTS // BRANCH_ROWS, next_pow2(C))``, ``MAX_TILE_ELEMENTS = 8192`` (2048
for float64 math), at most ``MAX_LOOP_BLOCK_ONE_ROW`` = 4096 in the column loop of a 1-row tile; the
launcher's ``max_block`` lowers the cap (tests run the column loop at small C with it). ``num_warps``
(of the tile before the 1-row loop cap) = 4 up to 2048 elements, 8 up to 4096, 16 up to 8192, 32
beyond, a float64 element counting as two: at most 16 (float64: 8) elements per thread, so no launch
spills (ptxas for sm_90a: ``tests/loss/test_kernel_resources.py``; figures: ``benchmarks/README.md``).
Examples with K = 5 (8 tile rows): C = 100 -> BLOCK 128, 4 warps, single block; C = 1000 -> BLOCK
1024, 16 warps, single block; C = 21841 -> BLOCK 1024, 16 warps, 22 column blocks per loop. K = 1:
C = 8192 -> BLOCK 8192, 16 warps, single block; C = 21841 -> BLOCK 4096, 16 warps, 6 column blocks.
"""
import contextlib
import os
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[str] = None
except ImportError as _exc:  # CPU-only PyTorch wheels ship without Triton: stay importable.
    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=object)
    _TRITON_IMPORT_ERROR = f"triton is not importable ({_exc})"

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------
MAX_BRANCHES_PER_LAUNCH = 8  # branches (tile rows) of one launch; more take several launches
MAX_TILE_ELEMENTS = 8192  # BRANCH_ROWS * BLOCK per program with 4-byte math
MAX_TILE_ELEMENTS_FP64 = 2048  # with float64 math
MAX_LOOP_BLOCK_ONE_ROW = 4096  # BLOCK of a 1-row tile's column loop (C > the single-block tile)
# (largest tile in 4-byte elements, num_warps): the first row whose bound the tile does not exceed
# (a float64 element counts as two).
NUM_WARPS_TABLE = ((2048, 4), (4096, 8), (8192, 16), (float("inf"), 32))


# ----------------------------------------------------------------------------------------------
# Kernel helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _log1p_nonneg(p):
    """log(1 + p) for p >= 0, accurate for tiny p (Goldberg: log(u) * p / (u - 1), u = fl(1 + p))."""
    u = 1.0 + p
    d = u - 1.0
    exact = d == 0.0
    return tl.where(exact, p, tl.log(u) * (p / tl.where(exact, 1.0, d)))


@triton.jit
def _expm1_nonneg(v):
    """exp(v) - 1 for moderate v >= 0, accurate for tiny v (Kahan: (u - 1) * v / log(u), u = fl(exp v))."""
    u = tl.exp(v)
    d = u - 1.0
    exact = d == 0.0
    log_u = tl.log(u)
    return tl.where(exact, v, d * (v / tl.where(exact, 1.0, log_u)))


@triton.jit
def _row_start(base_ptr, row_offset, VEC: tl.constexpr):
    """base_ptr + row_offset, with the hint that it is a multiple of VEC elements (the launcher checks
    it): row strides not divisible by 16 (C = 1000) otherwise hide the alignment and forbid vector
    accesses. (The hint must sit on an op made here: Triton drops hints put on function arguments.)"""
    ptr = base_ptr + row_offset
    return tl.multiple_of(ptr, VEC * (ptr.dtype.element_ty.primitive_bitwidth // 8))


@triton.jit
def _column_mask(cols, C, VEC: tl.constexpr):
    """cols < C, written so that Triton sees it constant over VEC-aligned groups (C % VEC == 0):
    a plain `cols < C` with an unspecialized C forbids vector loads."""
    return (cols // VEC) * VEC < C


@triton.jit
def _branch_row_pointers(row, kidx, branch_ptrs, branch_strides, NUM_BRANCHES: tl.constexpr, VEC: tl.constexpr):
    """[BRANCH_ROWS] pointers to row `row` of each branch (padding rows point at branch 0), hinted
    VEC-element aligned like _row_start (a select of pointers loses the alignment of its operands)."""
    ptrs = _row_start(branch_ptrs[0], row * branch_strides[0], VEC) + tl.zeros_like(kidx)
    for k in tl.static_range(1, NUM_BRANCHES):
        ptrs = tl.where(kidx == k, branch_ptrs[k] + row * branch_strides[k], ptrs)
    if NUM_BRANCHES > 1:
        ptrs = tl.multiple_of(ptrs, VEC * (ptrs.dtype.element_ty.primitive_bitwidth // 8))
    return ptrs


@triton.jit
def _load_branch_params(eps_ptr, inv_t_ptr, kidx, branch_ok):
    """1/T, eps [BRANCH_ROWS] (1 on padding rows) and whether every eps is 1 (then the weights are p)."""
    inv_t = tl.load(inv_t_ptr)
    eps = tl.load(eps_ptr + kidx, mask=branch_ok, other=1.0)
    all_eps_one = tl.max(tl.abs(eps - 1.0), axis=0) == 0.0
    return inv_t, eps, all_eps_one


@triton.jit
def _load_target(target_ptr, row, C):
    """The row's target y and whether it is in [0, C); an out-of-range y reads column 0 (its row turns NaN)."""
    y = tl.load(target_ptr + row)
    target_ok = (y >= 0) & (y < C)
    return tl.where(target_ok, y, 0), target_ok


@triton.jit
def _load_student_block(start, branch_row_ptrs, C, branch_ok, inv_t,
                        ACC: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Columns start .. start + BLOCK: cols, col_ok (< C) and students x = s / T [BRANCH_ROWS, BLOCK] (0 where masked)."""
    cols = start + tl.arange(0, BLOCK)
    col_ok = _column_mask(cols, C, VEC)
    x = tl.load(branch_row_ptrs[:, None] + cols[None, :], mask=branch_ok[:, None] & col_ok[None, :],
                other=0.0).to(ACC) * inv_t
    return cols, col_ok, x


@triton.jit
def _load_block(start, teacher_row_ptr, branch_row_ptrs, y, C, branch_ok, inv_t,
                ACC: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Columns start .. start + BLOCK: cols, col_ok (< C), off_target (< C and != y), teacher z = t / T
    [BLOCK] and students x = s / T [BRANCH_ROWS, BLOCK] (0 where masked)."""
    cols, col_ok, x = _load_student_block(start, branch_row_ptrs, C, branch_ok, inv_t, ACC, BLOCK, VEC)
    z = tl.load(teacher_row_ptr + cols, mask=col_ok, other=0.0).to(ACC) * inv_t
    return cols, col_ok, col_ok & (cols != y), z, x


@triton.jit
def _online_max_sumexp(v, m, d, AXIS: tl.constexpr):
    """Folds v (-inf where masked; [BLOCK] with AXIS 0, [BRANCH_ROWS, BLOCK] with AXIS 1) into a running max m
    and sum d = sum exp(v - m) along AXIS; returns the new m, d and exp(v - m) (0 while all is -inf)."""
    m_new = tl.maximum(m, tl.max(v, axis=AXIS))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(v - tl.expand_dims(shift, AXIS))
    return m_new, d * tl.exp(m - shift) + tl.sum(e, axis=AXIS), e


@triton.jit
def _initial_statistics(BRANCH_ROWS: tl.constexpr, ACC: tl.constexpr):
    """Empty-row values of the running statistics m_t, d_t (scalars), m_s, d_s, a_w, g_w ([BRANCH_ROWS])."""
    zero_k = tl.zeros([BRANCH_ROWS], dtype=ACC)
    m_t = tl.max(zero_k, axis=0) + float("-inf")
    d_t = tl.sum(zero_k, axis=0)
    return m_t, d_t, zero_k + float("-inf"), zero_k, zero_k, zero_k


@triton.jit
def _online_update(z, x, col_ok, off_target, eps, all_eps_one, m_t, d_t, m_s, d_s, a_w, g_w):
    """Folds one column block into the running row statistics.

    Teacher: m_t = max z, d_t = sum exp(z - m_t). Students (per branch): m_s = max x,
    d_s = sum exp(x - m_s). Weights relative to the running teacher max, off the target:
    a_w = sum u_c, g_w = sum u_c (m_s - x_c) with u_c = exp(eps (z_c - m_t)) = w_c * exp(eps log d_t).
    Returns the new statistics and this block's exponentials e_t, e_s, u (relative to the new maxima).
    """
    z_m = tl.where(col_ok, z, float("-inf"))
    m_t_new, d_t_new, e_t = _online_max_sumexp(z_m, m_t, d_t, 0)
    m_s_new, d_s_new, e_s = _online_max_sumexp(tl.where(col_ok[None, :], x, float("-inf")), m_s, d_s, 1)

    if all_eps_one:
        u = e_t[None, :] + tl.zeros_like(x)
        rebase = tl.exp(m_t - m_t_new) + tl.zeros_like(eps)
    else:
        u = tl.exp(eps[:, None] * (z_m[None, :] - m_t_new))
        rebase = tl.exp(eps * (m_t - m_t_new))
    u = tl.where(off_target[None, :], u, 0.0)
    # Rebase the gap on the new student max (adds a_w * (m_s_new - m_s) >= 0), then on the new teacher max.
    gap_shift = a_w * tl.where(a_w > 0.0, m_s_new - m_s, 0.0)
    g_w_new = (g_w + gap_shift) * rebase + tl.sum(u * (m_s_new[:, None] - x), axis=1)
    a_w_new = a_w * rebase + tl.sum(u, axis=1)
    return m_t_new, d_t_new, m_s_new, d_s_new, a_w_new, g_w_new, e_t, e_s, u


@triton.jit
def _row_loss(m_t, d_t, m_s, d_s, a_w, g_w, z_y, x_y, eps):
    """Per-branch loss l from the finished row statistics, with the terms the gradients reuse.

    w_c = u_c * weight_norm; S_nt = sum_{c != y} w_c; loss_nt = -sum_{c != y} w_c log q_c >= 0;
    nlq_y = -log q_y >= 0. Returns (l, log d_t, log d_s, weight_norm, S_nt, loss_nt, p_y, w_y, nlq_y).
    """
    log_d_t = tl.log(d_t)
    log_d_s = tl.log(d_s)
    weight_norm = tl.exp(-eps * log_d_t)
    s_nt = a_w * weight_norm
    loss_nt = g_w * weight_norm + s_nt * log_d_s
    p_y = tl.exp((z_y - m_t) - log_d_t)
    w_y = _expm1_nonneg(eps * _log1p_nonneg(p_y))
    nlq_y = (m_s - x_y) + log_d_s
    loss = loss_nt + w_y * nlq_y
    return loss, log_d_t, log_d_s, weight_norm, s_nt, loss_nt, p_y, w_y, nlq_y


@triton.jit
def _load_grad_scale(scale_ptr, scale_stride_k, scale_stride_b, row, kidx, branch_ok, row_ok, inv_t,
                     ACC: tl.constexpr):
    """grad_scale[k, row] / T per branch [BRANCH_ROWS] (NaN for a bad row, 0 on padding rows)."""
    scale = tl.load(scale_ptr + kidx * scale_stride_k + row * scale_stride_b, mask=branch_ok, other=0.0)
    return tl.where(row_ok, scale.to(ACC) * inv_t, float("nan"))


@triton.jit
def _grad_coefficients(scale_ptr, scale_stride_k, scale_stride_b, row, kidx, branch_ok, target_ok, inv_t, eps,
                       m_s, log_d_s, s_nt, p_y, w_y, nlq_y, loss_nt, ACC: tl.constexpr):
    """Per-branch factors of every gradient column, as the tuple _store_grad_block takes:
    (m_s, log d_s, S = S_nt + w_y, w_y, eps, grad_scale / T (NaN for a bad target), h_y, sum_c h_c)."""
    scale = _load_grad_scale(scale_ptr, scale_stride_k, scale_stride_b, row, kidx, branch_ok, target_ok, inv_t, ACC)
    weight_sum = s_nt + w_y
    # h_y = p_y dl/dp_y = eps p_y (1 + p_y)^(eps - 1) (-log q_y), with (1 + p_y)^eps = 1 + w_y.
    h_y = eps * p_y * ((1.0 + w_y) / (1.0 + p_y)) * nlq_y
    h_sum = eps * loss_nt + h_y
    return m_s, log_d_s, weight_sum, w_y, eps, scale, h_y, h_sum


@triton.jit
def _student_probabilities(x, col_ok, m_s, log_d_s):
    """q = softmax(x) [BRANCH_ROWS, BLOCK] from the finished row statistics (0 where col_ok is false)."""
    return tl.exp((tl.where(col_ok[None, :], x, float("-inf")) - m_s[:, None]) - log_d_s[:, None])


@triton.jit
def _recompute_block(z, x, col_ok, off_target, m_t, log_d_t, m_s, log_d_s, eps, all_eps_one):
    """p [BLOCK], q and the off-target weights w_nt [BRANCH_ROWS, BLOCK] of one column block of the loop."""
    # Masked columns are -inf here (exp -> 0). Subtract the max before log d: z - m_t is
    # exact near the max, z - lse_t would round.
    log_p = (tl.where(col_ok, z, float("-inf")) - m_t) - log_d_t
    p = tl.exp(log_p)
    q = _student_probabilities(x, col_ok, m_s, log_d_s)
    if all_eps_one:
        w = p[None, :] + tl.zeros_like(x)
    else:
        w = tl.exp(eps[:, None] * log_p[None, :])
    return p, q, tl.where(off_target[None, :], w, 0.0)


@triton.jit
def _store_student_grad(grad_row_ptrs, cols, col_ok, branch_ok, is_target, q, w_nt, weight_sum, w_y, scale):
    """Stores (S q_c - w_c) * scale at the columns cols (where col_ok) of each branch's gradient row, with
    w_c = w_y at the target and w_nt elsewhere ([BRANCH_ROWS, BLOCK] or broadcastable to it)."""
    w = tl.where(is_target[None, :], w_y[:, None], w_nt)
    g = (weight_sum[:, None] * q - w) * scale[:, None]
    tl.store(grad_row_ptrs[:, None] + cols[None, :], g.to(grad_row_ptrs.dtype.element_ty),
             mask=branch_ok[:, None] & col_ok[None, :])


@triton.jit
def _store_grad_block(grad_row_ptrs, teacher_grad_row_ptr, cols, col_ok, branch_ok, is_target, x, q, w_nt, p,
                      coef, TEACHER_GRAD: tl.constexpr, TEACHER_ACCUMULATE: tl.constexpr):
    """Stores one column block of the student gradients and, with TEACHER_GRAD, of the teacher
    gradient (added to what an earlier launch stored there with TEACHER_ACCUMULATE)."""
    m_s, log_d_s, weight_sum, w_y, eps, scale, h_y, h_sum = coef
    _store_student_grad(grad_row_ptrs, cols, col_ok, branch_ok, is_target, q, w_nt, weight_sum, w_y, scale)
    if TEACHER_GRAD:
        # h_c = p_c dl/dp_c = -eps w_c log q_c off the target; dl/dt_c = (h_c - p_c sum_j h_j) / T.
        log_q = (x - m_s[:, None]) - log_d_s[:, None]  # shift first: exact near the max
        h = tl.where(is_target[None, :], h_y[:, None], -eps[:, None] * w_nt * log_q)
        dt = tl.sum(scale[:, None] * (h - p[None, :] * h_sum[:, None]), axis=0)
        if TEACHER_ACCUMULATE:
            dt += tl.load(teacher_grad_row_ptr + cols, mask=col_ok, other=0.0).to(dt.dtype)
        tl.store(teacher_grad_row_ptr + cols, dt.to(teacher_grad_row_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _ofa_fused_kernel(
    branch_ptrs, branch_strides,  # NUM_BRANCHES-tuples: [B, C] logits (rows contiguous) and row strides
    teacher_ptr, teacher_stride, target_ptr,
    eps_ptr, inv_t_ptr,  # eps [NUM_BRANCHES] and 1/T [1], math dtype
    scale_ptr, scale_stride_k, scale_stride_b,  # grad_scale [NUM_BRANCHES, B] (any strides), math dtype
    loss_ptr,  # [NUM_BRANCHES, B] math dtype
    grad_ptr,  # [NUM_BRANCHES, B, C] contiguous, input dtype
    teacher_grad_ptr,  # [B, C] contiguous, input dtype (or math dtype when accumulating)
    B, C,
    NUM_BRANCHES: tl.constexpr, BRANCH_ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    WANT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, TEACHER_ACCUMULATE: tl.constexpr, VEC: tl.constexpr,
):
    """One program per batch row: losses (and gradients) of all NUM_BRANCHES branches of that row
    (design and memory traffic: module doc)."""
    ACC = loss_ptr.dtype.element_ty  # float32, or float64 for float64 inputs
    row = tl.program_id(0).to(tl.int64)
    kidx = tl.arange(0, BRANCH_ROWS)
    branch_ok = kidx < NUM_BRANCHES
    inv_t, eps, all_eps_one = _load_branch_params(eps_ptr, inv_t_ptr, kidx, branch_ok)
    y, target_ok = _load_target(target_ptr, row, C)
    teacher_row_ptr = _row_start(teacher_ptr, row * teacher_stride, VEC)
    branch_row_ptrs = _branch_row_pointers(row, kidx, branch_ptrs, branch_strides, NUM_BRANCHES, VEC)
    z_y = tl.load(teacher_row_ptr + y).to(ACC) * inv_t
    x_y = tl.load(branch_row_ptrs + y, mask=branch_ok, other=0.0).to(ACC) * inv_t

    m_t, d_t, m_s, d_s, a_w, g_w = _initial_statistics(BRANCH_ROWS, ACC)
    if SINGLE_BLOCK:  # the block's values stay in registers for the gradients
        cols, col_ok, off_target, z, x = _load_block(0, teacher_row_ptr, branch_row_ptrs, y, C, branch_ok, inv_t,
                                                     ACC, BLOCK, VEC)
        m_t, d_t, m_s, d_s, a_w, g_w, e_t, e_s, u = _online_update(z, x, col_ok, off_target, eps, all_eps_one,
                                                                   m_t, d_t, m_s, d_s, a_w, g_w)
    else:
        for start in range(0, C, BLOCK):
            cols, col_ok, off_target, z, x = _load_block(start, teacher_row_ptr, branch_row_ptrs, y, C, branch_ok,
                                                         inv_t, ACC, BLOCK, VEC)
            m_t, d_t, m_s, d_s, a_w, g_w, e_t, e_s, u = _online_update(z, x, col_ok, off_target, eps, all_eps_one,
                                                                       m_t, d_t, m_s, d_s, a_w, g_w)
    loss, log_d_t, log_d_s, weight_norm, s_nt, loss_nt, p_y, w_y, nlq_y = _row_loss(m_t, d_t, m_s, d_s, a_w, g_w,
                                                                                    z_y, x_y, eps)
    tl.store(loss_ptr + kidx * B + row, tl.where(target_ok, loss, float("nan")), mask=branch_ok)

    if WANT_GRAD:
        coef = _grad_coefficients(scale_ptr, scale_stride_k, scale_stride_b, row, kidx, branch_ok, target_ok, inv_t,
                                  eps, m_s, log_d_s, s_nt, p_y, w_y, nlq_y, loss_nt, ACC)
        grad_row_ptrs = _row_start(grad_ptr, (kidx * B + row) * C, VEC)
        teacher_grad_row_ptr = _row_start(teacher_grad_ptr, row * C, VEC)
        if SINGLE_BLOCK:  # reuse the exponentials: q = e_s / d_s, w = u * exp(-eps log d_t), p = e_t / d_t
            p = e_t * (1.0 / d_t)
            q = e_s * (1.0 / d_s)[:, None]
            w_nt = u * weight_norm[:, None]
            _store_grad_block(grad_row_ptrs, teacher_grad_row_ptr, cols, col_ok, branch_ok, cols == y, x, q, w_nt, p,
                              coef, TEACHER_GRAD, TEACHER_ACCUMULATE)
        else:
            for start in range(0, C, BLOCK):
                cols, col_ok, off_target, z, x = _load_block(start, teacher_row_ptr, branch_row_ptrs, y, C,
                                                             branch_ok, inv_t, ACC, BLOCK, VEC)
                p, q, w_nt = _recompute_block(z, x, col_ok, off_target, m_t, log_d_t, m_s, log_d_s, eps, all_eps_one)
                _store_grad_block(grad_row_ptrs, teacher_grad_row_ptr, cols, col_ok, branch_ok, cols == y, x, q,
                                  w_nt, p, coef, TEACHER_GRAD, TEACHER_ACCUMULATE)


# ----------------------------------------------------------------------------------------------
# Sparse-teacher kernel (shared/docs/ofa-loss.md, "A sparse teacher"; csrc/ofa_row_math.h)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _student_row_stats(branch_row_ptrs, C, branch_ok, inv_t,
                       BRANCH_ROWS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """One pass over the student rows: max_x, d = sum exp(x - max_x) and the gap G = sum_c (max_x - x_c) [BRANCH_ROWS]."""
    _, _, m_s, d_s, g_s, _ = _initial_statistics(BRANCH_ROWS, ACC)
    for start in range(0, C, BLOCK):
        cols, col_ok, x = _load_student_block(start, branch_row_ptrs, C, branch_ok, inv_t, ACC, BLOCK, VEC)
        m_new, d_s, _exp = _online_max_sumexp(tl.where(col_ok[None, :], x, float("-inf")), m_s, d_s, 1)
        # Merge (m_s, g_s, start columns) with this block's gap about m_new: every term stays >= 0.
        m_prev = tl.where(start > 0, m_s, m_new)  # no previous columns: no rebase (and no 0 * inf)
        g_s = g_s + start * (m_new - m_prev) + tl.sum(tl.where(col_ok[None, :], m_new[:, None] - x, 0.0), axis=1)
        m_s = m_new
    return m_s, d_s, g_s


@triton.jit
def _load_stored_block(start, logits_row_ptr, indices_row_ptr, lse, k, C, branch_row_ptrs, branch_ok, inv_t,
                       ACC: tl.constexpr, STORED_BLOCK: tl.constexpr):
    """Stored entries start .. start + STORED_BLOCK: class idx, ok (a stored class in [0, C)), log p_i
    [STORED_BLOCK] (-inf where not ok) and the gathered students x_i = s_i / T [BRANCH_ROWS, STORED_BLOCK]."""
    j = start + tl.arange(0, STORED_BLOCK)
    idx = tl.load(indices_row_ptr + j, mask=j < k, other=0)
    ok = (j < k) & (idx >= 0) & (idx < C)
    idx = tl.where(ok, idx, 0)
    log_p = tl.where(ok, tl.load(logits_row_ptr + j, mask=ok, other=0.0).to(ACC) * inv_t - lse, float("-inf"))
    x = tl.load(branch_row_ptrs[:, None] + idx[None, :], mask=branch_ok[:, None] & ok[None, :],
                other=0.0).to(ACC) * inv_t
    return idx, ok, log_p, x


@triton.jit
def _stored_row_stats(logits_row_ptr, indices_row_ptr, lse, k, C, y, branch_row_ptrs, branch_ok, inv_t, eps, m_s,
                      BRANCH_ROWS: tl.constexpr, ACC: tl.constexpr, STORED_BLOCK: tl.constexpr):
    """One pass over the stored classes: log sum_A p_i, log p_y (-inf when y is not stored) and per branch
    sum_{A, != y} w_i, sum_{A, != y} w_i (max_x - x_i), G(A) = sum_A (max_x - x_i)."""
    m_a, d_a, _, w_sum, w_gap, g_a = _initial_statistics(BRANCH_ROWS, ACC)
    log_p_y = m_a
    for start in range(0, k, STORED_BLOCK):
        idx, ok, log_p, x = _load_stored_block(start, logits_row_ptr, indices_row_ptr, lse, k, C, branch_row_ptrs,
                                               branch_ok, inv_t, ACC, STORED_BLOCK)
        m_a, d_a, _exp = _online_max_sumexp(log_p, m_a, d_a, 0)
        is_y = ok & (idx == y)
        log_p_y = tl.maximum(log_p_y, tl.max(tl.where(is_y, log_p, float("-inf")), axis=0))
        w = tl.where((ok & ~is_y)[None, :], tl.exp(eps[:, None] * log_p[None, :]), 0.0)
        gap = tl.where(ok[None, :], m_s[:, None] - x, 0.0)
        w_sum += tl.sum(w, axis=1)
        w_gap += tl.sum(w * gap, axis=1)
        g_a += tl.sum(gap, axis=1)
    return m_a + tl.log(d_a), log_p_y, w_sum, w_gap, g_a


@triton.jit
def _log_rest_probability(log_stored_mass, others):
    """log(r / others) with r = -expm1(log sum_A p_i) clamped >= 0; -inf when r == 0 or others == 0."""
    v = tl.minimum(log_stored_mass, 0.0)
    u = tl.exp(v)
    # 1 - u is exact for u <= 1/2; near 1, -expm1 by Kahan's ratio (u - 1) * v / log u.
    rest = tl.where(u <= 0.5, 1.0 - u, tl.where(u == 1.0, -v, (1.0 - u) * (v / tl.where(u == 1.0, -1.0, tl.log(u)))))
    ok = (others > 0) & (rest > 0.0)
    return tl.where(ok, tl.log(tl.where(ok, rest, 1.0)) - tl.log(tl.maximum(others, 1).to(rest.dtype)),
                    float("-inf"))


@triton.jit
def _sparse_row_loss(m_s, d_s, g_s, x_y, log_stored_mass, log_p_y, w_sum, w_gap, g_a, eps, k, C):
    """Per-branch loss l, the weight sum S and the weights w_y, w_rest (formulas: csrc/ofa_row_math.h)."""
    y_stored = log_p_y > float("-inf")
    log_p_rest = _log_rest_probability(log_stored_mass, C - k)
    p_y = tl.exp(tl.where(y_stored, log_p_y, log_p_rest))
    w_y = _expm1_nonneg(eps * _log1p_nonneg(p_y))
    w_rest = tl.exp(eps * log_p_rest)
    gap_y = m_s - x_y
    not_stored = tl.where(y_stored, 0.0, 1.0)
    rest_count = (C - k) - not_stored
    weight_sum = w_sum + w_y + w_rest * rest_count
    rest_gap = tl.where(w_rest > 0.0, w_rest * (g_s - g_a - not_stored * gap_y), 0.0)
    loss = w_gap + w_y * gap_y + rest_gap + weight_sum * tl.log(d_s)
    return loss, weight_sum, w_y, w_rest


@triton.jit
def _store_sparse_grads(grad_row_ptrs, branch_row_ptrs, logits_row_ptr, indices_row_ptr, lse, k, C, y, branch_ok,
                        inv_t, eps, m_s, log_d_s, weight_sum, w_y, w_rest, scale,
                        ACC: tl.constexpr, BLOCK: tl.constexpr, STORED_BLOCK: tl.constexpr, VEC: tl.constexpr):
    """(S q_c - w_c) * scale: w_rest (w_y at y) over all columns, then, after a barrier, the stored classes != y."""
    for start in range(0, C, BLOCK):
        cols, col_ok, x = _load_student_block(start, branch_row_ptrs, C, branch_ok, inv_t, ACC, BLOCK, VEC)
        q = _student_probabilities(x, col_ok, m_s, log_d_s)
        _store_student_grad(grad_row_ptrs, cols, col_ok, branch_ok, cols == y, q, w_rest[:, None], weight_sum, w_y,
                            scale)
    tl.debug_barrier()  # the dense stores of this program land before they are overwritten below
    for start in range(0, k, STORED_BLOCK):
        idx, ok, log_p, x = _load_stored_block(start, logits_row_ptr, indices_row_ptr, lse, k, C, branch_row_ptrs,
                                               branch_ok, inv_t, ACC, STORED_BLOCK)
        off_target = ok & (idx != y)  # y was stored above with w_y
        q = _student_probabilities(x, off_target, m_s, log_d_s)
        w = tl.exp(eps[:, None] * log_p[None, :])
        _store_student_grad(grad_row_ptrs, idx, off_target, branch_ok, idx == y, q, w, weight_sum, w_y, scale)


@triton.jit
def _ofa_sparse_kernel(
    branch_ptrs, branch_strides,  # NUM_BRANCHES-tuples: [B, C] logits (rows contiguous) and row strides
    logits_ptr, logits_stride, indices_ptr, indices_stride,  # stored teacher [B, k] (math dtype, int64)
    lse_ptr, target_ptr,  # [B] math dtype, [B] int64
    eps_ptr, inv_t_ptr,  # eps [NUM_BRANCHES] and 1/T [1], math dtype
    scale_ptr, scale_stride_k, scale_stride_b,  # grad_scale [NUM_BRANCHES, B] (any strides), math dtype
    loss_ptr, grad_ptr,  # [NUM_BRANCHES, B] math dtype; [NUM_BRANCHES, B, C] contiguous, input dtype
    B, C, k,
    NUM_BRANCHES: tl.constexpr, BRANCH_ROWS: tl.constexpr, BLOCK: tl.constexpr, STORED_BLOCK: tl.constexpr,
    WANT_GRAD: tl.constexpr, VEC: tl.constexpr,
):
    """One program per batch row: the sparse-teacher losses (and gradients) of all NUM_BRANCHES branches."""
    ACC = loss_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    kidx = tl.arange(0, BRANCH_ROWS)
    branch_ok = kidx < NUM_BRANCHES
    inv_t, eps, _ = _load_branch_params(eps_ptr, inv_t_ptr, kidx, branch_ok)
    y, target_ok = _load_target(target_ptr, row, C)
    branch_row_ptrs = _branch_row_pointers(row, kidx, branch_ptrs, branch_strides, NUM_BRANCHES, VEC)
    logits_row_ptr = logits_ptr + row * logits_stride
    indices_row_ptr = indices_ptr + row * indices_stride
    lse = tl.load(lse_ptr + row).to(ACC)
    x_y = tl.load(branch_row_ptrs + y, mask=branch_ok, other=0.0).to(ACC) * inv_t

    m_s, d_s, g_s = _student_row_stats(branch_row_ptrs, C, branch_ok, inv_t, BRANCH_ROWS, ACC, BLOCK, VEC)
    log_stored_mass, log_p_y, w_sum, w_gap, g_a = _stored_row_stats(
        logits_row_ptr, indices_row_ptr, lse, k, C, y, branch_row_ptrs, branch_ok, inv_t, eps, m_s,
        BRANCH_ROWS, ACC, STORED_BLOCK)
    loss, weight_sum, w_y, w_rest = _sparse_row_loss(m_s, d_s, g_s, x_y, log_stored_mass, log_p_y, w_sum, w_gap,
                                                     g_a, eps, k, C)
    tl.store(loss_ptr + kidx * B + row, tl.where(target_ok, loss, float("nan")), mask=branch_ok)
    if WANT_GRAD:
        scale = _load_grad_scale(scale_ptr, scale_stride_k, scale_stride_b, row, kidx, branch_ok, target_ok, inv_t,
                                 ACC)
        grad_row_ptrs = _row_start(grad_ptr, (kidx * B + row) * C, VEC)
        _store_sparse_grads(grad_row_ptrs, branch_row_ptrs, logits_row_ptr, indices_row_ptr, lse, k, C, y,
                            branch_ok, inv_t, eps, m_s, tl.log(d_s), weight_sum, w_y, w_rest, scale,
                            ACC, BLOCK, STORED_BLOCK, VEC)

# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def launch_config(C: int, num_branches: int, max_block: Optional[int] = None,
                  math_bytes: int = 4) -> Tuple[int, int, int, bool]:
    """(BRANCH_ROWS, BLOCK, num_warps, SINGLE_BLOCK) for C classes and one launch of num_branches branches."""
    rows = _next_power_of_2(num_branches)
    cap = max(1, (MAX_TILE_ELEMENTS_FP64 if math_bytes == 8 else MAX_TILE_ELEMENTS) // rows)
    if max_block is not None:
        cap = min(cap, 1 << (max(1, int(max_block)).bit_length() - 1))  # largest power of two <= max_block
    block = min(cap, _next_power_of_2(max(C, 1)))
    num_warps = next(w for most, w in NUM_WARPS_TABLE if rows * block * math_bytes // 4 <= most)
    if rows == 1 and C > block:  # the column loop (both passes' code live): fewer elements per thread
        block = min(block, MAX_LOOP_BLOCK_ONE_ROW)
    return rows, block, num_warps, C <= block


def vector_width(matrices: Sequence[Tensor], C: int) -> int:
    """VEC: the largest power of two <= 16 bytes / element size such that C and every row start of
    every matrix ([rows, C] views, stride(-1) == 1) are multiples of VEC elements (and VEC x element
    size bytes). Rows of length C = 1000 give 4 (fp32) / 8 (bf16): 16-byte accesses; C = 21841 gives 1."""
    vec = 16 // matrices[0].element_size()
    for m in matrices:
        size = m.element_size()
        while vec > 1 and (C % vec or m.data_ptr() % (vec * size) or (m.size(0) > 1 and m.stride(0) % vec)):
            vec //= 2
    return vec


_PARAMS_CACHE: Dict[tuple, Tensor] = {}
_PARAMS_CACHE_SIZE = 64


def _device_params(eps: Tensor, temperature: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[eps_0 .. eps_{K-1}, 1/T] in the math dtype on `device`: kernel data, not compile-time constants.

    eps is a CPU tensor, so reading its values costs no GPU sync. The device copies are cached by
    value (eps and T are hyperparameters: after the first step a call copies nothing), and a new copy
    goes through pinned memory with non_blocking=True, since a plain pageable .to('cuda') makes
    PyTorch synchronize the stream on every loss call.
    """
    values = tuple(float(e) for e in eps.detach().reshape(-1).tolist()) + (1.0 / float(temperature),)
    key = (device, dtype, values)
    params = _PARAMS_CACHE.get(key)
    if params is None:
        host = torch.tensor(values, dtype=torch.float64).to(dtype)
        if device.type == "cuda":
            params = host.pin_memory().to(device, non_blocking=True)
        else:
            params = host.to(device)
        if len(_PARAMS_CACHE) >= _PARAMS_CACHE_SIZE:
            _PARAMS_CACHE.pop(next(iter(_PARAMS_CACHE)))
        _PARAMS_CACHE[key] = params
    return params


def _branch_matrices(branches: Sequence[Tensor]) -> List[Tensor]:
    """The K [B, C] branch matrices: [k, B, C] entries split into k views (no copy)."""
    matrices: List[Tensor] = []
    for entry in branches:
        if entry.dim() == 3:
            matrices.extend(entry.unbind(0))
        else:
            matrices.append(entry)
    return matrices


def _check_inputs(matrices: Sequence[Tensor], teacher: Tensor, target: Tensor, eps: Tensor,
                  temperature: float) -> None:
    """Raises ValueError/TypeError for inputs outside ofa_fused_forward_triton's contract."""
    K = len(matrices)
    if K == 0:
        raise ValueError("ofakd_fast: need at least one student branch")
    if teacher.dim() != 2:
        raise ValueError(f"ofakd_fast: teacher logits must be [B, C], got {tuple(teacher.shape)}")
    B, C = teacher.shape
    dtype, device = teacher.dtype, teacher.device
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"ofakd_fast: unsupported logits dtype {dtype}")
    if C > 1 and teacher.stride(1) != 1:
        raise ValueError("ofakd_fast: teacher rows must be contiguous (stride(-1) == 1)")
    for i, m in enumerate(matrices):
        if m.dtype != dtype or m.device != device:
            raise TypeError(f"ofakd_fast: branch {i} is {m.dtype} on {m.device}, teacher is {dtype} on {device}")
        if tuple(m.shape) != (B, C):
            raise ValueError(f"ofakd_fast: branch {i} is {tuple(m.shape)}, expected [B, C] = {(B, C)}")
        if C > 1 and m.stride(1) != 1:
            raise ValueError(f"ofakd_fast: rows of branch {i} must be contiguous (stride(-1) == 1)")
    if target.dtype != torch.int64 or target.numel() != B:
        raise ValueError("ofakd_fast: target must be int64 [B]")
    if eps.numel() != K:
        raise ValueError(f"ofakd_fast: eps has {eps.numel()} values for {K} branches")
    if not temperature > 0:
        raise ValueError(f"ofakd_fast: temperature must be > 0, got {temperature}")
    if device.type == "cpu" and B > 0 and C > 0:  # free here; on a GPU the kernel turns bad targets into NaN
        if bool(((target < 0) | (target >= C)).any()):
            raise ValueError(f"ofakd_fast: target outside [0, {C})")


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernel's arithmetic (and loss) dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _allocate_outputs(K: int, teacher: Tensor, want_grad: bool,
                      want_teacher_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """loss_rows [K, B] (math dtype), grad_branches [K, B, C] and grad_teacher [B, C] (input dtype),
    each gradient empty when it is not wanted."""
    (B, C), dtype, device = teacher.shape, teacher.dtype, teacher.device
    loss_rows = torch.empty((K, B), dtype=_math_dtype(dtype), device=device)
    grad_branches = torch.empty((K, B, C) if want_grad else (0,), dtype=dtype, device=device)
    grad_teacher = torch.empty((B, C) if want_teacher_grad else (0,), dtype=dtype, device=device)
    return loss_rows, grad_branches, grad_teacher


def _launch_group(group_mats: Sequence[Tensor], k0: int, teacher: Tensor, target: Tensor, params: Tensor,
                  scale: Optional[Tensor], loss_rows: Tensor, grad_branches: Tensor,
                  teacher_work: Optional[Tensor], accumulate: bool, max_block: Optional[int]) -> None:
    """One launch for branches k0 .. k0 + len(group_mats) - 1 (at most MAX_BRANCHES_PER_LAUNCH).

    scale (grad_scale [K, B]) None: losses only; teacher_work None: no teacher gradient, else the
    [B, C] buffer it is stored in (added to with accumulate, for the groups after the first)."""
    (B, C), K, nb = teacher.shape, params.numel() - 1, len(group_mats)
    rows, block, num_warps, single = launch_config(C, nb, max_block, loss_rows.element_size())
    want_grad = scale is not None
    buffers = list(group_mats) + [teacher] + ([grad_branches[k0]] if want_grad else [])
    vec = vector_width(buffers + ([teacher_work] if teacher_work is not None else []), C)
    unused = loss_rows  # passed for the pointers the kernel does not read
    _ofa_fused_kernel[(B,)](
        tuple(group_mats), tuple(m.stride(0) for m in group_mats),
        teacher, teacher.stride(0),
        target,
        params[k0:k0 + nb], params[K:],
        scale[k0:k0 + nb] if want_grad else unused, scale.stride(0) if want_grad else 0,
        scale.stride(1) if want_grad else 0,
        loss_rows[k0:k0 + nb],
        grad_branches[k0:k0 + nb] if want_grad else unused,
        teacher_work if teacher_work is not None else unused,
        B, C,
        NUM_BRANCHES=nb, BRANCH_ROWS=rows, BLOCK=block, SINGLE_BLOCK=single,
        WANT_GRAD=want_grad, TEACHER_GRAD=teacher_work is not None, TEACHER_ACCUMULATE=accumulate,
        VEC=vec,
        num_warps=num_warps,
    )


def _launch_all(matrices: Sequence[Tensor], teacher: Tensor, target: Tensor, eps: Tensor, temperature: float,
                grad_scale: Optional[Tensor], outputs: Tuple[Tensor, Tensor, Tensor],
                max_block: Optional[int]) -> None:
    """Fills `outputs` (from _allocate_outputs, B > 0, C > 0) with one launch per group of
    MAX_BRANCHES_PER_LAUNCH branches; with several groups and a 16-bit teacher gradient, that gradient
    is accumulated in a math-dtype workspace and copied out at the end."""
    loss_rows, grad_branches, grad_teacher = outputs
    K, (B, C), device = len(matrices), teacher.shape, teacher.device
    acc_dtype = loss_rows.dtype
    params = _device_params(eps, temperature, device, acc_dtype)
    scale = None if grad_scale is None else grad_scale.detach().to(device=device, dtype=acc_dtype).expand(K, B)
    target_c = target.to(device).contiguous()
    teacher_work = grad_teacher if grad_teacher.numel() else None
    if teacher_work is not None and K > MAX_BRANCHES_PER_LAUNCH and teacher.dtype != acc_dtype:
        teacher_work = torch.empty((B, C), dtype=acc_dtype, device=device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for k0 in range(0, K, MAX_BRANCHES_PER_LAUNCH):
            _launch_group(matrices[k0:k0 + MAX_BRANCHES_PER_LAUNCH], k0, teacher, target_c, params, scale,
                          loss_rows, grad_branches, teacher_work, k0 > 0, max_block)
    if teacher_work is not None and teacher_work is not grad_teacher:
        grad_teacher.copy_(teacher_work)


def ofa_fused_forward_triton(branches: Sequence[Tensor], teacher: Tensor, target: Tensor, eps: Tensor,
                             temperature: float, grad_scale: Optional[Tensor], teacher_grad: bool,
                             *, max_block: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row OFA losses of K branches and, optionally, their gradients, in one kernel launch.

    branches: tensors [B, C] or [k_i, B, C] (K branches in all, rows contiguous, any row stride), same
    dtype as teacher (float32/float64/bfloat16/float16). teacher [B, C]; target int64 [B] in [0, C);
    eps float64 CPU [K]; temperature > 0. grad_scale: None (no gradients) or broadcastable to [K, B].
    Returns loss_rows [K, B] (float32, float64 for float64 inputs), grad_branches [K, B, C]
    (grad_scale[k, b] * dl_kb/ds, input dtype) and grad_teacher [B, C] (sum_k grad_scale[k, b] *
    dl_kb/dt, only when teacher_grad and grad_scale is given); gradients not computed are empty.
    max_block caps the column block (tests use it to run the column loop at small C).
    """
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"ofakd_fast: backend='triton' unavailable: {_TRITON_IMPORT_ERROR}")
    matrices = _branch_matrices(branches)
    _check_inputs(matrices, teacher, target, eps, temperature)
    want_grad = grad_scale is not None
    outputs = _allocate_outputs(len(matrices), teacher, want_grad, want_grad and bool(teacher_grad))
    B, C = teacher.shape
    if B == 0:
        return outputs
    if C == 0:
        raise ValueError("ofakd_fast: need at least one class")
    _launch_all(matrices, teacher, target, eps, temperature, grad_scale, outputs, max_block)
    return outputs


def _check_sparse_teacher(logits: Tensor, indices: Tensor, lse: Tensor, B: int, C: int) -> None:
    """Raises ValueError/TypeError for a sparse teacher outside ofa_fused_forward_sparse_triton's contract."""
    if logits.dim() != 2 or logits.size(0) != B or tuple(indices.shape) != tuple(logits.shape):
        raise ValueError(f"ofakd_fast: sparse teacher logits {tuple(logits.shape)} and indices "
                         f"{tuple(indices.shape)} must both be [B, k] with B = {B}")
    if indices.dtype != torch.int64:
        raise TypeError(f"ofakd_fast: sparse teacher indices must be int64, got {indices.dtype}")
    if not logits.dtype.is_floating_point or not lse.dtype.is_floating_point or lse.numel() != B:
        raise ValueError("ofakd_fast: sparse teacher logits must be floating [B, k] and lse floating [B]")
    if logits.size(1) > C:
        raise ValueError(f"ofakd_fast: {logits.size(1)} stored classes for C = {C}")
    if indices.device.type == "cpu" and indices.numel():  # free here; on a GPU bad indices are skipped
        if bool(((indices < 0) | (indices >= C)).any()):
            raise ValueError(f"ofakd_fast: sparse teacher indices outside [0, {C})")


def sparse_launch_config(C: int, k: int, num_branches: int, max_block: Optional[int] = None,
                         math_bytes: int = 4) -> Tuple[int, int, int, int]:
    """(BRANCH_ROWS, BLOCK, num_warps, STORED_BLOCK): launch_config's rows and warps, with at most 8 elements
    per thread in 4-byte math (the gathers and scattered stores need more registers: 16 spill on sm_90; float64
    keeps launch_config's tile, smaller ones spill more there), stored classes in blocks of <= BLOCK."""
    rows, block, num_warps, _ = launch_config(C, num_branches, max_block, math_bytes)
    if math_bytes == 4:
        block = min(block, 8 * 32 * num_warps // rows)
    return rows, block, num_warps, min(block, _next_power_of_2(max(k, 1)))


def _launch_sparse_group(group_mats: Sequence[Tensor], k0: int, logits: Tensor, indices: Tensor, lse: Tensor,
                         target: Tensor, params: Tensor, scale: Optional[Tensor], loss_rows: Tensor,
                         grad_branches: Tensor, max_block: Optional[int]) -> None:
    """One sparse-teacher launch for branches k0 .. k0 + len(group_mats) - 1 (scale None: losses only)."""
    (B, C), (_, k), K, nb = group_mats[0].shape, logits.shape, params.numel() - 1, len(group_mats)
    rows, block, num_warps, stored_block = sparse_launch_config(C, k, nb, max_block, loss_rows.element_size())
    want_grad = scale is not None
    vec = vector_width(list(group_mats) + ([grad_branches[k0]] if want_grad else []), C)
    unused = loss_rows  # passed for the pointers the kernel does not read
    _ofa_sparse_kernel[(B,)](
        tuple(group_mats), tuple(m.stride(0) for m in group_mats),
        logits, logits.stride(0), indices, indices.stride(0), lse, target,
        params[k0:k0 + nb], params[K:],
        scale[k0:k0 + nb] if want_grad else unused, scale.stride(0) if want_grad else 0,
        scale.stride(1) if want_grad else 0,
        loss_rows[k0:k0 + nb], grad_branches[k0:k0 + nb] if want_grad else unused,
        B, C, k,
        NUM_BRANCHES=nb, BRANCH_ROWS=rows, BLOCK=block, STORED_BLOCK=stored_block, WANT_GRAD=want_grad, VEC=vec,
        num_warps=num_warps,
    )


def ofa_fused_forward_sparse_triton(branches: Sequence[Tensor], teacher_logits: Tensor, teacher_indices: Tensor,
                                    teacher_lse: Tensor, target: Tensor, eps: Tensor, temperature: float,
                                    grad_scale: Optional[Tensor],
                                    max_block: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Per-row OFA losses of K branches against a sparse (top-k) teacher and, optionally, their gradients.

    branches as in ofa_fused_forward_triton; teacher_logits [B, k], teacher_indices int64 [B, k] (distinct
    per row, in [0, C)), teacher_lse [B] = logsumexp(t / T) over all C classes (shared/docs/ofa-loss.md,
    "A sparse teacher"). Returns loss_rows [K, B] (float32, float64 for float64 branches) and grad_branches
    [K, B, C] (grad_scale[k, b] * dl_kb/ds, branch dtype; empty without grad_scale).
    """
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"ofakd_fast: backend='triton' unavailable: {_TRITON_IMPORT_ERROR}")
    matrices = _branch_matrices(branches)
    if not matrices:
        raise ValueError("ofakd_fast: need at least one student branch")
    _check_inputs(matrices, matrices[0], target, eps, temperature)  # branch 0 stands in for the dense teacher
    B, C = matrices[0].shape
    _check_sparse_teacher(teacher_logits, teacher_indices, teacher_lse, B, C)
    K, device = len(matrices), matrices[0].device
    loss_rows, grad_branches, _ = _allocate_outputs(K, matrices[0], grad_scale is not None, False)
    if B == 0:
        return loss_rows, grad_branches
    if C == 0:
        raise ValueError("ofakd_fast: need at least one class")
    acc_dtype = loss_rows.dtype
    params = _device_params(eps, temperature, device, acc_dtype)
    scale = None if grad_scale is None else grad_scale.detach().to(device=device, dtype=acc_dtype).expand(K, B)
    logits = teacher_logits.detach().to(device=device, dtype=acc_dtype).contiguous()
    indices = teacher_indices.to(device).contiguous()
    lse = teacher_lse.detach().to(device=device, dtype=acc_dtype).contiguous()
    target_c = target.to(device).contiguous()
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for k0 in range(0, K, MAX_BRANCHES_PER_LAUNCH):
            _launch_sparse_group(matrices[k0:k0 + MAX_BRANCHES_PER_LAUNCH], k0, logits, indices, lse, target_c,
                                 params, scale, loss_rows, grad_branches, max_block)
    return loss_rows, grad_branches


def _kernel_is_interpreted() -> bool:
    return type(_ofa_fused_kernel).__name__ == "InterpretedFunction"


def triton_unavailable_reason(device) -> Optional[str]:
    """None when ofa_fused_forward_triton can run on tensors of `device`, else why it cannot."""
    device = torch.device(device)
    if _TRITON_IMPORT_ERROR is not None:
        return f"backend='triton' needs Triton: {_TRITON_IMPORT_ERROR}"
    if device.type == "cpu":
        if _kernel_is_interpreted():
            return None
        hint = " (it is set now, but only after the kernels were defined)" if os.environ.get(
            "TRITON_INTERPRET") == "1" else ""
        return ("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
                " (before ofakd_fast.kernels.ofa_loss_triton is imported)" + hint)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "backend='triton' on CUDA tensors needs a CUDA GPU, and torch.cuda.is_available() is False"
        if _kernel_is_interpreted():
            return None  # the interpreter copies CUDA tensors to the host: slow but correct
        try:
            triton.runtime.driver.active.get_current_target()
        except Exception as exc:  # no usable Triton GPU backend/driver
            return f"backend='triton': Triton has no usable GPU driver ({type(exc).__name__}: {exc})"
        return None
    return f"backend='triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not on {device.type}"
