"""`alphanet search`: evolutionary search for the accuracy-vs-FLOPs Pareto front (AlphaNet / AttentiveNAS).

An initial population of random subnets within a FLOPs window is evaluated; then each iteration
breeds children from the current Pareto front of everything evaluated so far, by mutation (each
gene resampled with probability 0.2) and crossover (each gene from either parent), keeps those in
the window not seen before, and evaluates them. Every candidate is BN-calibrated and evaluated on
the validation split, never the test split. Under torchrun the candidates of a round are split
across processes; the search itself is driven by one seeded RNG, so the results do not depend on
the number of processes. After each finished iteration the state is saved; a killed search resumes
from there.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch.distributed as dist

from .evaluate import TrainedSupernet
from .flops import mflops
from .space import ArchConfig

PRESETS = {
    "digits": dict(population=32, mutations=8, crossovers=8, iterations=4),
    "imagenet": dict(population=512, mutations=128, crossovers=128, iterations=20),
}


@dataclass
class SearchConfig:
    population: int
    mutations: int
    crossovers: int
    iterations: int
    mutation_prob: float = 0.2
    min_mflops: Optional[float] = None  # default: the min subnet's
    max_mflops: Optional[float] = None  # default: the max subnet's
    calib_batches: Optional[int] = None
    seed: int = 0


def pareto_front(points: List[Dict[str, object]]) -> List[int]:
    """Indices of the points no other point beats (higher or equal top-1 at lower or equal MFLOPs)."""
    front = []
    for i, p in enumerate(points):
        dominated = any(q["top1"] >= p["top1"] and q["mflops"] <= p["mflops"] and
                        (q["top1"] > p["top1"] or q["mflops"] < p["mflops"]) for q in points)
        if not dominated:
            front.append(i)
    return front


def _key(arch: ArchConfig) -> str:
    return json.dumps(arch, sort_keys=True)


class EvolutionarySearch:
    def __init__(self, trained: TrainedSupernet, config: SearchConfig, out: str):
        self.trained, self.config, self.out = trained, config, out
        space = trained.space
        self.window = (config.min_mflops if config.min_mflops is not None else mflops(space, space.min_config()),
                       config.max_mflops if config.max_mflops is not None else mflops(space, space.max_config()))
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.state_path = os.path.join(out, "search_state.json")

    def in_window(self, arch: ArchConfig) -> bool:
        return self.window[0] <= mflops(self.trained.space, arch) <= self.window[1]

    def evaluate_all(self, archs: List[ArchConfig]) -> List[Dict[str, object]]:
        """Each process evaluates its share; every process gets all results, in order."""
        mine = {i: self.trained.evaluate(arch, "val", self.config.calib_batches)
                for i, arch in enumerate(archs) if i % self.world == self.rank}
        if self.world > 1:
            shares = [None] * self.world
            dist.all_gather_object(shares, mine)
            mine = {i: result for share in shares for i, result in share.items()}
        return [mine[i] for i in range(len(archs))]

    def children(self, archive: List[Dict[str, object]], rng: random.Random) -> List[ArchConfig]:
        space = self.trained.space
        parents = [archive[i]["arch"] for i in pareto_front(archive)]
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
            # The min and max subnets anchor the front's two ends (where they lie in the window).
            population = [arch for arch in (space.min_config(), space.max_config()) if self.in_window(arch)]
            population += [space.random_config_in_window(rng, lambda a: mflops(space, a), *self.window)
                           for _ in range(self.config.population - len(population))]
            archive = self.evaluate_all(population)
            iteration = 0
            self._save_state(archive, iteration, rng)
        else:
            archive, iteration = state["archive"], state["iteration"]
            rng.setstate(_tuple_state(state["rng"]))
            self._log(f"resuming after iteration {iteration} ({len(archive)} subnets evaluated)")
        while iteration < self.config.iterations:
            new = self.children(archive, rng)
            archive += self.evaluate_all(new)
            iteration += 1
            self._save_state(archive, iteration, rng)
            front = pareto_front(archive)
            self._log(f"iteration {iteration}/{self.config.iterations}: {len(new)} new subnets, {len(archive)} in all, "
                      f"{len(front)} on the front")
        return archive

    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _save_state(self, archive, iteration: int, rng: random.Random) -> None:
        if self.rank != 0:
            return
        temporary = self.state_path + ".tmp"
        with open(temporary, "w") as handle:
            json.dump({"archive": archive, "iteration": iteration, "rng": rng.getstate(),
                       "config": self.config.__dict__}, handle)
        os.replace(temporary, self.state_path)

    def _load_state(self) -> Optional[Dict[str, object]]:
        if not os.path.exists(self.state_path):
            return None
        with open(self.state_path) as handle:
            return json.load(handle)


def _tuple_state(state):
    """random.getstate() after a JSON round trip (lists back to tuples)."""
    return tuple(tuple(part) if isinstance(part, list) else part for part in state)


def write_outputs(archive: List[Dict[str, object]], out: str) -> None:
    front = set(pareto_front(archive))
    records = [{**record, "on_front": i in front} for i, record in enumerate(archive)]
    with open(os.path.join(out, "pareto.json"), "w") as handle:
        json.dump(records, handle, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    axis.scatter([r["mflops"] for r in records], [r["top1"] for r in records], s=12, alpha=0.5, label="evaluated")
    on_front = sorted((r for r in records if r["on_front"]), key=lambda r: r["mflops"])
    axis.plot([r["mflops"] for r in on_front], [r["top1"] for r in on_front], "o-", color="C3", label="Pareto front")
    axis.set_xlabel("MFLOPs")
    axis.set_ylabel("validation top-1 (%), BN recalibrated")
    axis.set_title(f"evolutionary search: {len(records)} subnets")
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(out, "pareto.png"), dpi=110)
    plt.close(figure)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="alphanet search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt or a run folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="sizes: digits (default for a digits run) or imagenet (the paper's)")
    parser.add_argument("--population", type=int)
    parser.add_argument("--mutations", type=int)
    parser.add_argument("--crossovers", type=int)
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--mutation-prob", type=float, default=0.2)
    parser.add_argument("--min-mflops", type=float, default=None)
    parser.add_argument("--max-mflops", type=float, default=None)
    parser.add_argument("--calib-batches", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: <run folder>/search)")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        trained = TrainedSupernet.load(args.checkpoint)
        preset = PRESETS[args.preset or ("digits" if trained.config.dataset == "digits" else "imagenet")]
        sizes = {key: getattr(args, key) if getattr(args, key) is not None else preset[key] for key in preset}
        config = SearchConfig(**sizes, mutation_prob=args.mutation_prob, min_mflops=args.min_mflops,
                              max_mflops=args.max_mflops, calib_batches=args.calib_batches, seed=args.seed)
        run_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)
        out = args.out or os.path.join(run_dir, "search")
        os.makedirs(out, exist_ok=True)
        archive = EvolutionarySearch(trained, config, out).run()
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"alphanet search: {error}") from None
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_outputs(archive, out)
        front = [archive[i] for i in sorted(pareto_front(archive), key=lambda i: archive[i]["mflops"])]
        for record in front:
            print(f"front: {record['mflops']:8.2f} MFLOPs  top-1 {record['top1']:.2f}%")
        print(f"wrote {os.path.join(out, 'pareto.json')} and {os.path.join(out, 'pareto.png')}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
