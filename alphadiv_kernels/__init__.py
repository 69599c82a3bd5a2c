"""Fused adaptive alpha-divergence knowledge distillation (AlphaNet, ICML 2021) for PyTorch."""
from .adaptive_kd import available_backends, fused_adaptive_kd
from .fused_linear import FusedLinearAdaptiveKDLoss, fused_linear_adaptive_kd
from .loss import AdaptiveKDLoss
from .reference import adaptive_kd_reference, alphanet_adaptive_loss_soft

__all__ = [
    "AdaptiveKDLoss",
    "FusedLinearAdaptiveKDLoss",
    "adaptive_kd_reference",
    "alphanet_adaptive_loss_soft",
    "available_backends",
    "fused_adaptive_kd",
    "fused_linear_adaptive_kd",
]
__version__ = "0.1.0"
