"""Triton kernel of the adaptive alpha-divergence KD op (`backend="triton"`).

One program per row, looping over blocks of columns (math: csrc/adaptive_kd_math.h), with
xs = s/T - max, xt = t/T - max:
  1. the row maxima of s/T and t/T;
  2. Z_s = sum exp(xs), Z_t = sum exp(xt), and sum exp(xt) (xt - xs), which gives forward KL as
     sum p log w = (1/Z_t) sum exp(xt)(xt - xs) + log(Z_s / Z_t);
  3. the statistics of the alphas that are not forward KL (R = sum q log c, or B = sum q (c - 1)),
     both in one sweep;
  4. the selected branch's gradient, scaled for the reduction and written once in the student's
     dtype, and the surrogate value when asked for.
A row of up to 16384 columns is one block: it is read once and the sweeps run on registers. Longer
rows are streamed in blocks of 4096 columns and re-read in each sweep (from L2). The kernel
uses only tl.exp / tl.log (no libdevice) so it also runs under TRITON_INTERPRET=1 on CPU tensors,
which is how it is tested without a GPU.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from ._constants import (BRANCH_FORWARD_KL, BRANCH_NEG_ONE, BRANCH_REVERSE_KL, REDUCTION_MEAN, REDUCTION_NONE,
                         branch_code)
from ._validation import check_op_arguments

try:
    import triton
    import triton.language as tl
except ImportError:  # the op then has no Triton backend
    triton = None

MAX_STREAMED_BLOCK = 4096   # columns per step when a row is longer than one block
MAX_SINGLE_BLOCK = 16384    # rows up to this many columns are read once and kept in registers


def available(device: torch.device) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under its interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    # The branch codes as compile-time constants (a jitted function reads no other kind of global)
    FORWARD_KL = tl.constexpr(BRANCH_FORWARD_KL)
    REVERSE_KL = tl.constexpr(BRANCH_REVERSE_KL)
    NEG_ONE = tl.constexpr(BRANCH_NEG_ONE)

    @triton.jit
    def _expm1(x):
        # exp(x) - 1 to a few ulps without libdevice (Kahan): (u - 1) x / log u with u = exp(x) cancels
        # the rounding of u; u == 1 means |x| is below half an ulp, and u == 0 means x = -inf.
        u = tl.exp(x)
        u_minus_one = u - 1.0
        return tl.where(u == 1.0, x, tl.where(u_minus_one == -1.0, -1.0, u_minus_one * x / tl.log(u)))

    @triton.jit
    def _clipped_weight(xs, xt, es, et, log_ratio, zt_over_zs, alpha, clip, log_clip, BRANCH: tl.constexpr):
        # c - 1 (General, NegOne) or log c (ReverseKL) of one block
        if BRANCH == NEG_ONE:
            return tl.minimum(es / et * zt_over_zs, clip) - 1.0
        log_w = (xt - xs) + log_ratio
        if BRANCH == REVERSE_KL:
            return tl.minimum(log_w, log_clip)
        return _expm1(tl.minimum(log_w * alpha, log_clip))

    @triton.jit
    def _load_row_block(row, cols, valid, stride, inv_t, cached, SINGLE_BLOCK: tl.constexpr):
        # s/T (or t/T) of one block of columns: from the registers when the whole row is one block
        if SINGLE_BLOCK:
            return cached
        return tl.load(row + cols * stride, mask=valid, other=float("-inf")).to(tl.float32) * inv_t

    @triton.jit
    def _shifted_logits(s_row, t_row, cols, valid, s_col, t_col, inv_t, cached_s, cached_t, max_s, max_t,
                        SINGLE_BLOCK: tl.constexpr):
        # xs = s/T - max_s and xt = t/T - max_t of one block of columns
        xs = _load_row_block(s_row, cols, valid, s_col, inv_t, cached_s, SINGLE_BLOCK) - max_s
        xt = _load_row_block(t_row, cols, valid, t_col, inv_t, cached_t, SINGLE_BLOCK) - max_t
        return xs, xt

    @triton.jit
    def _alpha_statistics(s_row, t_row, s_col, t_col, C, inv_t, cached_s, cached_t, max_s, max_t, log_ratio,
                          zt_over_zs, inv_zs, forward_kl, alpha_lo, alpha_hi, clip, log_clip,
                          BRANCH_LO: tl.constexpr, BRANCH_HI: tl.constexpr, NEED_LO: tl.constexpr,
                          NEED_HI: tl.constexpr, SINGLE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
        # R or B of both alphas that need one, in one sweep; forward_kl stands for an alpha that doesn't
        total_lo = tl.zeros([BLOCK], dtype=tl.float32)
        total_hi = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < C
            xs, xt = _shifted_logits(s_row, t_row, cols, valid, s_col, t_col, inv_t, cached_s, cached_t, max_s,
                                     max_t, SINGLE_BLOCK)
            es, et = tl.exp(xs), tl.exp(xt)
            if NEED_LO:
                w = _clipped_weight(xs, xt, es, et, log_ratio, zt_over_zs, alpha_lo, clip, log_clip, BRANCH_LO)
                total_lo += tl.where(es == 0.0, 0.0, es * w)
            if NEED_HI:
                w = _clipped_weight(xs, xt, es, et, log_ratio, zt_over_zs, alpha_hi, clip, log_clip, BRANCH_HI)
                total_hi += tl.where(es == 0.0, 0.0, es * w)
        stat_lo = forward_kl
        stat_hi = forward_kl
        if NEED_LO:
            stat_lo = tl.sum(total_lo, axis=0) * inv_zs
        if NEED_HI:
            stat_hi = tl.sum(total_hi, axis=0) * inv_zs
        return stat_lo, stat_hi

    @triton.jit
    def _divergence(statistic, alpha, BRANCH: tl.constexpr):
        if BRANCH == FORWARD_KL:
            return statistic
        if BRANCH == REVERSE_KL:
            return -statistic
        return statistic / (alpha * (alpha - 1.0))

    @triton.jit
    def adaptive_kd_kernel(S, T, G, ROW_VALUES, MASK, DEVICE_ROW_WEIGHT, s_stride_row, s_stride_col, t_stride_row,
                           t_stride_col, C, inv_t, temperature, t_squared, row_weight, alpha_lo, alpha_hi, clip,
                           log_clip, BRANCH_LO: tl.constexpr, BRANCH_HI: tl.constexpr, SAME_ALPHA: tl.constexpr,
                           NEED_LO: tl.constexpr, NEED_HI: tl.constexpr, HAS_MASK: tl.constexpr,
                           HAS_DEVICE_ROW_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SURROGATE: tl.constexpr,
                           SINGLE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_row = S + row * s_stride_row
        t_row = T + row * t_stride_row
        keep = True
        if HAS_MASK:
            keep = tl.load(MASK + row) != 0
        offsets = tl.arange(0, BLOCK)
        weight = row_weight
        if HAS_DEVICE_ROW_WEIGHT:
            weight = tl.load(DEVICE_ROW_WEIGHT).to(tl.float32)
        if keep:
            # a row of one block is read once and kept in registers for every sweep
            cached_s = tl.zeros([BLOCK], dtype=tl.float32)
            cached_t = tl.zeros([BLOCK], dtype=tl.float32)
            if SINGLE_BLOCK:
                cached_s = tl.load(s_row + offsets * s_stride_col, mask=offsets < C,
                                   other=float("-inf")).to(tl.float32) * inv_t
                cached_t = tl.load(t_row + offsets * t_stride_col, mask=offsets < C,
                                   other=float("-inf")).to(tl.float32) * inv_t
            # sweep 1: maxima
            run_s = tl.full([BLOCK], float("-inf"), tl.float32)
            run_t = tl.full([BLOCK], float("-inf"), tl.float32)
            for start in range(0, C, BLOCK):
                cols = start + offsets
                valid = cols < C
                run_s = tl.maximum(run_s, _load_row_block(s_row, cols, valid, s_stride_col, inv_t, cached_s,
                                                          SINGLE_BLOCK))
                run_t = tl.maximum(run_t, _load_row_block(t_row, cols, valid, t_stride_col, inv_t, cached_t,
                                                          SINGLE_BLOCK))
            max_s = tl.max(run_s, axis=0)
            max_t = tl.max(run_t, axis=0)
            # sweep 2: normalisers and the forward-KL sum
            sum_s = tl.zeros([BLOCK], dtype=tl.float32)
            sum_t = tl.zeros([BLOCK], dtype=tl.float32)
            sum_kl = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, C, BLOCK):
                cols = start + offsets
                valid = cols < C
                xs, xt = _shifted_logits(s_row, t_row, cols, valid, s_stride_col, t_stride_col, inv_t, cached_s,
                                         cached_t, max_s, max_t, SINGLE_BLOCK)
                es, et = tl.exp(xs), tl.exp(xt)
                sum_s += es
                sum_t += et
                sum_kl += tl.where(et == 0.0, 0.0, et * (xt - xs))
            zs = tl.sum(sum_s, axis=0)
            zt = tl.sum(sum_t, axis=0)
            log_zs = tl.log(zs)
            log_ratio = tl.log(zs / zt)  # not log zs - log zt: both ~log C, their rounding would dominate
            zt_over_zs = zt / zs
            forward_kl = tl.sum(sum_kl, axis=0) / zt + log_ratio
            # sweep 3: the statistics of the alphas that are not forward KL
            stat_lo = forward_kl
            stat_hi = forward_kl
            if NEED_LO or NEED_HI:
                stat_lo, stat_hi = _alpha_statistics(
                    s_row, t_row, s_stride_col, t_stride_col, C, inv_t, cached_s, cached_t, max_s, max_t, log_ratio,
                    zt_over_zs, 1.0 / zs, forward_kl, alpha_lo, alpha_hi, clip, log_clip, BRANCH_LO, BRANCH_HI,
                    NEED_LO, NEED_HI, SINGLE_BLOCK, BLOCK)
            if SAME_ALPHA:
                stat_hi = stat_lo
            d_lo = _divergence(stat_lo, alpha_lo, BRANCH_LO)
            d_hi = _divergence(stat_hi, alpha_hi, BRANCH_HI)
            use_lo = d_lo > d_hi  # strict, as in AlphaNet
            value = tl.where(use_lo, d_lo, d_hi)
            # sweep 4: gradient (and surrogate) of the chosen branch
            if COMPUTE_GRAD or SURROGATE:
                scale = weight * temperature
                surrogate = tl.zeros([BLOCK], dtype=tl.float32)
                stat = tl.where(use_lo, stat_lo, stat_hi)
                for start in range(0, C, BLOCK):
                    cols = start + offsets
                    valid = cols < C
                    xs, xt = _shifted_logits(s_row, t_row, cols, valid, s_stride_col, t_stride_col, inv_t, cached_s,
                                             cached_t, max_s, max_t, SINGLE_BLOCK)
                    es, et = tl.exp(xs), tl.exp(xt)
                    q, p = es / zs, et / zt
                    if use_lo:
                        grad, q_rho, seen = _branch_gradient(xs, xt, es, et, q, p, stat, log_ratio, zt_over_zs,
                                                             alpha_lo, clip, log_clip, BRANCH_LO)
                    else:
                        grad, q_rho, seen = _branch_gradient(xs, xt, es, et, q, p, stat, log_ratio, zt_over_zs,
                                                             alpha_hi, clip, log_clip, BRANCH_HI)
                    if COMPUTE_GRAD:
                        tl.store(G + row * C + cols, (grad * scale).to(G.dtype.element_ty), mask=valid)
                    if SURROGATE:
                        surrogate += tl.where(seen == 0.0, 0.0, -q_rho * (xs - log_zs))
                if SURROGATE:
                    value = tl.sum(surrogate, axis=0)
            tl.store(ROW_VALUES + row, value * t_squared * weight)
        else:
            tl.store(ROW_VALUES + row, 0.0)
            if COMPUTE_GRAD:
                for start in range(0, C, BLOCK):
                    cols = start + offsets
                    tl.store(G + row * C + cols, tl.zeros([BLOCK], dtype=tl.float32).to(G.dtype.element_ty),
                             mask=cols < C)

    @triton.jit
    def _branch_gradient(xs, xt, es, et, q, p, stat, log_ratio, zt_over_zs, alpha, clip, log_clip,
                         BRANCH: tl.constexpr):
        """(d D / d s, q * rho of the surrogate, the probability whose zeros void a term)."""
        if BRANCH == FORWARD_KL:
            return q - p, p, p
        w = _clipped_weight(xs, xt, es, et, log_ratio, zt_over_zs, alpha, clip, log_clip, BRANCH)
        if BRANCH == REVERSE_KL:
            return tl.where(q == 0.0, 0.0, q * (stat - w)), q * (w - 1.0), q
        grad = tl.where(q == 0.0, 0.0, q * (stat - w) / alpha)
        return grad, q * ((w + 1.0) / alpha + 1.0 / (alpha * (alpha - 1.0))), q


def launch_outputs(student: torch.Tensor, teacher_dtype: torch.dtype, mask: Optional[torch.Tensor], reduction: int,
                   compute_grad: bool):
    """(value dtype, fp32 row values, the gradient, the host row weight, the device row weight or None) of a
    Triton launch. Every row's value and gradient carry the row weight: 1 / valid rows for a mean (a mean over no
    rows is 0), else 1, so a reduced loss is one sum; a masked mean's weight stays on the device (no sync)."""
    rows, cols = student.shape
    value_dtype = torch.promote_types(student.dtype, teacher_dtype)
    if value_dtype == torch.float64:
        raise TypeError("the Triton backend computes in fp32; use backend='cpu' or 'reference' for float64")
    row_values = torch.empty(rows, device=student.device, dtype=torch.float32)
    grad = torch.empty((rows, cols) if compute_grad else (0,), device=student.device, dtype=student.dtype)
    row_weight = 1.0 / rows if reduction == REDUCTION_MEAN and rows > 0 else 1.0
    device_row_weight = None
    if reduction == REDUCTION_MEAN and mask is not None:
        device_row_weight = mask.sum().clamp(min=1).reciprocal().to(torch.float32).reshape(1)
    return value_dtype, row_values, grad, row_weight, device_row_weight


def adaptive_kd_triton(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor], alpha_min: float,
                       alpha_max: float, clip: float, temperature: float, reduction: int, surrogate: bool,
                       compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The launcher: same contract and argument checks as the C++ op alphadiv::adaptive_kd ([N, C] inputs)."""
    check_op_arguments(student, teacher, mask, alpha_min, alpha_max, clip, temperature, reduction)
    rows, cols = student.shape
    value_dtype, row_values, grad, row_weight, device_row_weight = launch_outputs(student, teacher.dtype, mask,
                                                                                  reduction, compute_grad)
    if rows > 0:
        branch_lo, branch_hi = branch_code(alpha_min), branch_code(alpha_max)
        single_block = cols <= MAX_SINGLE_BLOCK
        block = triton.next_power_of_2(cols) if single_block else MAX_STREAMED_BLOCK
        num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16  # <= 32 values of each input per thread
        adaptive_kd_kernel[(rows,)](
            student, teacher, grad, row_values, mask if mask is not None else row_values,
            device_row_weight if device_row_weight is not None else row_values,
            student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), cols,
            1.0 / temperature, float(temperature), temperature * temperature, row_weight, float(alpha_min),
            float(alpha_max), float(clip), math.log(clip), BRANCH_LO=branch_lo, BRANCH_HI=branch_hi,
            SAME_ALPHA=alpha_min == alpha_max, NEED_LO=branch_lo != BRANCH_FORWARD_KL,
            NEED_HI=branch_hi != BRANCH_FORWARD_KL and alpha_min != alpha_max, HAS_MASK=mask is not None,
            HAS_DEVICE_ROW_WEIGHT=device_row_weight is not None, COMPUTE_GRAD=compute_grad, SURROGATE=surrogate,
            SINGLE_BLOCK=single_block, BLOCK=block, num_warps=num_warps)
    if reduction == REDUCTION_NONE:
        return row_values.to(value_dtype), grad
    return row_values.sum().to(value_dtype), grad
