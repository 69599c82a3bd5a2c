"""Timing: per-provider blocks taking turns over rounds, on CPU or CUDA, and copy bandwidth."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch


@dataclass
class Timing:
    times_ms: List[float]

    def percentile(self, q: float) -> float:
        ordered = sorted(self.times_ms)
        position = q * (len(ordered) - 1)
        low, high = math.floor(position), math.ceil(position)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)


def _timed_call(step: Callable[[], None], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    step()
    return (time.perf_counter() - begin) * 1e3


def time_in_rounds(steps: Dict[str, Callable[[], None]], device: str, repeats: int, budget_s: float,
                   rounds: int = 3) -> Dict[str, Timing]:
    """Median-ready timings of each step.

    Each provider runs a block of consecutive calls (its steady state: the allocator reuses what
    the previous call freed, as in a training loop), and the blocks take turns over `rounds` rounds
    so that drift of a shared machine reaches every provider alike; each block starts with one
    untimed call (unless a call takes over a second). A provider gets `repeats` timed calls, fewer
    (at least 3) when they would exceed `budget_s` seconds.
    """
    planned: Dict[str, int] = {}
    estimates: Dict[str, float] = {}
    for name, step in steps.items():  # warm-up, which also compiles and estimates the call time
        step()
        estimates[name] = _timed_call(step, device)
        planned[name] = max(3, min(repeats, int(budget_s * 1e3 / max(estimates[name], 1e-3))))
    timings = {name: Timing([]) for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            todo = min(-(-planned[name] // rounds), planned[name] - len(timings[name].times_ms))
            if todo and estimates[name] < 1e3:
                step()  # untimed: the first call after another provider meets its allocator state
            for _ in range(todo):
                timings[name].times_ms.append(_timed_call(step, device))
    return timings


def copy_bandwidth_gbs(device: str, megabytes: int = 256, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) of this machine, now."""
    elements = megabytes * 2**20 // 4
    source = torch.ones(elements, device=device)
    target = torch.empty_like(source)
    timing = time_in_rounds({"copy": lambda: target.copy_(source)}, device, repeats, budget_s=5.0, rounds=1)
    return 2 * source.numel() * 4 / (timing["copy"].median * 1e-3) / 1e9
