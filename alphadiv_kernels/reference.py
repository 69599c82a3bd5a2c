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

from ._constants import BRANCH_FORWARD_KL, BRANCH_REVERSE_KL, REDUCTION_MEAN, REDUCTION_NONE, branch_code
from ._validation import validate_kd_arguments, validate_sparse_arguments as _validate_sparse_arguments


def _branch(lq: torch.Tensor, lp: torch.Tensor, alpha: float, clip: float):
    """Divergence, surrogate and gradient (wrt the logits / T) of one alpha for each row.

    Classes that the branch's weighting distribution (p for forward KL, q otherwise) gives no mass
    contribute exactly 0 to the sums (their terms may be 0 * inf or NaN); in the alpha branches their
    gradient is 0 too (it carries the factor q)."""
    q, p = lq.exp(), lp.exp()
    lw = lp - lq  # log importance ratio log(p / q), never formed as p / q
    branch = branch_code(alpha)
    if branch == BRANCH_FORWARD_KL:  # no clip
        unseen = p == 0
        divergence_terms, q_rho = p * lw, p  # q * rho with rho = w
        gradient = q - p
    elif branch == BRANCH_REVERSE_KL:  # clip on w
        unseen = q == 0
        log_c = lw.clamp(max=math.log(clip))
        divergence_terms, q_rho = -q * log_c, q * (log_c - 1.0)
        gradient = (q * ((q * log_c).where(~unseen, 0.0).sum(-1, keepdim=True) - log_c)).where(~unseen, 0.0)
    else:  # general alpha, clip on w^alpha
        unseen = q == 0
        c_minus_one = torch.expm1((alpha * lw).clamp(max=math.log(clip)))
        divergence_terms = q * c_minus_one / (alpha * (alpha - 1.0))
        q_rho = q * ((c_minus_one + 1.0) / alpha + 1.0 / (alpha * (alpha - 1.0)))
        total = (q * c_minus_one).where(~unseen, 0.0).sum(-1, keepdim=True)
        gradient = (q / alpha * (total - c_minus_one)).where(~unseen, 0.0)
    divergence = divergence_terms.where(~unseen, 0.0).sum(-1)
    surrogate = -(q_rho * lq).where(~unseen, 0.0).sum(-1)
    return divergence, surrogate, gradient


class _RowsWithGradient(torch.autograd.Function):
    """Per-row values whose gradient with respect to the student logits is given (the clipped gradient
    of Eq. 5 is not the gradient of the value). No second derivative: a backward with
    create_graph=True raises, as the fused op's."""

    @staticmethod
    def forward(ctx, rows, student, gradient):
        ctx.save_for_backward(gradient)
        return rows.clone()

    @staticmethod
    def backward(ctx, grad_rows):
        if torch.is_grad_enabled():
            raise RuntimeError("adaptive_kd_reference has no second derivative: backward with create_graph=True "
                               "(double backward, gradient penalties, Hessians) is not supported")
        (gradient,) = ctx.saved_tensors
        return None, gradient * grad_rows.unsqueeze(-1), None


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

    Arguments and semantics are those of :func:`alphadiv_kernels.fused_adaptive_kd`: each row's
    value and its gradient are written out as in the semantics table (docs/op.md). Half-precision
    inputs are computed in float32; the result has the promoted dtype of the two inputs and the
    gradient reaches the student only, in the student's dtype.
    """
    args = validate_kd_arguments(
        student_logits, teacher_logits, alpha_min=alpha_min, alpha_max=alpha_max, clip=clip,
        temperature=temperature, reduction=reduction, value=value, mask=mask,
    )
    out_dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    with torch.no_grad():
        lq = F.log_softmax(args.student.to(compute_dtype) / temperature, dim=-1)
        lp = F.log_softmax(args.teacher.to(compute_dtype) / temperature, dim=-1)
        d_min, s_min, g_min = _branch(lq, lp, alpha_min, clip)
        d_max, s_max, g_max = _branch(lq, lp, alpha_max, clip)
        use_min = d_min > d_max  # strict: ties (e.g. p == q) take alpha_max, as in AlphaNet
        rows = temperature**2 * (torch.where(use_min, s_min, s_max) if args.surrogate
                                 else torch.where(use_min, d_min, d_max))
        # d(T^2 D(s / T)) / ds = T * dD/d(s / T): Hinton's T^2 keeps gradients T-independent.
        gradient = temperature * torch.where(use_min[:, None], g_min, g_max)
        weight = torch.ones_like(rows)
        if args.mask is not None:
            weight = args.mask.to(rows.dtype)
        if args.reduction == REDUCTION_MEAN:
            weight = weight / weight.sum().clamp(min=1)  # a mean over no rows is 0
        # Masked rows: exactly 0 in value and gradient, even where their logits are NaN.
        keep = weight != 0
        rows = torch.where(keep, rows * weight, 0.0)
        gradient = torch.where(keep[:, None], gradient * weight[:, None], 0.0)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        student = student_logits.reshape(args.student.shape)
        rows = _RowsWithGradient.apply(rows, student, gradient.to(student_logits.dtype))
    if args.reduction == REDUCTION_NONE:
        return rows.reshape(args.leading_shape).to(out_dtype)
    return rows.sum().to(out_dtype)


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


def symmetric_kl_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """T^2 (KL(p || q) + KL(q || p)) = T^2 sum_j (p_j - q_j) (log p_j - log q_j) per row, written out in
    eager PyTorch and differentiated by autograd: the reference of :func:`symmetric_kl` (and the
    Table 3 "symmetric KL" KD of the paper). Classes at -inf in both logits contribute nothing."""
    args = validate_kd_arguments(student_logits, teacher_logits, alpha_min=1.0, alpha_max=1.0, clip=1.0,
                                 temperature=temperature, reduction=reduction, value="divergence", mask=mask)
    out_dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    lq = F.log_softmax(args.student.to(compute_dtype) / temperature, dim=-1)
    lp = F.log_softmax(args.teacher.detach().to(compute_dtype) / temperature, dim=-1)
    q, p = lq.exp(), lp.exp()
    # a class at -inf in the logits has log-probability -inf: 0 instead, so that the product and its gradient stay
    # finite (a probability that underflows keeps its finite log: its term is q (log q - log p), not q log q)
    rows = ((p - q) * (lp.where(torch.isfinite(lp), 0.0) - lq.where(torch.isfinite(lq), 0.0))).sum(-1) * temperature**2
    weight = torch.ones_like(rows) if args.mask is None else args.mask.to(rows.dtype)
    if args.reduction == REDUCTION_MEAN:
        weight = weight / weight.sum().clamp(min=1)
    rows = torch.where(weight != 0, rows * weight, 0.0)
    if args.reduction == REDUCTION_NONE:
        return rows.reshape(args.leading_shape).to(out_dtype)
    return rows.sum().to(out_dtype)


def sparse_teacher_bins(topk_logprobs: torch.Tensor, covers_every_class: bool) -> torch.Tensor:
    """The teacher's k + 1 bin log-probabilities ``[N, k + 1]``: its k cached log-probabilities and the tail,
    ``log max(0, 1 - sum exp(lp))`` (summed in float64; ``-inf``, an empty bin, when the k classes are all C)."""
    tail = (1.0 - topk_logprobs.to(torch.float64).exp().sum(-1)).clamp(min=0.0)
    if covers_every_class:
        tail = torch.zeros_like(tail)
    return torch.cat([topk_logprobs, tail.log().to(topk_logprobs.dtype).unsqueeze(-1)], dim=-1)


def check_sparse_teacher(topk_indices: torch.Tensor, topk_logprobs: torch.Tensor, num_classes: int) -> None:
    """The checks the CPU kernel makes (with a host synchronisation on other devices): indices in [0, C) and
    distinct within a row, log-probabilities <= 0 and not NaN."""
    if topk_indices.numel() == 0:
        return
    if bool((topk_indices < 0).any()) or bool((topk_indices >= num_classes).any()):
        raise ValueError(f"topk_indices must lie in [0, {num_classes}) (the student's classes), got values in "
                         f"[{int(topk_indices.min())}, {int(topk_indices.max())}]")
    ordered = topk_indices.sort(-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("topk_indices has a class twice in a row: each row's k classes must be distinct")
    if bool((topk_logprobs > 0).any()) or bool(topk_logprobs.isnan().any()):
        raise ValueError("topk_logprobs must be log-probabilities (<= 0, not NaN)")


def sparse_adaptive_kd_reference(
    student_logits: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    clip: float = 5.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    value: str = "divergence",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eager spec of :func:`alphadiv_kernels.fused_sparse_adaptive_kd`: the adaptive loss on k + 1 bins.

    Per row the teacher gives k classes ``I`` and their log-probabilities (used as given: already at the
    temperature the cache was made with); its tail bin holds ``1 - sum p_I``. The student's bins are
    ``log q_I`` and ``log q_tail = logsumexp`` over the classes outside ``I`` of ``log_softmax(s / T)``
    (a sum over those classes, exact when the tail is tiny). The branches, clip, selection, value modes,
    reduction, mask and T^2 are those of :func:`adaptive_kd_reference` on the bins (its `_branch`); the
    gradient wrt the logits is the bins' gradient taken through the gather and the tail's logsumexp by
    autograd, so the tail's share goes to the classes outside ``I`` in proportion to their q. A row whose
    k log-probabilities are all -inf carries no teacher: value 0, gradient 0 (it still counts in a mean
    unless masked). Computed in float64 for float64 inputs, else float32.
    """
    args = _validate_sparse_arguments(student_logits, topk_indices, topk_logprobs, alpha_min=alpha_min,
                                      alpha_max=alpha_max, clip=clip, temperature=temperature, reduction=reduction,
                                      value=value, mask=mask)
    student, indices, logprobs = args.student, args.indices, args.logprobs
    num_classes, k = student.shape[1], indices.shape[1]
    check_sparse_teacher(indices, logprobs, num_classes)
    out_dtype = torch.promote_types(student_logits.dtype, topk_logprobs.dtype)
    compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        logits = student.detach().to(compute_dtype).requires_grad_(True)
        lq = F.log_softmax(logits / temperature, dim=-1)
        lq_topk = lq.gather(1, indices.long())
        in_topk = torch.zeros_like(lq, dtype=torch.bool).scatter_(1, indices.long(), True)
        tail_terms = lq.masked_fill(in_topk, float("-inf"))
        # rows whose tail has no class of the student (k = C, or the rest at -inf) take a finite stand-in, so
        # that the logsumexp, whose value is replaced by -inf, has a finite gradient
        empty_tail = (tail_terms == float("-inf")).all(-1)
        tail_terms = tail_terms.masked_fill(empty_tail[:, None], 0.0)
        lq_tail = torch.logsumexp(tail_terms, dim=-1).masked_fill(empty_tail, float("-inf"))
        lq_bins = torch.cat([lq_topk, lq_tail[:, None]], dim=1)
    lp_bins = sparse_teacher_bins(logprobs.to(compute_dtype), k == num_classes)
    with torch.no_grad():
        bins = lq_bins.detach()
        d_min, s_min, g_min = _branch(bins, lp_bins, alpha_min, clip)
        d_max, s_max, g_max = _branch(bins, lp_bins, alpha_max, clip)
        use_min = d_min > d_max
        rows = temperature**2 * (torch.where(use_min, s_min, s_max) if args.surrogate
                                 else torch.where(use_min, d_min, d_max))
        bin_gradient = torch.where(use_min[:, None], g_min, g_max)
    # bin_gradient is d D / d z for bin logits z (log_softmax(z) = the bins); through log q_bins(s) it is
    # sum_b G_b d log q_b / d s_j = G_b(j) q_j / q_b(j), the sum_b G_b = 0 term vanishing.
    (gradient,) = torch.autograd.grad(lq_bins, logits, grad_outputs=bin_gradient)
    gradient = gradient * temperature**2  # d/ds of T^2 D(s / T): T * dD/d(s/T), and autograd's 1/T is inside
    with torch.no_grad():
        no_teacher = (logprobs == float("-inf")).all(-1)
        weight = torch.ones_like(rows) if args.mask is None else args.mask.to(rows.dtype)
        if args.reduction == REDUCTION_MEAN:
            weight = weight / weight.sum().clamp(min=1)
        keep = (weight != 0) & ~no_teacher
        rows = torch.where(keep, rows * weight, 0.0)
        gradient = torch.where(keep[:, None], gradient * weight[:, None], 0.0)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        rows = _RowsWithGradient.apply(rows, student_logits.reshape(student.shape), gradient.to(student_logits.dtype))
    if args.reduction == REDUCTION_NONE:
        return rows.reshape(args.leading_shape).to(out_dtype)
    return rows.sum().to(out_dtype)
