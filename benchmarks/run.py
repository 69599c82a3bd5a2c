"""`python -m benchmarks`: fused_adaptive_kd against eager PyTorch and torch.compile.

Every provider runs on the same inputs in this one process; see timing.time_in_rounds for how the
runs are scheduled and memory.py for how peak memory is measured. Baselines: AlphaNet's own loss code
and this project's eager reference, each eager and under torch.compile; speed-ups are against the
fastest eager and the fastest compiled baseline of each case, named in the summary lines.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from typing import Dict, List, Optional

import torch

from . import memory, report
from .cases import (COMPILED_BASELINES, DEFAULT_DTYPE, DEFAULT_SHAPES, EAGER_BASELINES, FULL_SHAPES, LOG_SOFTMAX, MODES,
                    Case, fastest, make_step, parse_shape, select_providers)
from .timing import copy_bandwidth_gbs, time_in_rounds


class OneLineErrors(argparse.ArgumentParser):
    """Bad arguments as one line (`python -m benchmarks: error: ...`), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = OneLineErrors(prog="python -m benchmarks", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["loss", "lm", "data"], default="loss",
                        help="loss: the KD loss on logits (default); lm: LLM distillation's projection + loss "
                             "(materialised logits, token-chunked torch.compile, fused-linear); data: training "
                             "images/s of the ImageNet input pipeline against the reference's")
    parser.add_argument("--data-images", type=int, default=300, help="data suite: JPEGs generated and read")
    parser.add_argument("--data-root", default=os.path.join("results", "data-jpegs"),
                        help="data suite: folder of the generated JPEGs (reused when it holds --data-images)")
    parser.add_argument("--linear-shapes", nargs="+", default=None,
                        help="tokens x hidden x vocab (NxHxV) shapes of the lm suite (default: 512x256x8000 on CPU; "
                             "4096x1024x32000 and 8192x2048x128256 on CUDA)")
    parser.add_argument("--topk", type=int, nargs="*", default=None,
                        help="lm suite: k of the sparse-teacher rows (default 32 128 1024; none: --topk with no value)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="logits dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="NxC shapes (default: the device's set; on CPU the quick one, see --full)")
    parser.add_argument("--full", action="store_true",
                        help="the larger set: 4096x32000 on CPU, and 8 s of timed calls per provider and case")
    parser.add_argument("--providers", nargs="+", default=None,
                        help="alphanet-eager, alphanet-compile, reference-eager, reference-compile, fused-cpu, "
                             "fused-cuda, fused-triton, 'liger-kl (alpha 1,1)', 'kl-eager (alpha 1,1)', "
                             "'log_softmax (floor)' (default: all available of these); opt-in: 'fused-compile (MODE)', "
                             "the op under torch.compile, MODE default (and on CUDA max-autotune-no-cudagraphs, "
                             "reduce-overhead)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per provider and case (median)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed calls per provider and case; slow providers get fewer (>= 3) "
                             "(default 2, with --full 8)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", default=None, help="results folder (default: results/<device>-<time>)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    args.budget = args.budget if args.budget is not None else (8.0 if args.full else 2.0)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    if args.data_images < 2 * 32:
        parser.error("--data-images must be at least 64 (two batches)")
    return args


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine_description(device: str) -> str:
    if device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}; commit {_commit()}"


def peak_bytes(case: Case, provider: str, step) -> Optional[int]:
    if case.device == "cuda":
        return memory.cuda_peak_bytes(step)
    return memory.cpu_peak_bytes(provider, case.rows, case.cols, str(case.dtype).removeprefix("torch."), case.mode)


def run_case(case: Case, providers: Dict, args, copy_gbs: float) -> List[report.Row]:
    student, teacher = case.make_inputs()
    steps = {name: make_step(fn, student, teacher, "fwd" if name == LOG_SOFTMAX else case.mode)
             for name, fn in providers.items()}
    timings = time_in_rounds(steps, case.device, args.repeats, args.budget)
    medians = {name: timing.median for name, timing in timings.items()}
    best_eager, best_compile = fastest(medians, EAGER_BASELINES), fastest(medians, COMPILED_BASELINES)
    element = case.dtype.itemsize
    ideal = case.rows * case.cols * element * (3 if case.mode == "fwd+bwd" else 2)
    rows = []
    for name, timing in timings.items():
        peak = None
        if not args.no_memory and case.mode == "fwd+bwd" and name != LOG_SOFTMAX:
            peak = peak_bytes(case, name, steps[name])
        gbs = case.bytes_moved() / (timing.median * 1e-3) / 1e9
        rows.append(report.Row(
            shape=case.name, dtype=str(case.dtype).removeprefix("torch."), mode=case.mode, provider=name,
            median_ms=timing.median, min_ms=min(timing.times_ms), p20_ms=timing.percentile(0.2),
            p80_ms=timing.percentile(0.8), max_ms=max(timing.times_ms), runs=len(timing.times_ms),
            speedup_vs_eager=medians[best_eager] / timing.median if best_eager else None,
            speedup_vs_compile=medians[best_compile] / timing.median if best_compile else None,
            gbs=gbs, fraction_of_copy_bw=gbs / copy_gbs,
            peak_mb=None if peak is None else peak / 2**20,
            peak_vs_ideal=None if peak is None else peak / ideal,
            eager_baseline=best_eager, compile_baseline=best_compile,
            speedup_vs_floor=medians[LOG_SOFTMAX] / timing.median if LOG_SOFTMAX in medians else None,
        ))
    return rows


def run_lm(args, dtype: torch.dtype) -> List[dict]:
    from . import lm

    print(machine_description(args.device))
    shapes = args.linear_shapes or lm.DEFAULT_LM_SHAPES[args.device]
    topk = lm.DEFAULT_TOPK if args.topk is None else tuple(args.topk)
    if any(k < 1 for k in topk):
        raise SystemExit("python -m benchmarks: error: --topk values must be >= 1")
    rows = lm.run(shapes, dtype, args.device, min(args.repeats, 5), args.budget, not args.no_memory, topk)
    lm.print_table(rows)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or os.path.join("results", f"lm-{args.device}-{stamp}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump({"machine": machine_description(args.device), "rows": rows}, handle, indent=1)
    lm.plot(rows, os.path.join(out_dir, "lm.png"))
    print(f"wrote {os.path.join(out_dir, 'results.json')} and lm.png")
    return rows


def run_data(args) -> List[dict]:
    from . import data_pipeline

    print(f"{machine_description('cpu')}; {args.data_images} JPEGs in {args.data_root}")
    rows = data_pipeline.run(args.data_root, args.data_images, image_size=224)
    line = data_pipeline.print_table(rows)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or os.path.join("results", f"data-{stamp}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump({"machine": machine_description("cpu"), "rows": rows, "summary": line}, handle, indent=1)
    print(f"wrote {os.path.join(out_dir, 'results.json')}")
    return rows


def main(argv: Optional[List[str]] = None) -> List[report.Row]:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype or DEFAULT_DTYPE[args.device])
    if args.suite == "lm":
        return run_lm(args, dtype)
    if args.suite == "data":
        return run_data(args)
    shapes = [parse_shape(text) for text in (args.shapes or (FULL_SHAPES if args.full else DEFAULT_SHAPES)[args.device])]
    providers = select_providers(args.providers, args.device)
    machine = machine_description(args.device)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or os.path.join("results", f"{args.device}-{stamp}")
    print(f"results: {', '.join(report.output_paths(out_dir))} (rewritten after every case)", flush=True)
    copy_gbs = copy_bandwidth_gbs(args.device)
    print(f"{machine}\ncopy bandwidth {copy_gbs:.1f} GB/s; providers: {', '.join(providers)}")
    title = f"fused_adaptive_kd, {str(dtype).removeprefix('torch.')}: {machine}; copy {copy_gbs:.1f} GB/s"
    rows: List[report.Row] = []
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    cases = [Case(r, c, dtype, args.device, mode) for (r, c) in shapes for mode in args.modes]
    progress = tqdm(cases, desc="cases", unit="case") if tqdm else cases
    for case in progress:
        rows += run_case(case, providers, args, copy_gbs)
        report.write_outputs(rows, out_dir, title)  # a stopped run keeps every finished case
    report.print_table(rows)
    for path in report.output_paths(out_dir):
        print(f"wrote {path}")
    return rows
