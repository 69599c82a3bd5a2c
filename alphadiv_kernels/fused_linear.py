"""`fused_linear_adaptive_kd`: the output projection and the adaptive KD loss, chunk by chunk.

Distilling a language model, the student's and the teacher's logits and the logits' gradient are
three `[tokens, vocab]` tensors, often larger than the model's activations. Here the logits of one
chunk of rows exist at a time: per chunk,

    s = x_c W_s^T + b_s,   t = x_t,c W_t^T + b_t           (the teacher under no_grad)
    loss_c, g = the fused op on (s, t), reduction "sum"    (g = d loss_c / d s, from the op's forward)
    dx_c = g W_s,   dW_s += g^T x_c,   db_s += sum_rows g  (dW_s, db_s accumulate in float32; float64 weights in float64)

so the gradients of the student's input, weight and bias are complete when the forward returns,
and the backward only scales them by the incoming gradient. A mean divides by the number of valid
rows at the end (a device scalar: no host synchronisation). The teacher is never differentiated.

Chunk size (rows), unless given: every method holds the float32 weight gradient (V x H x 4 bytes);
the chunk's three `[chunk, V]` temporaries (student logits, teacher logits, their gradient, of
`itemsize` bytes each) are kept below 3/4 of it, and a chunk is a power of two of at most N rows:

    3 * chunk * V * itemsize <= 0.75 * V * H * 4   =>   chunk = clamp(2 ** floor(log2(H / itemsize)), 1, N)

e.g. N = 4096 tokens, H = 1024, V = 32000, float32: 256 rows, 3 x 256 x 32000 x 4 B = 98 MB of
logits, where the unfused computation holds 3 x 4096 x 32000 x 4 B = 1.5 GB. Larger chunks make
better matrix products (fewer, fuller GEMMs, and fewer passes over the weight gradient).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ._validation import check_backend, check_loss_parameters
from .adaptive_kd import _graph_is_retained, fused_adaptive_kd

REDUCTIONS = ("mean", "sum")


def default_chunk_size(rows: int, hidden: int, itemsize: int) -> int:
    """Rows per chunk (see the module doc): the largest power of two <= H / itemsize, within [1, N]."""
    target = hidden / itemsize
    chunk = 2 ** math.floor(math.log2(target)) if target >= 1 else 1
    return max(1, min(rows, chunk))


def _check_settings(alpha_min, alpha_max, clip, temperature, reduction, chunk_size, backend) -> None:
    """The loss settings, for the function and (at construction) the module."""
    check_loss_parameters(alpha_min, alpha_max, clip, temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum' (per-row values would need the [N, V] gradient), "
                         f"got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a whole number of rows >= 1, got {chunk_size!r}")
    check_backend(backend)


def _check_tensors(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, mask):
    for name, tensor in (("student_input", student_input), ("student_weight", student_weight),
                         ("teacher_input", teacher_input), ("teacher_weight", teacher_weight)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if student_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError(f"the weights must be [V, H] matrices, got {list(student_weight.shape)} and "
                         f"{list(teacher_weight.shape)}")
    if student_input.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"student_input's last dimension ({student_input.shape[-1]}) must equal student_weight's "
                         f"hidden size ({student_weight.shape[1]})")
    if teacher_input.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(f"teacher_input's last dimension ({teacher_input.shape[-1]}) must equal teacher_weight's "
                         f"hidden size ({teacher_weight.shape[1]})")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher must share the vocabulary, got {student_weight.shape[0]} and "
                         f"{teacher_weight.shape[0]} rows of weights")
    if student_input.shape[:-1] != teacher_input.shape[:-1]:
        raise ValueError(f"student_input and teacher_input must have the same leading shape, got "
                         f"{list(student_input.shape[:-1])} and {list(teacher_input.shape[:-1])}")
    for name, bias, weight in (("student_bias", student_bias, student_weight),
                               ("teacher_bias", teacher_bias, teacher_weight)):
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
            raise ValueError(f"{name} must be a [{weight.shape[0]}] tensor")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                             or mask.shape != student_input.shape[:-1]):
        raise ValueError(f"mask must be a bool tensor of shape {list(student_input.shape[:-1])}")


class _FusedLinearAdaptiveKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, teacher_x, teacher_weight, teacher_bias, mask, loss_args, reduction,
                chunk_size):
        rows = x.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_x = torch.zeros_like(x) if need_x else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for float64 weights
        grad_w = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        need_grad = need_x or need_w or need_b
        for start in range(0, rows, chunk_size):
            end = min(start + chunk_size, rows)
            x_chunk = x[start:end]
            logits = torch.nn.functional.linear(x_chunk, weight, bias)
            teacher = torch.nn.functional.linear(teacher_x[start:end], teacher_weight, teacher_bias)
            chunk_mask = None if mask is None else mask[start:end]
            if not need_grad:
                total += fused_adaptive_kd(logits, teacher, reduction="sum", mask=chunk_mask, **loss_args).to(total.dtype)
                continue
            leaf = logits.requires_grad_(True)
            with torch.enable_grad():
                loss = fused_adaptive_kd(leaf, teacher, reduction="sum", mask=chunk_mask, **loss_args)
            (grad_logits,) = torch.autograd.grad(loss, leaf)
            total += loss.detach().to(total.dtype)
            del leaf, logits, teacher, loss  # the loss's graph would keep the student logits alive
            if need_x:
                grad_x[start:end] = grad_logits @ weight
            if need_w and grad_logits.dtype == accumulate:
                grad_w.addmm_(grad_logits.t(), x_chunk)  # no [V, H] temporary
            elif need_w:  # 16-bit matmul (fp32 inside the GEMM), accumulated across chunks in fp32
                grad_w += (grad_logits.t() @ x_chunk).to(accumulate)
            if need_b:
                grad_b += grad_logits.to(accumulate).sum(0)
            del grad_logits
        scale = None
        if reduction == "mean":
            count = mask.sum() if mask is not None else torch.tensor(rows, device=x.device)
            scale = 1.0 / count.clamp(min=1).to(total.dtype)
            total = total * scale
        grads = []
        for grad, like in ((grad_x, x), (grad_w, weight), (grad_b, bias)):
            if grad is not None and scale is not None:
                grad = grad.mul_(scale)
            grads.append(None if grad is None else grad.to(like.dtype))
        # Kept on ctx rather than saved: the backward hands them over, and a leaf's AccumulateGrad can only
        # adopt a gradient nothing else references (a saved tensor would make it copy the [V, H] one).
        ctx.grads = grads
        return total.to(torch.promote_types(x.dtype, teacher_x.dtype))

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise RuntimeError("fused_linear_adaptive_kd has no second derivative (create_graph=True)")
        # A graph kept for another backward keeps the gradients and gets scaled copies. Otherwise they are
        # handed over (loss.backward() passes 1: no pass over the [V, H] weight gradient) or scaled in place.
        if _graph_is_retained():
            grads = [None if grad is None else grad * grad_loss for grad in ctx.grads]
        else:
            grads, ctx.grads = ctx.grads, None
            if not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
                grads = [None if grad is None else grad.mul_(grad_loss) for grad in grads]
        return (*grads, None, None, None, None, None, None, None)


def fused_linear_adaptive_kd(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    clip: float = 5.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``fused_adaptive_kd(student_input @ student_weight.T + student_bias, teacher_input @ teacher_weight.T +
    teacher_bias)`` without ever holding the ``[N, V]`` logits (see the module doc).

    Args:
        student_input: ``[..., H]`` hidden states of the student (differentiated).
        student_weight, student_bias: ``[V, H]`` and ``[V]`` output projection of the student (differentiated).
        teacher_input, teacher_weight, teacher_bias: the teacher's ``[..., H_t]``, ``[V, H_t]``, ``[V]``
            (``H_t`` may differ from ``H``; never differentiated).
        alpha_min, alpha_max, clip, temperature, backend: as :func:`fused_adaptive_kd`.
        reduction: ``"mean"`` over unmasked rows or ``"sum"``.
        mask: optional bool ``[...]``; ``False`` rows (padding, prompt tokens) give 0 and do not count.
        chunk_size: rows per chunk (default: :func:`default_chunk_size`).
    """
    _check_tensors(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, mask)
    _check_settings(alpha_min, alpha_max, clip, temperature, reduction, chunk_size, backend)
    x = student_input.reshape(-1, student_input.shape[-1])
    teacher_x = teacher_input.reshape(-1, teacher_input.shape[-1]).detach()
    flat_mask = None if mask is None else mask.reshape(-1)
    chunk = chunk_size or default_chunk_size(x.shape[0], x.shape[1], x.element_size())
    loss_args = dict(alpha_min=float(alpha_min), alpha_max=float(alpha_max), clip=float(clip),
                     temperature=float(temperature), backend=backend)
    return _FusedLinearAdaptiveKD.apply(x, student_weight, student_bias, teacher_x, teacher_weight.detach(),
                                        None if teacher_bias is None else teacher_bias.detach(), flat_mask,
                                        loss_args, reduction, chunk)


class FusedLinearAdaptiveKDLoss(nn.Module):
    """The module form: ``loss_fn(student_input, student_weight, teacher_input, teacher_weight, student_bias=None,
    teacher_bias=None, mask=None)``; settings checked at construction."""

    def __init__(self, alpha_min: float = -1.0, alpha_max: float = 1.0, clip: float = 5.0, *,
                 temperature: float = 1.0, reduction: str = "mean", chunk_size: Optional[int] = None,
                 backend: str = "auto") -> None:
        super().__init__()
        _check_settings(alpha_min, alpha_max, clip, temperature, reduction, chunk_size, backend)
        self.settings = dict(alpha_min=float(alpha_min), alpha_max=float(alpha_max), clip=float(clip),
                             temperature=float(temperature), reduction=reduction, chunk_size=chunk_size,
                             backend=backend)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, student_bias=None,
                teacher_bias=None, mask=None):
        return fused_linear_adaptive_kd(student_input, student_weight, teacher_input, teacher_weight,
                                        student_bias=student_bias, teacher_bias=teacher_bias, mask=mask,
                                        **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings.items())
