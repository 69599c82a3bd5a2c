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


cpu_extension = _try_import("alphadiv_kernels._C")
HAS_CPU_EXTENSION = cpu_extension is not None and hasattr(torch.ops.alphadiv, "adaptive_kd")


def missing_reason(module: str) -> str:
    return _load_errors.get(module, "it was not built")
