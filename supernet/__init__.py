"""Weight-sharing supernet of the AlphaNet / AttentiveNAS space: elastic ops, model, FLOPs, BN calibration.

The names below are imported on first use, so `alphanet --help` and `alphanet flops` start without torch."""
import importlib

_EXPORTS = {"recalibrate_bn": "calibration", "count_with_hooks": "flops", "flops_and_params": "flops",
            "mflops": "flops", "ElasticSupernet": "model", "StaticSubnet": "model", "extract": "model",
            "ALPHANET": "space", "SPACES": "space", "TINY": "space", "SearchSpace": "space", "get_space": "space"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'supernet' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
