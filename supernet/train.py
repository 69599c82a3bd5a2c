"""`alphanet train`: sandwich-rule supernet training with in-place adaptive alpha-divergence KD.

Per step, on one mini-batch: the max subnet learns the labels (label smoothing), with dropout and
drop-connect on; its detached logits teach k random subnets and the min subnet, with both off,
through `fused_adaptive_kd` (or KL, or the label-smoothed labels for the no-KD ablation); the
gradients of all of them are summed and averaged across processes in one all-reduce, value-clipped,
and applied in one optimizer step. Every process samples the same subnets (an RNG keyed on seed and
step); BN statistics stay per process.

Single process: `alphanet train`. Several: `torchrun --standalone --nproc_per_node=N -m supernet.train`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader, DistributedSampler

from alphadiv_kernels import fused_adaptive_kd

from . import checkpoint as ckpt
from . import runlog
from .calibration import recalibrate_bn, share_bn_statistics
from .config import (CommandLineParser, TrainConfig, add_config_arguments, error_line, overrides, resolve_config,
                     save_yaml, to_dict)
from .data import EncodedImages, load_splits, num_classes
from .evaluate import calibration_loader, classification_metrics, positive_int, shard, to_device
from .flops import flops_and_params
from .model import ElasticSupernet
from .report import plot_curves, summary_lines, width_table_lines, write_width_table
from .runtime import Runtime, make_autocast, print0, setup_runtime
from .space import ArchConfig, SearchSpace, get_space

# ---------------------------------------------------------------------------------------------
# Processes


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
    """A student's loss: the adaptive alpha-divergence (or KL) to the teacher, or with `kd none` the
    label-smoothed cross-entropy the max subnet uses (as the reference's no-distillation ablation)."""
    if config.kd == "none":
        return F.cross_entropy(student.float(), labels, label_smoothing=config.label_smoothing)
    alphas = (1.0, 1.0) if config.kd == "kl" else (config.alpha_min, config.alpha_max)
    return fused_adaptive_kd(student, teacher, alpha_min=alphas[0], alpha_max=alphas[1], clip=config.kd_clip,
                             temperature=config.kd_temperature)


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
    kd_losses = []
    for subnet in subnets + [space.min_config()]:
        with record_function("forward"):
            with autocast():
                student = model(images, subnet)
            kd = distillation_loss(student, teacher, labels, config)
        with record_function("backward"):
            scaler.scale(kd).backward()
        kd_losses.append(kd.detach().float())
    return {"ce": ce.detach(), "kd": torch.stack(kd_losses).mean()}


def all_reduce_gradients(params: List[nn.Parameter], runtime: Runtime,
                         losses: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Average the gradients, and the step's `losses` riding in the same buffer, over processes with one
    all-reduce; returns the flat averaged buffer (the gradients, then the losses in order). Every process
    then sees the same losses and gradients, so every process skips the same non-finite steps."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    scalars = [value.detach().float().reshape(1) for value in (losses or {}).values()]
    flat = torch._utils._flatten_dense_tensors(grads + scalars)
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
# Optimisation


WARMUP_FACTOR = 0.001  # the reference's: the LR starts at 0.001x and rises linearly


def make_optimizer(model: nn.Module, config: TrainConfig, global_batch: int) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # BN parameters and biases
    lr = config.lr_per_256 * global_batch / 256
    # fused: the step takes a skip flag on the device (`found_inf`) and then leaves weights and momentum as
    # they were, so a non-finite step is skipped without the host reading anything
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, momentum=config.momentum, nesterov=True, fused=True)
    for param in model.parameters():  # zero momentum: torch's first step (buffer = gradient) exactly, and
        optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)  # valid if that step is skipped
    return optimizer


def load_optimizer(optimizer: torch.optim.Optimizer, state: Dict[str, object]) -> None:
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:  # checkpoints of unfused optimizers would switch the skip flag off
        group["fused"] = True


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """AttentiveNAS's WarmupCosineLR: a linear warm-up from WARMUP_FACTOR, multiplied by a cosine over all
    steps (not only those after the warm-up)."""
    warmup = 1.0
    if step < warmup_steps:
        progress = step / warmup_steps
        warmup = WARMUP_FACTOR * (1 - progress) + progress
    return warmup * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def make_schedule(optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))


def calibration_batches(config: TrainConfig) -> int:
    return math.ceil(config.calib_images / config.batch_size)


class NonFiniteLossError(RuntimeError):
    pass


class StepGuard:
    """The step loop's bookkeeping without a host sync per step.

    `check` keeps a step's losses on the device and returns its skip flag there: 1 where a loss or the
    reduced gradient is not finite, for the fused SGD's `found_inf` (the step then changes nothing).
    Consecutive skips are counted on the device too; once `limit` are reached every later step is
    skipped as well, so the weights stay those from before the run diverged until `flush` (every
    `log_every` steps, before any checkpoint, at the end of an epoch) reads all pending steps back in
    one copy and `halted_at` names the step at which the run must stop."""

    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        self.in_a_row = torch.zeros((), device=device)
        self.pending: List[torch.Tensor] = []  # per step: its losses and the count of skips in a row
        self.steps: List[tuple] = []  # per step: what the host knows (loss names, step number, LR)
        self.halted_at: Optional[int] = None

    def check(self, loss_names: List[str], reduced: torch.Tensor, step: int, lr: float) -> torch.Tensor:
        """`reduced`: `all_reduce_gradients`' buffer, the gradients then the losses named `loss_names`."""
        finite = torch.isfinite(reduced).all()
        self.in_a_row = torch.where(finite & (self.in_a_row < self.limit), 0.0, self.in_a_row + 1)
        self.pending.append(torch.cat([reduced[-len(loss_names):], self.in_a_row.view(1)]))
        self.steps.append((loss_names, step, lr))
        return (self.in_a_row > 0).float()

    def flush(self) -> List[Dict[str, float]]:
        """The pending steps as records ({"step", the losses, "lr", "skipped"}), up to the step that
        reached `limit` skips in a row, if one did (`halted_at` then holds it); one host sync."""
        if not self.pending:
            return []
        rows = torch.stack(self.pending).tolist()  # the sync
        records = []
        for (names, step, lr), row in zip(self.steps, rows):
            *values, in_a_row = row
            if in_a_row >= self.limit:
                self.halted_at = step
                break
            records.append({"step": step, **dict(zip(names, values)), "lr": lr, "skipped": in_a_row > 0})
        self.pending, self.steps = [], []
        return records


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM: the run stopped at a step boundary, its checkpoint saved."""


@contextlib.contextmanager
def stop_requests():
    """While inside, SIGINT / SIGTERM are recorded in the yielded list (the run stops at its next step
    boundary with a checkpoint); a second one raises KeyboardInterrupt at once. Handlers are restored on
    exit; outside the main thread nothing is installed."""
    requested: List[int] = []

    def request_stop(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run_command(prog: str, run: Callable[[], object]) -> None:
    """A training command's main: one line and a non-zero exit (130 when interrupted) for what can go
    wrong, and the process group closed."""
    try:
        run()
    except Interrupted as stop:
        print(f"{prog}: {stop}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the last checkpoint is kept", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (ValueError, OSError, NonFiniteLossError) as error:
        raise SystemExit(f"{prog}: {error_line(error)}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The run: setup, one epoch at a time, evaluation, finish


class EpochOrder(torch.utils.data.Sampler):
    """The training images of an epoch from a given step on: the DistributedSampler's order of the epoch
    (the same on a resumed run), cut to whole batches. `start(epoch, offset)` sets it before each pass
    of the run's one DataLoader, whose persistent workers then serve every epoch (pinned batches on a
    GPU, two batches prefetched per worker)."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, steps_per_epoch: int):
        self.sampler, self.batch_size, self.steps_per_epoch = sampler, batch_size, steps_per_epoch
        self.indices: List[int] = []

    def start(self, epoch: int, offset: int) -> None:
        self.sampler.set_epoch(epoch)
        self.indices = list(self.sampler)[offset * self.batch_size: self.steps_per_epoch * self.batch_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclasses.dataclass
class Run:
    """Everything one training run holds; `save` writes what `setup` needs to continue it exactly."""

    config: TrainConfig
    runtime: Runtime
    space: SearchSpace
    splits: Dict[str, object]
    model: ElasticSupernet
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: object
    order: "EpochOrder"
    loader: DataLoader  # one for the whole run: workers persist across epochs
    steps_per_epoch: int
    step: int = 0
    history: List[Dict[str, float]] = dataclasses.field(default_factory=list)
    epoch_sums: Dict[str, float] = dataclasses.field(default_factory=dict)  # of the epoch under way
    skipped: int = 0
    guard: Optional[StepGuard] = None  # made by setup
    lock: Optional[ckpt.RunFolderLock] = None  # held by the main process while the run writes its folder

    @property
    def out(self) -> str:
        return self.config.out

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def close(self) -> None:
        """Release the run folder (the lock) for the next process."""
        if self.lock is not None:
            self.lock.release()

    def save(self) -> None:
        if self.runtime.is_main:
            save_yaml(self.config, os.path.join(self.out, "config.yaml"))
            ckpt.save(os.path.join(self.out, "checkpoint.pt"), {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "history": self.history, "epoch_sums": self.epoch_sums, "skipped": self.skipped,
                "rng": ckpt.capture_rng(), "config": to_dict(self.config)})


def setup(config: TrainConfig, resume: Optional[str], runtime: Runtime) -> Run:
    """The run folder locked first (a second process on it stops within seconds), then data, model and
    optimizer, or the resumed run's state; then the folder cleaned and its logs cut back to the
    checkpoint (to nothing on a fresh start), so every step and epoch is logged once. A failure
    releases the lock, and removes the folder if the lock created it."""
    state = ckpt.load(resume) if resume else None
    if state is not None and "optimizer" not in state:
        raise ValueError(f"{resume!r} holds supernet weights only (converted from the reference code); "
                         "it cannot be resumed, only evaluated, searched and exported")
    config.out = ckpt.run_folder(config.out, resume, config.dataset)
    lock = ckpt.RunFolderLock(config.out).acquire() if runtime.is_main else None
    try:
        run = build_run(config, state, runtime)
        if lock is not None:
            ckpt.remove_stale_temporaries(config.out)
            runlog.rewind(config.out, run.step, run.history)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def build_run(config: TrainConfig, state: Optional[Dict[str, object]], runtime: Runtime) -> Run:
    """Data, model, optimizer and schedule of a run, with a checkpoint's `state` restored."""
    splits = load_splits(config.dataset, config.data_path, config.image_size)
    space = dataclasses.replace(get_space(config.space), num_classes=num_classes(config.dataset, splits))
    sampler = DistributedSampler(splits["train"], runtime.world, runtime.rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // config.batch_size
    order = EpochOrder(sampler, config.batch_size, steps_per_epoch)
    images, collate = splits["train"], None  # decode_on_device: files read by the workers, decoded in to_device
    if config.decode_on_device:
        images = EncodedImages(splits["train"], config.image_size)
        collate = images.collate
    loader = DataLoader(images, batch_size=config.batch_size, sampler=order, num_workers=config.workers,
                        collate_fn=collate, persistent_workers=config.workers > 0,
                        pin_memory=runtime.device.type == "cuda")
    if steps_per_epoch == 0:
        raise ValueError(f"config key 'batch_size' ({config.batch_size}) exceeds the {len(sampler)} training "
                         "images per process")
    autocast = make_autocast(config.amp, runtime)
    torch.manual_seed(config.seed)  # the initial weights
    model = ElasticSupernet(space, config.dropout, config.drop_connect, config.bn_momentum).to(runtime.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config, config.batch_size * runtime.world)
    run = Run(config, runtime, space, splits, model, optimizer, make_schedule(optimizer, config, steps_per_epoch),
              torch.amp.GradScaler(runtime.device.type, enabled=config.amp == "fp16", init_scale=2.0**10),
              autocast, order, loader, steps_per_epoch, guard=StepGuard(config.max_nonfinite_steps, runtime.device))
    if state is not None:
        model.load_state_dict(state["model"])
        load_optimizer(optimizer, state["optimizer"])
        run.schedule.load_state_dict(state["schedule"])
        run.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        run.step, run.history = state["step"], state["history"]
        run.epoch_sums, run.skipped = state.get("epoch_sums", {}), state.get("skipped", 0)
    return run


def train_epoch(run: Run, stop_at_step: Optional[int], stop_requested) -> None:
    """Train from the current step to the end of its epoch (or to `stop_at_step`, or until a stop is
    requested). The epoch's sums of losses, steps and seconds live in `run.epoch_sums`, which the
    checkpoint keeps, so a resumed epoch reports the whole epoch. The host reads the losses back every
    `log_every` steps (and before each checkpoint), not every step: see `StepGuard`."""
    config, runtime, params = run.config, run.runtime, [p for p in run.model.parameters() if p.requires_grad]
    epoch, offset = divmod(run.step, run.steps_per_epoch)
    run.order.start(epoch, offset)
    progress = _progress(runtime, run.loader, epoch, config.epochs, offset, run.steps_per_epoch)
    run.epoch_sums = run.epoch_sums or {"ce": 0.0, "kd": 0.0, "steps": 0, "seconds": 0.0}
    started = time.time() - run.epoch_sums["seconds"]
    for images, labels in progress:
        seed_step(config.seed, runtime.rank, run.step)
        images, labels = to_device(images, labels, runtime.device, config.channels_last)
        subnets = sample_subnets(run.space, config.seed, run.step, config.num_random_subnets)
        losses = sandwich_backward(run.model, images, labels, subnets, config, run.autocast, run.scaler)
        with record_function("all_reduce"):
            flat = all_reduce_gradients(params, runtime, losses)
        with record_function("optimizer"):
            if config.amp == "fp16":
                run.scaler.unscale_(run.optimizer)
            run.optimizer.found_inf = run.guard.check(list(losses), flat, run.step + 1, run.schedule.get_last_lr()[0])
            if config.grad_clip_value > 0:
                torch.nn.utils.clip_grad_value_(params, config.grad_clip_value)
            run.optimizer.step()
            run.scaler.update()
            run.schedule.step()
            run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.epoch_sums["seconds"] = time.time() - started
        end_of_epoch = run.step % run.steps_per_epoch == 0
        stop = stop_requested() or (stop_at_step is not None and run.step >= stop_at_step)
        save = not end_of_epoch and (stop or (config.checkpoint_every and run.step % config.checkpoint_every == 0))
        if end_of_epoch or stop or save or run.step % config.log_every == 0:
            flush_run_steps(run, progress)
        if save:  # an epoch end is saved after its evaluation
            run.save()
        if stop:
            return
    flush_run_steps(run, progress)


def flush_steps(guard: StepGuard, sums: Dict[str, float], out: str, is_main: bool) -> List[Dict[str, float]]:
    """Read a run's pending steps back (one host sync), add their losses to the epoch's `sums` (keys named
    as the losses, and "steps"), append them to `out`'s steps.jsonl (on the main process); stop the run
    if it diverged. Returns the step records (for `skipped` and the progress bar)."""
    with record_function("logging"):
        records = guard.flush()
        for record in records:
            for name in sums.keys() & record.keys():  # the losses
                sums[name] += record[name]
            sums["steps"] += 1
        if is_main and records:
            runlog.append_steps(out, records)
    if guard.halted_at is not None:
        saved = os.path.join(out, "checkpoint.pt")
        kept = f"the last good checkpoint is {saved}" if os.path.exists(saved) else "no checkpoint was written"
        raise NonFiniteLossError(f"{guard.limit} steps in a row had a non-finite loss or gradient "
                                 f"(last at step {guard.halted_at}); stopping: {kept}")
    return records


def flush_run_steps(run: Run, progress) -> None:
    records = flush_steps(run.guard, run.epoch_sums, run.out, run.runtime.is_main)
    run.skipped += sum(record["skipped"] for record in records)
    if records and hasattr(progress, "set_postfix"):
        progress.set_postfix(ce=f"{records[-1]['ce']:.3f}", kd=f"{records[-1]['kd']:.4f}")


def calibrated_accuracy(run: Run, loader: DataLoader, subnet: ArchConfig) -> Dict[str, float]:
    """BN-recalibrate the supernet for one subnet, then evaluate it (the supernet's BN statistics
    are left as that subnet's; training uses batch statistics). Every process calibrates on its share
    of the calibration batches and evaluates its shard of `loader` (see `evaluation_loader`); the
    statistics and counts are combined, so all processes get what one process computing all of it
    would."""
    config, runtime, model = run.config, run.runtime, run.model
    count = calibration_batches(config)
    calib_loader = calibration_loader(run.splits["train"], config.batch_size, config.seed, config.workers,
                                      runtime.rank, runtime.world, count)
    batches = (to_device(images, labels, runtime.device, config.channels_last)[0] for images, labels in calib_loader)
    with run.autocast():
        used = recalibrate_bn(model, batches, count, forward=lambda x: model(x, subnet), allow_empty=True)
    share_bn_statistics(model, used)
    model.eval()
    try:
        return classification_metrics(lambda x: model(x, subnet), loader, runtime.device, run.autocast,
                                      config.channels_last, all_reduce=True)
    finally:
        model.train()


def evaluation_loader(run: Run, split: str) -> DataLoader:
    """This process's shard of an evaluation split."""
    return DataLoader(shard(run.splits[split], run.runtime.rank, run.runtime.world),
                      batch_size=run.config.eval_batch_size, num_workers=run.config.workers)


def evaluate_widths(run: Run, split: str, widths: List[float]) -> List[Dict[str, float]]:
    """Calibrated top-1 of a slimmable supernet at each width, with its MFLOPs and parameters."""
    loader = evaluation_loader(run, split)
    rows = []
    for width in widths:
        arch = run.space.width_config(width)
        flops, params = flops_and_params(run.space, arch)
        rows.append({"width": width, "mflops": flops / 1e6, "params": params,
                     "top1": calibrated_accuracy(run, loader, arch)["top1"]})
    return rows


def evaluate_min_max(run: Run, split: str) -> Dict[str, float]:
    loader = evaluation_loader(run, split)
    return {name: calibrated_accuracy(run, loader, subnet)["top1"]
            for name, subnet in (("max", run.space.max_config()), ("min", run.space.min_config()))}


def end_epoch(run: Run) -> None:
    """The finished epoch's record (losses over all its steps, calibrated validation top-1), logged and saved."""
    sums = run.epoch_sums
    record = {"epoch": run.step // run.steps_per_epoch, "step": run.step, "lr": run.schedule.get_last_lr()[0],
              "train_ce": sums["ce"] / sums["steps"], "train_kd": sums["kd"] / sums["steps"],
              "skipped_steps": run.skipped, "seconds": sums["seconds"]}
    accuracy = evaluate_min_max(run, "val")  # every process takes a share
    record.update(val_top1_max=accuracy["max"], val_top1_min=accuracy["min"])
    run.history.append(record)
    if run.runtime.is_main:
        runlog.append_epoch(run.out, record)
        print0(run.runtime, "epoch {epoch}: ce {train_ce:.3f} kd {train_kd:.4f} val top-1 max {val_top1_max:.1f}% "
                            "min {val_top1_min:.1f}%".format(**record))
    run.epoch_sums = {}
    run.save()


def finish(run: Run) -> Dict[str, object]:
    summary: Dict[str, object] = {"step": run.step, "skipped_steps": run.skipped}
    accuracy = evaluate_min_max(run, "test")  # every process takes a share
    summary.update(test_top1_max=accuracy["max"], test_top1_min=accuracy["min"])
    rows = evaluate_widths(run, "test", run.space.width_grid()) if run.space.width_range else None
    if run.runtime.is_main:
        plot_curves(run.history, os.path.join(run.out, "curves.png"))
        lines = summary_lines(summary, run.out)
        if rows:  # slimmable: the paper's Table 1 row, one width per line
            summary["widths"] = rows
            write_width_table(rows, os.path.join(run.out, "widths"), f"{run.space.name} on {run.config.dataset}")
            lines += ["", *width_table_lines(rows, "test"),
                      f"per width: {os.path.join(run.out, 'widths')}.csv, .json and .png"]
        ckpt.atomic_write(os.path.join(run.out, "summary.txt"), ("\n".join(lines) + "\n").encode())
        ckpt.atomic_write(os.path.join(run.out, "summary.json"), json.dumps(summary, indent=1).encode())
        print("\n".join(lines), flush=True)
    return summary


def run_training(config: TrainConfig, resume: Optional[str] = None, stop_at_step: Optional[int] = None,
                 runtime: Optional[Runtime] = None) -> Dict[str, object]:
    """Train (or continue) a supernet; returns the final summary (or partial state when stopped early).
    SIGINT / SIGTERM stop it at the next step boundary with a checkpoint (a second one stops at once)
    and raise `Interrupted`."""
    runtime = runtime or setup_runtime(config.device)
    with contextlib.closing(setup(config, resume, runtime)) as run:
        return train_to_the_end(run, stop_at_step)


def train_to_the_end(run: Run, stop_at_step: Optional[int]) -> Dict[str, object]:
    config, runtime = run.config, run.runtime
    print0(runtime, f"training {run.space.name} supernet on {config.dataset}: {runtime.world} process(es) on "
                    f"{runtime.device}, {run.steps_per_epoch} steps/epoch, {config.epochs} epochs, kd={config.kd}, "
                    f"amp={config.amp}; outputs in {config.out}")
    with stop_requests() as requested:
        run.model.train()
        while run.step < run.total_steps:
            train_epoch(run, stop_at_step, lambda: bool(requested))
            if run.step % run.steps_per_epoch == 0 and run.epoch_sums:
                end_epoch(run)
            if requested:
                raise Interrupted(f"interrupted at step {run.step}/{run.total_steps}; checkpoint saved, continue "
                                  f"with: alphanet train --resume {run.out}")
            if stop_at_step is not None and run.step >= stop_at_step:
                return {"step": run.step, "stopped": True}
        return finish(run)


PROFILE_PHASES = {"data wait": "enumerate(DataLoader)", "forward": "forward", "backward": "backward",
                  "all-reduce": "all_reduce", "optimizer": "optimizer", "logging (host sync)": "logging"}


def profile_training(config: TrainConfig, steps: int, resume: Optional[str] = None,
                     runtime: Optional[Runtime] = None) -> Dict[str, float]:
    """Train `steps` steps under torch.profiler, print where a step's time goes and write the trace
    (`profile_trace.json`, for chrome://tracing or Perfetto) to the run folder. The run stops with a
    checkpoint, so `alphanet train --resume` continues it. Returns milliseconds per step by phase."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler library's own chatter (e.g. "no GPU") off
    runtime = runtime or setup_runtime(config.device)
    with contextlib.closing(setup(config, resume, runtime)) as run:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
        first, target = run.step, min(run.total_steps, run.step + steps)
        run.model.train()
        with profile(activities=activities) as profiler:
            began = time.perf_counter()
            while run.step < target:
                train_epoch(run, target, lambda: False)
                if run.step % run.steps_per_epoch == 0 and run.epoch_sums:
                    end_epoch(run)
            total_ms = (time.perf_counter() - began) * 1e3
        done = max(1, run.step - first)
        phases = dict.fromkeys(PROFILE_PHASES, 0.0)
        for event in profiler.key_averages():
            for phase, label in PROFILE_PHASES.items():
                if event.key == label or (label.startswith("enumerate") and event.key.startswith(label)):
                    phases[phase] += event.cpu_time_total / 1e3 / done
        phases["other"] = max(0.0, total_ms / done - sum(phases.values()))
        if runtime.is_main:
            trace = os.path.join(run.out, "profile_trace.json")
            profiler.export_chrome_trace(trace)
            lines = [f"profile of steps {first + 1}-{run.step} on {runtime.device.type} ({runtime.world} process(es)): "
                     f"{total_ms / done:.1f} ms per step (wall clock, host side)"]
            lines += [f"  {phase:<20} {ms:9.2f} ms  {100 * ms / (total_ms / done):5.1f}%" for phase, ms in phases.items()]
            lines += [f"trace: {trace}", f"continue the run with: alphanet train --resume {run.out}"]
            print("\n".join(lines), flush=True)
    return phases


def _progress(runtime: Runtime, loader, epoch: int, epochs: int, done: int, total: int):
    if not runtime.is_main:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, file=sys.stderr,
                initial=done, total=total)


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet train", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
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
            config = ckpt.config_for_resume(resume, given)
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
