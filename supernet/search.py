"""`alphanet search`: evolutionary search for the accuracy-vs-FLOPs Pareto front (AlphaNet / AttentiveNAS).

As the reference's `parallel_supernet_evo_search.py`: `iterations` rounds of evaluation, the first on an
initial population (the min subnet, then random subnets within a FLOPs window); each later round
evaluates the children bred from the archive that keeps the best subnet of every `bucket_mflops`-wide
FLOPs bucket (10 MFLOPs for ImageNet) of everything evaluated so far, by mutation (each gene, with
probability 0.2, replaced by a different value) and crossover (each gene from either parent), in the
window. The reference's 20 iterations of 512 / 128 + 128 thus evaluate 512 + 19 x 256 = 5,376 subnets
(the children it breeds in its last iteration are never evaluated, and are not bred here). Unlike the
reference, a child evaluated before is not evaluated again. Every candidate is BN-calibrated and
evaluated on the validation split, never the test split. Under torchrun the candidates of a round are
split across processes; the search itself is driven by one seeded RNG, so the results do not depend on
the number of processes. After each finished iteration the state is saved; a killed search resumes from
there.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist

from .checkpoint import RunFolderLock, atomic_write
from .config import CommandLineParser, is_bundled, positive_int
from .errors import run_command
from .evaluation import TrainedSupernet, add_evaluation_arguments
from .flops import mflops
from .latency import LatencyTable, measure_subnet, window_predicate
from .model import extract
from .report import save_figure
from .runtime import setup_runtime
from .space import ArchConfig, load_arch

# The reference's search: 512 / 128 / 128 / 20 in 200-1200 MFLOPs, 10-MFLOP buckets, 32 x 256 calibration
# images. The digits preset calibrates on 256 of the ~1,300 training digits: a search in well under a minute.
PRESETS = {
    "digits": dict(population=32, mutations=8, crossovers=8, iterations=5, bucket_mflops=0.05,
                   min_mflops=None, max_mflops=None, calib_images=256),
    "imagenet": dict(population=512, mutations=128, crossovers=128, iterations=20, bucket_mflops=10.0,
                     min_mflops=200.0, max_mflops=1200.0, calib_images=32 * 256),
}


@dataclass
class SearchConfig:
    population: int
    mutations: int
    crossovers: int
    iterations: int
    bucket_mflops: float = 10.0
    mutation_prob: float = 0.2
    min_mflops: Optional[float] = None  # default: the min subnet's
    max_mflops: Optional[float] = None  # default: the max subnet's
    calib_images: int = 32 * 256
    seed: int = 0
    seeds: Tuple[Dict[str, object], ...] = ()  # archs placed in the initial population (e.g. published ones)
    latency_table: Optional[str] = None  # predicted latency: a window on it, and the front against it
    min_latency_ms: Optional[float] = None
    max_latency_ms: Optional[float] = None


def pareto_front(points: List[Dict[str, object]], cost: str = "mflops") -> List[int]:
    """Indices of the points no other point beats (higher or equal top-1 at lower or equal cost: MFLOPs, or
    predicted latency with `cost="latency_ms"`)."""
    front = []
    for i, p in enumerate(points):
        dominated = any(q["top1"] >= p["top1"] and q[cost] <= p[cost] and
                        (q["top1"] > p["top1"] or q[cost] < p[cost]) for q in points)
        if not dominated:
            front.append(i)
    return front


def bucket_archive(points: List[Dict[str, object]], bucket_mflops: float) -> Dict[float, Dict[str, object]]:
    """The best point (highest top-1; the first of equals) of each FLOPs bucket, keyed by the bucket's
    centre round(MFLOPs / width) * width, as the reference's `pareto_global`."""
    best: Dict[float, Dict[str, object]] = {}
    for point in points:
        bucket = round(point["mflops"] / bucket_mflops) * bucket_mflops
        if bucket not in best or best[bucket]["top1"] < point["top1"]:
            best[bucket] = point
    return best


def _key(arch: ArchConfig) -> str:
    return json.dumps(arch, sort_keys=True)


class EvolutionarySearch:
    def __init__(self, trained: TrainedSupernet, config: SearchConfig, out: str):
        self.trained, self.config, self.out = trained, config, out
        space = trained.space
        self.window = (config.min_mflops if config.min_mflops is not None else mflops(space, space.min_config()),
                       config.max_mflops if config.max_mflops is not None else mflops(space, space.max_config()))
        self.latency = LatencyTable.load(config.latency_table) if config.latency_table else None
        self.in_latency_window = window_predicate(self.latency, config.min_latency_ms, config.max_latency_ms)
        self.cost = "latency_ms" if self.latency else "mflops"
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.state_path = os.path.join(out, "search_state.json")

    def in_window(self, arch: ArchConfig) -> bool:
        return self.window[0] <= mflops(self.trained.space, arch) <= self.window[1] and self.in_latency_window(arch)

    def evaluate_all(self, archs: List[ArchConfig]) -> List[Dict[str, object]]:
        """Each process evaluates its share; every process gets all results, in order."""
        mine = {i: self.trained.evaluate(arch, "val", self.config.calib_images)
                for i, arch in enumerate(archs) if i % self.world == self.rank}
        if self.world > 1:
            shares = [None] * self.world
            dist.all_gather_object(shares, mine)
            mine = {i: result for share in shares for i, result in share.items()}
        results = [mine[i] for i in range(len(archs))]
        if self.latency is not None:
            for result in results:
                result["latency_ms"] = self.latency.predict(result["arch"])
        return results

    def children(self, archive: List[Dict[str, object]], rng: random.Random) -> List[ArchConfig]:
        space = self.trained.space
        parents = [point["arch"] for point in bucket_archive(archive, self.config.bucket_mflops).values()]
        seen = {_key(r["arch"]) for r in archive}
        made: List[ArchConfig] = []

        def breed(count: int, make) -> None:
            for _ in range(count * 50):  # bounded: a tiny space can run out of new subnets
                if count == 0:
                    return
                child = make()
                if self.in_window(child) and _key(child) not in seen:
                    seen.add(_key(child))
                    made.append(child)
                    count -= 1

        breed(self.config.mutations, lambda: space.mutate(rng.choice(parents), rng, self.config.mutation_prob))
        breed(self.config.crossovers, lambda: space.crossover(rng.choice(parents), rng.choice(parents), rng))
        return made

    def run(self) -> List[Dict[str, object]]:
        space = self.trained.space
        state = self._load_state()
        rng = random.Random(self.config.seed)
        if state is None:
            # The min subnet (where it lies in the window), then random subnets within the window.
            population = [arch for arch in (space.min_config(),) if self.in_window(arch)]
            population += [arch for arch in self.config.seeds if arch not in population]
            population = [arch for arch in population if self.in_window(arch)]
            population += [space.random_config_in_window(rng, lambda a: mflops(space, a), *self.window,
                                                         accept=self.in_latency_window)
                           for _ in range(self.config.population - len(population))]
            archive = self.evaluate_all(population)
            iteration = 1  # the initial population is the first round
            self._save_state(archive, iteration, rng)
        else:
            archive, iteration = state["archive"], state["iteration"]
            if "rounds" not in state:  # written before rounds counted the initial population
                iteration += 1
            rng.setstate(_tuple_state(state["rng"]))
            self._log(f"resuming after iteration {iteration} ({len(archive)} subnets evaluated)")
        while iteration < self.config.iterations:
            new = self.children(archive, rng)
            archive += self.evaluate_all(new)
            iteration += 1
            self._save_state(archive, iteration, rng)
            front = pareto_front(archive, self.cost)
            self._log(f"iteration {iteration}/{self.config.iterations}: {len(new)} new subnets, {len(archive)} in all, "
                      f"{len(front)} on the front")
        return archive

    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _save_state(self, archive, iteration: int, rng: random.Random) -> None:
        if self.rank != 0:
            return
        atomic_write(self.state_path, json.dumps({"archive": archive, "iteration": iteration, "rounds": True,
                                                  "rng": rng.getstate(), "config": self.config.__dict__}).encode())

    def _load_state(self) -> Optional[Dict[str, object]]:
        if not os.path.exists(self.state_path):
            return None
        try:
            with open(self.state_path) as handle:
                state = json.load(handle)
            return state if {"archive", "iteration", "rng"} <= set(state) else None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            raise ValueError(f"{self.state_path!r} is damaged; delete it to start the search afresh") from None


def _tuple_state(state):
    """random.getstate() after a JSON round trip (lists back to tuples)."""
    return tuple(tuple(part) if isinstance(part, list) else part for part in state)


def write_outputs(archive: List[Dict[str, object]], out: str, cost: str = "mflops") -> None:
    front = set(pareto_front(archive, cost))
    records = [{**record, "on_front": i in front} for i, record in enumerate(archive)]
    atomic_write(os.path.join(out, "pareto.json"), json.dumps(records, indent=1).encode())
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    axis.scatter([r[cost] for r in records], [r["top1"] for r in records], s=12, alpha=0.5, label="evaluated")
    on_front = sorted((r for r in records if r["on_front"]), key=lambda r: r[cost])
    axis.plot([r[cost] for r in on_front], [r["top1"] for r in on_front], "o-", color="C3", label="Pareto front")
    axis.set_xlabel("MFLOPs" if cost == "mflops" else "predicted latency (ms, the latency table's device)")
    axis.set_ylabel("validation top-1 (%), BN recalibrated")
    axis.set_title(f"evolutionary search: {len(records)} subnets")
    axis.legend()
    save_figure(figure, os.path.join(out, "pareto.png"))


def measure_front(trained: TrainedSupernet, table: LatencyTable, front: List[Dict[str, object]], out: str
                  ) -> List[Dict[str, object]]:
    """The front's subnets as exported (static layers), measured with the table's settings: predicted vs
    measured latency per subnet, written to latency_report.json."""
    rows = []
    for record in front:
        subnet = extract(trained.model, record["arch"]).cpu()
        measured = measure_subnet(table, subnet, record["arch"]["resolution"])
        error = record["latency_ms"] - measured
        rows.append(dict(arch=record["arch"], mflops=record["mflops"], top1=record["top1"],
                         predicted_ms=record["latency_ms"], measured_ms=measured, error_ms=error,
                         error_pct=100 * error / measured))
    atomic_write(os.path.join(out, "latency_report.json"), json.dumps(rows, indent=1).encode())
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet search", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt or a run folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="sizes: digits (default for a digits run) or imagenet (the reference's)")
    parser.add_argument("--population", type=positive_int, help="initial population (imagenet 512)")
    parser.add_argument("--mutations", type=int, help="children by mutation per iteration (imagenet 128)")
    parser.add_argument("--crossovers", type=int, help="children by crossover per iteration (imagenet 128)")
    parser.add_argument("--iterations", type=positive_int,
                        help="rounds of evaluation, the first on the initial population (imagenet 20: 5,376 subnets)")
    parser.add_argument("--bucket_mflops", type=float, help="width of the archive's FLOPs buckets (imagenet 10)")
    parser.add_argument("--mutation_prob", type=float, default=0.2, help="probability of mutating each gene")
    parser.add_argument("--min_mflops", type=float, help="FLOPs window (imagenet 200; digits: the min subnet's)")
    parser.add_argument("--max_mflops", type=float, help="FLOPs window (imagenet 1200; digits: the max subnet's)")
    parser.add_argument("--latency_table", default=None, metavar="TABLE.json",
                        help="search against predicted latency (a table of alphanet latency for this space)")
    parser.add_argument("--max_latency_ms", type=float, help="latency window (with --latency_table)")
    parser.add_argument("--min_latency_ms", type=float, help="latency window (with --latency_table)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--include", nargs="+", default=[], metavar="ARCH",
                        help="archs to put in the initial population: published names (a0 ... a6, a5_1) or JSON files")
    parser.add_argument("--out", default=None, help="output folder (default: <run folder>/search)")
    add_evaluation_arguments(parser, "training images for BN calibration of each subnet (imagenet 8192, digits 256; "
                                     "at most the training split)")  # under torchrun: each process its own GPU
    args = parser.parse_args(argv)
    for name in ("mutations", "crossovers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must be 0 or more")
    if args.bucket_mflops is not None and not args.bucket_mflops > 0:
        parser.error("--bucket_mflops must be positive")
    if not 0 <= args.mutation_prob <= 1:
        parser.error("--mutation_prob must be in [0, 1]")
    latency_window = (args.min_latency_ms, args.max_latency_ms)
    if args.latency_table is None and latency_window != (None, None):
        parser.error("--min_latency_ms / --max_latency_ms need --latency_table")
    if args.latency_table is not None:
        try:
            table = LatencyTable.load(args.latency_table)
        except ValueError as error:
            parser.error(str(error))
        if None not in latency_window and latency_window[0] > latency_window[1]:
            parser.error("--min_latency_ms must not exceed --max_latency_ms")

    def search() -> None:
        runtime = setup_runtime(args.device)  # NCCL between GPUs, gloo between CPUs
        trained = TrainedSupernet.load(args.checkpoint, args.data_path, runtime.device, args.calib_batch_size)
        preset = PRESETS[args.preset or ("digits" if is_bundled(trained.config.dataset) else "imagenet")]
        sizes = {key: getattr(args, key) if getattr(args, key) is not None else preset[key] for key in preset}
        seeds = tuple(load_arch(text, trained.space) for text in args.include)
        sizes["calib_images"] = min(sizes["calib_images"], len(trained.splits["train"]))
        if args.latency_table is not None:
            table.check_space(trained.space)
            fastest = table.predict(trained.space.min_config())
            if args.max_latency_ms is not None and args.max_latency_ms < fastest:
                raise ValueError(f"--max_latency_ms {args.max_latency_ms:g} is below the smallest subnet's predicted "
                                 f"latency, {fastest:.3f} ms on the table's device")
        config = SearchConfig(**sizes, mutation_prob=args.mutation_prob, seed=args.seed, seeds=seeds,
                              latency_table=args.latency_table, min_latency_ms=args.min_latency_ms,
                              max_latency_ms=args.max_latency_ms)
        run_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)
        out = args.out or os.path.join(run_dir, "search")
        with RunFolderLock(out) if runtime.is_main else contextlib.nullcontext():  # one search per folder
            evolution = EvolutionarySearch(trained, config, out)
            archive = evolution.run()
            if runtime.is_main:
                write_outputs(archive, out, evolution.cost)
        if runtime.is_main:
            cost = evolution.cost
            front = [archive[i] for i in sorted(pareto_front(archive, cost), key=lambda i: archive[i][cost])]
            for record in front:
                latency = f"  predicted {record['latency_ms']:8.3f} ms" if evolution.latency else ""
                print(f"front: {record['mflops']:8.2f} MFLOPs{latency}  top-1 {record['top1']:.2f}%")
            print(f"wrote {os.path.join(out, 'pareto.json')} and {os.path.join(out, 'pareto.png')}")
            if evolution.latency:
                rows = measure_front(trained, evolution.latency, front, out)
                for row in rows:
                    print(f"measured: {row['mflops']:8.2f} MFLOPs  predicted {row['predicted_ms']:8.3f} ms  measured "
                          f"{row['measured_ms']:8.3f} ms  error {row['error_pct']:+6.1f}%")
                print(f"wrote {os.path.join(out, 'latency_report.json')}")

    run_command("alphanet search", search)


if __name__ == "__main__":
    main()
