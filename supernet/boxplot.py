"""`alphanet boxplot`: accuracy of sampled subnets per FLOPs group, one box per run (Figures 4, 9, 10).

    alphanet boxplot --checkpoint RUN_A RUN_B [--label adaptive kl] [--groups 4] [--per_group 20] --out DIR

The space's FLOPs range (min to max subnet) is cut into `--groups` equal intervals (or the intervals
of `--edges 200,250,300`); `--per_group` random subnets are drawn in each (seeded: the same subnets for
every run, which must share a search space), each BN-calibrated and evaluated on `--split` in every
run. Per run and group: min, first quartile, median, third quartile and max of top-1 (numpy's
linear-interpolation percentiles; the whiskers of the plot are min and max). Several run folders
under one label (`--checkpoint A1,A2 B1,B2`) pool their subnets, e.g. the seeds of one ablation point.
Writes `DIR/groups.csv` (one row per run and group), `DIR/groups.json` (the same, with every subnet's
arch, MFLOPs and top-1) and `DIR/groups.png` (the boxes of the runs side by side in each group).
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .checkpoint import RunFolderLock, atomic_write
from .config import CommandLineParser, positive_int
from .errors import run_command
from .evaluation import TrainedSupernet, add_evaluation_arguments
from .flops import mflops
from .space import ArchConfig, SearchSpace

SAMPLING_TRIALS = 200  # random draws per wanted subnet before a sparse group is left with fewer
STATISTICS = ("min", "q1", "median", "q3", "max")


def box_statistics(values: Sequence[float]) -> Dict[str, float]:
    """min, q1, median, q3, max (numpy's linear percentiles) of a non-empty list."""
    q1, median, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return {"min": float(min(values)), "q1": float(q1), "median": float(median), "q3": float(q3),
            "max": float(max(values))}


def group_edges(space: SearchSpace, groups: int, edges: Optional[List[float]] = None) -> List[Tuple[float, float]]:
    """The FLOPs intervals: `edges` as given, or `groups` equal parts of the space's range."""
    if edges is None:
        low, high = mflops(space, space.min_config()), mflops(space, space.max_config())
        edges = [low + (high - low) * i / groups for i in range(groups + 1)]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"--edges {edges}: give at least two increasing MFLOPs values")
    return list(zip(edges, edges[1:]))


def sample_groups(space: SearchSpace, intervals: List[Tuple[float, float]], per_group: int,
                  seed: int) -> List[List[ArchConfig]]:
    """`per_group` distinct random subnets in each interval (the last one closed), drawn from one seeded
    RNG: the same subnets whichever runs are evaluated."""
    rng = random.Random(f"alphanet-groups/{seed}")
    chosen: List[List[ArchConfig]] = [[] for _ in intervals]
    seen = set()
    for _ in range(SAMPLING_TRIALS * per_group * len(intervals)):
        if all(len(group) >= per_group for group in chosen):
            break
        arch = space.random_config(rng)
        key = json.dumps(arch, sort_keys=True)
        flops = mflops(space, arch)
        for index, (low, high) in enumerate(intervals):
            last = index == len(intervals) - 1
            if (low <= flops < high or (last and flops == high)) and len(chosen[index]) < per_group and key not in seen:
                seen.add(key)
                chosen[index].append(arch)
    return chosen


def evaluate_groups(runs: Dict[str, List[TrainedSupernet]], intervals: List[Tuple[float, float]],
                    subnets: List[List[ArchConfig]], split: str, calib_images: Optional[int]) -> List[Dict]:
    """One row per (label, group): the interval, the statistics of top-1 over the group's subnets in
    every run of the label, and the subnets' results."""
    from tqdm import tqdm

    total = sum(len(group) for group in subnets) * sum(len(trained) for trained in runs.values())
    rows = []
    with tqdm(total=total, desc="subnets", unit="subnet", leave=False) as progress:
        for label, trained_runs in runs.items():
            for (low, high), group in zip(intervals, subnets):
                results = []
                for trained in trained_runs:
                    for arch in group:
                        result = trained.evaluate(arch, split, calib_images)
                        results.append({"arch": arch, "mflops": result["mflops"], "top1": result["top1"]})
                        progress.update()
                stats = box_statistics([r["top1"] for r in results]) if results else dict.fromkeys(STATISTICS)
                rows.append({"label": label, "low_mflops": low, "high_mflops": high, "subnets": len(results),
                             **stats, "results": results})
    return rows


def write_outputs(rows: List[Dict], out: str, title: str) -> List[str]:
    from .report import plt, save_figure

    paths = [os.path.join(out, name) for name in ("groups.csv", "groups.json", "groups.png")]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["label", "low_mflops", "high_mflops", "subnets", *STATISTICS],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(paths[0], text.getvalue().encode())
    atomic_write(paths[1], json.dumps(rows, indent=1).encode())
    labels = list(dict.fromkeys(row["label"] for row in rows))
    intervals = list(dict.fromkeys((row["low_mflops"], row["high_mflops"]) for row in rows))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(intervals) * max(1, len(labels)) / 2), 4.5))
    width = 0.8 / len(labels)
    for index, label in enumerate(labels):
        mine = {(row["low_mflops"], row["high_mflops"]): row for row in rows if row["label"] == label}
        boxes = [{"med": mine[i]["median"], "q1": mine[i]["q1"], "q3": mine[i]["q3"], "whislo": mine[i]["min"],
                  "whishi": mine[i]["max"], "label": label} for i in intervals if mine[i]["subnets"]]
        positions = [g + (index - (len(labels) - 1) / 2) * width for g, i in enumerate(intervals) if mine[i]["subnets"]]
        drawn = axis.bxp(boxes, positions=positions, widths=width * 0.9, showfliers=False, patch_artist=True,
                         medianprops={"color": "black"})
        for patch in drawn["boxes"]:
            patch.set_facecolor(f"C{index}")
            patch.set_alpha(0.6)
        axis.plot([], [], color=f"C{index}", linewidth=8, alpha=0.6, label=label)
    axis.set_xticks(range(len(intervals)), [f"{low:.3g}-{high:.3g}" for low, high in intervals])
    axis.set_xlabel("MFLOPs group")
    axis.set_ylabel("top-1 (%), BN recalibrated")
    axis.set_title(title)
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    save_figure(figure, paths[2])
    return paths


def table_lines(rows: List[Dict]) -> List[str]:
    lines = [f"{'run':<16} {'MFLOPs':>15} {'n':>4} " + " ".join(f"{name:>7}" for name in STATISTICS)]
    for row in rows:
        values = " ".join(f"{row[name]:7.2f}" if row[name] is not None else f"{'-':>7}" for name in STATISTICS)
        lines.append(f"{row['label'][:16]:<16} {row['low_mflops']:7.3g}-{row['high_mflops']:<7.3g} "
                     f"{row['subnets']:>4} {values}")
    return lines


def boxplot(runs: Dict[str, List[TrainedSupernet]], groups: int, per_group: int, split: str,
            calib_images: Optional[int], out: str, seed: int = 0, edges: Optional[List[float]] = None) -> List[Dict]:
    """Sample, evaluate and write: the rows (see `evaluate_groups`), also written to `out`."""
    spaces = {trained.space.name for trained_runs in runs.values() for trained in trained_runs}
    if len(spaces) != 1:
        raise ValueError(f"the runs have different search spaces ({', '.join(sorted(spaces))}); the same subnets "
                         "must exist in every run")
    space = next(iter(runs.values()))[0].space
    intervals = group_edges(space, groups, edges)
    subnets = sample_groups(space, intervals, per_group, seed)
    rows = evaluate_groups(runs, intervals, subnets, split, calib_images)
    # A width-only space has few distinct networks per interval; the title then says what was drawn.
    counted = f"{per_group}" if all(len(group) == per_group for group in subnets) else f"up to {per_group} distinct"
    write_outputs(rows, out, f"{space.name}: {counted} subnets per FLOPs group, {split} split")
    return rows


def parse_edges(text: Optional[str]) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--edges {text!r}: write increasing MFLOPs values, e.g. 200,250,300") from None


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet boxplot", description=__doc__)
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="RUN[,RUN...]",
                        help="run folders (or checkpoints), one per box; comma-joined folders pool their subnets")
    parser.add_argument("--label", nargs="+", default=None, help="a name per --checkpoint (default: the folders)")
    parser.add_argument("--groups", type=positive_int, default=4, help="equal FLOPs intervals over the space's range")
    parser.add_argument("--edges", default=None, help="MFLOPs interval edges instead, e.g. 200,250,300,350")
    parser.add_argument("--per_group", type=positive_int, default=20, help="subnets sampled per group")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled subnets")
    parser.add_argument("--out", required=True, help="output folder")
    add_evaluation_arguments(parser)
    args = parser.parse_args(argv)
    if args.label is not None and len(args.label) != len(args.checkpoint):
        parser.error(f"give one --label per --checkpoint ({len(args.checkpoint)}), got {len(args.label)}")

    def work() -> List[Dict]:
        from .runtime import resolve_device

        device = resolve_device(args.device)
        edges = parse_edges(args.edges)
        labels = args.label or [folders for folders in args.checkpoint]
        runs = {label: [TrainedSupernet.load(folder, args.data_path, device, args.calib_batch_size)
                        for folder in folders.split(",")] for label, folders in zip(labels, args.checkpoint)}
        with RunFolderLock(args.out):
            rows = boxplot(runs, args.groups, args.per_group, args.split, args.calib_images, args.out, args.seed,
                           edges)
        print("\n".join(table_lines(rows)))
        for name in ("groups.csv", "groups.json", "groups.png"):
            print(f"wrote {os.path.join(args.out, name)}")
        return rows

    run_command("alphanet boxplot", work)


if __name__ == "__main__":
    main()
