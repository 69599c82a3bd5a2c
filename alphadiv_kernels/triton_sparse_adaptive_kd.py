"""Triton kernels of the sparse-teacher adaptive KD op (`fused_sparse_adaptive_kd`, `backend="triton"`).

Two launches (math: csrc/sparse_adaptive_kd_math.h):
  1. `_mark_topk_kernel`, a program per row: sets the k teacher classes' bits in a [N, ceil(C / 32)] int32
     bitmap with atomic ORs; an index outside [0, C), a class whose bit was already set (a duplicate), or a
     log-probability > 0 or NaN marks the row bad (its value and gradient become NaN: no host sync);
  2. `sparse_adaptive_kd_kernel`, a program per row, over blocks of columns with x = s / T:
     a. one sweep: the tail's (classes whose bit is clear) max and sum of exp, online
        (z <- z exp(m_old - m_new) + exp(x - m_new) per lane), and whether a logit is NaN or +inf;
     b. the k + 1 bins in registers, in fp64: lq_I = x_I - m - log Z with m = max(m_tail, max x_I) and
        Z = sum_I exp(x_I - m) + Z_tail exp(m_tail - m), lq_tail = m_tail - m + log(Z_tail / Z); the teacher's
        tail 1 - sum p_I; the statistics of both alphas, the selection, the value (the teacher's normaliser
        is inside its log-probabilities, so near-equal rows need log Z below fp32's rounding of ~log C);
     c. the gradient: G_tail exp(x_j - m_tail) / Z_tail at the tail's columns, then G_b at the k classes
        (disjoint stores: no ordering between them is needed).
Like the dense Triton kernel it uses only tl.exp / tl.log (no libdevice), so it runs under TRITON_INTERPRET=1
on CPU tensors, which is how it is tested without a GPU.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from ._constants import REDUCTION_NONE, branch_code
from ._validation import check_loss_parameters
from .triton_adaptive_kd import launch_outputs

try:
    import triton
    import triton.language as tl
except ImportError:  # the op then has no Triton backend
    triton = None

MAX_BLOCK = 4096  # columns per step
MAX_TOPK = 4096   # the k + 1 bins of a row live in registers


def available(device: torch.device) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under its interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    from .triton_adaptive_kd import FORWARD_KL, REVERSE_KL, _divergence, _expm1

    @triton.jit
    def _mark_topk_kernel(IDX, LP, BITMAP, BAD, i_stride_row, i_stride_col, l_stride_row, l_stride_col, K, C, WORDS,
                          BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = tl.arange(0, BLOCK_K)
        in_k = b < K
        j = tl.load(IDX + row * i_stride_row + b * i_stride_col, mask=in_k, other=0).to(tl.int64)
        lp = tl.load(LP + row * l_stride_row + b * l_stride_col, mask=in_k, other=float("-inf")).to(tl.float32)
        in_range = (j >= 0) & (j < C)
        bit = (j % 32).to(tl.int32)
        old = tl.atomic_or(BITMAP + row * WORDS + j // 32, tl.full([BLOCK_K], 1, tl.int32) << bit,
                           mask=in_k & in_range)
        duplicate = ((old >> bit) & 1) != 0
        bad = in_k & ((~in_range) | duplicate | (lp > 0.0) | (lp != lp))
        tl.store(BAD + row, tl.max(bad.to(tl.int32), axis=0))

    @triton.jit
    def _bin_terms(lq, lp, alpha, log_clip, BRANCH: tl.constexpr):
        """(term of the statistic S, term of the surrogate, q) of bins (csrc/sparse_adaptive_kd_math.h)."""
        q = tl.exp(lq)
        if BRANCH == FORWARD_KL:
            p = tl.exp(lp)
            return tl.where(p == 0.0, 0.0, p * (lp - lq)), tl.where(p == 0.0, 0.0, -p * lq), q
        if BRANCH == REVERSE_KL:
            log_c = tl.minimum(lp - lq, log_clip)
            return tl.where(q == 0.0, 0.0, q * log_c), tl.where(q == 0.0, 0.0, -q * (log_c - 1.0) * lq), q
        c_minus_one = _expm1(tl.minimum(alpha * (lp - lq), log_clip))
        rho = (c_minus_one + 1.0) / alpha + 1.0 / (alpha * (alpha - 1.0))
        return tl.where(q == 0.0, 0.0, q * c_minus_one), tl.where(q == 0.0, 0.0, -q * rho * lq), q

    @triton.jit
    def _bin_gradient(lq, lp, statistic, alpha, log_clip, BRANCH: tl.constexpr):
        q = tl.exp(lq)
        if BRANCH == FORWARD_KL:
            return q - tl.exp(lp)
        if BRANCH == REVERSE_KL:
            return tl.where(q == 0.0, 0.0, q * (statistic - tl.minimum(lp - lq, log_clip)))
        return tl.where(q == 0.0, 0.0, q / alpha * (statistic - _expm1(tl.minimum(alpha * (lp - lq), log_clip))))

    @triton.jit
    def _branch_over_bins(lq, lp, in_k, lq_tail, lp_tail, alpha, log_clip, BRANCH: tl.constexpr):
        """(statistic, divergence, surrogate) of one alpha over the k classes and the tail."""
        stat, surrogate, _ = _bin_terms(lq, lp, alpha, log_clip, BRANCH)
        stat_tail, surrogate_tail, _ = _bin_terms(lq_tail, lp_tail, alpha, log_clip, BRANCH)
        statistic = tl.sum(tl.where(in_k, stat, 0.0), axis=0) + stat_tail
        surrogate_sum = tl.sum(tl.where(in_k, surrogate, 0.0), axis=0) + surrogate_tail
        return statistic, _divergence(statistic, alpha, BRANCH), surrogate_sum

    @triton.jit
    def _tail_logits(S, BITMAP, row, s_stride_row, s_stride_col, cols, valid, WORDS, inv_t):
        """x = s / T of a block of columns, and the same with the k classes at -inf."""
        x = tl.load(S + row * s_stride_row + cols * s_stride_col, mask=valid, other=float("-inf")).to(tl.float32)
        x = x * inv_t
        word = tl.load(BITMAP + row * WORDS + cols // 32, mask=valid, other=0)
        in_topk = ((word >> (cols % 32).to(tl.int32)) & 1) != 0
        return x, tl.where(in_topk, float("-inf"), x), in_topk

    @triton.jit
    def sparse_adaptive_kd_kernel(S, IDX, LP, G, ROW_VALUES, MASK, BITMAP, BAD, DEVICE_ROW_WEIGHT, s_stride_row,
                                  s_stride_col, i_stride_row, i_stride_col, l_stride_row, l_stride_col, C, K, WORDS,
                                  inv_t, temperature, t_squared, row_weight, alpha_lo, alpha_hi, log_clip,
                                  BRANCH_LO: tl.constexpr, BRANCH_HI: tl.constexpr, SAME_ALPHA: tl.constexpr,
                                  HAS_MASK: tl.constexpr, HAS_DEVICE_ROW_WEIGHT: tl.constexpr,
                                  COMPUTE_GRAD: tl.constexpr, SURROGATE: tl.constexpr, TAIL_EMPTY: tl.constexpr,
                                  BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        b = tl.arange(0, BLOCK_K)
        in_k = b < K
        weight = row_weight
        if HAS_DEVICE_ROW_WEIGHT:
            weight = tl.load(DEVICE_ROW_WEIGHT).to(tl.float32)
        lp = tl.load(LP + row * l_stride_row + b * l_stride_col, mask=in_k, other=float("-inf")).to(tl.float32)
        lp_max = tl.max(lp, axis=0)
        bad = tl.load(BAD + row) != 0
        has_teacher = (lp_max > float("-inf")) | bad  # a row without a teacher is 0, like a masked one
        if HAS_MASK:
            has_teacher = has_teacher & (tl.load(MASK + row) != 0)
        if has_teacher:
            j = tl.load(IDX + row * i_stride_row + b * i_stride_col, mask=in_k, other=0).to(tl.int64)
            in_range = in_k & (j >= 0) & (j < C)
            x_topk = tl.load(S + row * s_stride_row + j * s_stride_col, mask=in_range,
                             other=float("-inf")).to(tl.float32) * inv_t
            # a: the tail's max and sum (online), the row's bad logits
            run_max = tl.full([BLOCK], float("-inf"), tl.float32)
            run_sum = tl.zeros([BLOCK], dtype=tl.float32)
            nonfinite = tl.zeros([BLOCK], dtype=tl.int32)
            any_finite = tl.zeros([BLOCK], dtype=tl.int32)
            for start in range(0, C, BLOCK):
                cols = start + offsets
                valid = cols < C
                x, x_tail, _ = _tail_logits(S, BITMAP, row, s_stride_row, s_stride_col, cols, valid, WORDS, inv_t)
                nonfinite |= ((x != x) | (x == float("inf"))).to(tl.int32)
                any_finite |= (x > float("-inf")).to(tl.int32)
                new_max = tl.maximum(run_max, x_tail)
                seen = new_max > float("-inf")
                run_sum = tl.where(seen, run_sum * tl.exp(run_max - new_max) + tl.exp(x_tail - new_max), 0.0)
                run_max = new_max
            max_tail = tl.max(run_max, axis=0)
            has_tail = max_tail > float("-inf")
            z_tail = tl.sum(tl.where(run_max > float("-inf"), run_sum * tl.exp(run_max - max_tail), 0.0), axis=0)
            bad = bad | (tl.max(nonfinite, axis=0) != 0) | (tl.max(any_finite, axis=0) == 0)
            if bad:  # bad teacher entries, NaN or +inf logits, or every class at -inf
                tl.store(ROW_VALUES + row, float("nan"))
                if COMPUTE_GRAD:
                    _fill_row(G, row, C, float("nan"), BLOCK)
            else:
                # b: the bins (fp64)
                x_bins = x_topk.to(tl.float64)
                row_max = tl.maximum(max_tail.to(tl.float64), tl.max(x_bins, axis=0))
                z = tl.sum(tl.where(in_range, tl.exp(x_bins - row_max), 0.0), axis=0)
                z += tl.where(has_tail, z_tail.to(tl.float64) * tl.exp(max_tail.to(tl.float64) - row_max), 0.0)
                lq = x_bins - row_max - tl.log(z)
                lq_tail = tl.where(has_tail, max_tail.to(tl.float64) - row_max + tl.log(z_tail.to(tl.float64) / z),
                                   float("-inf"))
                lp_bins = lp.to(tl.float64)
                p_tail = tl.maximum(1.0 - tl.sum(tl.where(in_k, tl.exp(lp_bins), 0.0), axis=0), 0.0)
                if TAIL_EMPTY:
                    p_tail = 0.0 * p_tail
                lp_tail = tl.log(p_tail)
                stat_lo, d_lo, sur_lo = _branch_over_bins(lq, lp_bins, in_k, lq_tail, lp_tail, alpha_lo, log_clip,
                                                          BRANCH_LO)
                stat_hi, d_hi, sur_hi = stat_lo, d_lo, sur_lo
                if not SAME_ALPHA:
                    stat_hi, d_hi, sur_hi = _branch_over_bins(lq, lp_bins, in_k, lq_tail, lp_tail, alpha_hi, log_clip,
                                                              BRANCH_HI)
                use_lo = d_lo > d_hi  # strict, as in AlphaNet
                value = tl.where(use_lo, d_lo, d_hi)
                if SURROGATE:
                    value = tl.where(use_lo, sur_lo, sur_hi)
                tl.store(ROW_VALUES + row, value.to(tl.float32) * t_squared * weight)
                # c: the gradient, scaled by T and the reduction's row weight
                if COMPUTE_GRAD:
                    scale = weight * temperature
                    if use_lo:
                        grad_topk = _bin_gradient(lq, lp_bins, stat_lo, alpha_lo, log_clip, BRANCH_LO)
                        grad_tail = _bin_gradient(lq_tail, lp_tail, stat_lo, alpha_lo, log_clip, BRANCH_LO)
                    else:
                        grad_topk = _bin_gradient(lq, lp_bins, stat_hi, alpha_hi, log_clip, BRANCH_HI)
                        grad_tail = _bin_gradient(lq_tail, lp_tail, stat_hi, alpha_hi, log_clip, BRANCH_HI)
                    tail_factor = tl.where(has_tail, grad_tail.to(tl.float32) / z_tail, 0.0) * scale
                    for start in range(0, C, BLOCK):
                        cols = start + offsets
                        valid = cols < C
                        _, x_tail, in_topk = _tail_logits(S, BITMAP, row, s_stride_row, s_stride_col, cols, valid,
                                                          WORDS, inv_t)
                        grad = tl.where(has_tail, tl.exp(x_tail - max_tail), 0.0) * tail_factor
                        tl.store(G + row * C + cols, grad.to(G.dtype.element_ty), mask=valid & ~in_topk)
                    # without a tail class the tail bin's gradient stays with the k classes (sparse math header)
                    grad_topk += tl.where(has_tail, 0.0, tl.exp(lq) * grad_tail)
                    tl.store(G + row * C + j, (grad_topk.to(tl.float32) * scale).to(G.dtype.element_ty), mask=in_range)
        else:
            tl.store(ROW_VALUES + row, 0.0)
            if COMPUTE_GRAD:
                _fill_row(G, row, C, 0.0, BLOCK)

    @triton.jit
    def _fill_row(G, row, C, fill, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        for start in range(0, C, BLOCK):
            cols = start + offsets
            tl.store(G + row * C + cols, tl.full([BLOCK], fill, tl.float32).to(G.dtype.element_ty), mask=cols < C)


def sparse_adaptive_kd_triton(student: torch.Tensor, topk_indices: torch.Tensor, topk_logprobs: torch.Tensor,
                              mask: Optional[torch.Tensor], alpha_min: float, alpha_max: float, clip: float,
                              temperature: float, reduction: int, surrogate: bool,
                              compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The launcher: the contract of the C++ op alphadiv::sparse_adaptive_kd ([N, C], [N, k], [N, k])."""
    if student.dim() != 2 or topk_indices.dim() != 2 or topk_indices.shape != topk_logprobs.shape or \
            topk_indices.shape[0] != student.shape[0]:
        raise ValueError(f"alphadiv::sparse_adaptive_kd_triton expects [N, C] logits and [N, k] indices and "
                         f"log-probabilities, got {list(student.shape)}, {list(topk_indices.shape)} and "
                         f"{list(topk_logprobs.shape)}")
    rows, cols = student.shape
    k = topk_indices.shape[1]
    if not 1 <= k <= min(cols, MAX_TOPK):
        raise ValueError(f"the Triton backend takes 1 <= k <= min(C, {MAX_TOPK}) teacher classes, got k = {k}")
    check_loss_parameters(alpha_min, alpha_max, clip, temperature)
    value_dtype, row_values, grad, row_weight, device_row_weight = launch_outputs(student, topk_logprobs.dtype, mask,
                                                                                  reduction, compute_grad)
    if rows > 0:
        words = (cols + 31) // 32
        bitmap = torch.zeros(rows, words, device=student.device, dtype=torch.int32)
        bad = torch.empty(rows, device=student.device, dtype=torch.int32)
        block_k = triton.next_power_of_2(k)
        _mark_topk_kernel[(rows,)](topk_indices, topk_logprobs, bitmap, bad, topk_indices.stride(0),
                                   topk_indices.stride(1), topk_logprobs.stride(0), topk_logprobs.stride(1), k, cols,
                                   words, BLOCK_K=block_k)
        block = min(triton.next_power_of_2(cols), MAX_BLOCK)
        branch_lo, branch_hi = branch_code(alpha_min), branch_code(alpha_max)
        sparse_adaptive_kd_kernel[(rows,)](
            student, topk_indices, topk_logprobs, grad, row_values, mask if mask is not None else row_values, bitmap,
            bad, device_row_weight if device_row_weight is not None else row_values, student.stride(0),
            student.stride(1), topk_indices.stride(0), topk_indices.stride(1), topk_logprobs.stride(0),
            topk_logprobs.stride(1), cols, k, words, 1.0 / temperature, float(temperature),
            temperature * temperature, row_weight, float(alpha_min), float(alpha_max), math.log(clip),
            BRANCH_LO=branch_lo, BRANCH_HI=branch_hi, SAME_ALPHA=alpha_min == alpha_max, HAS_MASK=mask is not None,
            HAS_DEVICE_ROW_WEIGHT=device_row_weight is not None, COMPUTE_GRAD=compute_grad, SURROGATE=surrogate,
            TAIL_EMPTY=k == cols, BLOCK=block, BLOCK_K=block_k, num_warps=4 if block <= 2048 else 8)
    if reduction == REDUCTION_NONE:
        return row_values.to(value_dtype), grad
    return row_values.sum().to(value_dtype), grad
