"""Latency of subnets on the user's own device: a lookup table of measured blocks, its prediction for any
subnet, and measured whole subnets to fit and check it (`alphanet latency`, `alphanet search --latency_table`).

A subnet is a sequence of parts, each fixed by the shapes it sees:

    stem   |resolution|first width
    block  |stage|input size|in -> out channels|kernel|expand|stride     (one per block of the subnet)
    head   |input size|channels|last width                               (head convs, pooling, classifier)

`build_table` measures every distinct part of a space: the part as the exported static layers (plain conv /
BN / linear, what `alphanet export` writes and a user deploys), channels-last, under `torch.inference_mode`,
`warmup` calls then the median of `repeats` single calls, on the device, batch size, thread count and dtype
asked for. The table is a JSON file rewritten (atomically) as it grows, so a killed measurement keeps what
it measured and a rerun of the same command measures the rest. A subnet's predicted latency is the sum of
its parts' entries; `calibrate` fits `measured = slope * sum + intercept` on measured whole subnets (the
per-call and between-layer costs the parts do not see) and stores it, with its error, in the table.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoint import atomic_write
from .model import ElasticSupernet, extract, static_block, static_head, static_stem
from .space import ArchConfig, SearchSpace, get_space

FORMAT = "alphanet-latency-table"
VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL_TIMING, QUICK_TIMING = (10, 30), (2, 5)  # (warmup calls, timed calls)
SETTINGS = ("format", "version", "space", "device", "batch_size", "threads", "dtype", "warmup", "repeats")


def _conv_out(size: int, stride: int) -> int:
    return (size + stride - 1) // stride


# ---------------------------------------------------------------------------------------------
# Parts of a subnet


def subnet_parts(space: SearchSpace, config: ArchConfig) -> List[str]:
    """The keys of the parts `config` runs, in order."""
    cfg = space.validate(config)
    widths = cfg["width"]
    keys = [f"stem|{cfg['resolution']}|{widths[0]}"]
    size, in_channels = _conv_out(cfg["resolution"], space.first_conv_stride), widths[0]
    for index, stage in enumerate(space.stages):
        out_channels = widths[index + 1]
        for block in range(cfg["depth"][index]):
            stride = stage.stride if block == 0 else 1
            keys.append(f"block|{index}|{size}|{in_channels}>{out_channels}|{cfg['kernel_size'][index]}|"
                        f"{cfg['expand_ratio'][index]}|{stride}")
            size, in_channels = _conv_out(size, stride), out_channels
    keys.append(f"head|{size}|{in_channels}|{widths[-1]}")
    return keys


def _configs_covering(space: SearchSpace) -> Iterator[ArchConfig]:
    """Configs that together run every distinct part of the space: each resolution, and per stage every
    (input width, output width, kernel, expand) at full depth, the other stages at their first choices."""
    if space.width_range:  # slimmable: the widths move together with the multiplier
        for width in _slimmable_steps(space):
            base = space.width_config(width)
            for resolution in space.resolutions:
                yield {**base, "resolution": resolution}
        return
    choices = space.choices()
    base = space.max_config()
    for resolution in space.resolutions:
        for index, stage in enumerate(space.stages):
            previous = choices["width"][index]
            for in_width in previous:
                for out_width in stage.widths:
                    for kernel in stage.kernel_sizes:
                        for expand in stage.expand_ratios:
                            config = json.loads(json.dumps(base))
                            config["resolution"] = resolution
                            config["width"][index], config["width"][index + 1] = in_width, out_width
                            config["kernel_size"][index], config["expand_ratio"][index] = kernel, expand
                            yield config
        for first in choices["width"][0]:  # the stem at each width, the head at each pair of widths
            for last_stage in choices["width"][-2]:
                for last in choices["width"][-1]:
                    config = json.loads(json.dumps(base))
                    config["resolution"], config["width"][0] = resolution, first
                    config["width"][-2], config["width"][-1] = last_stage, last
                    if space.head == "pool":
                        config["width"][-1] = last_stage
                    yield config


def _slimmable_steps(space: SearchSpace) -> List[float]:
    """One width multiplier inside each interval where no layer's width changes (every gene's width is a
    monotone step function of the multiplier; the steps are found by bisection), and the range's ends."""
    from .space import scaled_width
    low, high = space.width_range
    steps = set()
    for base in filter(None, space.base_widths):
        for value in range(scaled_width(base, low) + 8, scaled_width(base, high) + 1, 8):
            left, right = low, high  # the smallest multiplier whose width reaches `value`
            for _ in range(60):
                middle = (left + right) / 2
                left, right = (left, middle) if scaled_width(base, middle) >= value else (middle, right)
            steps.add(right)
    points = sorted({low, high, *steps})
    return [low, high] + [(a + b) / 2 for a, b in zip(points, points[1:])]


def all_parts(space: SearchSpace) -> List[str]:
    """Every distinct part of the space, in a stable order."""
    seen: Dict[str, None] = {}
    for config in _configs_covering(space):
        for key in subnet_parts(space, config):
            seen.setdefault(key)
    return list(seen)


def part_module(supernet: ElasticSupernet, key: str) -> Tuple[nn.Module, Tuple[int, int, int]]:
    """The static layers of a part and the (channels, height, width) of its input."""
    kind, *fields = key.split("|")
    space = supernet.space
    if kind == "stem":
        resolution, width = map(int, fields)
        return static_stem(supernet, width), (space.in_channels, resolution, resolution)
    if kind == "block":
        stage, size = int(fields[0]), int(fields[1])
        in_channels, out_channels = map(int, fields[2].split(">"))
        kernel, expand, stride = map(int, fields[3:])
        # the stage's first block with this stride whose weights hold the input width (a stride-1 stage's first
        # block may be narrower than its later ones)
        block = next(block for block in supernet.stages[stage]
                     if block.stride == stride and block.project.weight.shape[1] >= 1
                     and (block.expand_conv if block.has_expand else block.project).weight.shape[1] >= in_channels)
        return static_block(space, block, in_channels, out_channels, kernel, expand), (in_channels, size, size)
    size, in_channels, last = map(int, fields)
    head, classifier = static_head(supernet, in_channels, last)
    return nn.Sequential(head, nn.Flatten(1), classifier), (in_channels, size, size)


# ---------------------------------------------------------------------------------------------
# Timing


def median_ms(module: nn.Module, input_shape: Sequence[int], device: torch.device, dtype: torch.dtype,
              warmup: int, repeats: int) -> float:
    """Median wall time of one forward call in ms: channels-last input, inference mode, synchronised."""
    module = module.to(device=device, dtype=dtype).eval().to(memory_format=torch.channels_last)
    x = torch.randn(*input_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for call in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            module(x)
            sync()
            if call >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def machine() -> str:
    name = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        name += f"; {torch.cuda.get_device_name()}"
    return f"{name}; {os.cpu_count()} CPUs; {platform.system()} {platform.release()}"


class LatencyTable:
    """A table file: its settings, the measured parts (ms) and the calibration, if fitted."""

    def __init__(self, data: Dict[str, object], path: Optional[str] = None):
        self.data, self.path = data, path

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        if not os.path.isfile(path):
            raise ValueError(f"latency table {path!r} does not exist; make it with alphanet latency")
        try:
            with open(path) as handle:
                data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"latency table {path!r} is not JSON") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a latency table of alphanet latency")
        return cls(data, path)

    @property
    def space(self) -> SearchSpace:
        return get_space(self.data["space"])

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=1).encode())

    def check_space(self, space: SearchSpace) -> None:
        if self.data["space"] != space.name:
            raise ValueError(f"latency table {self.path!r} was measured for the {self.data['space']!r} space, not "
                             f"{space.name!r}")
        missing = [key for key in all_parts(space) if key not in self.data["entries"]]
        if missing:
            raise ValueError(f"latency table {self.path!r} is unfinished: {len(missing)} of its space's parts are not "
                             f"measured; rerun alphanet latency with the same settings to finish it")

    def parts_sum(self, config: ArchConfig) -> float:
        entries = self.data["entries"]
        return sum(entries[key] for key in subnet_parts(self.space, config))

    def predict(self, config: ArchConfig) -> float:
        """Predicted latency (ms): the parts' sum, through the calibration where one was fitted."""
        total = self.parts_sum(config)
        fit = self.data.get("calibration")
        return fit["slope"] * total + fit["intercept"] if fit else total

    def timing(self) -> Tuple[torch.device, torch.dtype, int, int, int]:
        return (torch.device(self.data["device"]), DTYPES[self.data["dtype"]], self.data["batch_size"],
                self.data["warmup"], self.data["repeats"])


def _settings(space, device, batch_size, threads, dtype, quick) -> Dict[str, object]:
    warmup, repeats = QUICK_TIMING if quick else FULL_TIMING
    return dict(format=FORMAT, version=VERSION, space=space.name, device=device, batch_size=batch_size,
                threads=threads, dtype=dtype, warmup=warmup, repeats=repeats)


def build_table(space: SearchSpace, out: str, *, device: str = "cpu", batch_size: int = 1, threads: int = 1,
                dtype: str = "float32", quick: bool = False, progress: bool = True, seed: int = 0) -> LatencyTable:
    """Measures (or finishes) the table of `space` in `out` (see the module doc)."""
    from tqdm.auto import tqdm

    settings = _settings(space, device, batch_size, threads, dtype, quick)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    table = LatencyTable(dict(settings, entries={}), out)
    if os.path.exists(out):
        existing = LatencyTable.load(out)
        for key in SETTINGS:
            if existing.data.get(key) != settings[key]:
                raise ValueError(f"{out!r} holds a latency table with other settings ({key}: "
                                 f"{existing.data.get(key)!r} there, {settings[key]!r} now); choose another --out")
        table = existing
    table.data.update(machine=machine(), torch=torch.__version__, date=datetime.date.today().isoformat())
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    supernet = ElasticSupernet(space).eval()
    keys = [key for key in all_parts(space) if key not in table.data["entries"]]
    warmup, repeats = settings["warmup"], settings["repeats"]
    last_save = time.monotonic()
    for key in tqdm(keys, desc=f"latency {space.name}", unit="part", disable=not progress):
        module, shape = part_module(supernet, key)
        table.data["entries"][key] = median_ms(module, (batch_size, *shape), torch.device(device), DTYPES[dtype],
                                               warmup, repeats)
        if time.monotonic() - last_save > 1:  # a kill loses at most a second of measurements
            table.save()
            last_save = time.monotonic()
    table.save()
    return table


# ---------------------------------------------------------------------------------------------
# Whole subnets: measurement, calibration, agreement


def measure_subnet(table: LatencyTable, subnet: nn.Module, resolution: int) -> float:
    device, dtype, batch_size, warmup, repeats = table.timing()
    torch.set_num_threads(table.data["threads"])
    return median_ms(subnet, (batch_size, table.space.in_channels, resolution, resolution), device, dtype, warmup,
                     repeats)


def spearman(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for position in range(i, j + 1):
                result[order[position]] = (i + j) / 2
            i = j + 1
        return result
    a, b = ranks(first), ranks(second)
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    scale = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return covariance / scale if scale else float("nan")


def calibrate(table: LatencyTable, configs: List[ArchConfig], progress: bool = True,
              named: Optional[Dict[str, ArchConfig]] = None) -> Dict[str, object]:
    """Measures each config as a whole static subnet (random weights: latency does not depend on them), fits
    `measured = slope * parts_sum + intercept` by least squares, stores it in the table and returns the
    report: per subnet predicted (after the fit) and measured ms, their rank correlation, the mean absolute
    error, and FLOPs' rank correlation with the measured latency."""
    from tqdm.auto import tqdm

    from .flops import mflops

    space = table.space
    supernet = ElasticSupernet(space).eval()
    rows = []
    for name, config in tqdm([*((n, c) for n, c in (named or {}).items()), *((None, c) for c in configs)],
                             desc="whole subnets", unit="subnet", disable=not progress):
        measured = measure_subnet(table, extract(supernet, config), config["resolution"])
        rows.append(dict(name=name, arch=config, parts_ms=table.parts_sum(config), measured_ms=measured,
                         mflops=mflops(space, config)))
    sums, measured = [row["parts_ms"] for row in rows], [row["measured_ms"] for row in rows]
    mean_x, mean_y = statistics.fmean(sums), statistics.fmean(measured)
    spread = sum((x - mean_x) ** 2 for x in sums)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sums, measured)) / spread if spread else 1.0
    intercept = mean_y - slope * mean_x
    for row in rows:
        row["predicted_ms"] = slope * row["parts_ms"] + intercept
    errors = [abs(row["predicted_ms"] - row["measured_ms"]) for row in rows]
    fit = dict(slope=slope, intercept=intercept, subnets=len(rows), mae_ms=statistics.fmean(errors),
               mape=statistics.fmean(e / row["measured_ms"] for e, row in zip(errors, rows)),
               spearman_predicted=spearman([row["predicted_ms"] for row in rows], measured),
               spearman_mflops=spearman([row["mflops"] for row in rows], measured))
    table.data["calibration"] = fit
    table.save()
    return dict(fit=fit, subnets=rows)


def random_configs(space: SearchSpace, count: int, seed: int) -> List[ArchConfig]:
    rng = random.Random(seed)
    return [space.random_config(rng) for _ in range(count)]


def window_predicate(table: Optional[LatencyTable], low: Optional[float], high: Optional[float]
                     ) -> Callable[[ArchConfig], bool]:
    if table is None:
        return lambda config: True
    return lambda config: (low is None or table.predict(config) >= low) and (high is None or
                                                                             table.predict(config) <= high)


# ---------------------------------------------------------------------------------------------
# `alphanet latency`


def main(argv: Optional[List[str]] = None) -> None:
    from .config import CommandLineParser, positive_int
    from .errors import run_command
    from .space import PUBLISHED, SPACES

    parser = CommandLineParser(prog="alphanet latency", description=__doc__)
    parser.add_argument("--space", required=True, help=f"search space: {', '.join(sorted(SPACES))}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch_size", type=positive_int, default=1)
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_TIMING[0]} warm-up and {QUICK_TIMING[1]} timed calls per part instead of "
                             f"{FULL_TIMING[0]} and {FULL_TIMING[1]} (tests, a first look)")
    parser.add_argument("--validate", type=int, default=0, metavar="N",
                        help="then measure N random whole subnets (and the published A0-A6 in the alphanet space), "
                             "fit the calibration and report predicted vs measured")
    parser.add_argument("--seed", type=int, default=0, help="of the random subnets")
    parser.add_argument("--out", required=True, help="the table (JSON); an unfinished one is resumed")
    args = parser.parse_args(argv)
    if args.space not in SPACES:
        parser.error(f"unknown space {args.space!r}: choose from {', '.join(sorted(SPACES))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.validate < 0:
        parser.error("--validate must be 0 or more")
    if os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is a folder; give the table's file name")

    def measure() -> Dict[str, object]:
        space = get_space(args.space)
        table = build_table(space, args.out, device=args.device, batch_size=args.batch_size,
                            threads=args.threads or torch.get_num_threads(), dtype=args.dtype, quick=args.quick)
        print(f"{args.out}: {len(table.data['entries'])} parts of the {space.name!r} space, {args.device}, batch "
              f"{args.batch_size}, {table.data['threads']} threads, {args.dtype}")
        if not args.validate:
            return {}
        named = {name: model.arch for name, model in PUBLISHED.items()} if space.name == "alphanet" else {}
        report = calibrate(table, random_configs(space, args.validate, args.seed), named=named)
        for row in report["subnets"]:
            if row["name"]:
                print(f"{row['name']:>6}: predicted {row['predicted_ms']:8.2f} ms, measured {row['measured_ms']:8.2f} ms,"
                      f" {row['mflops']:7.1f} MFLOPs")
        fit = report["fit"]
        print(f"calibration over {fit['subnets']} subnets: measured = {fit['slope']:.3f} x parts + "
              f"{fit['intercept']:.3f} ms; mean absolute error {fit['mae_ms']:.3f} ms ({100 * fit['mape']:.1f}%); "
              f"rank correlation with measured latency: predicted {fit['spearman_predicted']:.3f}, MFLOPs "
              f"{fit['spearman_mflops']:.3f}")
        atomic_write(os.path.splitext(args.out)[0] + "_validation.json", json.dumps(report, indent=1).encode())
        return report

    run_command("alphanet latency", measure, kept="the table keeps every part measured")


if __name__ == "__main__":
    main()
