"""CPU speed of fused_adaptive_kd against eager PyTorch and torch.compile, forward + backward.

    python -m benchmarks.cpu_speed [--shapes 2048x1000 512x32000] [--repeats 15] [--threads N]

Every provider runs on the same fp32 inputs in this one process; each time is the median of
`--repeats` timed runs after warm-up, in blocks that take turns over three rounds (compile time
excluded and reported apart). Baselines: the
eager reference `adaptive_kd_reference` (same semantics as the op) and `torch.compile` of it, and
AlphaNet's own loss code eager and compiled. Prints a table and the ratios the op is judged by:
speedup over the eager and the compiled reference, and time relative to `torch.log_softmax` of the
student logits alone (a floor: our op needs about two exponentials per element, log_softmax one).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

from alphadiv_kernels import adaptive_kd_reference, alphanet_adaptive_loss_soft, fused_adaptive_kd


def timed_in_rounds(steps: Dict[str, Callable[[], None]], repeats: int, rounds: int = 3, warmup: int = 3
                    ) -> Dict[str, Tuple[float, float, float]]:
    """(median, min, max) wall time in ms of each step over `repeats` runs.

    Each provider runs a block of consecutive calls (its steady state: the allocator reuses what
    the previous call freed, as in a training loop), and the blocks take turns over `rounds`
    rounds, so slow drift of a shared machine reaches every provider alike.
    """
    times: Dict[str, List[float]] = {name: [] for name in steps}
    per_round = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(warmup):
                step()
            for _ in range(per_round):
                start = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def forward_backward(loss_fn: Callable, student: torch.Tensor, teacher: torch.Tensor) -> Callable[[], None]:
    leaf = student.detach().clone().requires_grad_(True)

    def step():
        loss_fn(leaf, teacher).backward()
        leaf.grad = None

    return step


def run_shape(rows: int, cols: int, repeats: int) -> Dict[str, Tuple[float, float, float]]:
    generator = torch.Generator().manual_seed(rows * 100003 + cols)
    student = torch.randn(rows, cols, generator=generator) * 3
    teacher = torch.randn(rows, cols, generator=generator) * 3
    steps = {}
    for name, loss_fn in (("reference", adaptive_kd_reference), ("AlphaNet code", alphanet_adaptive_loss_soft)):
        compiled = torch.compile(loss_fn)
        start = time.perf_counter()
        forward_backward(compiled, student, teacher)()  # compile outside the timed runs
        print(f"  (torch.compile of the {name} took {time.perf_counter() - start:.1f} s, not counted)")
        steps[f"eager {name}"] = forward_backward(loss_fn, student, teacher)
        steps[f"torch.compile {name}"] = forward_backward(compiled, student, teacher)
    steps["fused_adaptive_kd (cpu)"] = forward_backward(lambda s, t: fused_adaptive_kd(s, t, backend="cpu"),
                                                        student, teacher)
    steps["log_softmax(student), forward only"] = lambda: torch.log_softmax(student, -1)
    return timed_in_rounds(steps, repeats)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["2048x1000", "512x32000"], help="NxC shapes")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per provider (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, forward+backward, "
          f"median of {args.repeats}")
    for shape in args.shapes:
        rows, cols = (int(x) for x in shape.lower().split("x"))
        print(f"\n{rows}x{cols}")
        results = run_shape(rows, cols, args.repeats)
        for name, (median, low, high) in results.items():
            print(f"  {name:38s} {median:9.2f} ms   (min {low:.2f}, max {high:.2f})")
        ours = results["fused_adaptive_kd (cpu)"][0]
        for name in ("reference", "AlphaNet code"):
            print(f"  speedup over eager {name + ':':15s} {results['eager ' + name][0] / ours:6.1f}x   "
                  f"over torch.compile: {results['torch.compile ' + name][0] / ours:5.1f}x")
        print(f"  time / log_softmax:          {ours / results['log_softmax(student), forward only'][0]:6.2f}x")


if __name__ == "__main__":
    main()
