"""`alphanet train`: sandwich-rule supernet training with in-place adaptive alpha-divergence KD.

Per step, on one mini-batch: the max subnet learns the labels (label smoothing); its detached logits
teach k random subnets and the min subnet through `fused_adaptive_kd` (or KL, or labels for the
no-KD ablation); the gradients of all of them are summed and averaged across processes in one
all-reduce, value-clipped, and applied in one optimizer step. Every process samples the same
subnets (an RNG keyed on seed and step); BN statistics stay per process.

Single process: `alphanet train`. Several: `torchrun --standalone --nproc_per_node=N -m supernet.train`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from alphadiv_kernels import fused_adaptive_kd

from . import checkpoint as ckpt
from .calibration import recalibrate_bn
from .config import TrainConfig, parse_overrides, resolve_config, save_yaml, to_dict
from .data import load_splits, num_classes
from .evaluate import calibration_loader, classification_metrics, to_device
from .model import ElasticSupernet
from .space import ArchConfig, SearchSpace, get_space
from .report import plot_curves, summary_lines

# ---------------------------------------------------------------------------------------------
# Processes


@dataclasses.dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime() -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Runtime(rank, dist.get_world_size() if dist.is_initialized() else 1, device)


def print0(runtime: Runtime, *args) -> None:
    if runtime.is_main:
        print(*args, flush=True)


def seed_step(seed: int, rank: int, step: int) -> None:
    """Dropout and drop-connect randomness keyed on (seed, rank, step): a resumed run draws the same."""
    torch.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)


def sample_subnets(space: SearchSpace, seed: int, step: int, count: int) -> List[ArchConfig]:
    """The random subnets of a step: the same on every process, and on a resumed run."""
    rng = random.Random(f"alphanet-subnets/{seed}/{step}")
    return [space.random_config(rng) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# The sandwich step


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      config: TrainConfig) -> torch.Tensor:
    if config.kd == "none":
        return F.cross_entropy(student.float(), labels)
    alphas = (1.0, 1.0) if config.kd == "kl" else (config.alpha_min, config.alpha_max)
    return fused_adaptive_kd(student, teacher, alpha_min=alphas[0], alpha_max=alphas[1], clip=config.kd_clip)


def sandwich_backward(model: ElasticSupernet, images: torch.Tensor, labels: torch.Tensor,
                      subnets: List[ArchConfig], config: TrainConfig, autocast, scaler) -> Dict[str, torch.Tensor]:
    """Backward of the max subnet on labels and of each subnet distilled from it; grads accumulate."""
    space = model.space
    with autocast():
        logits = model(images, space.max_config())
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
    scaler.scale(ce).backward()
    teacher = logits.detach()
    kd_losses = []
    for subnet in subnets + [space.min_config()]:
        with autocast():
            student = model(images, subnet)
        kd = distillation_loss(student, teacher, labels, config)
        scaler.scale(kd).backward()
        kd_losses.append(kd.detach().float())
    return {"ce": ce.detach(), "kd": torch.stack(kd_losses).mean()}


def all_reduce_gradients(params: List[nn.Parameter], runtime: Runtime) -> torch.Tensor:
    """Average the gradients over processes with one all-reduce; returns the flat averaged buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    if runtime.world > 1:
        dist.all_reduce(flat)
        flat /= runtime.world
    for param, grad in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        if param.grad is None:
            param.grad = grad.clone()
        else:
            param.grad.copy_(grad)
    return flat


# ---------------------------------------------------------------------------------------------
# Optimisation and evaluation


def make_optimizer(model: nn.Module, config: TrainConfig, global_batch: int) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # BN parameters and biases
    lr = config.lr_per_256 * global_batch / 256
    return torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=config.momentum, nesterov=True)


def make_schedule(optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = config.warmup_epochs * steps_per_epoch
    total = config.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def calibrated_accuracy(model, calib_loader, eval_loader, subnet, config, runtime, autocast) -> Dict[str, float]:
    """BN-recalibrate the supernet for one subnet, then evaluate it (the supernet's BN statistics
    are left as that subnet's; training uses batch statistics)."""
    def calib_batches():
        for images, labels in calib_loader:
            yield to_device(images, labels, runtime.device, config.channels_last)[0]

    with autocast():
        recalibrate_bn(model, calib_batches(), config.calib_batches, forward=lambda x: model(x, subnet))
    model.eval()
    try:
        return classification_metrics(lambda x: model(x, subnet), eval_loader, runtime.device, autocast,
                                      config.channels_last)
    finally:
        model.train()


# ---------------------------------------------------------------------------------------------
# The run


class NonFiniteLossError(RuntimeError):
    pass


def make_autocast(config: TrainConfig, runtime: Runtime):
    if config.amp == "off":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    if config.amp == "fp16" and runtime.device.type != "cuda":
        raise ValueError("--amp fp16 needs a GPU; use --amp bf16 on CPU")
    return lambda: torch.autocast(runtime.device.type, dtype=dtype)


def run_training(config: TrainConfig, resume: Optional[str] = None, stop_at_step: Optional[int] = None,
                 runtime: Optional[Runtime] = None) -> Dict[str, object]:
    """Train (or continue) a supernet; returns the final summary (or partial state when stopped early)."""
    runtime = runtime or setup_runtime()
    state = None
    if resume:  # config: see checkpoint.config_for_resume
        state = ckpt.load(resume)
        config.out = os.path.dirname(os.path.abspath(ckpt.checkpoint_path(resume)))
    out = config.out or os.path.join("runs", f"{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    config.out = out
    if runtime.is_main:
        os.makedirs(out, exist_ok=True)

    splits = load_splits(config.dataset, config.data_path, config.image_size)
    space = dataclasses.replace(get_space(config.space), num_classes=num_classes(config.dataset, splits))
    torch.manual_seed(config.seed)  # the initial weights
    model = ElasticSupernet(space, config.dropout, config.drop_connect).to(runtime.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]

    sampler = DistributedSampler(splits["train"], runtime.world, runtime.rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(sampler)} training images per process")
    optimizer = make_optimizer(model, config, config.batch_size * runtime.world)
    schedule = make_schedule(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.amp == "fp16", init_scale=2.0**10)
    autocast = make_autocast(config, runtime)
    step = 0
    history: List[Dict[str, float]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        step, history = state["step"], state["history"]

    calib_loader = calibration_loader(splits["train"], config.batch_size, config.seed, config.workers)
    eval_loaders = {name: DataLoader(splits[name], batch_size=config.eval_batch_size, num_workers=config.workers)
                    for name in ("val", "test")}
    total_steps = config.epochs * steps_per_epoch
    print0(runtime, f"training {space.name} supernet on {config.dataset}: {runtime.world} process(es), "
                    f"{steps_per_epoch} steps/epoch, {config.epochs} epochs, kd={config.kd}, amp={config.amp}; "
                    f"outputs in {out}")

    def save(step_now: int) -> None:
        if runtime.is_main:
            save_yaml(config, os.path.join(out, "config.yaml"))
            ckpt.save(os.path.join(out, "checkpoint.pt"), {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "step": step_now, "history": history, "rng": ckpt.capture_rng(),
                "config": to_dict(config)})

    nonfinite_in_a_row = skipped = 0
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)[offset * config.batch_size: steps_per_epoch * config.batch_size]
        loader = DataLoader(Subset(splits["train"], order), batch_size=config.batch_size, num_workers=config.workers)
        progress = _progress(runtime, loader, epoch, config.epochs)
        sums = {"ce": 0.0, "kd": 0.0}
        started = time.time()
        for images, labels in progress:
            seed_step(config.seed, runtime.rank, step)
            images, labels = to_device(images, labels, runtime.device, config.channels_last)
            subnets = sample_subnets(space, config.seed, step, config.num_random_subnets)
            losses = sandwich_backward(model, images, labels, subnets, config, autocast, scaler)
            flat = all_reduce_gradients(params, runtime)
            if config.amp == "fp16":
                scaler.unscale_(optimizer)
            finite = bool(torch.isfinite(flat).all()) and all(math.isfinite(v.item()) for v in losses.values())
            if finite:
                torch.nn.utils.clip_grad_value_(params, config.grad_clip_value)
                scaler.step(optimizer)
                nonfinite_in_a_row = 0
            else:  # skip the update; all processes see the same reduced gradients, so all skip
                skipped += 1
                nonfinite_in_a_row += 1
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if nonfinite_in_a_row >= config.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                    f"stopping. The last good checkpoint is {os.path.join(out, 'checkpoint.pt')}")
            for key in sums:
                sums[key] += losses[key].item()
            if runtime.is_main:
                _log_step(out, step, losses, schedule.get_last_lr()[0])
                if hasattr(progress, "set_postfix"):
                    progress.set_postfix(ce=f"{losses['ce'].item():.3f}", kd=f"{losses['kd'].item():.4f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step % steps_per_epoch:
                save(step)
            if stop_at_step is not None and step >= stop_at_step:
                save(step)
                return {"step": step, "stopped": True}
        if step % steps_per_epoch == 0:
            record = {"epoch": epoch + 1, "step": step, "lr": schedule.get_last_lr()[0],
                      "train_ce": sums["ce"] / max(1, len(loader)), "train_kd": sums["kd"] / max(1, len(loader)),
                      "skipped_steps": skipped, "seconds": time.time() - started}
            if runtime.is_main:
                for name, subnet in (("max", space.max_config()), ("min", space.min_config())):
                    result = calibrated_accuracy(model, calib_loader, eval_loaders["val"], subnet, config, runtime,
                                                 autocast)
                    record[f"val_top1_{name}"] = result["top1"]
                history.append(record)
                _log_epoch(out, record)
                print0(runtime, "epoch {epoch}: ce {train_ce:.3f} kd {train_kd:.4f} val top-1 max {val_top1_max:.1f}% "
                                "min {val_top1_min:.1f}%".format(**record))
            save(step)

    summary: Dict[str, object] = {"step": step, "skipped_steps": skipped}
    if runtime.is_main:
        for name, subnet in (("max", space.max_config()), ("min", space.min_config())):
            summary[f"test_top1_{name}"] = calibrated_accuracy(model, calib_loader, eval_loaders["test"], subnet,
                                                                config, runtime, autocast)["top1"]
        plot_curves(history, os.path.join(out, "curves.png"))
        lines = summary_lines(summary, out)
        with open(os.path.join(out, "summary.txt"), "w") as handle:
            handle.write("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
    return summary


def _progress(runtime: Runtime, loader, epoch: int, epochs: int):
    if not runtime.is_main:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, file=sys.stderr)


def _log_step(out: str, step: int, losses: Dict[str, torch.Tensor], lr: float) -> None:
    with open(os.path.join(out, "steps.jsonl"), "a") as handle:
        handle.write(json.dumps({"step": step, "ce": losses["ce"].item(), "kd": losses["kd"].item(), "lr": lr}) + "\n")


def _log_epoch(out: str, record: Dict[str, float]) -> None:
    with open(os.path.join(out, "metrics.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\n")
    csv_path = os.path.join(out, "metrics.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a") as handle:
        if new:
            handle.write(",".join(record) + "\n")
        handle.write(",".join(f"{value}" for value in record.values()) + "\n")


def main(argv: Optional[List[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="alphanet train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits", help="named preset: digits (default) or imagenet")
    parser.add_argument("--config", default=None, help="YAML file of config keys")
    parser.add_argument("--resume", default=None, help="checkpoint (or run folder) to continue from")
    known, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        if known.resume:
            config = ckpt.config_for_resume(known.resume, overrides)
        else:
            config = resolve_config(known.preset, known.config, overrides)
        run_training(config, resume=known.resume)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as error:
        raise SystemExit(f"alphanet train: {error}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
