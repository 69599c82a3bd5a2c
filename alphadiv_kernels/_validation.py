"""Argument checks shared by every backend: bad calls fail here, before any kernel runs."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from ._constants import MAX_TEMPERATURE, REDUCTION_NONE, REDUCTION_SUM, REDUCTIONS

VALUE_MODES = ("divergence", "surrogate")
BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")


class KDArguments(NamedTuple):
    """Validated arguments, with the logits flattened to [N, C] and the mask to [N]."""

    student: torch.Tensor
    teacher: torch.Tensor
    mask: Optional[torch.Tensor]
    leading_shape: torch.Size
    reduction: int
    surrogate: bool


def _check_real(name: str, value: float) -> None:
    """A finite real number: Python int / float or a NumPy scalar (not bool)."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not -math.inf < value < math.inf:  # not math.isfinite: dynamo's dynamic-shape tracing cannot run it
        raise ValueError(f"{name} must be finite, got {value}")


def check_loss_parameters(alpha_min: float, alpha_max: float, clip: float, temperature: float) -> None:
    """The scalar parameters of the loss (also checked by `AdaptiveKDLoss` at construction)."""
    for name, number in (("alpha_min", alpha_min), ("alpha_max", alpha_max), ("clip", clip),
                         ("temperature", temperature)):
        _check_real(name, number)
    if alpha_min > alpha_max:
        raise ValueError(f"alpha_min ({alpha_min}) must not exceed alpha_max ({alpha_max})")
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    if not 0 < temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in (0, {MAX_TEMPERATURE:g}], got {temperature}: above "
                         f"{MAX_TEMPERATURE:g} the divergence is below the float32 rounding of its terms")


_CHECKED_SETTINGS: set = set()


def check_settings_once(alpha_min, alpha_max, clip, temperature, reduction, value) -> None:
    """`check_loss_parameters` and `check_reduction_and_value`, remembered per distinct settings (with their
    types, so a bool or a NumPy scalar is never taken for a float it equals): a training loop repeats a few
    settings, and their checks cost as much as a small call's kernel. NaN never equals itself, so it is
    checked (and refused) on every call. Under torch.compile the checks are traced once per compile anyway."""
    key = (alpha_min, alpha_max, clip, temperature, reduction, value,
           type(alpha_min), type(alpha_max), type(clip), type(temperature), type(reduction), type(value))
    remember = not torch.compiler.is_compiling()
    if remember:
        try:
            if key in _CHECKED_SETTINGS:
                return
        except TypeError:  # an unhashable setting: the checks below name it
            remember = False
    check_loss_parameters(alpha_min, alpha_max, clip, temperature)
    check_reduction_and_value(reduction, value)
    if remember and len(_CHECKED_SETTINGS) < 4096:
        _CHECKED_SETTINGS.add(key)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def check_reduction_and_value(reduction: str, value: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if value not in VALUE_MODES:
        raise ValueError(f"value must be one of {', '.join(map(repr, VALUE_MODES))}, got {value!r}")


def check_op_arguments(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor], alpha_min: float,
                       alpha_max: float, clip: float, temperature: float, reduction: int) -> None:
    """The checks of the op's own [N, C] entry point, as csrc/adaptive_kd_checks.h (for the Triton op)."""
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"alphadiv::adaptive_kd expects 2-D [N, C] logits, got student {list(student.shape)} and "
                         f"teacher {list(teacher.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher logits must have the same shape, got {list(student.shape)} and "
                         f"{list(teacher.shape)}")
    if student.shape[1] == 0:
        raise ValueError("logits need at least one class (C = 0)")
    if not (student.is_floating_point() and teacher.is_floating_point()):
        raise TypeError(f"logits must be floating point, got {student.dtype} and {teacher.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"student and teacher must be on the same device, got {student.device} and {teacher.device}")
    check_loss_parameters(alpha_min, alpha_max, clip, temperature)
    if not REDUCTION_NONE <= reduction <= REDUCTION_SUM:
        raise ValueError(f"reduction code must be 0, 1 or 2, got {reduction}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.dim() != 1 or mask.shape[0] != student.shape[0]:
            raise ValueError(f"mask must have shape [{student.shape[0]}], got {list(mask.shape)}")


def flat_row_mask(mask: Optional[torch.Tensor], leading_shape: torch.Size, device: torch.device
                  ) -> Optional[torch.Tensor]:
    """A bool mask of the logits' leading shape, on their device, flattened to [N] (None stays None)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor marking the rows that count, got {got}")
    if mask.shape != leading_shape:
        raise ValueError(f"mask must have the logits' leading shape {tuple(leading_shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on the logits' device {device}, got {mask.device}")
    return mask.reshape(-1)


def validate_kd_arguments(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha_min: float,
    alpha_max: float,
    clip: float,
    temperature: float,
    reduction: str,
    value: str,
    mask: Optional[torch.Tensor],
) -> KDArguments:
    # One combined test first (a small call's checks cost as much as its kernel), the messages after it.
    if not (isinstance(student_logits, torch.Tensor) and isinstance(teacher_logits, torch.Tensor)
            and student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        for name, tensor in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    shape, dims = student_logits.shape, student_logits.dim()
    if dims == 0 or teacher_logits.dim() == 0:
        name = "student_logits" if dims == 0 else "teacher_logits"
        raise ValueError(f"{name} must have at least one dimension (the classes), got a scalar")
    if shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    device = student_logits.device
    if device != teacher_logits.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got {device} and {teacher_logits.device}"
        )
    num_classes = shape[-1]
    if num_classes == 0:
        raise ValueError("logits need at least one class: the last dimension has size 0")
    check_settings_once(alpha_min, alpha_max, clip, temperature, reduction, value)

    leading_shape = shape[:-1]
    return KDArguments(
        student=student_logits if dims == 2 else student_logits.reshape(-1, num_classes),
        teacher=teacher_logits if dims == 2 else teacher_logits.reshape(-1, num_classes),
        mask=flat_row_mask(mask, leading_shape, device),
        leading_shape=leading_shape,
        reduction=REDUCTIONS[reduction],
        surrogate=value == "surrogate",
    )


class SparseKDArguments(NamedTuple):
    """Validated arguments of the sparse-teacher loss, flattened to [N, C], [N, k], [N, k] and [N]."""

    student: torch.Tensor
    indices: torch.Tensor
    logprobs: torch.Tensor
    mask: Optional[torch.Tensor]
    leading_shape: torch.Size
    reduction: int
    surrogate: bool


INDEX_DTYPES = (torch.int32, torch.int64)


def check_sparse_teacher_shapes(student: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                                 names=("student_logits", "topk_indices", "topk_logprobs")) -> None:
    """Types, shapes and devices of a (student logits or hidden states, top-k indices, top-k log-probs) triple."""
    for name, tensor in zip(names, (student, indices, logprobs)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if not student.is_floating_point():
        raise TypeError(f"{names[0]} must be a floating-point tensor, got {student.dtype}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{names[1]} must be int32 or int64 class indices, got {indices.dtype}")
    if not logprobs.is_floating_point():
        raise TypeError(f"{names[2]} must be a floating-point tensor of log-probabilities, got {logprobs.dtype}")
    if indices.shape != logprobs.shape:
        raise ValueError(f"{names[1]} and {names[2]} must have the same shape, got {tuple(indices.shape)} and "
                         f"{tuple(logprobs.shape)}")
    if indices.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"{names[1]} must have {names[0]}'s leading shape {tuple(student.shape[:-1])} (then k), "
                         f"got {tuple(indices.shape)}")
    if indices.shape[-1] == 0:
        raise ValueError(f"{names[1]} needs at least one class per row (k = 0)")
    for name, tensor in zip(names[1:], (indices, logprobs)):
        if tensor.device != student.device:
            raise ValueError(f"{name} must be on {names[0]}'s device {student.device}, got {tensor.device}")


def validate_sparse_arguments(student_logits, topk_indices, topk_logprobs, *, alpha_min, alpha_max, clip,
                              temperature, reduction, value, mask) -> SparseKDArguments:
    check_sparse_teacher_shapes(student_logits, topk_indices, topk_logprobs)
    num_classes, k = student_logits.shape[-1], topk_indices.shape[-1]
    if num_classes == 0:
        raise ValueError("logits need at least one class: the last dimension has size 0")
    if k > num_classes:
        raise ValueError(f"k = {k} teacher classes per row, more than the student's {num_classes} classes")
    check_settings_once(alpha_min, alpha_max, clip, temperature, reduction, value)
    leading_shape = student_logits.shape[:-1]
    flat_mask = flat_row_mask(mask, leading_shape, student_logits.device)
    return SparseKDArguments(
        student=student_logits.reshape(-1, num_classes), indices=topk_indices.reshape(-1, k),
        logprobs=topk_logprobs.reshape(-1, k), mask=flat_mask, leading_shape=leading_shape,
        reduction=REDUCTIONS[reduction], surrogate=value == "surrogate",
    )
