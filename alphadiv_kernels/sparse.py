"""`fused_sparse_adaptive_kd`: the adaptive alpha-divergence KD loss from a sparse teacher.

A teacher stored or served as its top-k log-probabilities per token (`alphadiv-cache-teacher`, an
inference server) is a distribution over k + 1 bins: the k classes and a tail bin holding the rest of its
mass, ``p_tail = max(0, 1 - sum exp(lp_I))``. The student's bins are its probabilities of the k classes and
the sum of its probabilities over every other class. The loss is :func:`fused_adaptive_kd`'s on those bins
(branches, clip, selection, value modes, reduction, mask, T^2), and the gradient of the tail bin reaches the
classes outside the k in proportion to their probability. With k = C and the teacher's full log_softmax it
equals :func:`fused_adaptive_kd` (the tail bin is empty). Math: csrc/sparse_adaptive_kd_math.h; the
executable spec: :func:`alphadiv_kernels.reference.sparse_adaptive_kd_reference`.

The kernels (CPU C++, CUDA C++, Triton) implement the custom op `alphadiv::sparse_adaptive_kd` with the
dense op's autograd contract: the forward writes the gradient, the backward scales it.

Bad teacher entries (an index outside [0, C), a class twice in a row, a log-probability > 0 or NaN) are a
ValueError on CPU tensors and with the reference backend. The CUDA and Triton kernels do not synchronise
with the host to check: such a row's value and gradient are NaN, so the loss shows it.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _extension, triton_sparse_adaptive_kd
from ._constants import REDUCTION_NONE
from ._contract import BACKENDS, SPARSE_SCHEMA, SparseOpArgs
from ._validation import (check_backend, check_loss_parameters, check_reduction_and_value,
                          validate_sparse_arguments)
from .adaptive_kd import _resolve_backend, make_eager_function, register_op
from .reference import sparse_adaptive_kd_reference


def fused_sparse_adaptive_kd(
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
    backend: str = "auto",
) -> torch.Tensor:
    """Adaptive alpha-divergence KD against a teacher given as its top-k log-probabilities (see the module doc).

    Args:
        student_logits: ``[..., C]`` floating logits of the student (receives the gradient).
        topk_indices: int32 or int64 ``[..., k]``: the teacher's k classes per row, distinct, ``1 <= k <= C``.
        topk_logprobs: ``[..., k]`` their log-probabilities (``<= 0``), as stored: at the temperature the
            teacher was run with (``temperature`` below divides the student's logits only). A row whose k
            values are all ``-inf`` has no teacher: value 0 and gradient 0 (it still counts in a mean unless
            masked).
        alpha_min, alpha_max, clip, temperature, reduction, value, mask, backend: as :func:`fused_adaptive_kd`.

    Returns:
        The loss in the promoted dtype of the logits and the log-probabilities.
    """
    args = validate_sparse_arguments(student_logits, topk_indices, topk_logprobs, alpha_min=alpha_min,
                                     alpha_max=alpha_max, clip=clip, temperature=temperature, reduction=reduction,
                                     value=value, mask=mask)
    chosen = _resolve_backend(backend, student_logits.device)
    if chosen == "reference":
        return sparse_adaptive_kd_reference(student_logits, topk_indices, topk_logprobs, alpha_min=alpha_min,
                                            alpha_max=alpha_max, clip=clip, temperature=temperature,
                                            reduction=reduction, value=value, mask=mask)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    op = BACKENDS[chosen].sparse_op()
    op_args = SparseOpArgs(args.student, args.indices, args.logprobs.detach(), args.mask, float(alpha_min),
                           float(alpha_max), float(clip), float(temperature), args.reduction, args.surrogate,
                           compute_grad)
    if compute_grad and not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()):
        loss, _ = _EagerSparseAdaptiveKD.apply(*op_args, op)
    else:
        loss, _ = op(*op_args)
    return loss.reshape(args.leading_shape) if args.reduction == REDUCTION_NONE else loss


class SparseAdaptiveKDLoss(torch.nn.Module):
    """``SparseAdaptiveKDLoss(alpha_min, alpha_max, clip)(student_logits, topk_indices, topk_logprobs, mask=None)``;
    settings as :func:`fused_sparse_adaptive_kd`."""

    def __init__(self, alpha_min: float = -1.0, alpha_max: float = 1.0, clip: float = 5.0, *,
                 temperature: float = 1.0, reduction: str = "mean", value: str = "divergence",
                 backend: str = "auto") -> None:
        super().__init__()
        self.settings = dict(alpha_min=float(alpha_min), alpha_max=float(alpha_max), clip=float(clip),
                             temperature=float(temperature), reduction=reduction, value=value, backend=backend)
        check_loss_parameters(alpha_min, alpha_max, clip, temperature)  # bad settings fail here
        check_reduction_and_value(reduction, value)
        check_backend(backend)

    def forward(self, student_logits, topk_indices, topk_logprobs, mask=None):
        return fused_sparse_adaptive_kd(student_logits, topk_indices, topk_logprobs, mask=mask, **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings.items())


@torch.no_grad()
def teacher_topk(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, k: int,
                 temperature: float = 1.0, vocab_size: Optional[int] = None, chunk_size: int = 1024,
                 logprob_dtype: torch.dtype = torch.float32):
    """A teacher's top-k classes and log-probabilities at `temperature` from its final hidden states ``[..., H]``
    and output projection ``[V, H]``, one chunk of rows at a time (the ``[chunk, V]`` logits exist one chunk at a
    time). The softmax runs over the first `vocab_size` rows (default all): a padded head's extra rows never
    enter. Returns int32 indices and `logprob_dtype` log-probabilities, ``[..., k]``, descending; what
    `alphadiv-cache-teacher` stores and ``teacher_topk=k`` distills from."""
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be a whole number in [1, {vocab}] (the teacher's classes), got {k!r}")
    check_loss_parameters(-1.0, 1.0, 1.0, temperature)
    flat = hidden.reshape(-1, hidden.shape[-1])
    indices = torch.empty(flat.shape[0], k, dtype=torch.int32, device=flat.device)
    logprobs = torch.empty(flat.shape[0], k, dtype=logprob_dtype, device=flat.device)
    weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    for start in range(0, flat.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        logits = torch.nn.functional.linear(flat[rows], weight, bias).float() / temperature
        top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        indices[rows], logprobs[rows] = top.indices, top.values
    return indices.reshape(*hidden.shape[:-1], k), logprobs.reshape(*hidden.shape[:-1], k)


# ---------------------------------------------------------------------------------------------
# torch.library glue, shared by alphadiv::sparse_adaptive_kd (C++: CPU, and CUDA where built) and
# alphadiv::sparse_adaptive_kd_triton.


def _sparse_adaptive_kd_fake(student, topk_indices, topk_logprobs, mask, alpha_min, alpha_max, clip, temperature,
                             reduction, surrogate, compute_grad):
    value_dtype = torch.promote_types(student.dtype, topk_logprobs.dtype)
    loss = student.new_empty((student.shape[0],) if reduction == REDUCTION_NONE else (), dtype=value_dtype)
    return loss, student.new_empty(student.shape if compute_grad else (0,))


_EagerSparseAdaptiveKD = make_eager_function(SparseOpArgs)

if _extension.HAS_CPU_EXTENSION:
    register_op("alphadiv::sparse_adaptive_kd", _sparse_adaptive_kd_fake, SparseOpArgs)

if triton_sparse_adaptive_kd.triton is not None:
    torch.library.define("alphadiv::sparse_adaptive_kd_triton", SPARSE_SCHEMA)
    torch.library.impl("alphadiv::sparse_adaptive_kd_triton", ["CUDA", "CPU"])(
        triton_sparse_adaptive_kd.sparse_adaptive_kd_triton)
    register_op("alphadiv::sparse_adaptive_kd_triton", _sparse_adaptive_kd_fake, SparseOpArgs)
