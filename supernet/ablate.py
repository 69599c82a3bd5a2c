"""`alphanet ablate`: the paper's comparisons as one command, over seeds, with confidence intervals.

    alphanet ablate --grid kd=none,kl,adaptive --seeds 0,1,2 [--quick] [--preset ablation] [--key value ...]
    alphanet ablate --grid kd=kl kd_temperature=0.5,1,2,4 --seeds 0,1,2
    alphanet ablate --grid alphas=-1:1,-0.5:0.5,-2:2 kd_clip=2,5,10 --seeds 0,1,2

Every grid point (the product of the --grid values; `alphas=MIN:MAX` sets alpha_min and alpha_max) is
trained once per seed by `alphanet train` in a process of its own, in `OUT/runs/<point>/seed-<s>`, its
output in `OUT/logs/`. The comparison's baseline, KL distillation (`kd=kl`, the other grid keys at the
preset's values), is trained too when the grid lacks it. A finished run is never run again and an
unfinished one resumes from its checkpoint, so the same command continues an interrupted ablation,
and the same command with more seeds extends a finished one.

Per grid point the calibrated test top-1 of the max and min subnets (and of each width of a slimmable
space) is reported as mean and standard deviation over seeds, with the difference to the KL baseline
paired by seed: its mean and 95% confidence interval (Student's t with n - 1 degrees of freedom over
the per-seed differences). Written to OUT: ablation.md (the table), ablation.csv (one row per grid
point and metric), ablation.json (everything, with each run's numbers) and ablation.png (difference to
KL per grid point with its interval, as the paper's Figure 6).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import os
import hashlib
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .checkpoint import LOCK_FILE, RunFolderLock, atomic_write
from .errors import CommandError, run_command
from .config import (CommandLineParser, TrainConfig, add_config_arguments, field_types, overrides,
                     resolve_config, to_dict)

BASELINE = {"kd": "kl"}
PAIR_KEYS = {"alphas": ("alpha_min", "alpha_max")}
QUICK_EPOCH_FRACTION = 3  # --quick trains a third of the preset's epochs

Point = Tuple[Tuple[str, str], ...]  # ((grid key, value as written), ...)


# ---------------------------------------------------------------------------------------------
# The grid


def parse_grid(items: Sequence[str]) -> Dict[str, List[str]]:
    """`KEY=V1,V2 ...` into {key: [values]}: train config keys, their aliases, or `alphas=MIN:MAX,...`."""
    grid: Dict[str, List[str]] = {}
    known = field_types(TrainConfig)
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--grid {item!r}: write KEY=V1,V2 (e.g. kd=none,kl,adaptive)")
        if key not in known and key not in PAIR_KEYS:
            raise ValueError(f"--grid {item!r}: {key!r} is not a train config key (see alphanet train --help) "
                             f"or {', '.join(PAIR_KEYS)}")
        if key in ("seed", "out"):
            raise ValueError(f"--grid {item!r}: {key} is set by the ablation (use --seeds, --out)")
        if key in grid:
            raise ValueError(f"--grid: {key!r} appears twice")
        grid[key] = [value.strip() for value in values.split(",")]
        if key in PAIR_KEYS and any(len(value.split(":")) != 2 for value in grid[key]):
            raise ValueError(f"--grid {item!r}: each {key} value is MIN:MAX, e.g. -1:1")
    return grid


def config_values(point: Point) -> Dict[str, str]:
    """The train config keys a grid point sets."""
    values: Dict[str, str] = {}
    for key, value in point:
        if key in PAIR_KEYS:
            values.update(zip(PAIR_KEYS[key], value.split(":")))
        else:
            values[key] = value
    return values


def point_label(point: Point) -> str:
    return " ".join(f"{key}={value}" for key, value in point) or "preset"


def point_folder(point: Point) -> str:
    """A file-system-safe, readable folder name of a grid point."""
    text = "_".join(f"{key}-{value}" for key, value in point) or "preset"
    return re.sub(r"[^A-Za-z0-9_.+-]", "~", text)


@dataclass
class Plan:
    """What an ablation trains: its points (the baseline first when the grid lacks it), seeds and keys."""

    preset: str
    grid: Dict[str, List[str]]
    seeds: List[int]
    fixed: Dict[str, str]  # train keys given on the command line, the same for every run
    yaml_path: Optional[str]
    quick: bool
    points: List[Point]
    baseline: Point

    def to_json(self) -> Dict[str, object]:
        return {"preset": self.preset, "grid": self.grid, "seeds": self.seeds, "fixed": self.fixed,
                "config": self.yaml_path, "quick": self.quick}

    def identity(self) -> Dict[str, object]:
        """What makes two ablations the same one: all but the seeds (more seeds extend an ablation)."""
        return {key: value for key, value in self.to_json().items() if key != "seeds"}

    def default_folder(self) -> str:
        """runs/ablation-<preset>-<digest of the plan>: the same command finds the same folder."""
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return os.path.join("runs", f"ablation-{self.preset}-{digest}")

    def train_values(self, point: Point, seed: int, out: str) -> Dict[str, str]:
        values = {**self.fixed, **config_values(point), "seed": str(seed), "out": out}
        if self.quick and "epochs" not in values:
            epochs = resolve_config(self.preset, self.yaml_path, self.fixed).epochs
            values["epochs"] = str(max(1, math.ceil(epochs / QUICK_EPOCH_FRACTION)))
        return values


def make_plan(preset: str, grid: Dict[str, List[str]], seeds: List[int], fixed: Dict[str, str],
              yaml_path: Optional[str], quick: bool) -> Plan:
    """Every run's config is resolved (and so checked) here, before anything is created or run."""
    clash = [key for key in fixed if key in grid or any(key in PAIR_KEYS.get(g, ()) for g in grid)]
    if clash:
        raise ValueError(f"--{clash[0]} is both a grid key and a fixed key; give it in one place")
    if "kd" in fixed and fixed["kd"] != "kl" and "kd" not in grid:
        raise ValueError("the baseline is KL distillation: a fixed --kd other than kl leaves nothing to compare")
    points: List[Point] = [tuple(zip(grid, values)) for values in itertools.product(*grid.values())]
    effective = {}
    for point in points:
        effective[point] = _effective(preset, yaml_path, {**fixed, **config_values(point)})
    # The baseline: kd=kl, every other grid key at the preset's value (or the fixed keys').
    baseline_values = {**fixed, **BASELINE}
    baseline_config = _effective(preset, yaml_path, baseline_values)
    matches = [point for point in points if effective[point] == baseline_config]
    if matches:
        baseline = matches[0]
    else:
        baseline = tuple((key, baseline_values[key]) for key in BASELINE)
        points = [baseline] + points
    for seed in seeds:  # seeds are config values too
        resolve_config(preset, yaml_path, {**fixed, "seed": str(seed)})
    return Plan(preset, grid, seeds, fixed, yaml_path, quick, points, baseline)


def _effective(preset: str, yaml_path: Optional[str], values: Dict[str, str]) -> Dict[str, object]:
    config = to_dict(resolve_config(preset, yaml_path, values))
    config.pop("out")
    return config


# ---------------------------------------------------------------------------------------------
# Running the runs


def run_folder(out: str, point: Point, seed: int) -> str:
    return os.path.join(out, "runs", point_folder(point), f"seed-{seed}")


def read_result(folder: str) -> Optional[Dict[str, object]]:
    """A finished run's summary (None while it is unfinished)."""
    path = os.path.join(folder, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def train_command(plan: Plan, point: Point, seed: int, folder: str) -> List[str]:
    command = [sys.executable, "-m", "supernet.train"]
    if os.path.exists(os.path.join(folder, "checkpoint.pt")):
        return command + ["--resume", folder]  # the checkpoint holds the run's config
    if os.path.isdir(folder):  # a run stopped before its first checkpoint: nothing of it to keep
        shutil.rmtree(folder)
    command += ["--preset", plan.preset] + (["--config", plan.yaml_path] if plan.yaml_path else [])
    for key, value in plan.train_values(point, seed, folder).items():
        command.append(f"--{key}={value}")
    return command


class RunFailed(CommandError):
    """A run of the ablation exited with an error (its log names it)."""


def execute(plan: Plan, out: str, point: Point, seed: int, threads: int) -> Tuple[Dict[str, object], float]:
    """Train one run (or resume it) in its own process, its output to OUT/logs/; (summary, seconds)."""
    began = time.time()
    folder = run_folder(out, point, seed)
    log_path = os.path.join(out, "logs", f"{point_folder(point)}_seed-{seed}.log")
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    command = train_command(plan, point, seed, folder)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    if done.returncode == 130:
        raise KeyboardInterrupt
    result = read_result(folder)
    if done.returncode != 0 or result is None:
        raise RunFailed(f"the run {point_label(point)} seed {seed} failed (exit {done.returncode}); see {log_path}")
    return result, time.time() - began


def run_all(plan: Plan, out: str, jobs: int) -> Dict[Tuple[Point, int], Dict[str, object]]:
    """Every (point, seed) run, finished ones read back; `jobs` at a time."""
    from tqdm import tqdm

    results: Dict[Tuple[Point, int], Dict[str, object]] = {}
    todo = []
    for point in plan.points:
        for seed in plan.seeds:
            result = read_result(run_folder(out, point, seed))
            if result is None:
                todo.append((point, seed))
            else:
                results[(point, seed)] = result
    if results:
        print(f"{len(results)} of {len(results) + len(todo)} runs already finished; running the other {len(todo)}")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    progress = tqdm(total=len(todo), desc="runs", unit="run", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        started = {pool.submit(execute, plan, out, point, seed, threads): (point, seed) for point, seed in todo}
        try:
            for future in concurrent.futures.as_completed(started):
                point, seed = started[future]
                result, seconds = future.result()
                results[(point, seed)] = result
                progress.write(f"{point_label(point)} seed {seed}: max {result['test_top1_max']:.2f}% "
                               f"min {result['test_top1_min']:.2f}% ({seconds:.0f} s)")
                progress.update()
        except BaseException:
            for future in started:
                future.cancel()
            raise
    progress.close()
    return results


# ---------------------------------------------------------------------------------------------
# Aggregation


def metrics_of(result: Dict[str, object]) -> Dict[str, float]:
    """The numbers compared: the max and min subnets' test top-1, and each width's of a slimmable space."""
    values = {"max": float(result["test_top1_max"]), "min": float(result["test_top1_min"])}
    for row in result.get("widths", []):
        values[f"width {row['width']:.2f}"] = float(row["top1"])
    return values


def t_quantile(degrees_of_freedom: int, probability: float = 0.975) -> float:
    from scipy.stats import t

    return float(t.ppf(probability, degrees_of_freedom))


def summarise(values: Dict[int, float], baseline: Dict[int, float]) -> Dict[str, object]:
    """Mean and std over seeds; the difference to the baseline paired by seed, with a 95% interval."""
    seeds = sorted(values)
    numbers = [values[seed] for seed in seeds]
    row: Dict[str, object] = {"n": len(numbers), "mean": statistics.fmean(numbers),
                              "std": statistics.stdev(numbers) if len(numbers) > 1 else float("nan")}
    paired = [seed for seed in seeds if seed in baseline]
    differences = [values[seed] - baseline[seed] for seed in paired]
    row["paired_seeds"] = len(paired)
    row["diff"] = statistics.fmean(differences) if differences else float("nan")
    if len(differences) > 1:
        half_width = t_quantile(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
        row["ci_low"], row["ci_high"] = row["diff"] - half_width, row["diff"] + half_width
    else:
        row["ci_low"] = row["ci_high"] = float("nan")
    return row


def aggregate(plan: Plan, results: Dict[Tuple[Point, int], Dict[str, object]]) -> List[Dict[str, object]]:
    """One record per (grid point, metric)."""
    per_run = {key: metrics_of(result) for key, result in results.items()}
    metrics = list(dict.fromkeys(name for values in per_run.values() for name in values))
    baseline = {name: {seed: per_run[(plan.baseline, seed)][name] for seed in plan.seeds
                       if name in per_run.get((plan.baseline, seed), {})} for name in metrics}
    rows = []
    for point in plan.points:
        for name in metrics:
            values = {seed: per_run[(point, seed)][name] for seed in plan.seeds
                      if name in per_run.get((point, seed), {})}
            if values:
                rows.append({"point": point_label(point), "baseline": point == plan.baseline, "metric": name,
                             **config_values(point), **summarise(values, baseline[name])})
    return rows


# ---------------------------------------------------------------------------------------------
# Outputs


def _number(value: float, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def cell(row: Dict[str, object]) -> str:
    text = f"{_number(row['mean'])} ± {_number(row['std'])}"
    if row["baseline"]:
        return text + " (KL)"
    return text + f" ({_number(row['diff'], sign=True)} [{_number(row['ci_low'], sign=True)}, " \
                  f"{_number(row['ci_high'], sign=True)}])"


def markdown_table(plan: Plan, rows: List[Dict[str, object]], title: str) -> str:
    by_point = {}
    for row in rows:
        by_point.setdefault(row["point"], {})[row["metric"]] = row
    lines = [f"### {title}", "",
             "Calibrated test top-1 (%), mean ± std over seeds (difference to KL, paired by seed "
             "[95% confidence interval]).", "",
             "| grid point | seeds | max subnet | min subnet |", "|---|---|---|---|"]
    for point in plan.points:
        cells = by_point.get(point_label(point), {})
        if "max" in cells:
            lines.append(f"| {point_label(point)} | {cells['max']['n']} | {cell(cells['max'])} | {cell(cells['min'])} |")
    return "\n".join(lines) + "\n"


def plot(plan: Plan, rows: List[Dict[str, object]], path: str, title: str) -> None:
    from .report import plt, save_figure

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    labels = [point_label(point) for point in plan.points]
    for axis, metric in zip(axes, ("max", "min")):
        chosen = {row["point"]: row for row in rows if row["metric"] == metric}
        xs = list(range(len(labels)))
        means = [chosen[label]["diff"] if label in chosen else float("nan") for label in labels]
        lows = [chosen[label]["ci_low"] if label in chosen else float("nan") for label in labels]
        highs = [chosen[label]["ci_high"] if label in chosen else float("nan") for label in labels]
        errors = [[0 if math.isnan(m - lo) else m - lo for m, lo in zip(means, lows)],
                  [0 if math.isnan(hi - m) else hi - m for m, hi in zip(means, highs)]]
        colors = ["grey" if label == point_label(plan.baseline) else "tab:blue" for label in labels]
        axis.bar(xs, means, color=colors, yerr=errors, capsize=4)
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
        axis.set_title(f"{metric} subnet")
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test top-1 minus KL's (points), 95% CI")
    figure.suptitle(title)
    save_figure(figure, path)


def write_outputs(plan: Plan, out: str, rows: List[Dict[str, object]],
                  results: Dict[Tuple[Point, int], Dict[str, object]]) -> List[str]:
    import csv
    import io

    title = f"alphanet ablate: preset {plan.preset}{' (quick)' if plan.quick else ''}, seeds " \
            f"{','.join(map(str, plan.seeds))}"
    paths = [os.path.join(out, f"ablation.{suffix}") for suffix in ("md", "csv", "json", "png")]
    atomic_write(paths[0], markdown_table(plan, rows, title).encode())
    text = io.StringIO()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(paths[1], text.getvalue().encode())
    runs = [{"point": point_label(point), "seed": seed, "folder": run_folder(out, point, seed),
             **metrics_of(results[(point, seed)])} for point in plan.points for seed in plan.seeds]
    record = {**plan.to_json(), "baseline": point_label(plan.baseline), "rows": rows, "runs": runs}
    atomic_write(paths[2], json.dumps(record, indent=1).encode())
    plot(plan, rows, paths[3], title)
    return paths


# ---------------------------------------------------------------------------------------------
# The command


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: write whole numbers separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds) or any(seed < 0 for seed in seeds):
        raise ValueError(f"--seeds {text!r}: seeds must be distinct and not negative")
    return seeds


def check_folder(out: str, plan: Plan) -> None:
    """ValueError unless `out` is new, empty, or holds this same ablation (fewer or more seeds allowed)."""
    plan_path = os.path.join(out, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as handle:
            saved = json.load(handle)
        saved.pop("seeds", None)
        if saved != json.loads(json.dumps(plan.identity())):
            raise ValueError(f"--out {out!r} holds a different ablation ({plan_path}); choose another folder")
    elif os.path.exists(out) and (not os.path.isdir(out) or set(os.listdir(out)) - {LOCK_FILE}):
        raise ValueError(f"--out {out!r} exists and is not an ablation folder")


def open_folder(out: str, plan: Plan) -> None:
    """The ablation folder with its logs folder and plan, after `check_folder`."""
    check_folder(out, plan)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    atomic_write(os.path.join(out, "plan.json"), json.dumps(plan.to_json(), indent=1).encode())


def draw_boxplot(plan: Plan, out: str, per_group: int) -> List[str]:
    """`alphanet boxplot` over the finished runs: one box per grid point, its seeds pooled."""
    from .boxplot import boxplot
    from .evaluation import TrainedSupernet

    runs = {point_label(point): [TrainedSupernet.load(run_folder(out, point, seed)) for seed in plan.seeds]
            for point in plan.points}
    boxplot(runs, 4, per_group, "test", None, out)
    return [os.path.join(out, name) for name in ("groups.csv", "groups.json", "groups.png")]


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet ablate", description=__doc__)
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                        help="train keys and their values (the grid is their product); alphas=MIN:MAX,...")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of every grid point, comma-separated")
    parser.add_argument("--preset", default="ablation", help="the train preset of every run")
    parser.add_argument("--config", default=None, help="YAML file of train keys, for every run")
    parser.add_argument("--quick", action="store_true",
                        help=f"1/{QUICK_EPOCH_FRACTION} of the preset's epochs, for a first answer")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("--out", default=None,
                        help="ablation folder (default runs/ablation-<preset>-<digest of the command's settings>)")
    parser.add_argument("--boxplot", type=int, default=0, metavar="N",
                        help="also draw Figure 4's box plots: N subnets per FLOPs group (4 groups), the same in every "
                             "run, their test top-1 pooled over the seeds of each grid point (alphanet boxplot)")
    add_config_arguments(parser, exclude=("seed", "out"))  # set per run by --seeds and the ablation folder
    args = parser.parse_args(argv)

    def ablate() -> List[str]:
        if args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        fixed = {name: value for name, value in overrides(args).items() if name != "out"}  # --out: the ablation's
        plan = make_plan(args.preset, parse_grid(args.grid), parse_seeds(args.seeds), fixed, args.config, args.quick)
        out = args.out or plan.default_folder()
        check_folder(out, plan)
        with RunFolderLock(out):  # one ablation per folder
            open_folder(out, plan)
            print(f"alphanet ablate: {len(plan.points)} grid points x {len(plan.seeds)} seeds = "
                  f"{len(plan.points) * len(plan.seeds)} runs in {out} (baseline: {point_label(plan.baseline)})",
                  flush=True)
            results = run_all(plan, out, args.jobs)
            paths = write_outputs(plan, out, aggregate(plan, results), results)
            if args.boxplot > 0:
                paths += draw_boxplot(plan, out, args.boxplot)
            return paths

    paths = run_command("alphanet ablate", ablate, kept="finished runs are kept, rerun the same command to continue")
    with open(paths[0]) as handle:
        print(handle.read())
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
