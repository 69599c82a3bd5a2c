"""What the adaptive loss did: which branch each row took and how often the importance weight was clipped.

AlphaNet's loss keeps, per row, the larger of D_alpha_min and D_alpha_max, and clips the importance weight
of the kept branch at `clip`. Two numbers say what that means for a batch:

    alpha_min_share = (rows on the alpha_min branch) / (rows)
        the student puts too much mass where the teacher has little (alpha_min < 0 penalises
        over-estimation): a high share early in training is normal, and falls as the student matches;
    clip_share = (entries (row, class) of the kept branch whose weight hit the clip) / (rows * classes)
        how much of the gradient is bounded by `clip`: near 0 the clip is inactive, a large share means
        the student is far from the teacher on many classes (or `clip` is tight).

Forward KL (alpha = 1) has no clip, so its rows add none to the clip count. A class the student gives
probability 0 is never counted (its weight does not enter the gradient). Masked rows count in neither.

The counts are device tensors (no host synchronisation), computed by the same per-row selection as the
kernels but in a separate pass over the logits, in blocks of rows (float32, float64 for float64 inputs),
only when asked for: about the cost of one more forward of the loss.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._constants import BRANCH_FORWARD_KL, BRANCH_REVERSE_KL, branch_code

BLOCK_ELEMENTS = 1 << 22  # rows per block ~ this many logits: a few float32 [rows, C] temporaries of 16 MB


class KDStats(NamedTuple):
    """Counts behind the two shares, as device tensors; `a + b` pools two calls (chunks, steps, processes)."""

    rows: torch.Tensor             # valid rows
    alpha_min_rows: torch.Tensor   # of which on the alpha_min branch
    entries: torch.Tensor          # valid rows x classes
    clipped: torch.Tensor          # entries of the kept branch whose importance weight hit the clip

    @property
    def alpha_min_share(self) -> torch.Tensor:
        return self.alpha_min_rows / self.rows.clamp(min=1)

    @property
    def clip_share(self) -> torch.Tensor:
        return self.clipped / self.entries.clamp(min=1)

    def __add__(self, other: "KDStats") -> "KDStats":  # type: ignore[override]
        return KDStats(*(mine + theirs for mine, theirs in zip(self, other)))

    @staticmethod
    def zeros(device: torch.device) -> "KDStats":
        return KDStats(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(4)))


def _divergence_and_clipped(lq: torch.Tensor, lp: torch.Tensor, alpha: float, clip: float):
    """Per row: D_alpha (the kernels' branch formulas) and the number of classes whose weight is clipped."""
    lw = lp - lq
    q, p = lq.exp(), lp.exp()
    branch = branch_code(alpha)
    if branch == BRANCH_FORWARD_KL:
        divergence = (p * lw).where(p > 0, 0.0).sum(-1)
        return divergence, torch.zeros_like(divergence)
    seen = q > 0
    exponent = lw if branch == BRANCH_REVERSE_KL else alpha * lw  # the log of the weight that is clipped
    clipped = ((exponent > math.log(clip)) & seen).sum(-1).to(lq.dtype)
    log_c = exponent.clamp(max=math.log(clip))
    if branch == BRANCH_REVERSE_KL:
        divergence = -(q * log_c).where(seen, 0.0).sum(-1)
    else:
        divergence = (q * torch.expm1(log_c)).where(seen, 0.0).sum(-1) / (alpha * (alpha - 1.0))
    return divergence, clipped


@torch.no_grad()
def adaptive_kd_stats(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, alpha_min: float = -1.0,
                      alpha_max: float = 1.0, clip: float = 5.0, temperature: float = 1.0,
                      mask: Optional[torch.Tensor] = None) -> KDStats:
    """The counts of the module doc for ``[N, C]`` logits (``mask``: bool ``[N]``); arguments already checked."""
    rows, classes = student_logits.shape
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    stats = KDStats.zeros(student_logits.device)
    block = max(1, BLOCK_ELEMENTS // max(classes, 1))
    for start in range(0, rows, block):
        end = min(rows, start + block)
        lq = F.log_softmax(student_logits[start:end].to(dtype) / temperature, dim=-1)
        lp = F.log_softmax(teacher_logits[start:end].to(dtype) / temperature, dim=-1)
        d_min, clipped_min = _divergence_and_clipped(lq, lp, alpha_min, clip)
        d_max, clipped_max = _divergence_and_clipped(lq, lp, alpha_max, clip)
        use_min = d_min > d_max  # strict, as the kernels: ties and NaN take alpha_max
        clipped = torch.where(use_min, clipped_min, clipped_max)
        valid = torch.ones(end - start, dtype=torch.bool, device=lq.device) if mask is None else mask[start:end]
        counted = valid.to(torch.float64)
        stats = stats + KDStats(counted.sum(), (use_min & valid).to(torch.float64).sum(), counted.sum() * classes,
                                (clipped.to(torch.float64) * counted).sum())
    return stats
