"""The training engine under `alphanet train` and `alphanet distill`: one loop, one run state.

A command supplies a `Task`: the module it trains, one step's forward and backward, and what it
evaluates at each epoch's end and at the finish. The engine supplies everything else, the same for
every command:

- the run folder: locked for one process, stale temporaries removed, its logs cut back to the
  checkpoint (to nothing on a fresh start), so every step and epoch is logged exactly once;
- one DataLoader whose persistent workers serve every epoch, in the DistributedSampler's order of the
  epoch from the resumed step on (`EpochOrder`), and the step's randomness keyed on (seed, rank, step);
- the gradients and the step's losses averaged over processes in one all-reduce, the GradScaler for
  fp16, the gradient clip, SGD-Nesterov (fused: a non-finite step is skipped on the device, without a
  host sync per step: `StepGuard`) and the warm-up cosine LR;
- SIGINT / SIGTERM: a checkpoint at the next step boundary, then `Interrupted`;
- atomic checkpoints of everything needed to continue bit for bit, the progress bar, steps.jsonl,
  metrics.csv, curves.png, summary.txt and summary.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from alphadiv_kernels import fused_adaptive_kd, symmetric_kl

from . import checkpoint as ckpt
from . import runlog
from .config import KDConfig, RunConfig, save_yaml, to_dict
from .data import EncodedImages
from .errors import Interrupted, NonFiniteLossError
from .evaluation import Calibration, calibrated_metrics, shard, to_device
from .report import plot_curves
from .runtime import Runtime, make_autocast, print0

WARMUP_FACTOR = 0.001  # the reference's: the LR starts at 0.001x and rises linearly
INITIAL_LOSS_SCALE = 2.0**10  # fp16: small enough that the first steps rarely overflow


# ---------------------------------------------------------------------------------------------
# The distillation term every command shares


def kd_divergence(student: torch.Tensor, teacher: torch.Tensor, config: KDConfig, return_stats: bool = False):
    """T^2 D_T(teacher || student) through the fused op: the adaptive alpha-divergence, KL (`kd kl`: both
    alphas 1) or symmetric KL (`kd symmetric`: the op's KL and reverse-KL branches, summed); without the
    T^2 where `kd_t_squared` is false. With `return_stats` (`kd adaptive` only), also the op's diagnostics."""
    stats = None
    if config.kd == "symmetric":
        divergence = symmetric_kl(student, teacher, temperature=config.kd_temperature)
    else:
        alphas = (1.0, 1.0) if config.kd == "kl" else (config.alpha_min, config.alpha_max)
        divergence = fused_adaptive_kd(student, teacher, alpha_min=alphas[0], alpha_max=alphas[1],
                                       clip=config.kd_clip, temperature=config.kd_temperature,
                                       return_stats=return_stats)
        if return_stats:
            divergence, stats = divergence
    divergence = divergence if config.kd_t_squared else divergence / config.kd_temperature**2
    return (divergence, stats) if return_stats else divergence


# ---------------------------------------------------------------------------------------------
# What a command supplies


class Task:
    """A command's part of a run. `setup` builds it after the data (`splits`) and before the optimizer;
    its `model` is what the optimizer trains and the checkpoint holds."""

    command = "alphanet train"  # continues the run: "<command> --resume <folder>"
    loss_names: Sequence[str] = ()  # the losses `step` returns, in order: steps.jsonl, epoch means, progress bar
    model: nn.Module

    def describe(self, run: "Run") -> str:
        """The line printed when the run starts."""
        raise NotImplementedError

    def before_training(self, run: "Run") -> None:
        """Called once, before the first step of a fresh run (not when one resumes)."""

    def step(self, run: "Run", images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward and backward of one batch (`indices`: its positions in the training split), each loss
        scaled by `run.scaler`; returns the detached losses named `loss_names`."""
        raise NotImplementedError

    def evaluate(self, run: "Run", split: str) -> Dict[str, float]:
        """Calibrated metrics on a split (every process takes its share; every process gets all of them):
        "val" at each epoch's end (keys prefixed val_ in the epoch record), "test" at the finish."""
        raise NotImplementedError

    def epoch_line(self, record: Dict[str, float]) -> str:
        """The line printed at an epoch's end."""
        raise NotImplementedError

    def summary_lines(self, run: "Run", summary: Dict[str, object]) -> List[str]:
        """summary.txt (also printed); may add to `summary` (summary.json) and write more files (main process)."""
        raise NotImplementedError

    curves: Dict[str, Dict[str, str]] = {}  # plot_curves' losses= and accuracies= for curves.png


# ---------------------------------------------------------------------------------------------
# Steps: randomness, gradient averaging, the non-finite skip


def seed_step(seed: int, rank: int, step: int) -> None:
    """Dropout and drop-connect randomness keyed on (seed, rank, step): a resumed run draws the same."""
    torch.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)


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


# ---------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(model: nn.Module, config: RunConfig, global_batch: int) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]  # BN parameters and biases
    lr = config.lr_per_256 * global_batch / 256
    # fused: the step takes a skip flag on the device (`found_inf`) and then leaves weights and momentum as
    # they were, so a non-finite step is skipped without the host reading anything
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, momentum=config.momentum, nesterov=True, fused=True)
    for param in decay + no_decay:  # zero momentum: torch's first step (buffer = gradient) exactly, and
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


def make_schedule(optimizer, config: RunConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))


# ---------------------------------------------------------------------------------------------
# Stopping


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


# ---------------------------------------------------------------------------------------------
# The run


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

    def batch(self, position: int) -> torch.Tensor:
        """The training-split indices of the pass's `position`-th batch."""
        return torch.as_tensor(self.indices[position * self.batch_size:(position + 1) * self.batch_size])

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclasses.dataclass
class Run:
    """Everything one training run holds; `save` writes what `setup` needs to continue it exactly."""

    config: RunConfig
    runtime: Runtime
    task: Task
    splits: Dict[str, Dataset]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Callable
    order: EpochOrder
    loader: DataLoader  # one for the whole run: workers persist across epochs
    steps_per_epoch: int
    guard: StepGuard
    step: int = 0
    history: List[Dict[str, float]] = dataclasses.field(default_factory=list)
    epoch_sums: Dict[str, float] = dataclasses.field(default_factory=dict)  # of the epoch under way
    skipped: int = 0
    lock: Optional[ckpt.RunFolderLock] = None  # held by the main process while the run writes its folder

    @property
    def out(self) -> str:
        return self.config.out

    @property
    def model(self) -> nn.Module:
        return self.task.model

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    @property
    def calibration(self) -> Calibration:
        """`calib_images` training images in batches of the run's batch size."""
        config = self.config
        return Calibration(self.splits["train"], config.calib_images, config.batch_size, config.seed, config.workers)

    def evaluation_loader(self, split: str) -> DataLoader:
        """This process's shard of an evaluation split."""
        return DataLoader(shard(self.splits[split], self.runtime.rank, self.runtime.world),
                          batch_size=self.config.eval_batch_size, num_workers=self.config.workers)

    def calibrated_metrics(self, module: nn.Module, loader: DataLoader,
                           forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
        return calibrated_metrics(module, loader, self.calibration, self.runtime, self.autocast,
                                  self.config.channels_last, forward)

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


def setup(config: RunConfig, resume: Optional[str], runtime: Runtime, load_splits: Callable[[], Dict[str, Dataset]],
          make_task: Callable[[Dict[str, Dataset]], Task], default_name: str) -> Run:
    """The run folder locked first (a second process on it stops within seconds), then the data
    (`load_splits`), the task (`make_task`, with the weights seeded by `config.seed`), the optimizer, or
    the resumed run's state; then the folder cleaned and its logs cut back to the checkpoint (to nothing
    on a fresh start), so every step and epoch is logged once. A failure releases the lock, and removes
    the folder if the lock created it."""
    state = ckpt.load(resume) if resume else None
    if state is not None and "optimizer" not in state:
        raise ValueError(f"{resume!r} holds weights only (converted from the reference code); it cannot be "
                         "resumed, only evaluated, searched and exported")
    config.out = ckpt.run_folder(config.out, resume, default_name)
    lock = ckpt.RunFolderLock(config.out).acquire() if runtime.is_main else None
    try:
        run = build_run(config, state, runtime, load_splits(), make_task)
        if lock is not None:
            ckpt.remove_stale_temporaries(config.out)
            runlog.rewind(config.out, run.step, run.history)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def build_run(config: RunConfig, state: Optional[Dict[str, object]], runtime: Runtime, splits: Dict[str, Dataset],
              make_task: Callable[[Dict[str, Dataset]], Task]) -> Run:
    """Data loading, the task, optimizer and schedule of a run, with a checkpoint's `state` restored."""
    sampler = DistributedSampler(splits["train"], runtime.world, runtime.rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"config key 'batch_size' ({config.batch_size}) exceeds the {len(sampler)} training "
                         "images per process")
    order = EpochOrder(sampler, config.batch_size, steps_per_epoch)
    images, collate = splits["train"], None  # decode_on_device: files read by the workers, decoded in to_device
    if config.decode_on_device:
        images = EncodedImages(splits["train"], config.image_size)
        collate = images.collate
    loader = DataLoader(images, batch_size=config.batch_size, sampler=order, num_workers=config.workers,
                        collate_fn=collate, persistent_workers=config.workers > 0,
                        pin_memory=runtime.device.type == "cuda")
    autocast = make_autocast(config.amp, runtime)
    torch.manual_seed(config.seed)  # the initial weights
    task = make_task(splits)
    task.model.to(runtime.device)
    if config.channels_last:
        task.model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(task.model, config, config.batch_size * runtime.world)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.amp == "fp16", init_scale=INITIAL_LOSS_SCALE)
    run = Run(config, runtime, task, splits, optimizer, make_schedule(optimizer, config, steps_per_epoch), scaler,
              autocast, order, loader, steps_per_epoch, StepGuard(config.max_nonfinite_steps, runtime.device))
    if state is not None:
        task.model.load_state_dict(state["model"])
        load_optimizer(optimizer, state["optimizer"])
        run.schedule.load_state_dict(state["schedule"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        run.step, run.history = state["step"], state["history"]
        run.epoch_sums, run.skipped = state.get("epoch_sums", {}), state.get("skipped", 0)
    return run


def train_epoch(run: Run, stop_at_step: Optional[int], stop_requested: Callable[[], bool]) -> None:
    """Train from the current step to the end of its epoch (or to `stop_at_step`, or until a stop is
    requested). The epoch's sums of losses, steps and seconds live in `run.epoch_sums`, which the
    checkpoint keeps, so a resumed epoch reports the whole epoch. The host reads the losses back every
    `log_every` steps (and before each checkpoint), not every step: see `StepGuard`."""
    config, runtime = run.config, run.runtime
    params = [p for p in run.model.parameters() if p.requires_grad]
    epoch, offset = divmod(run.step, run.steps_per_epoch)
    run.order.start(epoch, offset)
    progress = progress_bar(runtime, run.loader, f"epoch {epoch + 1}/{config.epochs}", offset, run.steps_per_epoch)
    run.epoch_sums = run.epoch_sums or {**dict.fromkeys(run.task.loss_names, 0.0), "steps": 0, "seconds": 0.0}
    started = time.time() - run.epoch_sums["seconds"]
    for position, (images, labels) in enumerate(progress):
        seed_step(config.seed, runtime.rank, run.step)
        images, labels = to_device(images, labels, runtime.device, config.channels_last)
        losses = run.task.step(run, images, labels, run.order.batch(position))
        with record_function("all_reduce"):
            flat = all_reduce_gradients(params, runtime, losses)
        with record_function("optimizer"):
            if config.amp == "fp16":
                run.scaler.unscale_(run.optimizer)
            run.optimizer.found_inf = run.guard.check(list(losses), flat, run.step + 1, run.schedule.get_last_lr()[0])
            if config.grad_clip_value > 0:
                torch.nn.utils.clip_grad_value_(params, config.grad_clip_value)
            run.optimizer.step()  # a no-op where found_inf is set
            run.scaler.update()
            run.schedule.step()
            run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.epoch_sums["seconds"] = time.time() - started
        end_of_epoch = run.step % run.steps_per_epoch == 0
        stop = stop_requested() or (stop_at_step is not None and run.step >= stop_at_step)
        save = not end_of_epoch and (stop or (config.checkpoint_every and run.step % config.checkpoint_every == 0))
        if end_of_epoch or stop or save or run.step % config.log_every == 0:
            flush_steps(run, progress)
        if save:  # an epoch end is saved after its evaluation
            run.save()
        if stop:
            return
    flush_steps(run, progress)


def flush_steps(run: Run, progress=None) -> None:
    """Read the pending steps back (one host sync), add their losses to the epoch's sums, append them to
    steps.jsonl (main process), count the skipped ones; stop the run if it diverged."""
    with record_function("logging"):
        records = run.guard.flush()
        for record in records:
            for name in run.task.loss_names:
                run.epoch_sums[name] = run.epoch_sums.get(name, 0.0) + record[name]
            run.epoch_sums["steps"] += 1
        if run.runtime.is_main and records:
            runlog.append_steps(run.out, records)
    run.skipped += sum(record["skipped"] for record in records)
    if run.guard.halted_at is not None:
        saved = os.path.join(run.out, "checkpoint.pt")
        kept = f"the last good checkpoint is {saved}" if os.path.exists(saved) else "no checkpoint was written"
        raise NonFiniteLossError(f"{run.guard.limit} steps in a row had a non-finite loss or gradient "
                                 f"(last at step {run.guard.halted_at}); stopping: {kept}")
    if records and hasattr(progress, "set_postfix"):
        progress.set_postfix({name: f"{records[-1][name]:.4f}" for name in run.task.loss_names})


def end_epoch(run: Run) -> None:
    """The finished epoch's record (mean losses over all its steps, the task's validation metrics),
    logged and saved."""
    sums = run.epoch_sums
    record = {"epoch": run.step // run.steps_per_epoch, "step": run.step, "lr": run.schedule.get_last_lr()[0],
              **{f"train_{name}": sums[name] / sums["steps"] for name in run.task.loss_names},
              "skipped_steps": run.skipped, "seconds": sums["seconds"]}
    record.update({f"val_{name}": value for name, value in run.task.evaluate(run, "val").items()})
    run.history.append(record)
    if run.runtime.is_main:
        runlog.append_epoch(run.out, record)
        print0(run.runtime, run.task.epoch_line(record))
    run.epoch_sums = {}
    run.save()


def finish(run: Run) -> Dict[str, object]:
    """The test metrics of the finished run; curves.png, summary.txt and summary.json (main process)."""
    summary: Dict[str, object] = {"step": run.step, "skipped_steps": run.skipped}
    summary.update({f"test_{name}": value for name, value in run.task.evaluate(run, "test").items()})
    if run.runtime.is_main:
        plot_curves(run.history, os.path.join(run.out, "curves.png"), **run.task.curves)
        lines = run.task.summary_lines(run, summary)
        ckpt.atomic_write(os.path.join(run.out, "summary.txt"), ("\n".join(lines) + "\n").encode())
        ckpt.atomic_write(os.path.join(run.out, "summary.json"), json.dumps(summary, indent=1).encode())
        print("\n".join(lines), flush=True)
    return summary


def train_to_the_end(run: Run, stop_at_step: Optional[int] = None) -> Dict[str, object]:
    """Train (or continue) the run to its last epoch, then `finish`; returns the summary (or partial state
    when stopped at `stop_at_step`). SIGINT / SIGTERM stop it at the next step boundary with a checkpoint
    (a second one stops at once) and raise `Interrupted`."""
    print0(run.runtime, run.task.describe(run))
    if run.step == 0:
        run.task.before_training(run)
    with stop_requests() as requested:
        run.model.train()
        while run.step < run.total_steps:
            train_epoch(run, stop_at_step, lambda: bool(requested))
            if run.step % run.steps_per_epoch == 0 and run.epoch_sums:
                end_epoch(run)
            if requested:
                raise Interrupted(f"interrupted at step {run.step}/{run.total_steps}; checkpoint saved, continue "
                                  f"with: {run.task.command} --resume {run.out}")
            if stop_at_step is not None and run.step >= stop_at_step:
                return {"step": run.step, "stopped": True}
        return finish(run)


PROFILE_PHASES = {"data wait": "enumerate(DataLoader)", "forward": "forward", "backward": "backward",
                  "all-reduce": "all_reduce", "optimizer": "optimizer", "logging (host sync)": "logging"}


def profile(run: Run, steps: int) -> Dict[str, float]:
    """Train `steps` steps under torch.profiler, print where a step's time goes and write the trace
    (`profile_trace.json`, for chrome://tracing or Perfetto) to the run folder. The run stops with a
    checkpoint, so `--resume` continues it. Returns milliseconds per step by phase."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler library's own chatter (e.g. "no GPU") off
    runtime = run.runtime
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    first, target = run.step, min(run.total_steps, run.step + steps)
    run.model.train()
    with torch_profile(activities=activities) as profiler:
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
        lines += [f"trace: {trace}", f"continue the run with: {run.task.command} --resume {run.out}"]
        print("\n".join(lines), flush=True)
    return phases


def progress_bar(runtime: Runtime, iterable, description: str, done: int = 0, total: Optional[int] = None):
    """A tqdm bar on the main process's stderr (the iterable itself elsewhere)."""
    if not runtime.is_main:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=description, unit="step", leave=False, file=sys.stderr, initial=done, total=total)
