"""Peak memory of forward+backward per provider.

CUDA: `torch.cuda.max_memory_allocated` around one call. CPU: a fresh subprocess per provider and
case runs one warm-up call, hands freed memory back to the OS (malloc_trim), resets the kernel's
peak-RSS counter (/proc/self/clear_refs) and reads the peak (VmHWM) over one more call. Both report
the peak of inputs + everything the call holds at once, in bytes.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from typing import Callable, Optional

import torch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def cuda_peak_bytes(step: Callable[[], None]) -> int:
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def cpu_peak_bytes(provider: str, rows: int, cols: int, dtype: str, mode: str, timeout_s: float = 600) -> Optional[int]:
    """Peak RSS (inputs included) of one call in a fresh interpreter; None where it cannot be read."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    command = [sys.executable, "-m", "benchmarks.memory", provider, f"{rows}x{cols}", dtype, mode]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {provider} {rows}x{cols} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def peak_growth_bytes(step: Callable[[], None]) -> int:
    """How far one call of `step` raises this process's RSS at its peak, after a warm-up call (which
    compiles and allocates once) and with freed memory handed back to the OS first."""
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    step()
    return (_rss_kib("VmHWM") - rss_before) * 1024


def _probe(provider: str, shape: str, dtype: str, mode: str) -> None:
    from .cases import Case, available_providers, make_step, parse_shape

    rows, cols = parse_shape(shape)
    case = Case(rows, cols, getattr(torch, dtype), "cpu", mode)
    student, teacher = case.make_inputs()
    step = make_step(available_providers("cpu")[provider], student, teacher, mode)
    del student  # the step holds its own copy of the student (the leaf) for fwd+bwd
    inputs = 2 * rows * cols * case.dtype.itemsize  # student (or its leaf copy) and teacher
    # Peak over the interpreter's own footprint: inputs plus what the call holds at its peak.
    print(json.dumps({"peak_bytes": inputs + peak_growth_bytes(step)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: peak RSS of one provider call")
    parser.add_argument("provider")
    parser.add_argument("shape")
    parser.add_argument("dtype")
    parser.add_argument("mode")
    arguments = parser.parse_args()
    _probe(arguments.provider, arguments.shape, arguments.dtype, arguments.mode)
