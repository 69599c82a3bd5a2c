"""Codes and limits shared by the Python side of every backend (reference, Triton, launcher), equal to
those of `csrc/adaptive_kd_math.h` (a test reads the header and compares)."""
from __future__ import annotations

ALPHA_LIMIT_TOLERANCE = 1e-3  # |alpha - 1| or |alpha| below this selects the KL limit, as AlphaNet's code

BRANCH_FORWARD_KL, BRANCH_REVERSE_KL, BRANCH_GENERAL, BRANCH_NEG_ONE = 0, 1, 2, 3

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2
REDUCTIONS = {"none": REDUCTION_NONE, "mean": REDUCTION_MEAN, "sum": REDUCTION_SUM}

# Above this temperature the divergence (of order 1/T^2 before the T^2 factor) drowns in fp32 rounding:
# at T = 1e5 an fp32 accumulation returns -26.4 where float64 says 4.60. Larger values are rejected.
MAX_TEMPERATURE = 100.0


def branch_code(alpha: float) -> int:
    """The branch an alpha takes (the table of the op's semantics)."""
    if abs(alpha - 1.0) < ALPHA_LIMIT_TOLERANCE:
        return BRANCH_FORWARD_KL
    if abs(alpha) < ALPHA_LIMIT_TOLERANCE:
        return BRANCH_REVERSE_KL
    return BRANCH_NEG_ONE if alpha == -1.0 else BRANCH_GENERAL
