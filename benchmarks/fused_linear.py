"""The `fused-linear` suite: output projection + adaptive KD, as LLM distillation computes it.

Providers, all on the same inputs (student hidden states `[N, H]`, weights `[V, H]` and biases, the
teacher's of the same sizes), forward + backward into the student's input, weight and bias:
- `matmul + reference loss`: the logits as two matmuls, then the eager reference loss;
- `matmul + fused op`: the same logits, then `fused_adaptive_kd`;
- `fused-linear`: `fused_linear_adaptive_kd`, chunk by chunk (never the `[N, V]` logits).
Reported: median time with its spread, and the peak memory above the inputs and weights (CPU: peak
RSS of a fresh subprocess per provider; GPU: max_memory_allocated).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import alphadiv_kernels as ak

from .memory import peak_growth_bytes
from .timing import time_in_rounds

DEFAULT_LINEAR_SHAPES = {"cpu": ["4096x1024x32000"], "cuda": ["8192x4096x128256"]}
PROVIDERS = ("matmul + reference loss", "matmul + fused op", "fused-linear")


@dataclass(frozen=True)
class LinearCase:
    rows: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    device: str

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.hidden}x{self.vocab}"

    def make_inputs(self, seed: int = 0) -> Dict[str, torch.Tensor]:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        draw = lambda *shape, scale=1.0: (torch.randn(*shape, generator=generator, device=self.device)
                                          * scale).to(self.dtype)
        return dict(x=draw(self.rows, self.hidden), w=draw(self.vocab, self.hidden, scale=self.hidden ** -0.5 * 2),
                    b=draw(self.vocab, scale=0.1), xt=draw(self.rows, self.hidden),
                    wt=draw(self.vocab, self.hidden, scale=self.hidden ** -0.5 * 3), bt=draw(self.vocab, scale=0.1))


def parse_linear_shape(text: str) -> tuple:
    try:
        rows, hidden, vocab = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--linear-shapes: {text!r} is not of the form NxHxV (e.g. 4096x1024x32000)") from None
    if min(rows, hidden, vocab) <= 0:
        raise SystemExit(f"--linear-shapes: {text!r} needs positive sizes")
    return rows, hidden, vocab


def make_step(provider: str, inputs: Dict[str, torch.Tensor]) -> Callable[[], None]:
    x, w, b = (inputs[k].detach().clone().requires_grad_(True) for k in ("x", "w", "b"))
    xt, wt, bt = inputs["xt"], inputs["wt"], inputs["bt"]

    def unfused(loss_fn):
        def step():
            logits = torch.nn.functional.linear(x, w, b)
            with torch.no_grad():
                teacher = torch.nn.functional.linear(xt, wt, bt)
            loss_fn(logits, teacher).backward()
            x.grad = w.grad = b.grad = None
        return step

    if provider == "matmul + reference loss":
        return unfused(ak.adaptive_kd_reference)
    if provider == "matmul + fused op":
        return unfused(ak.fused_adaptive_kd)

    def fused_step():
        ak.fused_linear_adaptive_kd(x, w, xt, wt, student_bias=b, teacher_bias=bt).backward()
        x.grad = w.grad = b.grad = None
    return fused_step


def peak_extra_bytes(case: LinearCase, provider: str, step: Callable[[], None]) -> Optional[int]:
    """Peak memory of one forward + backward above the inputs and weights."""
    if case.device == "cuda":
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    command = [sys.executable, "-m", "benchmarks.fused_linear", provider, case.name, str(case.dtype).split(".")[-1]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {provider} {case.name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_bytes"]


def _probe(provider: str, shape: str, dtype: str) -> None:
    case = LinearCase(*parse_linear_shape(shape), getattr(torch, dtype), "cpu")
    print(json.dumps({"extra_bytes": peak_growth_bytes(make_step(provider, case.make_inputs()))}))


def run(shapes: List[str], dtype: torch.dtype, device: str, repeats: int, budget: float, memory: bool) -> List[dict]:
    rows = []
    for text in shapes:
        case = LinearCase(*parse_linear_shape(text), dtype, device)
        inputs = case.make_inputs()
        steps = {provider: make_step(provider, inputs) for provider in PROVIDERS}
        timings = time_in_rounds(steps, device, repeats, budget)
        base = timings["matmul + fused op"].median
        for provider, timing in timings.items():
            extra = peak_extra_bytes(case, provider, steps[provider]) if memory else None
            rows.append(dict(shape=case.name, dtype=str(dtype).split(".")[-1], provider=provider,
                             median_ms=timing.median, min_ms=min(timing.times_ms), max_ms=max(timing.times_ms),
                             runs=len(timing.times_ms), time_vs_matmul_fused=timing.median / base,
                             extra_mb=None if extra is None else extra / 2**20))
        if memory:
            reference = next(r["extra_mb"] for r in rows if r["shape"] == case.name
                             and r["provider"] == "matmul + fused op")
            for row in rows:
                if row["shape"] == case.name and reference:
                    row["extra_vs_matmul_fused"] = row["extra_mb"] / reference
    return rows


def print_table(rows: List[dict]) -> None:
    print(f"{'shape (NxHxV)':<18} {'provider':<24} {'median ms':>10} {'min':>9} {'max':>9} {'x time':>7} "
          f"{'extra MB':>9} {'x mem':>6}")
    for row in rows:
        extra = f"{row['extra_mb']:9.0f}" if row.get("extra_mb") is not None else f"{'-':>9}"
        ratio = f"{row['extra_vs_matmul_fused']:6.2f}" if row.get("extra_vs_matmul_fused") is not None else f"{'-':>6}"
        print(f"{row['shape']:<18} {row['provider']:<24} {row['median_ms']:10.1f} {row['min_ms']:9.1f} "
              f"{row['max_ms']:9.1f} {row['time_vs_matmul_fused']:7.2f} {extra} {ratio}")
    print("x time, x mem: relative to 'matmul + fused op'; extra MB: peak above the inputs and weights")


if __name__ == "__main__":
    _probe(*sys.argv[1:4])
