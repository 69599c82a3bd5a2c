"""`alphanet train`: sandwich-rule supernet training with in-place adaptive alpha-divergence KD.

Per step, on one mini-batch: the max subnet learns the labels (label smoothing), with dropout and
drop-connect on; its detached logits teach k random subnets and the min subnet, with both off,
through `fused_adaptive_kd` (or KL, or the label-smoothed labels for the no-KD ablation); the
gradients of all of them are summed and averaged across processes in one all-reduce, value-clipped,
and applied in one optimizer step. Every process samples the same subnets (an RNG keyed on seed and
step); BN statistics stay per process. The loop, the run state and the evaluation are the engine's
(supernet/engine.py), shared with `alphanet distill`.

Single process: `alphanet train`. Several: `torchrun --standalone --nproc_per_node=N -m supernet.train`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import record_function

from alphadiv_kernels.diagnostics import KDStats

from . import checkpoint as ckpt
from . import engine
from .config import (CommandLineParser, TrainConfig, add_config_arguments, config_for_resume, overrides,
                     positive_int, resolve_config, to_dict)
from .data import config_splits, num_classes
from .errors import run_command
from .flops import flops_and_params, mflops
from .model import ElasticSupernet
from .report import summary_lines, width_table_lines, write_width_table
from .runtime import Runtime, setup_runtime
from .space import ArchConfig, SearchSpace, get_space


ADAPTIVE_KD_STATS = ("kd_alpha_min_share", "kd_clip_share")  # per step, over every student; epoch means in metrics


def sample_subnets(space: SearchSpace, seed: int, step: int, count: int) -> List[ArchConfig]:
    """The random subnets of a step: the same on every process, and on a resumed run."""
    rng = random.Random(f"alphanet-subnets/{seed}/{step}")
    return [space.random_config(rng) for _ in range(count)]


ATTENTIVE_FLOPS_BINS = 40  # AttentiveNAS discretises FLOPs in 25-MFLOP steps over its ~200-1200 MFLOPs
ATTENTIVE_TRIALS = 100  # draws per candidate before one off the target is accepted anyway, as AttentiveNAS


def flops_matched_candidates(space: SearchSpace, rng: random.Random, count: int) -> List[ArchConfig]:
    """AttentiveNAS's candidates of one slot: a FLOPs target drawn as the FLOPs bin of a random subnet
    (the FLOPs distribution of the space), then `count` random subnets in that bin."""
    low, high = (mflops(space, arch) for arch in (space.min_config(), space.max_config()))
    step = max(high - low, 1e-9) / ATTENTIVE_FLOPS_BINS

    def flops_bin(arch: ArchConfig) -> int:
        return round((mflops(space, arch) - low) / step)

    target = flops_bin(space.random_config(rng))
    candidates = []
    for _ in range(count):
        for _trial in range(ATTENTIVE_TRIALS + 1):
            arch = space.random_config(rng)
            if flops_bin(arch) == target:
                break
        candidates.append(arch)
    return candidates


@torch.no_grad()
def attentive_subnets(model: ElasticSupernet, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
                      step: int, runtime: Runtime, autocast) -> List[ArchConfig]:
    """AttentiveNAS's BestUp / WorstUp without a predictor: per slot, k FLOPs-matched candidates scored by
    their label-smoothed cross-entropy on this minibatch (the reference's training criterion), the
    lowest (best) or highest (worst) kept. The scores are summed over processes, so every process keeps
    the same subnet; reading them costs one host sync per slot."""
    chosen = []
    for slot in range(config.num_random_subnets):
        rng = random.Random(f"alphanet-attentive/{config.seed}/{step}/{slot}")
        candidates = flops_matched_candidates(model.space, rng, config.attentive_candidates)
        with record_function("attentive sampling"), autocast():
            scores = torch.stack([F.cross_entropy(model(images, arch).float(), labels,
                                                  label_smoothing=config.label_smoothing) for arch in candidates])
        if runtime.world > 1:
            dist.all_reduce(scores)
        pick = scores.argmin() if config.attentive_choice == "best" else scores.argmax()
        chosen.append(candidates[int(pick)])
    return chosen


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      config: TrainConfig) -> Tuple[torch.Tensor, Optional[KDStats]]:
    """A student's loss: the adaptive alpha-divergence (or KL) to the teacher, or with `kd none` the
    label-smoothed cross-entropy the max subnet uses (as the reference's no-distillation ablation); and with
    `kd adaptive`, the op's diagnostics."""
    if config.kd == "none":
        return F.cross_entropy(student.float(), labels, label_smoothing=config.label_smoothing), None
    if config.kd == "adaptive":
        return engine.kd_divergence(student, teacher, config, return_stats=True)
    return engine.kd_divergence(student, teacher, config), None


def sandwich_backward(model: ElasticSupernet, images: torch.Tensor, labels: torch.Tensor,
                      subnets: List[ArchConfig], config: TrainConfig, autocast, scaler) -> Dict[str, torch.Tensor]:
    """Backward of the max subnet on labels (regularised) and of each subnet distilled from it
    (unregularised); grads accumulate."""
    space = model.space
    with record_function("forward"), autocast():
        logits = model(images, space.max_config(), regularize=True)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
    with record_function("backward"):
        scaler.scale(ce).backward()
    teacher = logits.detach()
    kd_losses, pooled = [], None
    for subnet in subnets + [space.min_config()]:
        with record_function("forward"):
            with autocast():
                student = model(images, subnet)
            kd, stats = distillation_loss(student, teacher, labels, config)
        with record_function("backward"):
            scaler.scale(kd).backward()
        kd_losses.append(kd.detach().float())
        pooled = stats if pooled is None else pooled + stats
    losses = {"ce": ce.detach(), "kd": torch.stack(kd_losses).mean()}
    if pooled is not None:  # over every student of the step
        losses.update(kd_alpha_min_share=pooled.alpha_min_share.float(), kd_clip_share=pooled.clip_share.float())
    return losses


class SupernetTask(engine.Task):
    """The sandwich rule on an elastic supernet; evaluated by its max and min subnets (and, for a
    slimmable space, each width at the finish), each BN-calibrated first."""

    command = "alphanet train"

    def __init__(self, config: TrainConfig, splits):
        space = dataclasses.replace(get_space(config.space), num_classes=num_classes(config.dataset, splits))
        self.config, self.space = config, space
        # The adaptive loss's diagnostics (alphadiv_kernels.diagnostics) ride along as two more step values.
        self.loss_names = ("ce", "kd", *(ADAPTIVE_KD_STATS if config.kd == "adaptive" else ()))
        self.model = ElasticSupernet(space, config.dropout, config.drop_connect, config.bn_momentum)

    def describe(self, run: engine.Run) -> str:
        config = self.config
        return (f"training {self.space.name} supernet on {config.dataset}: {run.runtime.world} process(es) on "
                f"{run.runtime.device}, {run.steps_per_epoch} steps/epoch, {config.epochs} epochs, kd={config.kd}, "
                f"sampler={config.sampler}, "
                f"amp={config.amp}; outputs in {config.out}")

    def step(self, run, images, labels, indices):
        config = self.config
        if config.sampler == "attentive":
            subnets = attentive_subnets(self.model, images, labels, config, run.step, run.runtime, run.autocast)
        else:
            subnets = sample_subnets(self.space, config.seed, run.step, config.num_random_subnets)
        return sandwich_backward(self.model, images, labels, subnets, config, run.autocast, run.scaler)

    def subnet_top1(self, run: engine.Run, loader, subnet: ArchConfig) -> float:
        """The supernet BN-recalibrated for one subnet, then evaluated (its BN statistics are left as that
        subnet's; training uses batch statistics)."""
        return run.calibrated_metrics(self.model, loader, lambda x: self.model(x, subnet))["top1"]

    def evaluate(self, run, split):
        loader = run.evaluation_loader(split)
        return {f"top1_{name}": self.subnet_top1(run, loader, subnet)
                for name, subnet in (("max", self.space.max_config()), ("min", self.space.min_config()))}

    def width_rows(self, run: engine.Run, split: str) -> List[Dict[str, float]]:
        """Calibrated top-1 of a slimmable supernet at each width, with its MFLOPs and parameters."""
        loader = run.evaluation_loader(split)
        rows = []
        for width in self.space.width_grid():
            arch = self.space.width_config(width)
            flops, params = flops_and_params(self.space, arch)
            rows.append({"width": width, "mflops": flops / 1e6, "params": params,
                         "top1": self.subnet_top1(run, loader, arch)})
        return rows

    def epoch_line(self, record):
        line = ("epoch {epoch}: ce {train_ce:.3f} kd {train_kd:.4f} val top-1 max {val_top1_max:.1f}% "
                "min {val_top1_min:.1f}%".format(**record))
        if "train_kd_alpha_min_share" in record:
            line += (" (kd: alpha_min on {train_kd_alpha_min_share:.0%} of rows, {train_kd_clip_share:.2%} of weights "
                     "clipped)".format(**record))
        return line

    def summary_lines(self, run, summary):
        lines = summary_lines(summary, run.out)
        if self.space.width_range:  # slimmable: the paper's Table 1 row, one width per line
            summary["widths"] = rows = self.width_rows(run, "test")
            write_width_table(rows, os.path.join(run.out, "widths"), f"{self.space.name} on {self.config.dataset}")
            lines += ["", *width_table_lines(rows, "test"),
                      f"per width: {os.path.join(run.out, 'widths')}.csv, .json and .png"]
        return lines


def setup(config: TrainConfig, resume: Optional[str], runtime: Runtime) -> engine.Run:
    """The run of `config` (or the resumed one), its folder locked: see `engine.setup`."""
    return engine.setup(config, resume, runtime, lambda: config_splits(config),
                        lambda splits: SupernetTask(config, splits), config.dataset)


def run_training(config: TrainConfig, resume: Optional[str] = None, stop_at_step: Optional[int] = None,
                 runtime: Optional[Runtime] = None) -> Dict[str, object]:
    """Train (or continue) a supernet; returns the final summary (or partial state when stopped early).
    SIGINT / SIGTERM stop it at the next step boundary with a checkpoint (a second one stops at once)
    and raise `Interrupted`."""
    runtime = runtime or setup_runtime(config.device)
    with contextlib.closing(setup(config, resume, runtime)) as run:
        return engine.train_to_the_end(run, stop_at_step)


def profile_training(config: TrainConfig, steps: int, resume: Optional[str] = None,
                     runtime: Optional[Runtime] = None) -> Dict[str, float]:
    """`engine.profile` of a supernet run: milliseconds per step by phase."""
    runtime = runtime or setup_runtime(config.device)
    with contextlib.closing(setup(config, resume, runtime)) as run:
        return engine.profile(run, steps)


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet train", description=__doc__)
    parser.add_argument("--preset", default="digits",
                        help="named preset: digits (default), imagenet, slim-digits, slim-imagenet or ablation")
    parser.add_argument("--config", default=None, help="YAML file of config keys")
    parser.add_argument("--resume", default=None, help="checkpoint (or run folder) to continue from")
    parser.add_argument("--profile", type=positive_int, default=None, metavar="N",
                        help="profile N steps with torch.profiler: print the split of a step (data wait, forward, "
                             "backward, all-reduce, optimizer, logging) and write the trace, then stop")
    add_config_arguments(parser)
    args = parser.parse_args(argv)

    def run() -> None:
        given, resume = overrides(args), args.resume
        if resume:
            config = config_for_resume(resume, given)
        else:
            config = resolve_config(args.preset, args.config, given)
            resume = ckpt.existing_run(config.out, to_dict(config))  # the same command again continues its run
            if resume and int(os.environ.get("RANK", "0")) == 0:
                print(f"{config.out} holds a checkpoint of these settings: continuing it", flush=True)
        if args.profile:
            profile_training(config, args.profile, resume=resume)
        else:
            run_training(config, resume=resume)

    run_command("alphanet train", run)


if __name__ == "__main__":
    main()
