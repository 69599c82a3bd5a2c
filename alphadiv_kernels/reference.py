"""Eager PyTorch versions of the loss.

`adaptive_kd_reference` is the executable spec of `fused_adaptive_kd` (same arguments, same value,
same gradient; log space throughout). `alphanet_adaptive_loss_soft` is the loss exactly as the
AlphaNet reference code computes it (probability ratios, returns the surrogate mean): it is what
the `value="surrogate"` mode reproduces, and the eager baseline of the benchmarks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._validation import validate_kd_arguments

ALPHA_LIMIT_TOLERANCE = 1e-3  # |alpha - 1| or |alpha| below this selects the KL limit


def _branch(lq: torch.Tensor, lp: torch.Tensor, alpha: float, clip: float):
    """Divergence, surrogate and q*rho of one alpha for each row (no gradient through p or rho)."""
    q, p = lq.detach().exp(), lp.exp()
    lw = lp - lq.detach()  # log importance ratio log(p / q)
    if abs(alpha - 1.0) < ALPHA_LIMIT_TOLERANCE:  # forward KL, no clip
        seen = p
        divergence_terms = p * lw
        q_rho = p  # q * rho with rho = w
    elif abs(alpha) < ALPHA_LIMIT_TOLERANCE:  # reverse KL, clip on w
        seen = q
        log_c = lw.clamp(max=math.log(clip))
        divergence_terms = -q * log_c
        q_rho = q * (log_c - 1.0)
    else:  # general alpha, clip on w^alpha
        seen = q
        c_minus_one = torch.expm1((alpha * lw).clamp(max=math.log(clip)))
        divergence_terms = q * c_minus_one / (alpha * (alpha - 1.0))
        q_rho = q * ((c_minus_one + 1.0) / alpha + 1.0 / (alpha * (alpha - 1.0)))
    # Classes the weighting distribution gives no mass contribute exactly 0 (their terms may be
    # 0 * inf or NaN); zeroing both factors keeps NaN out of the backward too.
    unseen = seen == 0
    divergence = torch.where(unseen, 0.0, divergence_terms).sum(-1)
    q_rho = torch.where(unseen, 0.0, q_rho).detach()
    # d/ds_j of -sum_i q_rho_i * lq_i (q_rho held fixed) is the clipped gradient of Eq. 5.
    surrogate = -(q_rho * torch.where(unseen, 0.0, lq)).sum(-1)
    return divergence, surrogate


def adaptive_kd_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    clip: float = 5.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    value: str = "divergence",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Readable eager implementation of the adaptive alpha-divergence KD loss.

    Arguments and semantics are those of :func:`alphadiv_kernels.fused_adaptive_kd`. Half-precision
    inputs are computed in float32; the result has the promoted dtype of the two inputs and the
    gradient reaches the student only.
    """
    args = validate_kd_arguments(
        student_logits, teacher_logits, alpha_min=alpha_min, alpha_max=alpha_max, clip=clip,
        temperature=temperature, reduction=reduction, value=value, mask=mask,
    )
    out_dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    lq = F.log_softmax(args.student.to(compute_dtype) / temperature, dim=-1)
    lp = F.log_softmax(args.teacher.detach().to(compute_dtype) / temperature, dim=-1)

    d_min, s_min = _branch(lq, lp, alpha_min, clip)
    d_max, s_max = _branch(lq, lp, alpha_max, clip)
    use_min = d_min > d_max  # strict: ties (e.g. p == q) take alpha_max, as in AlphaNet
    surrogate = torch.where(use_min, s_min, s_max)
    row_value = surrogate.detach() if args.surrogate else torch.where(use_min, d_min, d_max)
    # Value of the chosen mode, gradient of the surrogate; T^2 keeps gradients T-independent (Hinton).
    rows = temperature**2 * (row_value + surrogate - surrogate.detach())

    if args.mask is not None:
        rows = torch.where(args.mask, rows, 0.0)
    if args.reduction == 0:
        return rows.reshape(args.leading_shape).to(out_dtype)
    total = rows.sum()
    if args.reduction == 1:
        count = args.mask.sum() if args.mask is not None else torch.tensor(rows.shape[0])
        total = total / count.clamp(min=1)  # a mean over no rows is 0
    return total.to(out_dtype)


def alphanet_adaptive_loss_soft(
    output: torch.Tensor, target: torch.Tensor, alpha_min: float = -1.0, alpha_max: float = 1.0, iw_clip: float = 5.0
) -> torch.Tensor:
    """AlphaNet's `AdaptiveLossSoft(alpha_min, alpha_max, iw_clip)(output, target)`, line for line.

    Student first, teacher second. Returns the mean surrogate; NaN when a student probability
    underflows (the ratio p / q becomes inf).
    """

    def f_divergence(q_logits, p_logits, alpha):
        q_prob = F.softmax(q_logits, dim=1).detach()
        p_prob = F.softmax(p_logits, dim=1).detach()
        q_log_prob = F.log_softmax(q_logits, dim=1)  # gradient only flows here
        importance_ratio = p_prob / q_prob
        if abs(alpha) < 1e-3:
            importance_ratio = importance_ratio.clamp(0, iw_clip)
            f = -importance_ratio.log()
            f_base = 0
            rho_f = importance_ratio.log() - 1.0
        elif abs(alpha - 1.0) < 1e-3:
            f = importance_ratio * importance_ratio.log()
            f_base = 0
            rho_f = importance_ratio
        else:
            iw_alpha = torch.pow(importance_ratio, alpha)
            iw_alpha = iw_alpha.clamp(0, iw_clip)
            f = iw_alpha / alpha / (alpha - 1.0)
            f_base = 1.0 / alpha / (alpha - 1.0)
            rho_f = iw_alpha / alpha + f_base
        loss = torch.sum(q_prob * (f - f_base), dim=1)
        grad_loss = -torch.sum(q_prob * rho_f * q_log_prob, dim=1)
        return loss, grad_loss

    target = target.detach()
    loss_left, grad_loss_left = f_divergence(output, target, alpha_min)
    loss_right, grad_loss_right = f_divergence(output, target, alpha_max)
    ind = torch.gt(loss_left, loss_right).float()
    loss = ind * grad_loss_left + (1.0 - ind) * grad_loss_right
    return loss.mean()
