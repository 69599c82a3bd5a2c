"""Loads the compiled kernels; remembers why one is missing so a forced backend can say so."""
from __future__ import annotations

import importlib
from typing import Optional

import torch

_load_errors: dict = {}


def _try_import(module: str) -> Optional[object]:
    try:
        return importlib.import_module(module)
    except ImportError as error:  # not built, or built against another torch
        _load_errors[module] = f"{type(error).__name__}: {error}"
        return None


cpu_extension = _try_import("alphadiv_kernels._C")  # the op's schema and its CPU kernel
HAS_CPU_EXTENSION = cpu_extension is not None and hasattr(torch.ops.alphadiv, "adaptive_kd")
cuda_extension = _try_import("alphadiv_kernels._C_cuda") if HAS_CPU_EXTENSION else None
HAS_CUDA_EXTENSION = cuda_extension is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "alphadiv::adaptive_kd", "CUDA") if HAS_CPU_EXTENSION else False


def missing_reason(module: str) -> str:
    return _load_errors.get(module, "it was not built")
