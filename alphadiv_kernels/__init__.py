"""Fused adaptive alpha-divergence knowledge distillation (AlphaNet, ICML 2021) for PyTorch."""
from .adaptive_kd import available_backends, fused_adaptive_kd, symmetric_kl
from .fused_linear import FusedLinearAdaptiveKDLoss, fused_linear_adaptive_kd, fused_linear_sparse_adaptive_kd
from .loss import AdaptiveKDLoss
from .reference import (adaptive_kd_reference, alphanet_adaptive_loss_soft, sparse_adaptive_kd_reference,
                        symmetric_kl_reference)
from .sparse import SparseAdaptiveKDLoss, fused_sparse_adaptive_kd

__all__ = [
    "AdaptiveKDLoss",
    "FusedLinearAdaptiveKDLoss",
    "SparseAdaptiveKDLoss",
    "adaptive_kd_reference",
    "alphanet_adaptive_loss_soft",
    "available_backends",
    "fused_adaptive_kd",
    "fused_linear_adaptive_kd",
    "fused_linear_sparse_adaptive_kd",
    "fused_sparse_adaptive_kd",
    "sparse_adaptive_kd_reference",
    "symmetric_kl",
    "symmetric_kl_reference",
]
__version__ = "0.1.0"
