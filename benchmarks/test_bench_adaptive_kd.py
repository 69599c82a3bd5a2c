"""Regression tracking with pytest-benchmark, over the same cases as `python -m benchmarks`.

Not collected by the default test command (it lives outside tests/). Run:

    python -m pytest benchmarks/test_bench_adaptive_kd.py --benchmark-only [--benchmark-autosave]
    python -m pytest benchmarks/test_bench_adaptive_kd.py --benchmark-only --benchmark-compare
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.cases import DEFAULT_DTYPE, Case, available_providers, make_step, parse_shape

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = ["32x1000", "256x1000", "2048x1000"] + (["8192x128256"] if DEVICE == "cuda" else ["512x32000"])
PROVIDERS = [name for name in available_providers(DEVICE) if name.startswith(("alphanet", "fused"))]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_adaptive_kd_speed(benchmark, shape, provider, mode):
    rows, cols = parse_shape(shape)
    case = Case(rows, cols, getattr(torch, DEFAULT_DTYPE[DEVICE]), DEVICE, mode)
    step = make_step(available_providers(DEVICE)[provider], *case.make_inputs(), mode)
    step()  # compile / warm up outside the measurement
    if DEVICE == "cuda":
        def synchronized():
            step()
            torch.cuda.synchronize()
        benchmark(synchronized)
    else:
        benchmark(step)
    benchmark.extra_info.update(shape=shape, provider=provider, mode=mode, bytes_moved=case.bytes_moved())
