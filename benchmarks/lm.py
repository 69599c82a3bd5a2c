"""The `lm` suite: the loss of LLM distillation, output projection + adaptive KD, three ways.

All providers run on the same inputs (student hidden states `[N, H]`, weights `[V, H]` and biases,
the teacher's of the same sizes), forward + backward into the student's input, weight and bias:
- `logits + fused op`: both `[N, V]` logits materialised by two matmuls, then `fused_adaptive_kd`;
- `chunked compile`: the token-chunked pure-PyTorch loss people write today (Liger's chunked losses,
  TRL's JSD): per chunk of rows, the logits and AlphaNet's own adaptive loss (its surrogate, summed),
  their gradient from `torch.func.grad_and_value`, the whole chunk under `torch.compile`; the input,
  weight and bias gradients accumulate as the chunks go (same chunk size as the fused path);
- `fused-linear`: `fused_linear_adaptive_kd`, chunk by chunk with the fused op.
With a sparse teacher (its top-k log-probabilities, e.g. from `alphadiv-cache-teacher`; rows for each k of
`--topk`, the teacher's top-k computed once beforehand as a cache would hold it), three more:
- `top-k eager`: DistillKit-style, the student's `[N, V]` logits, log_softmax, the k classes gathered and the
  tail's logsumexp, then AlphaNet's adaptive loss on the k + 1 bins, autograd;
- `top-k compile`: the same function under `torch.compile`;
- `top-k fused-linear`: `fused_linear_sparse_adaptive_kd`, chunk by chunk (only the student's head projected).
Reported: median time with its spread, and the peak memory above the inputs and weights (CPU: peak
RSS of a fresh subprocess per provider, after a warm-up call that also compiles; GPU:
max_memory_allocated).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import alphadiv_kernels as ak
from alphadiv_kernels.fused_linear import default_chunk_size

from .memory import peak_growth_bytes
from .timing import time_in_rounds

DEFAULT_LM_SHAPES = {"cpu": ["512x256x8000"], "cuda": ["4096x1024x32000", "8192x2048x128256"]}
MATERIALISED, CHUNKED_COMPILE, FUSED_LINEAR = "logits + fused op", "chunked compile", "fused-linear"
PROVIDERS = (MATERIALISED, CHUNKED_COMPILE, FUSED_LINEAR)
TOPK_EAGER, TOPK_COMPILE, TOPK_FUSED = "top-k eager", "top-k compile", "top-k fused-linear"
SPARSE_PROVIDERS = (TOPK_EAGER, TOPK_COMPILE, TOPK_FUSED)
DEFAULT_TOPK = (32, 128, 1024)
BAR_LABELS = ("eager, materialised logits", "torch.compile", "fused-linear (alphadiv)")  # slot order of both groups


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


def _chunk_loss(x, w, b, xt, wt, bt):
    """AlphaNet's adaptive loss of one chunk, summed over its rows (its surrogate's gradient is the clipped one)."""
    student = F.linear(x, w, b).float()
    teacher = F.linear(xt, wt, bt).float()
    return ak.alphanet_adaptive_loss_soft(student, teacher) * x.shape[0]


@functools.lru_cache(maxsize=None)
def _compiled_chunk_step():
    return torch.compile(torch.func.grad_and_value(_chunk_loss, argnums=(0, 1, 2)))


def chunked_compile_loss(x, w, b, xt, wt, bt, chunk_size: int):
    """Loss and gradients (input, weight, bias) of the token-chunked compiled loss, mean over rows."""
    chunk_step = _compiled_chunk_step()
    grad_x = torch.empty_like(x)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        (gx, gw, gb), loss = chunk_step(x[rows], w, b, xt[rows], wt, bt)
        grad_x[rows] = gx
        grad_w += gw
        grad_b += gb
        total += loss
    scale = 1.0 / x.shape[0]
    return total * scale, grad_x * scale, (grad_w * scale).to(w.dtype), (grad_b * scale).to(b.dtype)


def teacher_top_k(inputs: Dict[str, torch.Tensor], k: int):
    """The teacher's top-k indices and log-probabilities, as a cache holds them (float32)."""
    from alphadiv_kernels.sparse import teacher_topk
    return teacher_topk(inputs["xt"], inputs["wt"], inputs["bt"], k=k)


def topk_eager_loss(x, w, b, indices, logprobs):
    """DistillKit-style sparse distillation in PyTorch: the student's k + 1 bins (gathered classes and the tail's
    logsumexp) against the teacher's (its k log-probabilities and 1 - their sum), AlphaNet's adaptive loss."""
    lq = F.log_softmax(F.linear(x, w, b).float(), dim=-1)
    rows = indices.long()
    student_bins = torch.cat([lq.gather(1, rows), lq.scatter(1, rows, float("-inf")).logsumexp(-1, keepdim=True)], 1)
    teacher_tail = (1.0 - logprobs.float().exp().sum(-1, keepdim=True)).clamp(min=0.0).log()
    teacher_bins = torch.cat([logprobs.float(), teacher_tail], 1)
    return ak.alphanet_adaptive_loss_soft(student_bins, teacher_bins)


@functools.lru_cache(maxsize=None)
def _compiled_topk_loss():
    return torch.compile(topk_eager_loss)


def make_sparse_step(provider: str, inputs: Dict[str, torch.Tensor], k: int) -> Callable[[], None]:
    x, w, b = (inputs[key].detach().clone().requires_grad_(True) for key in ("x", "w", "b"))
    indices, logprobs = teacher_top_k(inputs, k)
    loss = {TOPK_EAGER: topk_eager_loss, TOPK_COMPILE: _compiled_topk_loss()}.get(provider)

    def step():
        if loss is None:
            ak.fused_linear_sparse_adaptive_kd(x, w, indices, logprobs, student_bias=b).backward()
        else:
            loss(x, w, b, indices, logprobs).backward()
        x.grad = w.grad = b.grad = None
    return step


def make_step(provider: str, inputs: Dict[str, torch.Tensor], k: Optional[int] = None) -> Callable[[], None]:
    if provider in SPARSE_PROVIDERS:
        return make_sparse_step(provider, inputs, k)
    x, w, b = (inputs[k].detach().clone().requires_grad_(True) for k in ("x", "w", "b"))
    xt, wt, bt = inputs["xt"], inputs["wt"], inputs["bt"]

    if provider == MATERIALISED:
        def step():
            logits = F.linear(x, w, b)
            with torch.no_grad():
                teacher = F.linear(xt, wt, bt)
            ak.fused_adaptive_kd(logits, teacher).backward()
            x.grad = w.grad = b.grad = None
        return step
    if provider == CHUNKED_COMPILE:
        chunk = default_chunk_size(x.shape[0], x.shape[1], x.element_size())

        def chunked_step():
            _, x.grad, w.grad, b.grad = chunked_compile_loss(x.detach(), w.detach(), b.detach(), xt, wt, bt, chunk)
            x.grad = w.grad = b.grad = None
        return chunked_step

    def fused_step():
        ak.fused_linear_adaptive_kd(x, w, xt, wt, student_bias=b, teacher_bias=bt).backward()
        x.grad = w.grad = b.grad = None
    return fused_step


def peak_extra_bytes(case: LinearCase, provider: str, step: Callable[[], None], k: Optional[int] = None
                     ) -> Optional[int]:
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
    command = [sys.executable, "-m", "benchmarks.lm", provider, case.name, str(case.dtype).split(".")[-1], str(k or 0)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {provider} {case.name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_bytes"]


def _probe(provider: str, shape: str, dtype: str, k: str = "0") -> None:
    case = LinearCase(*parse_linear_shape(shape), getattr(torch, dtype), "cpu")
    print(json.dumps({"extra_bytes": peak_growth_bytes(make_step(provider, case.make_inputs(), int(k) or None))}))


def _rows_of(case: LinearCase, steps: Dict[str, Callable[[], None]], repeats: int, budget: float, memory: bool,
             baseline: str, k: Optional[int]) -> List[dict]:
    timings = time_in_rounds(steps, case.device, repeats, budget)
    rows = []
    for provider, timing in timings.items():
        extra = peak_extra_bytes(case, provider, steps[provider], k) if memory else None
        rows.append(dict(shape=case.name, dtype=str(case.dtype).split(".")[-1], provider=provider, k=k,
                         median_ms=timing.median, min_ms=min(timing.times_ms), max_ms=max(timing.times_ms),
                         runs=len(timing.times_ms), time_vs_baseline=timing.median / timings[baseline].median,
                         baseline=baseline, extra_mb=None if extra is None else extra / 2**20))
    return rows


def run(shapes: List[str], dtype: torch.dtype, device: str, repeats: int, budget: float, memory: bool,
        topk: tuple = DEFAULT_TOPK) -> List[dict]:
    """The dense rows of every shape, then the sparse rows of each k (skipped where k exceeds the vocabulary);
    memory ratios are against the dense materialised path of the same shape."""
    rows = []
    for text in shapes:
        case = LinearCase(*parse_linear_shape(text), dtype, device)
        inputs = case.make_inputs()
        case_rows = _rows_of(case, {provider: make_step(provider, inputs) for provider in PROVIDERS}, repeats, budget,
                             memory, CHUNKED_COMPILE, None)
        for k in (k for k in topk if k <= case.vocab):
            steps = {provider: make_step(provider, inputs, k) for provider in SPARSE_PROVIDERS}
            case_rows += _rows_of(case, steps, repeats, budget, memory, TOPK_COMPILE, k)
        materialised = case_rows[PROVIDERS.index(MATERIALISED)]["extra_mb"]
        for row in case_rows:
            row["extra_vs_materialised"] = row["extra_mb"] / materialised if materialised else None
        rows += case_rows
    return rows


def print_table(rows: List[dict]) -> None:
    print(f"{'shape (NxHxV)':<18} {'dtype':<8} {'provider':<20} {'k':>5} {'median ms':>10} {'min':>9} {'max':>9} "
          f"{'x time':>7} {'extra MB':>9} {'x mem':>6}")
    for row in rows:
        extra = f"{row['extra_mb']:9.0f}" if row.get("extra_mb") is not None else f"{'-':>9}"
        ratio = f"{row['extra_vs_materialised']:6.2f}" if row.get("extra_vs_materialised") is not None else f"{'-':>6}"
        k = f"{row['k']:5d}" if row.get("k") else f"{'-':>5}"
        print(f"{row['shape']:<18} {row['dtype']:<8} {row['provider']:<20} {k} {row['median_ms']:10.1f} "
              f"{row['min_ms']:9.1f} {row['max_ms']:9.1f} {row['time_vs_baseline']:7.2f} {extra} {ratio}")
    print(f"x time: median relative to '{CHUNKED_COMPILE}' (dense rows) or '{TOPK_COMPILE}' (top-k rows, same k); "
          f"x mem: peak above the inputs and weights relative to '{MATERIALISED}'")


def plot(rows: List[dict], path: str) -> None:
    """Median time and peak extra memory of every provider, one group of bars per shape and k."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(row["shape"], row.get("k") or 0) for row in rows}, key=lambda g: (g[0], g[1]))
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, key, label in ((axes[0], "median_ms", "median fwd+bwd (ms)"), (axes[1], "extra_mb", "peak extra (MB)")):
        for group_index, (shape, k) in enumerate(groups):
            members = [row for row in rows if row["shape"] == shape and (row.get("k") or 0) == k]
            for slot, row in enumerate(members):
                if row.get(key) is None:
                    continue
                axis.bar(group_index + (slot - 1) * 0.27, row[key], width=0.25, color=f"C{slot}",
                         label=BAR_LABELS[slot] if group_index == 0 else None)
        axis.set_xticks(range(len(groups)))
        axis.set_xticklabels([f"{shape}\n{'dense' if not k else f'top-{k}'}" for shape, k in groups], fontsize=8)
        axis.set_yscale("log")
        axis.set_ylabel(label)
    axes[0].legend(fontsize=8)
    figure.suptitle("LLM distillation loss: dense teacher (materialised / chunked compile / fused-linear) and top-k "
                    "teacher (eager / compile / fused-linear)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    _probe(*sys.argv[1:5])
