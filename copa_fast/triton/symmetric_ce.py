"""Triton kernels of copa_fast::symmetric_ce_triton: the exact N x C form (DESIGN §2), tiled.

Four launches, no host synchronisation, fixed-order reductions (bitwise deterministic):

1. ``_prep``    row norms and normalised rows of z and q; per-class counts n_c and weight sums.
2. ``_scores``  S = exp(tau) * zn qn^T tile by tile (written once, N x C), row log-sum-exp over
                the N expanded columns (R_i = log sum_c n_c exp(S_ic)) and the row argmax; with
                few row blocks, only partial products over column groups (``_scores_groups``),
                which the next launch sums in group order before the row statistics.
3. ``_colstats`` column log-sum-exp L_c = log sum_i exp(S_ic), two-level max shift (online), each
                class block's rows split into ranges (``_colstats_splits``).
4. ``_grads``   per-sample losses, then (fused_grad) G = dloss/dS recomputed tile by tile from S, R,
                L and the dz = s G qn, dq = s G^T zn products with the normalisation backward;
                each class block's dq split over up to 4 row ranges when N >> C, and both sides'
                D chunks shared out over column groups when there are few row blocks
                (``_grads_plan``: N = 500 runs on ~128 programs instead of 16).
Partial results (the loss, dloss/dtau, the split dq, the column groups' products and <zn, dz>,
the row ranges' column maxima and sums) are combined in a fixed order by the last program of
their block to finish (an integer ticket per block, the only atomic): bitwise deterministic. The
splits are sized by ``_slots`` (two programs an SM), so that a small problem (N = 500: 8 row
blocks) still spreads over the GPU.

Maxima are exact (never a fixed shift), so any tau up to 80 is safe. Each log-sum-exp is kept as
its pair (max, log of the shifted sum), R[2i], R[2i + 1] (L likewise): |S| reaches exp(tau), and
one rounded sum of the two (1e-3 at tau = 10 in float32) would be all the precision left in the
O(1) loss R + L - 2 S and in the probabilities exp(S - R). Labels outside 0..C-1 are
masked: their rows get NaN, never an out-of-bounds access. Extra memory: O((N + C) D + N C).
fp32 by default uses IEEE fp32 products (no TF32); ``precision="tf32"`` opts in to TF32 tensor cores,
``precision="tf32x3"`` to three TF32 products a product (float32-grade error).
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-12)

# Triton compiles a kernel once per specialisation of its integer arguments (each one's divisibility
# by 16, and the value 1): over 100 sampled episodes of varied N and C the step's five kernels made
# 25 compiled variants, 26-27 s of compilation on a first run (sm_90, the project's CPU machine).
# The sizes and counts that only bound loops and masks (N, C, block and group counts, ticket
# offsets) are not specialised: 15 variants, 19-20 s; adapt_many's 600 episodes compile the episodes
# kernel once instead of twice (3.2 against 5.9 s). D and the column chunks stay specialised (their
# divisibility makes the row loads vectorised; the PTX's vector loads and stores are unchanged), and
# so does C in ``_scores`` and N and C in ``_grads``: without them their large-problem variants
# spilled 8 to 32 more bytes a thread, and at C = 1 with an odd D 128 and 356.
# ``benchmarks/triton_aot.py --variants`` counts the variants.


@triton.jit
def _normalize_block(src, dst, nrm_out, blk, rows_total, D, BR: tl.constexpr, BD: tl.constexpr,
                     ACC: tl.constexpr):
    rows = blk * BR + tl.arange(0, BR)
    rmask = rows < rows_total
    # Scaled sum of squares (running max m, sum of (x/m)^2): no overflow at |x| ~ 1e20 and no
    # underflow at 1e-20 in float32.
    mx = tl.zeros((BR,), dtype=ACC)
    ss = tl.zeros((BR,), dtype=ACC)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        m = rmask[:, None] & (cols[None, :] < D)
        x = tl.load(src + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(ACC)
        m_new = tl.maximum(mx, tl.max(tl.abs(x), axis=1))
        safe = tl.where(m_new > 0, m_new, 1.0)
        r = mx / safe
        xs = x / safe[:, None]
        ss = ss * r * r + tl.sum(xs * xs, axis=1)
        mx = m_new
    nrm = mx * tl.sqrt(ss)
    tl.store(nrm_out + rows, nrm, mask=rmask)
    inv = 1.0 / tl.maximum(nrm, NORM_EPS)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        m = rmask[:, None] & (cols[None, :] < D)
        x = tl.load(src + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(ACC)
        tl.store(dst + rows[:, None] * D + cols[None, :], x * inv[:, None], mask=m)


@triton.jit
def _count_block(y_ptr, w_ptr, cnt_ptr, wsum_ptr, blk, N, C, HAS_W: tl.constexpr, BI: tl.constexpr,
                 BC: tl.constexpr, ACC: tl.constexpr):
    """Per-class counts and weight sums of a block of classes: a masked compare over all labels (no
    atomics, so the sums are bitwise reproducible)."""
    cls = blk * BC + tl.arange(0, BC)
    cmask = cls < C
    cnt = tl.zeros((BC,), dtype=ACC)
    ws = tl.zeros((BC,), dtype=ACC)
    for i0 in range(0, N, BI):
        idx = i0 + tl.arange(0, BI)
        imask = idx < N
        y = tl.load(y_ptr + idx, mask=imask, other=-1)
        hit = (y[:, None] == cls[None, :]) & imask[:, None]
        one = tl.where(hit, 1.0, 0.0).to(ACC)
        cnt += tl.sum(one, axis=0)
        if HAS_W:
            w = tl.load(w_ptr + idx, mask=imask, other=0.0).to(ACC)
            ws += tl.sum(one * w[:, None], axis=0)
    if not HAS_W:
        ws = cnt / N
    tl.store(cnt_ptr + cls, cnt, mask=cmask)
    tl.store(wsum_ptr + cls, ws, mask=cmask)


@triton.jit(do_not_specialize=["N", "C"])
def _class_means(x_ptr, y_ptr, p0_ptr, N, C, D, sxn, sxd, sy, BI: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                 ACC: tl.constexpr):
    """p0 = the class means of x's rows (the step's prototypes before w_proto): labels clamped into
    0..C-1 (a label outside it still turns the loss NaN in ``_prep``'s counts), a class without a row
    0 — what ``composite.class_means`` computes. A program per (class block, column block) runs over
    every row tile in order: sums as a one-hot tile times the rows (IEEE products, exact: each is a
    row entry or 0), counts as the one-hot's row sums. One launch, no atomics, deterministic; N x C
    x D products, so the launcher takes it for episode-sized problems only."""
    nbd = tl.cdiv(D, BD)
    cls = (tl.program_id(0) // nbd) * BC + tl.arange(0, BC)
    cols = (tl.program_id(0) % nbd) * BD + tl.arange(0, BD)
    dmask = cols < D
    acc = tl.zeros((BC, BD), dtype=ACC)
    cnt = tl.zeros((BC,), dtype=ACC)
    for i0 in range(0, N, BI):
        idx = i0 + tl.arange(0, BI)
        imask = idx < N
        y = tl.load(y_ptr + idx.to(tl.int64) * sy, mask=imask, other=0)
        y = tl.minimum(tl.maximum(y, 0), C - 1)
        one = tl.where((cls[:, None] == y[None, :]) & imask[None, :], 1.0, 0.0).to(ACC)   # (BC, BI)
        rows = tl.load(x_ptr + idx[:, None].to(tl.int64) * sxn + cols[None, :].to(tl.int64) * sxd,
                       mask=imask[:, None] & dmask[None, :], other=0.0).to(ACC)
        acc += tl.dot(one, rows, input_precision="ieee", out_dtype=ACC)
        cnt += tl.sum(one, axis=1)
    tl.store(p0_ptr + cls[:, None] * D + cols[None, :], acc / tl.maximum(cnt, 1.0)[:, None],
             mask=(cls[:, None] < C) & dmask[None, :])


@triton.jit(do_not_specialize=["N", "C", "NBZ", "NBQ", "NT"])
def _prep(z_ptr, q_ptr, zn_ptr, qn_ptr, znorm_ptr, qnorm_ptr, y_ptr, w_ptr, cnt_ptr, wsum_ptr, ticket_ptr,
          N, C, D, HAS_W: tl.constexpr, NBZ, NBQ, NT,
          BR: tl.constexpr, BD: tl.constexpr, BI: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    if pid == 0:
        for t0 in range(0, NT, BI):   # the last launch's completion counters
            t = t0 + tl.arange(0, BI)
            tl.store(ticket_ptr + t, tl.zeros((BI,), dtype=tl.int32), mask=t < NT)
    if pid < NBZ:
        _normalize_block(z_ptr, zn_ptr, znorm_ptr, pid, N, D, BR, BD, ACC)
    elif pid < NBZ + NBQ:
        _normalize_block(q_ptr, qn_ptr, qnorm_ptr, pid - NBZ, C, D, BR, BD, ACC)
    else:
        _count_block(y_ptr, w_ptr, cnt_ptr, wsum_ptr, pid - NBZ - NBQ, N, C, HAS_W, BI, BC, ACC)


@triton.jit(do_not_specialize=["N", "SG"])
def _scores(zn_ptr, qn_ptr, cnt_ptr, tau_ptr, S_ptr, R_ptr, pred_ptr, part_ptr, N, C, D, SG, SCOLS,
            GROUPED: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
            PREC: tl.constexpr):
    """Row blocks, each forming S on its rows with their row statistics; or (GROUPED) row blocks x
    SG column groups of SCOLS columns, each storing its partial products zn qn^T in its slot of
    part (SG x N x C), which the next launch sums in group order (``_colstats``)."""
    if not GROUPED:
        scale = tl.exp(tl.load(tau_ptr).to(ACC))
        _scores_block(zn_ptr, qn_ptr, cnt_ptr, scale, S_ptr, R_ptr, pred_ptr, part_ptr, 1, tl.program_id(0), 0, D,
                      N, C, D, False, BN, BC, BD, ACC, PREC)
    else:
        rows = (tl.program_id(0) // SG) * BN + tl.arange(0, BN)
        grp = tl.program_id(0) % SG
        d_lo = grp * SCOLS
        for c0 in range(0, C, BC):
            cls = c0 + tl.arange(0, BC)
            acc = _score_acc(zn_ptr, qn_ptr, rows, cls, d_lo, tl.minimum(d_lo + SCOLS, D), N, C, D, BN, BC, BD, ACC,
                             PREC)
            tl.store(part_ptr + grp * N * C + rows[:, None] * C + cls[None, :], acc,
                     mask=(rows[:, None] < N) & (cls[None, :] < C))


@triton.jit
def _score_acc(zn_ptr, qn_ptr, rows, cls, d_lo, d_hi, N, C, D, BN: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr):
    """zn qn^T on a (rows x cls) tile over columns d_lo .. d_hi - 1 (unscaled)."""
    rmask = rows < N
    cmask = cls < C
    acc = tl.zeros((BN, BC), dtype=ACC)
    for d0 in range(d_lo, d_hi, BD):
        cols = d0 + tl.arange(0, BD)
        dmask = cols < D
        a = tl.load(zn_ptr + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(qn_ptr + cls[:, None] * D + cols[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _scores_block(zn_ptr, qn_ptr, cnt_ptr, scale, S_ptr, R_ptr, pred_ptr, part_ptr, SG, blk, d_lo, d_hi, N, C, D,
                  FROM_PARTS: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
                  PREC: tl.constexpr):
    """S = scale * zn qn^T on a block of rows (all classes), its row log-sum-exp and argmax. The
    products: over columns d_lo .. d_hi - 1, or (FROM_PARTS) the SG groups' partial products in
    part, summed in group order."""
    rows = blk * BN + tl.arange(0, BN)
    rmask = rows < N
    neg_inf = float("-inf")
    m_row = tl.full((BN,), neg_inf, dtype=ACC)
    sum_row = tl.zeros((BN,), dtype=ACC)
    best = tl.full((BN,), neg_inf, dtype=ACC)
    arg = tl.zeros((BN,), dtype=tl.int64)
    for c0 in range(0, C, BC):
        cls = c0 + tl.arange(0, BC)
        cmask = cls < C
        if FROM_PARTS:
            m2 = rmask[:, None] & cmask[None, :]
            at = rows[:, None] * C + cls[None, :]
            acc = _parts_sum(part_ptr, at, m2, SG, N, C, BN, BC, ACC)
        else:
            acc = _score_acc(zn_ptr, qn_ptr, rows, cls, d_lo, d_hi, N, C, D, BN, BC, BD, ACC, PREC)
        s = acc * scale
        both = rmask[:, None] & cmask[None, :]
        tl.store(S_ptr + rows[:, None] * C + cls[None, :], s, mask=both)
        cnt = tl.load(cnt_ptr + cls, mask=cmask, other=0.0)
        # row argmax over all classes (first index on ties)
        s_all = tl.where(cmask[None, :], s, neg_inf)
        tmax = tl.max(s_all, axis=1)
        targ = tl.argmax(s_all, axis=1).to(tl.int64) + c0
        better = tmax > best
        arg = tl.where(better, targ, arg)
        best = tl.where(better, tmax, best)
        # online log-sum-exp over classes that have samples, weighted by their counts
        live = cmask[None, :] & (cnt[None, :] > 0)
        s_live = tl.where(live, s, neg_inf)
        m_new = tl.maximum(m_row, tl.max(s_live, axis=1))
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        p = tl.where(live, cnt[None, :] * tl.exp(s_live - m_safe[:, None]), 0.0)
        sum_row = sum_row * tl.exp(m_row - m_safe) + tl.sum(p, axis=1)
        m_row = m_new
    tl.store(R_ptr + 2 * rows, m_row, mask=rmask)   # the pair (max, log of the shifted sum)
    tl.store(R_ptr + 2 * rows + 1, tl.log(tl.where(rmask, sum_row, 1.0)), mask=rmask)
    tl.store(pred_ptr + rows, arg, mask=rmask)


@triton.jit
def _parts_sum(part_ptr, at, mask, SG, N, C, BN: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """The SG column groups' partial products at offsets ``at`` of each N x C slot, summed in group order."""
    acc = tl.zeros((BN, BC), dtype=ACC)
    for k in range(0, SG):
        acc += tl.load(part_ptr + k * N * C + at, mask=mask, other=0.0).to(ACC)
    return acc


@triton.jit(do_not_specialize=["T0", "N", "C", "CS", "SG", "NBR"])
def _colstats(S_ptr, L_ptr, part_ptr, ticket_ptr, T0, N, C, CS, CROWS, tau_ptr, cnt_ptr, R_ptr, pred_ptr, spart_ptr,
              SG, NBR, SUMMED: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """SUMMED (the scores came as SG groups' partial products in spart): first NBR row programs
    sum them in group order into S with the row statistics (``_scores_block``). Then class blocks x
    CS row ranges of CROWS rows, which read the scores (SUMMED: form them from spart, the same sum
    in the same order, so the same bits as S). CS > 1: each range stores its (max, sum of
    exp(S - max)) per class in its slot of part (CS x 2C); the class block's last range to finish
    (ticket[T0 + blk], zeroed by _prep) merges them in range order — the same bits whoever finishes
    last."""
    pid = tl.program_id(0)
    scale = tl.exp(tl.load(tau_ptr).to(ACC))
    if SUMMED and pid < NBR:
        # (no products here: the operand pointers, columns, BD and PREC go unused)
        _scores_block(S_ptr, S_ptr, cnt_ptr, scale, S_ptr, R_ptr, pred_ptr, spart_ptr, SG, pid, 0, 0, N, C, 0,
                      True, BN, BC, 16, ACC, "ieee")
    else:
        if SUMMED:
            pid -= NBR
        blk = pid // CS
        if CS == 1:
            _colstats_block(S_ptr, L_ptr, blk, 0, N, N, C, True, spart_ptr, SG, scale, SUMMED, BN, BC, ACC)
        else:
            rs = pid % CS
            r_lo = rs * CROWS
            _colstats_block(S_ptr, part_ptr + rs * 2 * C, blk, r_lo, tl.minimum(r_lo + CROWS, N), N, C, False,
                            spart_ptr, SG, scale, SUMMED, BN, BC, ACC)
            tl.debug_barrier()   # every thread's stores issued before the ticket
            ticket = tl.atomic_add(ticket_ptr + T0 + blk, 1, sem="acq_rel")
            if ticket == CS - 1:
                tl.debug_barrier()
                _merge_col_ranges(part_ptr, L_ptr, blk, CS, C, BC, ACC)


@triton.jit
def _merge_col_ranges(part_ptr, L_ptr, blk, CS, C, BC: tl.constexpr, ACC: tl.constexpr):
    """L of a class block from its CS row ranges' (max, shifted sum) pairs, merged in range order."""
    cls = blk * BC + tl.arange(0, BC)
    cmask = cls < C
    neg_inf = float("-inf")
    m_col = tl.full((BC,), neg_inf, dtype=ACC)
    sum_col = tl.zeros((BC,), dtype=ACC)
    for k in range(0, CS):
        m_k = tl.load(part_ptr + k * 2 * C + 2 * cls, mask=cmask, other=neg_inf, cache_modifier=".cg").to(ACC)
        s_k = tl.load(part_ptr + k * 2 * C + 2 * cls + 1, mask=cmask, other=0.0, cache_modifier=".cg").to(ACC)
        m_new = tl.maximum(m_col, m_k)
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        # an empty range holds (-inf, 0): its term is 0 * exp(-inf) = 0
        sum_col = sum_col * tl.exp(m_col - m_safe) + s_k * tl.exp(m_k - m_safe)
        m_col = m_new
    tl.store(L_ptr + 2 * cls, m_col, mask=cmask)
    tl.store(L_ptr + 2 * cls + 1, tl.log(tl.where(cmask, sum_col, 1.0)), mask=cmask)


@triton.jit
def _colstats_block(S_ptr, L_ptr, blk, r_lo, r_hi, N, C, LOG: tl.constexpr, spart_ptr, SG, scale,
                    SUMMED: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Column log-sum-exp L_c = log sum_i exp(S_ic) over rows r_lo .. r_hi - 1 of a block of
    classes, online max shift, stored as the pair (max, log of the shifted sum) — or, LOG False,
    (max, the shifted sum) for a merge. SUMMED: S formed from the groups' partial products."""
    cls = blk * BC + tl.arange(0, BC)
    cmask = cls < C
    neg_inf = float("-inf")
    m_col = tl.full((BC,), neg_inf, dtype=ACC)
    sum_col = tl.zeros((BC,), dtype=ACC)
    for i0 in range(r_lo, r_hi, BN):
        rows = i0 + tl.arange(0, BN)
        m = (rows[:, None] < r_hi) & cmask[None, :]
        at = rows[:, None] * C + cls[None, :]
        if SUMMED:
            s = tl.where(m, _parts_sum(spart_ptr, at, m, SG, N, C, BN, BC, ACC) * scale, neg_inf)
        else:
            s = tl.load(S_ptr + at, mask=m, other=neg_inf).to(ACC)
        m_new = tl.maximum(m_col, tl.max(s, axis=0))
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        sum_col = sum_col * tl.exp(m_col - m_safe) + tl.sum(tl.exp(s - m_safe[None, :]), axis=0)
        m_col = m_new
    tl.store(L_ptr + 2 * cls, m_col, mask=cmask)
    if LOG:
        tl.store(L_ptr + 2 * cls + 1, tl.log(tl.where(cmask, sum_col, 1.0)), mask=cmask)
    else:
        tl.store(L_ptr + 2 * cls + 1, sum_col, mask=cmask)


@triton.jit
def _lse_pair(ptr, idx, mask, ACC: tl.constexpr):
    """A log-sum-exp stored as its pair (max, log of the shifted sum) at ptr[2 idx], ptr[2 idx + 1]."""
    return (tl.load(ptr + 2 * idx, mask=mask, other=0.0).to(ACC),
            tl.load(ptr + 2 * idx + 1, mask=mask, other=0.0).to(ACC))


@triton.jit
def _g_tile(S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, rows, cls, N, C,
            HAS_W: tl.constexpr, ACC: tl.constexpr):
    """G = dloss/dS on a (rows x cls) tile, and S there; masked entries give 0 (NaN for bad labels)."""
    rmask = rows < N
    cmask = cls < C
    both = rmask[:, None] & cmask[None, :]
    s = tl.load(S_ptr + rows[:, None] * C + cls[None, :], mask=both, other=0.0).to(ACC)
    r_max, r_log = _lse_pair(R_ptr, rows, rmask, ACC)
    y = tl.load(y_ptr + rows, mask=rmask, other=0)
    valid = (y >= 0) & (y < C)
    if HAS_W:
        w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(ACC)
    else:
        w = tl.where(rmask, 1.0, 0.0).to(ACC) / N
    l_max, l_log = _lse_pair(L_ptr, cls, cmask, ACC)
    cnt = tl.load(cnt_ptr + cls, mask=cmask, other=0.0).to(ACC)
    ws = tl.load(wsum_ptr + cls, mask=cmask, other=0.0).to(ACC)
    # exp(S - R) as exp((S - max) - log sum): S - max is exact near the max, where it matters. Both
    # exponents are <= 0 wherever their term counts; the clamp keeps the others finite: a class with
    # no sample (n_c = 0, only with validation off) may score above the row's max, and at large tau
    # 0 * exp(overflow) would be NaN; masked rows meet columns whose max is -exp(tau).
    # (a NaN stays NaN: min(x, 0) written as a select, since tl.minimum may drop a NaN operand)
    e_row = (s - r_max[:, None]) - r_log[:, None]
    e_col = (s - l_max[None, :]) - l_log[None, :]
    g = 0.5 * (w[:, None] * cnt[None, :] * tl.exp(tl.where(e_row > 0.0, 0.0, e_row))
               + ws[None, :] * tl.exp(tl.where(e_col > 0.0, 0.0, e_col)))
    g = g - tl.where(y[:, None] == cls[None, :], w[:, None], 0.0)
    g = tl.where(valid[:, None], g, float("nan"))
    g = tl.where(both, g, 0.0)
    return g, s


@triton.jit
def _rows_block(zn_ptr, qn_ptr, S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, scale, losses_ptr, dz_ptr, blk,
                d_lo, d_hi, N, C, D, HAS_W: tl.constexpr, FUSED: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                BD: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Per-sample losses of a block of rows (stored by the program whose columns start at 0) and
    (FUSED) their dz = s G qn on columns d_lo .. d_hi - 1, before the normalisation backward.
    Returns the block's weighted loss sum, its share of dloss/dtau = sum G * S (on the program with
    column 0) and its share of <zn, dz> per row, over its columns."""
    rows = blk * BN + tl.arange(0, BN)
    rmask = rows < N
    y = tl.load(y_ptr + rows, mask=rmask, other=0)
    valid = (y >= 0) & (y < C)
    yc = tl.where(valid, y, 0)
    st = tl.load(S_ptr + rows * C + yc, mask=rmask, other=0.0).to(ACC)
    r_max, r_log = _lse_pair(R_ptr, rows, rmask, ACC)
    l_max, l_log = _lse_pair(L_ptr, yc, rmask, ACC)
    # (R - S) + (L - S) from the pairs: max - S is exact when S is near the max, and the O(1)
    # loss keeps float32 precision whatever exp(tau)
    loss = tl.where(valid, 0.5 * (((r_max - st) + r_log) + ((l_max - st) + l_log)), float("nan"))
    tl.store(losses_ptr + rows, loss, mask=rmask & ((rows * 0 + d_lo) == 0))   # (d_lo an int or a scalar)
    if HAS_W:
        w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(ACC)
    else:
        w = tl.where(rmask, 1.0, 0.0).to(ACC) / N
    ploss = tl.sum(tl.where(rmask, w * loss, 0.0), axis=0)
    dtau = tl.zeros((BN,), dtype=ACC)
    dot = tl.zeros((BN,), dtype=ACC)
    if FUSED:
        # dz = s * G qn, D chunk by D chunk; dtau = sum G * S on the first chunk only
        for d0 in range(d_lo, d_hi, BD):
            cols = d0 + tl.arange(0, BD)
            dmask = cols < D
            acc = tl.zeros((BN, BD), dtype=ACC)
            for c0 in range(0, C, BC):
                cls = c0 + tl.arange(0, BC)
                g, s = _g_tile(S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, rows, cls, N, C, HAS_W, ACC)
                if d0 == 0:
                    dtau += tl.sum(g * s, axis=1)
                b = tl.load(qn_ptr + cls[:, None] * D + cols[None, :], mask=(cls[:, None] < C) & dmask[None, :],
                            other=0.0)
                acc += tl.dot(g.to(b.dtype), b, input_precision=PREC, out_dtype=ACC)
            acc = acc * scale
            m2 = rmask[:, None] & dmask[None, :]
            zn = tl.load(zn_ptr + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(ACC)
            dot += tl.sum(acc * zn, axis=1)
            tl.store(dz_ptr + rows[:, None] * D + cols[None, :], acc, mask=m2)
    return ploss, tl.sum(dtau, axis=0), dot


@triton.jit
def _rows_group_finish(dz_ptr, zn_ptr, znorm_ptr, pdot_ptr, ticket_ptr, blk, grp, dot, N, D, RG,
                       BN: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """One of RG programs of a row block, each of which wrote dz on its own columns: its share of
    <zn, dz> goes to its slot of pdot (RG x N). The block's last program to finish (an integer
    ticket) sums the shares in group order — the same bits whoever finishes last — and applies the
    normalisation backward to the whole rows."""
    rows = blk * BN + tl.arange(0, BN)
    rmask = rows < N
    tl.store(pdot_ptr + grp * N + rows, dot, mask=rmask)
    tl.debug_barrier()   # every thread's dz and pdot stores issued before the ticket
    ticket = tl.atomic_add(ticket_ptr + blk, 1, sem="acq_rel")
    if ticket == RG - 1:
        tl.debug_barrier()
        tot = tl.zeros((BN,), dtype=ACC)
        for k in range(0, RG):
            tot += tl.load(pdot_ptr + k * N + rows, mask=rmask, other=0.0, cache_modifier=".cg").to(ACC)
        _norm_backward(dz_ptr, zn_ptr, znorm_ptr, rows, rmask, tot, D, BD, ACC, True)


@triton.jit
def _gt_zn_chunk(zn_ptr, S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, cls, cols, r_lo, r_hi, N, C, D,
                 HAS_W: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
                 PREC: tl.constexpr):
    """(G^T zn) of a block of classes on one D chunk, summed over rows r_lo .. r_hi - 1 in order."""
    dmask = cols < D
    acc = tl.zeros((BC, BD), dtype=ACC)
    for i0 in range(r_lo, r_hi, BN):
        rows = i0 + tl.arange(0, BN)
        inside = rows < r_hi
        g, s = _g_tile(S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, rows, cls, N, C, HAS_W, ACC)
        g = tl.where(inside[:, None], g, 0.0)
        a = tl.load(zn_ptr + rows[:, None] * D + cols[None, :], mask=inside[:, None] & dmask[None, :], other=0.0)
        acc += tl.dot(tl.trans(g.to(a.dtype)), a, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _store_dq_chunk(acc, qn_ptr, dq_ptr, cls, cmask, cols, D, ACC: tl.constexpr):
    """Stores one D chunk of dq = acc (scaled) for a block of classes; returns its share of <qn, dq>."""
    m2 = cmask[:, None] & (cols[None, :] < D)
    qn = tl.load(qn_ptr + cls[:, None] * D + cols[None, :], mask=m2, other=0.0).to(ACC)
    tl.store(dq_ptr + cls[:, None] * D + cols[None, :], acc, mask=m2)
    return tl.sum(acc * qn, axis=1)


@triton.jit
def _cls_block(zn_ptr, qn_ptr, qnorm_ptr, S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, scale, dq_ptr,
               blk, N, C, D, HAS_W: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr):
    """dq = s G^T zn of a block of classes, over every row, with the normalisation backward."""
    cls = blk * BC + tl.arange(0, BC)
    cmask = cls < C
    dot = tl.zeros((BC,), dtype=ACC)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        acc = _gt_zn_chunk(zn_ptr, S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, cls, cols, 0, N, N, C, D,
                           HAS_W, BN, BC, BD, ACC, PREC)
        dot += _store_dq_chunk(acc * scale, qn_ptr, dq_ptr, cls, cmask, cols, D, ACC)
    _norm_backward(dq_ptr, qn_ptr, qnorm_ptr, cls, cmask, dot, D, BD, ACC, False)


@triton.jit
def _cls_split(zn_ptr, qn_ptr, qnorm_ptr, S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, scale, dq_ptr,
               part_ptr, ticket_ptr, blk, split, d_lo, d_hi, NPART, ROWS_PER, N, C, D, HAS_W: tl.constexpr,
               SPLITS: tl.constexpr, BNC: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
               PREC: tl.constexpr):
    """One of NPART programs of a class block (SPLITS row ranges x column groups): G^T zn over its
    range of ROWS_PER rows in tiles of BNC rows (half the row programs' BN: with full tiles the
    kernel spilled 48-128 B a thread) on columns d_lo .. d_hi - 1, written to its range's slot (BC x D;
    the column groups of a range share a slot): the first range's is the block's own rows of dq, the
    others' are in part (SPLITS - 1 slots a block: C x D fewer values than a slot each). The
    block's last program to finish (an integer ticket, as for the loss total) sums the slots in
    split order — the same bits whoever finishes last — then writes dq = s G^T zn with the
    normalisation backward."""
    cls = blk * BC + tl.arange(0, BC)
    cmask = cls < C
    lc = tl.arange(0, BC)
    r_lo = split * ROWS_PER
    r_hi = tl.minimum(r_lo + ROWS_PER, N)
    own = dq_ptr + blk * BC * D   # the first range's slot: rows past C masked (dq has C rows)
    if split == 0:
        slot = own
    else:
        slot = part_ptr + (blk * (SPLITS - 1) + split - 1) * BC * D
    smask = (cls < tl.where(split == 0, C, (blk + 1) * BC))[:, None]   # part's slots are whole blocks
    for d0 in range(d_lo, d_hi, BD):
        cols = d0 + tl.arange(0, BD)
        acc = _gt_zn_chunk(zn_ptr, S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, cls, cols, r_lo, r_hi, N,
                           C, D, HAS_W, BNC, BC, BD, ACC, PREC)
        tl.store(slot + lc[:, None] * D + cols[None, :], acc, mask=smask & (cols[None, :] < D))
    tl.debug_barrier()   # every thread's slot stores issued before the ticket
    ticket = tl.atomic_add(ticket_ptr + blk, 1, sem="acq_rel")
    if ticket == NPART - 1:
        tl.debug_barrier()
        dot = tl.zeros((BC,), dtype=ACC)
        rest = part_ptr + blk * (SPLITS - 1) * BC * D
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            m2 = cmask[:, None] & (cols[None, :] < D)
            acc = tl.load(own + lc[:, None] * D + cols[None, :], mask=m2, other=0.0, cache_modifier=".cg").to(ACC)
            for k in range(SPLITS - 1):
                acc += tl.load(rest + (k * BC + lc[:, None]) * D + cols[None, :], mask=m2, other=0.0,
                               cache_modifier=".cg").to(ACC)
            dot += _store_dq_chunk(acc * scale, qn_ptr, dq_ptr, cls, cmask, cols, D, ACC)
        _norm_backward(dq_ptr, qn_ptr, qnorm_ptr, cls, cmask, dot, D, BD, ACC, False)


@triton.jit(do_not_specialize=["NBZ", "ROW_T0"])
def _grads(zn_ptr, qn_ptr, znorm_ptr, qnorm_ptr, S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr,
           tau_ptr, losses_ptr, ploss_ptr, pdtau_ptr, ticket_ptr, loss_ptr, dtau_ptr, dz_ptr, dq_ptr, part_ptr,
           pdot_ptr, N, C, D, NBZ, ROWS_PER, RG, RCOLS, CG, CCOLS, ROW_T0, HAS_W: tl.constexpr, FUSED: tl.constexpr,
           SPLITS: tl.constexpr, CLS_SPLIT: tl.constexpr, BN: tl.constexpr, BNC: tl.constexpr, BC: tl.constexpr,
           BD: tl.constexpr, BP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Row programs (NBZ row blocks x RG column groups of RCOLS columns) then, FUSED, class programs
    (each class block: SPLITS row ranges x CG column groups of CCOLS columns when CLS_SPLIT, else
    one program over everything). Tickets: [0] the loss total, [1 + b] class block b,
    [ROW_T0 + b] row block b (all zeroed by _prep)."""
    pid = tl.program_id(0)
    scale = tl.exp(tl.load(tau_ptr).to(ACC))
    if pid < NBZ * RG:
        blk = pid // RG
        grp = pid % RG
        d_lo = grp * RCOLS
        ploss, pdtau, dot = _rows_block(zn_ptr, qn_ptr, S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, scale,
                                        losses_ptr, dz_ptr, blk, d_lo, tl.minimum(d_lo + RCOLS, D), N, C, D, HAS_W,
                                        FUSED, BN, BC, BD, ACC, PREC)
        if FUSED:
            if RG == 1:
                rows = blk * BN + tl.arange(0, BN)
                _norm_backward(dz_ptr, zn_ptr, znorm_ptr, rows, rows < N, dot, D, BD, ACC, False)
            else:
                _rows_group_finish(dz_ptr, zn_ptr, znorm_ptr, pdot_ptr, ticket_ptr + ROW_T0, blk, grp, dot, N, D, RG,
                                   BN, BD, ACC)
        if grp == 0:
            tl.store(ploss_ptr + blk, ploss)
            tl.store(pdtau_ptr + blk, pdtau)
            # The last row block to finish sums every block's partials in index order: a deterministic
            # total in this launch (the integer ticket is the only atomic; acq_rel orders the stores).
            ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
            if ticket == NBZ - 1:
                tot_l = tl.zeros((BP,), dtype=ACC)
                tot_t = tl.zeros((BP,), dtype=ACC)
                for i0 in range(0, NBZ, BP):
                    idx = i0 + tl.arange(0, BP)
                    tot_l += tl.load(ploss_ptr + idx, mask=idx < NBZ, other=0.0, cache_modifier=".cg")
                    tot_t += tl.load(pdtau_ptr + idx, mask=idx < NBZ, other=0.0, cache_modifier=".cg")
                tl.store(loss_ptr, tl.sum(tot_l, axis=0))
                tl.store(dtau_ptr, tl.sum(tot_t, axis=0))
    elif FUSED:
        k = pid - NBZ * RG
        if CLS_SPLIT:   # class tickets follow the loss total's
            per_blk = SPLITS * CG
            r = k % per_blk
            d_lo = (r % CG) * CCOLS
            _cls_split(zn_ptr, qn_ptr, qnorm_ptr, S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, scale, dq_ptr,
                       part_ptr, ticket_ptr + 1, k // per_blk, r // CG, d_lo, tl.minimum(d_lo + CCOLS, D), per_blk,
                       ROWS_PER, N, C, D, HAS_W, SPLITS, BNC, BC, BD, ACC, PREC)
        else:
            _cls_block(zn_ptr, qn_ptr, qnorm_ptr, S_ptr, R_ptr, L_ptr, cnt_ptr, wsum_ptr, y_ptr, w_ptr, scale, dq_ptr,
                       k, N, C, D, HAS_W, BN, BC, BD, ACC, PREC)


@triton.jit(do_not_specialize=["N_ALL", "C_ALL", "S_ALL"])
def _episodes(z_ptr, q_ptr, y_ptr, row_off_ptr, cls_off_ptr, s_off_ptr, tau_ptr, zn_ptr, qn_ptr, znorm_ptr,
              qnorm_ptr, cnt_ptr, wsum_ptr, S_ptr, R_ptr, L_ptr, pred_ptr, losses_ptr, loss_ptr, dtau_ptr,
              dz_ptr, dq_ptr, D, N_ALL, C_ALL, S_ALL, FUSED: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
              BD: tl.constexpr, BI: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """One program per episode: forward and (FUSED) gradients of a whole episode, phase after phase
    with a block-wide barrier between phases. Episode e owns rows row_off[e, 0] + (0..row_off[e, 1])
    and classes cls_off[e, 0] + (0..cls_off[e, 1]) of the stacked tensors (packed or padded, N_ALL
    rows and C_ALL classes); its labels are local (0..C_e - 1); its N_e x C_e score block starts at
    s_off[e] of the S_ALL entries of S. The layout is not trusted: an episode whose rows, classes or
    score block do not lie inside those buffers (a negative start or count included) runs as an
    empty one, touching nothing, and gets a NaN loss and dtau (no host check: no synchronisation)."""
    e = tl.program_id(0)
    r0 = tl.load(row_off_ptr + 2 * e)
    n = tl.load(row_off_ptr + 2 * e + 1)
    c0 = tl.load(cls_off_ptr + 2 * e)
    c = tl.load(cls_off_ptr + 2 * e + 1)
    so = tl.load(s_off_ptr + e)
    # every term is evaluated: once n <= N_ALL and c <= C_ALL hold (< 2^31 each), n * c cannot overflow
    fits = ((r0 >= 0) & (r0 <= N_ALL) & (n >= 0) & (n <= N_ALL - r0) & (c0 >= 0) & (c0 <= C_ALL) & (c >= 0)
            & (c <= C_ALL - c0) & (so >= 0) & (so <= S_ALL) & (n * c <= S_ALL - so))
    r0, n = tl.where(fits, r0, 0), tl.where(fits, n, 0)
    c0, c = tl.where(fits, c0, 0), tl.where(fits, c, 0)
    so = tl.where(fits, so, 0)
    scale = tl.exp(tl.load(tau_ptr + e).to(ACC))
    z, zn, dz = z_ptr + r0 * D, zn_ptr + r0 * D, dz_ptr + r0 * D
    q, qn, dq = q_ptr + c0 * D, qn_ptr + c0 * D, dq_ptr + c0 * D
    y, znorm, R, pred, losses = y_ptr + r0, znorm_ptr + r0, R_ptr + 2 * r0, pred_ptr + r0, losses_ptr + r0
    qnorm, cnt, wsum, L = qnorm_ptr + c0, cnt_ptr + c0, wsum_ptr + c0, L_ptr + 2 * c0
    S = S_ptr + so
    nbz = tl.cdiv(n, BN)
    nbc = tl.cdiv(c, BC)
    for b in range(0, nbz):
        _normalize_block(z, zn, znorm, b, n, D, BN, BD, ACC)
    for b in range(0, tl.cdiv(c, BN)):
        _normalize_block(q, qn, qnorm, b, c, D, BN, BD, ACC)
    for b in range(0, nbc):
        _count_block(y, y, cnt, wsum, b, n, c, False, BI, BC, ACC)
    tl.debug_barrier()
    for b in range(0, nbz):
        _scores_block(zn, qn, cnt, scale, S, R, pred, S, 1, b, 0, D, n, c, D, False, BN, BC, BD, ACC, PREC)
    tl.debug_barrier()
    for b in range(0, nbc):
        _colstats_block(S, L, b, 0, n, n, c, True, S, 1, scale, False, BN, BC, ACC)
    tl.debug_barrier()
    tot_l = tl.zeros((1,), dtype=ACC)
    tot_t = tl.zeros((1,), dtype=ACC)
    for b in range(0, nbz):
        pl, pt, dot = _rows_block(zn, qn, S, R, L, cnt, wsum, y, y, scale, losses, dz, b, 0, D, n, c, D, False, FUSED,
                                  BN, BC, BD, ACC, PREC)
        if FUSED:
            rows = b * BN + tl.arange(0, BN)
            _norm_backward(dz, zn, znorm, rows, rows < n, dot, D, BD, ACC, False)
        tot_l += pl
        tot_t += pt
    if FUSED:
        for b in range(0, nbc):
            _cls_block(zn, qn, qnorm, S, R, L, cnt, wsum, y, y, scale, dq, b, n, c, D, False, BN, BC, BD, ACC, PREC)
    one = tl.arange(0, 1)
    tl.store(loss_ptr + e + one, tl.where(fits, tot_l, float("nan")))
    tl.store(dtau_ptr + e + one, tl.where(fits, tot_t, float("nan")))


@triton.jit
def _norm_backward(g_ptr, xn_ptr, norm_ptr, rows, rmask, dot, D, BD: tl.constexpr, ACC: tl.constexpr,
                   OTHERS: tl.constexpr):
    """In place: g <- (g - xn <xn, g>) / ||x|| (g / eps where the norm was clamped), as F.normalize.
    OTHERS: other programs of this launch wrote parts of g (read it from L2, past this SM's L1)."""
    tl.debug_barrier()   # g was just stored, possibly by other threads of this program
    nrm = tl.load(norm_ptr + rows, mask=rmask, other=1.0).to(ACC)
    live = nrm > NORM_EPS
    dot = tl.where(live, dot, 0.0)
    inv = 1.0 / tl.maximum(nrm, NORM_EPS)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        m2 = rmask[:, None] & (cols[None, :] < D)
        if OTHERS:
            g = tl.load(g_ptr + rows[:, None] * D + cols[None, :], mask=m2, other=0.0, cache_modifier=".cg").to(ACC)
        else:
            g = tl.load(g_ptr + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(ACC)
        xn = tl.load(xn_ptr + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(ACC)
        tl.store(g_ptr + rows[:, None] * D + cols[None, :], (g - xn * dot[:, None]) * inv[:, None], mask=m2)


# Whether Triton built these kernels for its interpreter (CPU tensors) or for a GPU: it decides when
# it decorates them (TRITON_INTERPRET at this module's import), and copa_fast.backends asks here.
INTERPRETED = type(_prep).__name__ == "InterpretedFunction"

# The interpreter runs a launch's programs with module-level state of its own (the grid position,
# the semantics of the current program): launches from two threads at once corrupt each other. Under
# it the launches of one call take a lock; compiled launches need none.
_LAUNCHES = threading.Lock() if INTERPRETED else contextlib.nullcontext()


def _cdiv(a, b):
    """Ceiling division of positive ints, for the launchers' host code. Not ``triton.cdiv``: that is
    a constexpr_function (triton 3.6 and 3.9), whose every host call unwraps its arguments and runs an
    import statement, ~4.5 us on the project's CPU machine; a launch plan makes ~17 such calls."""
    return -(-a // b)


def _launch_config(interpreted, dtype, batched=False, precision="ieee", d=None):
    """(BN, BC, BD, num_warps) of a launch (``batched``: the episodes kernel). Under the interpreter
    every tile op is a numpy call: larger tiles mean fewer Python steps. On a GPU: the largest
    tiles with which every kernel compiles for sm_80 and sm_90 without local-memory spills, checked
    by ``benchmarks/triton_aot.py`` (64-row tiles with 4 warps spilled 268 to 1,092 B a thread in
    the fused gradient kernels; with 8 warps the episodes kernel still spills 140 to 232 B, the
    single-problem kernels 8 B at most; float64 needs half of each tile). Timed on an H200
    (benchmarks/RESULTS.md, 2026-11-27): 64-row tiles with 8 warps against 32-row ones, one problem
    579 vs 665 us at N=500 and 15.4 vs 17.6 ms at N=16384, so single problems take them — where D
    (``d``) is a multiple of 16. With any other D the row addresses are not known to be aligned and
    the loads go one value at a time: the gradient kernel's 64-row tiles spilled 232 to 548 B a
    thread (D = 17, 100 and 1000, sm_90 and sm_80), 32-row ones up to 88 B (the scores kernel), the
    episodes kernel's 32 x 32 x 64 tiles 64 to 416 B; 16-row tiles (32-column chunks for the
    episodes kernel) spill nothing there."""
    if interpreted:
        return 32, 32, 64, 4
    if dtype == torch.float64:
        return 16, 16, 64, 8
    if d is not None and d % 16 != 0:   # row loads one value at a time: 16-row tiles
        return (16, 32, 32, 8) if batched else (16, 32, 64, 8)
    # three products a product hold more live tiles: 64 rows spilled 640 B a thread on sm_80
    return (32, 32, 64, 8) if batched or precision == "tf32x3" else (64, 32, 64, 8)


def _dq_splits(n, c, bn, bc, dtype, most=4):
    """(splits, rows per split) of the dq = s G^T zn work of each class block. Unsplit, a class
    block's program runs N x BC x D products, N BC / (BN C) times a row block's work (8x at
    N = 16384, C = 1000), on only C / BC programs (32 there, for a GPU of 132 SMs): the kernel waits
    on them. Split into at most ``most`` row ranges of whole row tiles, each close to a row block's
    work; the partial sums take (splits - 1) x C x D extra memory (the first range sums in dq itself),
    summed in split order (deterministic).
    float64 (an accuracy mode) stays unsplit: its split kernel spilled 48 B a thread (triton 3.9, sm_90)."""
    if dtype == torch.float64:
        return 1, n
    blocks = _cdiv(n, bn)
    want = max(1, min(most, (n * bc) // (bn * c), blocks))
    per = _cdiv(blocks, want)
    return _cdiv(blocks, per), per * bn


def _grads_plan(n, c, d, bn, bc, bd, dtype, slots):
    """(splits, rows per split, row column groups, class column groups) of the gradient launch.
    A row program forms dz on its rows for all classes, a class program dq on its classes over its
    row range: each loops over the D chunks. With few row blocks (N = 500: 8 programs of 64 rows on
    a 132-SM GPU) those loops are the launch's length, so the chunks are shared out over column
    groups — row blocks x groups near ``slots`` programs (about two per SM), and each class block's
    ranges split by columns too until a class program is no longer than a row program. The groups'
    shares of each row's <zn, dz> are summed in group order by the last of them (deterministic);
    the class groups share the split's partial slot. float64 and ``slots`` 0 keep one group."""
    splits, rows_per = _dq_splits(n, c, bn, bc, dtype)
    chunks = _cdiv(d, bd)
    if dtype == torch.float64 or slots <= 0:
        return splits, rows_per, 1, 1
    whole = lambda g: _cdiv(chunks, _cdiv(chunks, g))   # noqa: E731  (no empty group)
    rg = whole(min(chunks, max(1, _cdiv(slots, _cdiv(n, bn)))))
    row_steps = _cdiv(c, bc) * _cdiv(chunks, rg)            # BN x BC x BD products
    bnc = max(bn // 2, 16)
    cls_steps = _cdiv(min(rows_per, n), bnc) * chunks * bnc / bn   # the same unit
    cg = whole(min(chunks, max(1, math.ceil(cls_steps / row_steps))))
    return splits, rows_per, rg, cg


def _scores_groups(n, c, d, bn, bd, dtype, slots, budget=1 << 22):
    """Column groups of the scores launch: with few row blocks (N = 500: 8 programs, each 16
    dependent tile products) the D chunks are shared out over groups of programs that only store
    their partial products (``bn``-row blocks x groups near ``slots`` programs); the next launch
    sums them. They take groups x N x C extra values, kept under ``budget`` (one group, the fused
    kernel, where two would not fit: N = 16384, C = 1000). float64 keeps one group."""
    if dtype == torch.float64 or slots <= 0:
        return 1
    chunks = _cdiv(d, bd)
    g = max(1, min(chunks, _cdiv(slots, _cdiv(n, bn)), budget // max(n * c, 1)))
    return _cdiv(chunks, _cdiv(chunks, g))


def _colstats_splits(n, c, bn, bc, slots):
    """(row ranges, rows per range) of the column statistics: C / BC class blocks, each a loop over
    every row tile (N = 16384, C = 1000: 32 programs of 256 steps), are split into row ranges of
    whole tiles, class blocks x ranges near ``slots`` programs; a block's ranges are merged in order
    by the last to finish (2 x ranges x C extra values)."""
    tiles = _cdiv(n, bn)
    k = min(tiles, max(1, _cdiv(slots, _cdiv(c, bc)))) if slots > 0 else 1
    per = _cdiv(tiles, k)
    return _cdiv(tiles, per), per * bn


_SLOTS: dict[int, int] = {}


def _slots(device):
    """Programs a launch aims for when it shares its loops out (``_grads_plan``, ``_scores_groups``,
    ``_colstats_splits``): two per SM on a GPU; a nominal 8 under the interpreter, so that CI's
    small problems take the grouped and split paths too."""
    if INTERPRETED or device.type != "cuda":
        return 8
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SLOTS:
        _SLOTS[key] = 2 * torch.cuda.get_device_properties(key).multi_processor_count
    return _SLOTS[key]


# The dot products' input precision for float32 (float64 is always IEEE): "ieee" FMA products,
# "tf32" one TF32 tensor-core product, "tf32x3" three (operands split into TF32 high and low parts,
# the low x low term dropped): float32-grade results on tensor cores.
PRECISIONS = ("ieee", "tf32", "tf32x3")


def _precision(dtype, precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return "ieee" if dtype == torch.float64 else precision


def _check_device(name, t):
    if t.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{name}: the Triton kernels take CUDA tensors (CPU ones under TRITON_INTERPRET=1, set "
                         f"before copa_fast first runs them), got a tensor on {t.device}")


# Each scratch buffer of a launch starts at a multiple of this many entries of the working dtype
# (256 B in float32): Triton specialises pointer arguments on 16-byte alignment, which separate
# allocations always had.
_ALIGN = 64


def _carve(dev, dt, sizes):
    """Views into ONE allocation of dtype ``dt`` on ``dev``, one per entry of ``sizes``, each at
    least that many entries long and starting at a multiple of ``_ALIGN`` entries: a launch's scratch
    in one trip through torch's allocator instead of one a buffer (up to 16 a step). The kernels take
    the views as pointers only; int32 tickets take ``_int32_entries`` of them and a ``.view``."""
    padded = [_cdiv(k, _ALIGN) * _ALIGN for k in sizes]
    return torch.empty(sum(padded), device=dev, dtype=dt).split_with_sizes(padded)


def _int32_entries(k, dt):
    """Entries of dtype ``dt`` that hold k int32 values."""
    return _cdiv(4 * k, dt.itemsize)


class _Setup:
    """What both launchers share: contiguous inputs, dtypes, tile sizes, the outputs, and (``carve``)
    the per-row and per-class scratch (normalised rows and their norms, class counts, row and column
    LSE) in one allocation with the launcher's own."""

    def __init__(self, z, q, labels, precision, fused_grad, zero_outputs, batched=False, scratch=False):
        if z.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"z: the Triton kernels take float32 or float64, got {z.dtype}")
        _check_device("z", z)
        self.z, self.q = z.contiguous(), q.contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.n, self.d = z.shape
        self.c = q.shape[0]
        self.dev, self.dt = z.device, z.dtype
        self.acc = tl.float64 if self.dt == torch.float64 else tl.float32
        self.prec = _precision(self.dt, precision)
        self.bn, self.bc, self.bd, self.warps = _launch_config(INTERPRETED, self.dt, batched, self.prec, d=self.d)
        # scratch: z and q are the caller's own, and the normalised rows are written over them
        self.scratch = scratch
        fill = torch.zeros if zero_outputs else torch.empty   # zero: rows no episode owns
        self.pred = fill(self.n, device=self.dev, dtype=torch.int64)
        self.losses = fill(self.n, device=self.dev, dtype=self.dt)
        if fused_grad:
            like = torch.zeros_like if zero_outputs else torch.empty_like
            self.dz, self.dq = like(self.z), like(self.q)
        else:
            self.dz, self.dq = z.new_empty(0), z.new_empty(0)

    def carve(self, extra):
        """The shared scratch — zn and qn (unless written over z and q), znorm, qnorm, cnt, wsum, R
        and L (log-sum-exps as (max, log sum) pairs) — and the launcher's ``extra`` buffers (entries of
        the working dtype) from one allocation; returns the extra buffers' views."""
        n, c = self.n, self.c
        own = [] if self.scratch else [self.z.numel(), self.q.numel()]
        views = _carve(self.dev, self.dt, own + [n, c, c, c, 2 * n, 2 * c, *extra])
        if self.scratch:
            self.zn, self.qn = self.z, self.q
        else:
            self.zn, self.qn, views = views[0], views[1], views[2:]
        self.znorm, self.qnorm, self.cnt, self.wsum, self.R, self.L = views[:6]
        return views[6:]


def symmetric_ce(z, q, labels, tau, weights, fused_grad, precision="ieee", scratch=False):
    """Launcher with the op's schema; see copa_fast.ops.symmetric_ce. Four launches. ``scratch``: z
    and q belong to the caller alone, which lets the first launch write the normalised rows over
    them (read only there) instead of into buffers of their own."""
    st = _Setup(z, q, labels, precision, fused_grad, zero_outputs=False, scratch=scratch)
    z, q, labels, n, c, d, dev, dt, acc, prec = (st.z, st.q, st.labels, st.n, st.c, st.d, st.dev, st.dt, st.acc,
                                                 st.prec)
    bn, bc, bd = st.bn, st.bc, st.bd
    tau_t = tau.reshape(1).to(device=dev, dtype=dt)
    w = None if weights is None else weights.to(device=dev, dtype=dt).contiguous()
    nbz, nbq, nbc = _cdiv(n, bn), _cdiv(c, bn), _cdiv(c, bc)
    pred, losses, dz, dq = st.pred, st.losses, st.dz, st.dq
    loss, dtau = torch.empty((), device=dev, dtype=dt), torch.empty((), device=dev, dtype=dt)
    slots = _slots(dev)
    splits, rows_per, rg, cg = _grads_plan(n, c, d, bn, bc, bd, dt, slots) if fused_grad else (1, n, 1, 1)
    cls_split = splits * cg > 1
    # completion counters, zeroed by _prep: [0] the loss total; [1 + b] class block b's programs;
    # [row_t0 + b] row block b's column groups
    row_t0 = 1 + (nbc if cls_split else 0)
    # the score groups' partial-product programs take 32-row blocks (64 spilled there on sm_80 / triton 3.6)
    bn_parts = min(bn, 32)
    sg = _scores_groups(n, c, d, bn_parts, bd, dt, slots)
    bng = bn_parts if sg > 1 else bn
    cs, crows = _colstats_splits(n, c, bn, bc, slots)
    col_t0 = row_t0 + (nbz if rg > 1 else 0)   # [col_t0 + b]: class block b's row ranges
    n_tickets = col_t0 + (nbc if cs > 1 else 0)
    # S, the row blocks' loss and dloss/dtau partials, the tickets, then what only some plans use:
    # the class ranges' partial sums past the first (which sums in dq's own rows), the column groups'
    # shares of <zn, dz>, the column statistics' row-range pairs, the score groups' partial products
    has_part, has_pdot = cls_split and splits > 1, rg > 1
    S, ploss, pdtau, ticket, part, pdot, c_part, s_part = st.carve([
        n * c, nbz, nbz, _int32_entries(n_tickets, dt), (splits - 1) * nbc * bc * d if has_part else 0,
        rg * n if has_pdot else 0, cs * 2 * c if cs > 1 else 0, sg * n * c if sg > 1 else 0])
    ticket = ticket.view(torch.int32)
    zn, qn, znorm, qnorm, cnt, wsum, R, L = st.zn, st.qn, st.znorm, st.qnorm, st.cnt, st.wsum, st.R, st.L
    # a plan without a buffer passes one it never reads
    part, pdot = part if has_part else dq, pdot if has_pdot else ploss
    c_part, s_part = c_part if cs > 1 else L, s_part if sg > 1 else S
    chunk_cols = lambda g: _cdiv(_cdiv(d, bd), g) * bd   # noqa: E731
    w_arg = w if w is not None else z  # never read when HAS_W is False

    with _LAUNCHES:
        _prep[(nbz + nbq + nbc,)](z, q, zn, qn, znorm, qnorm, labels, w_arg, cnt, wsum, ticket, n, c, d, w is not None,
                                  nbz, nbq, n_tickets, BR=bn, BD=bd, BI=max(bn, 16), BC=bc, ACC=acc)
        _scores[(_cdiv(n, bng) * sg,)](zn, qn, cnt, tau_t, S, R, pred, s_part, n, c, d, sg, chunk_cols(sg),
                                       GROUPED=sg > 1, BN=bng, BC=bc, BD=bd, ACC=acc, PREC=prec, num_warps=st.warps)
        nbr = nbz if sg > 1 else 0   # row programs that sum the score groups first
        _colstats[(nbr + nbc * cs,)](S, L, c_part, ticket, col_t0, n, c, cs, crows, tau_t, cnt, R, pred, s_part, sg,
                                     nbr, SUMMED=sg > 1, BN=bn, BC=bc, ACC=acc)
        _grads[(nbz * rg + (nbc * (splits * cg if cls_split else 1) if fused_grad else 0),)](
            zn, qn, znorm, qnorm, S, R, L, cnt, wsum, labels, w_arg, tau_t, losses, ploss, pdtau, ticket, loss,
            dtau, dz, dq, part, pdot, n, c, d, nbz, rows_per, rg, chunk_cols(rg), cg, chunk_cols(cg), row_t0,
            HAS_W=w is not None, FUSED=fused_grad, SPLITS=splits, CLS_SPLIT=cls_split, BN=bn, BNC=max(bn // 2, 16),
            BC=bc, BD=bd, BP=64, ACC=acc, PREC=prec, num_warps=st.warps)
    return loss, losses, pred, dz, dq, dtau if fused_grad else z.new_empty(0)


def _check_step(x, labels, w_img, w_proto, pf, num_classes, tau, weights):
    """The checks of copa_fast::copa_loss's C++ kernels (csrc/symmetric_ce_checks.h), for the same
    step on these kernels: what the launches need, with errors naming the argument."""
    for name, t in (("x", x), ("w_img", w_img), ("w_proto", w_proto), ("pf", pf)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (as x), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (as x), got {t.device}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x: the Triton kernels take float32 or float64, got {x.dtype}")
    _check_device("x", x)
    n, d = x.shape
    if n < 1 or w_img.shape[0] < 1 or w_img.shape[1] != d:
        raise ValueError(f"x, w_img: expected x (N >= 1, D) and w_img (E >= 1, D), got {tuple(x.shape)} and "
                         f"{tuple(w_img.shape)}")
    if w_proto.shape != w_img.shape:
        raise ValueError(f"w_proto: expected shape {tuple(w_img.shape)} (as w_img), got {tuple(w_proto.shape)}")
    if pf.shape != x.shape:
        raise ValueError(f"pf: expected shape {tuple(x.shape)} (as x), got {tuple(pf.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels: expected int64 or int32, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels: expected {n} entries (rows of x), got shape {tuple(labels.shape)}")
    if labels.device != x.device:
        raise ValueError(f"labels: expected device {x.device}, got {labels.device}")
    if tau.numel() != 1 or not tau.is_floating_point():
        raise ValueError(f"tau: expected one floating element, got shape {tuple(tau.shape)}, {tau.dtype}")
    if weights is not None and (weights.shape != (n,) or weights.device != x.device):
        raise ValueError(f"weights: expected {n} entries on {x.device}, got shape {tuple(weights.shape)} on "
                         f"{weights.device}")


# The one-launch class means take N x C x D products (a one-hot tile times the rows, IEEE FMA): up
# to the largest episode (N = 1024, C = 128, D = 1024, 2^27) they replace the composite's 10 small
# kernels and ~9 allocations a step; above it the composite's vendor one-hot GEMM takes the products
# (expected the faster there; not yet timed on a GPU: bench_gpu_extras.py times both sides).
MEANS_KERNEL_MAX = 1 << 27


def class_means(pf, labels, num_classes):
    """(C, D) class means of pf's rows for the step: ``_class_means`` in one launch for
    episode-sized problems, else ``composite.class_means`` (the same values: labels clamped, a class
    without a row 0)."""
    n, d = pf.shape
    if n * num_classes * d > MEANS_KERNEL_MAX or d == 0:
        from ..ops.composite import class_means as composite_means

        return composite_means(pf, labels, num_classes)
    p0 = torch.empty(num_classes, d, device=pf.device, dtype=pf.dtype)
    bi, bc, bd = (32, 16, 64) if pf.dtype == torch.float64 else (64, 32, 64)
    acc = tl.float64 if pf.dtype == torch.float64 else tl.float32
    grid = (_cdiv(num_classes, bc) * _cdiv(d, bd),)
    with _LAUNCHES:
        _class_means[grid](pf, labels, p0, n, num_classes, d, pf.stride(0), pf.stride(1), labels.stride(0),
                           BI=bi, BC=bc, BD=bd, ACC=acc, num_warps=8)
    return p0


def copa_loss(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad, precision="ieee"):
    """One CoPA step with the schema of copa_fast::copa_loss_triton (that of copa_fast::copa_loss):
    class means p0 of pf (``class_means``: one launch at episode sizes), the adapters z = x w_img^T
    and q = p0 w_proto^T (vendor GEMMs, which follow torch's TF32 setting), then the four launches
    of ``symmetric_ce`` on z and q — this call's own, so the normalised rows are written over them
    (one N x E buffer fewer at the peak: ~32 MiB at N = 16384, E = 512). Returns (loss, losses, pred,
    dz, dq, p0, dtau). Labels outside 0..C-1 are clamped for the means and reach the kernels as they
    are, which makes the loss NaN."""
    _check_step(x, labels, w_img, w_proto, pf, num_classes, tau, weights)
    # in x's dtype whatever region the step runs in (the context only inside one: ~3 us a step)
    with (torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type)
          else contextlib.nullcontext()):
        p0 = class_means(pf, labels, int(num_classes))
        z, q = torch.mm(x, w_img.t()), torch.mm(p0, w_proto.t())
    loss, losses, pred, dz, dq, dtau = symmetric_ce(z, q, labels, tau, weights, fused_grad, precision, scratch=True)
    return loss, losses, pred, dz, dq, p0, dtau


def episodes_sce(z, q, labels, rows, classes, s_off, s_total, tau, fused_grad, precision="ieee"):
    """One launch for E episodes: see ``_episodes``. rows, classes: (E, 2) int64 [start, count];
    s_off: (E,) int64 start of each episode's N_e x C_e score block in a buffer of s_total entries;
    tau: (E,). Returns loss (E,), losses, pred (rows of z), dz, dq (empty without fused_grad; rows
    no episode owns are zero), dtau (E,)."""
    st = _Setup(z, q, labels, precision, fused_grad, zero_outputs=True, batched=True)
    e, dev, dt = rows.shape[0], st.dev, st.dt
    (S,) = st.carve([max(s_total, 1)])
    loss, dtau = torch.empty(e, device=dev, dtype=dt), torch.empty(e, device=dev, dtype=dt)
    with _LAUNCHES:
        _episodes[(e,)](st.z, st.q, st.labels, rows.contiguous(), classes.contiguous(), s_off.contiguous(),
                        tau.to(device=dev, dtype=dt).contiguous(), st.zn, st.qn, st.znorm, st.qnorm, st.cnt, st.wsum, S,
                        st.R, st.L, st.pred, st.losses, loss, dtau, st.dz, st.dq, st.d, st.n, st.c, s_total,
                        FUSED=fused_grad, BN=st.bn, BC=st.bc, BD=st.bd, BI=max(st.bn, 16), ACC=st.acc, PREC=st.prec,
                        num_warps=st.warps)
    return loss, st.losses, st.pred, st.dz, st.dq, dtau if fused_grad else z.new_empty(0)
