"""The CUDA kernel is compiled, linked and registered wherever it can be built (CI builds it without a GPU)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from alphadiv_kernels import _extension


def cuda_build_expected() -> bool:
    toolkit = any(os.path.exists(os.path.join(folder, "bin", "nvcc")) for folder in
                  filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda"))) or shutil.which("nvcc")
    return torch.version.cuda is not None and bool(toolkit) and os.environ.get("ALPHADIV_CUDA", "auto") != "0"


@pytest.mark.skipif(not cuda_build_expected(), reason="no CUDA build of torch, or no CUDA toolkit")
def test_cuda_kernel_is_built_and_registered_for_the_op():
    assert _extension.HAS_CUDA_EXTENSION, _extension.missing_reason("alphadiv_kernels._C_cuda")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("alphadiv::adaptive_kd", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("alphadiv::adaptive_kd", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("alphadiv::sparse_adaptive_kd", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("alphadiv::sparse_adaptive_kd", "CPU")
