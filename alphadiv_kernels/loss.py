"""`AdaptiveKDLoss`: the fused op as an nn.Module, drop-in for AlphaNet's `AdaptiveLossSoft`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._validation import check_backend, check_loss_parameters, check_reduction_and_value
from .adaptive_kd import fused_adaptive_kd


class AdaptiveKDLoss(nn.Module):
    """``AdaptiveKDLoss(alpha_min, alpha_max, clip)(student_logits, teacher_logits)``.

    Same call order as AlphaNet's ``AdaptiveLossSoft(output, target)``: student first, teacher
    second. ``value="surrogate"`` reproduces that class's returned scalar; the default returns the
    divergence itself. See :func:`alphadiv_kernels.fused_adaptive_kd` for every argument.
    """

    def __init__(self, alpha_min: float = -1.0, alpha_max: float = 1.0, clip: float = 5.0, *,
                 temperature: float = 1.0, reduction: str = "mean", value: str = "divergence",
                 backend: str = "auto") -> None:
        super().__init__()
        check_loss_parameters(alpha_min, alpha_max, clip, temperature)  # bad settings fail here, not at the first call
        check_reduction_and_value(reduction, value)
        check_backend(backend)
        alpha_min, alpha_max, clip, temperature = map(float, (alpha_min, alpha_max, clip, temperature))
        self.alpha_min, self.alpha_max, self.clip = alpha_min, alpha_max, clip
        self.temperature, self.reduction, self.value, self.backend = temperature, reduction, value, backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_adaptive_kd(
            student_logits, teacher_logits, alpha_min=self.alpha_min, alpha_max=self.alpha_max, clip=self.clip,
            temperature=self.temperature, reduction=self.reduction, value=self.value, mask=mask,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"alpha_min={self.alpha_min}, alpha_max={self.alpha_max}, clip={self.clip}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}, value={self.value!r}")
