"""`alphanet distill`: a student trained from a fixed teacher (AlphaNet, App. C).

    L = (1 - beta) * CE(student, labels) + beta * T^2 * KD_T(student, teacher)

with KD the adaptive alpha-divergence (`--kd adaptive`, default) or KL (`--kd kl`), both through
`fused_adaptive_kd` (its value already carries the T^2), or the labels alone (`--kd none`). beta = 0.9
and T = 1 by default. The teacher runs in eval mode without gradients; its BN statistics never
change. Models are named by a spec (supernet/models.py): `arch:SPACE:ARCH`, `supernet:RUN_DIR[:ARCH]`,
`export:DIR`, `torchvision:NAME[:WEIGHTS]`. A teacher given as `arch:` (fresh weights), and the
default teacher (the max subnet of the student's space), is first trained on the labels by this same
command, in `<run folder>/teacher`. `--cache_teacher` computes the teacher's logits of the training
split once and reuses them (only for data without random augmentation: digits).

Single process: `alphanet distill`. Several: `torchrun --standalone --nproc_per_node=N -m supernet.distill`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from alphadiv_kernels import fused_adaptive_kd

from . import checkpoint as ckpt
from . import models, runlog
from .config import (DATASETS, CommandLineParser, add_config_arguments, apply, check_ranges, is_bundled, key,
                     overrides, resolve_config, save_yaml, to_dict)
from .data import load_splits, num_classes
from .calibration import recalibrate_bn
from .evaluate import calibration_loader, classification_metrics, to_device
from .report import plot_curves
from .runtime import Runtime, make_autocast, print0, setup_runtime
from .train import (Interrupted, StepGuard, _progress, all_reduce_gradients, flush_steps, load_optimizer, lr_factor,
                    make_optimizer, run_command, seed_step, stop_requests)


@dataclass
class DistillConfig:
    dataset: str = key("digits", "data", "digits | digits_lowdata (bundled, no download) | cifar10 | imagefolder")
    data_path: str = key("", "data", "folder of cifar10 / imagefolder data")
    image_size: int = key(32, "data", "training crop / evaluation size of the images (pixels)")
    student: str = key("arch:digits:min", "models", f"the student: {models.SPEC_HELP}")
    teacher: str = key("", "models", "the teacher (same specs); default: the max subnet of the student's space, "
                                     "trained first")
    teacher_checkpoint: str = key("", "models", "a trained supernet (run folder or checkpoint) whose subnet "
                                                "--teacher_arch is the teacher (same as --teacher supernet:RUN:ARCH)")
    teacher_arch: str = key("max", "models", "the teacher's arch in --teacher_checkpoint: min, max, a0 ... or JSON")
    teacher_epochs: int = key(20, "models", "epochs of a teacher trained first on the labels")
    kd: str = key("adaptive", "distillation", "adaptive (alpha-divergence) | kl | none (labels only)")
    beta: float = key(0.9, "distillation", "weight of the KD term: (1 - beta) CE + beta T^2 KD_T")
    temperature: float = key(1.0, "distillation", "softmax temperature T of the KD term (<= 100)")
    alpha_min: float = key(-1.0, "distillation", "negative alpha of the adaptive KD")
    alpha_max: float = key(1.0, "distillation", "positive alpha of the adaptive KD")
    kd_clip: float = key(5.0, "distillation", "clip of the importance weight, > 0")
    cache_teacher: bool = key(False, "distillation", "compute the teacher's logits once (no random augmentation)")
    label_smoothing: float = key(0.0, "optimisation", "label smoothing of the cross-entropy term")
    epochs: int = key(30, "optimisation", "training epochs of the student")
    batch_size: int = key(64, "optimisation", "images per process and step")
    lr_per_256: float = key(0.4, "optimisation", "SGD-Nesterov LR per 256 images of the global batch")
    momentum: float = key(0.9, "optimisation", "SGD momentum")
    weight_decay: float = key(1e-5, "optimisation", "weight decay (not on BN parameters and biases)")
    warmup_epochs: int = key(2, "optimisation", "linear LR warm-up from 0.001x, then cosine")
    max_nonfinite_steps: int = key(5, "optimisation", "consecutive non-finite steps before the run stops")
    device: str = key("auto", "execution", "auto (the GPU when one is visible) | cpu | cuda | cuda:N")
    amp: str = key("off", "execution", "autocast: off | bf16 | fp16 (GPU only)")
    channels_last: bool = key(False, "execution", "channels-last memory format")
    workers: int = key(0, "execution", "data-loading worker processes")
    seed: int = key(0, "execution", "seed of the weights, data order and dropout")
    calib_images: int = key(512, "outputs", "training images that re-estimate the BN statistics before each "
                                            "evaluation (0: keep the running averages)")
    eval_batch_size: int = key(256, "outputs", "batch size of evaluation")
    checkpoint_every: int = key(0, "outputs", "steps between mid-epoch checkpoints (0: end of epoch only)")
    log_every: int = key(20, "outputs", "steps between reads of the losses back to the host (steps.jsonl "
                                        "still gets every step; a GPU is not made to wait every step)")
    out: str = key("", "outputs", "run folder (default runs/distill-<dataset>-<time>)")


PRESETS: Dict[str, Dict[str, object]] = {
    "digits": {},
    # ImageNet students of App. C (e.g. torchvision:mobilenet_v3_large) from a given teacher
    "imagenet": dict(dataset="imagefolder", image_size=224, student="torchvision:mobilenet_v3_large", epochs=90,
                     batch_size=128, lr_per_256=0.1, warmup_epochs=5, weight_decay=1e-5, amp="bf16",
                     channels_last=True, workers=8),
}


def validate(config: DistillConfig) -> None:
    check_ranges(config, {"dataset": DATASETS, "kd": ("adaptive", "kl", "none"),
                          "amp": ("bf16", "fp16", "off")},
                 positive=("epochs", "batch_size", "eval_batch_size", "max_nonfinite_steps", "image_size", "log_every",
                           "lr_per_256", "kd_clip", "teacher_epochs"),
                 non_negative=("warmup_epochs", "workers", "seed", "checkpoint_every", "weight_decay", "momentum",
                               "calib_images"),
                 fractions=("label_smoothing",))
    if not 0 <= config.beta <= 1:
        raise ValueError(f"config key 'beta' must be in [0, 1], got {config.beta}")
    if not 0 < config.temperature <= 100:
        raise ValueError(f"config key 'temperature' must be in (0, 100], got {config.temperature}")
    if config.alpha_min > config.alpha_max:
        raise ValueError(f"config keys alpha_min ({config.alpha_min}) must not exceed alpha_max ({config.alpha_max})")
    if not is_bundled(config.dataset) and not config.data_path:
        raise ValueError(f"dataset {config.dataset!r} needs a data folder (--data_path)")
    if config.cache_teacher and not is_bundled(config.dataset):
        raise ValueError(f"--cache_teacher needs data without random augmentation; {config.dataset!r} training "
                         "images are augmented, so the teacher must see each one")
    if config.teacher_checkpoint and config.teacher:
        raise ValueError("give the teacher either as --teacher or as --teacher_checkpoint, not both")
    for name in ("student", "teacher"):
        spec = getattr(config, name)
        if spec and spec.partition(":")[0] not in ("arch", "supernet", "export", "torchvision"):
            raise ValueError(f"config key {name!r}: {spec!r} is not one of {models.SPEC_HELP}")


def resolve(preset: str = "digits", yaml_path: Optional[str] = None, values: Optional[Dict] = None) -> DistillConfig:
    return resolve_config(preset, yaml_path, values, cls=DistillConfig, presets=PRESETS, check=validate)


def default_teacher(config: DistillConfig) -> str:
    if config.teacher_checkpoint:
        return f"supernet:{config.teacher_checkpoint}:{config.teacher_arch}"
    kind, _, rest = config.student.partition(":")
    space = rest.split(":")[0] if kind == "arch" else ("digits" if is_bundled(config.dataset) else "tiny")
    return f"arch:{space}:max"


class Indexed(Dataset):
    """(image, label, index): the index finds a training image's cached teacher logits."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


# ---------------------------------------------------------------------------------------------
# The loss


def distill_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                 config: DistillConfig) -> Dict[str, torch.Tensor]:
    """(1 - beta) CE + beta T^2 KD_T (the op's value carries T^2); `kd none`: CE alone."""
    ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=config.label_smoothing)
    if config.kd == "none":
        return {"loss": ce, "ce": ce.detach(), "kd": torch.zeros((), device=ce.device)}
    alphas = (1.0, 1.0) if config.kd == "kl" else (config.alpha_min, config.alpha_max)
    kd = fused_adaptive_kd(student_logits, teacher_logits, alpha_min=alphas[0], alpha_max=alphas[1],
                           clip=config.kd_clip, temperature=config.temperature)
    return {"loss": (1 - config.beta) * ce + config.beta * kd, "ce": ce.detach(), "kd": kd.detach().float()}


# ---------------------------------------------------------------------------------------------
# The run


def load_teacher(config: DistillConfig, classes: int, runtime: Runtime) -> Optional[torch.nn.Module]:
    """The frozen teacher; one named by `arch:` (fresh weights) is trained on the labels first."""
    if config.kd == "none":
        return None
    spec = config.teacher or default_teacher(config)
    if spec.startswith("arch:"):
        folder = os.path.join(config.out, "teacher")
        if not os.path.exists(os.path.join(folder, "summary.txt")):
            print0(runtime, f"training the teacher {spec} on the labels first ({config.teacher_epochs} epochs)")
            teacher_config = dataclasses.replace(config, student=spec, teacher="", kd="none",
                                                 epochs=config.teacher_epochs, cache_teacher=False, out=folder)
            resume = folder if os.path.exists(os.path.join(folder, "checkpoint.pt")) else None
            run_distill(teacher_config, resume=resume, runtime=runtime, role="teacher")
        model = models.build(spec, classes, config.seed)
        model.load_state_dict(ckpt.load(folder)["model"])
    else:
        model = models.build(spec, classes, config.seed, config.data_path or None)
    model = model.to(runtime.device).eval()
    model.requires_grad_(False)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def cached_logits(teacher, split: Dataset, config: DistillConfig, runtime: Runtime, autocast) -> torch.Tensor:
    loader = DataLoader(split, batch_size=config.eval_batch_size, num_workers=config.workers)
    chunks = []
    for images, _ in loader:
        images = to_device(images, images.new_zeros(0), runtime.device, config.channels_last)[0]
        with autocast():
            chunks.append(teacher(images).float())
    return torch.cat(chunks)


def calibrate(model: torch.nn.Module, split: Dataset, config: DistillConfig, runtime: Runtime, autocast) -> None:
    """Re-estimate the BN statistics on `calib_images` training images (a fixed order), then eval mode: a
    short run's running averages lag behind its weights (as the supernet's subnets are, the student is
    evaluated with the statistics of its final weights)."""
    if config.calib_images:
        loader = calibration_loader(split, config.batch_size, config.seed, config.workers)
        batches = (to_device(images, labels, runtime.device, config.channels_last)[0] for images, labels in loader)
        with autocast():
            recalibrate_bn(model, batches, math.ceil(config.calib_images / config.batch_size))
    model.eval()


def run_distill(config: DistillConfig, resume: Optional[str] = None, stop_at_step: Optional[int] = None,
                runtime: Optional[Runtime] = None, role: str = "student") -> Dict[str, object]:
    with contextlib.ExitStack() as held:
        return distill_run(config, resume, stop_at_step, runtime or setup_runtime(config.device), role, held)


def distill_run(config: DistillConfig, resume: Optional[str], stop_at_step: Optional[int], runtime: Runtime,
                role: str, held: contextlib.ExitStack) -> Dict[str, object]:
    """`run_distill`; the run folder's lock is held by `held`."""
    state = ckpt.load(resume) if resume else None
    config.out = ckpt.run_folder(config.out, resume, f"distill-{config.dataset}")
    if runtime.is_main:  # one process per run folder, until `held` closes (a failure below releases it)
        held.enter_context(ckpt.RunFolderLock(config.out))
    splits = load_splits(config.dataset, config.data_path, config.image_size)
    classes = num_classes(config.dataset, splits)
    sampler = DistributedSampler(splits["train"], runtime.world, runtime.rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"config key 'batch_size' ({config.batch_size}) exceeds the {len(sampler)} training "
                         "images per process")
    autocast = make_autocast(config.amp, runtime)
    student = models.build(config.student, classes, config.seed, config.data_path or None).to(runtime.device)
    trained_here = (config.teacher or default_teacher(config)).startswith("arch:")
    teacher = None if config.kd == "none" or trained_here else load_teacher(config, classes, runtime)
    if runtime.is_main:
        ckpt.remove_stale_temporaries(config.out)
    if config.kd != "none" and trained_here:
        teacher = load_teacher(config, classes, runtime)
    if config.channels_last:
        student = student.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(student, config, config.batch_size * runtime.world)
    total = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_epochs * steps_per_epoch, total))
    step, history, sums, skipped = 0, [], {}, 0
    if state is not None:
        student.load_state_dict(state["model"])
        load_optimizer(optimizer, state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        ckpt.restore_rng(state["rng"])
        step, history, sums, skipped = state["step"], state["history"], state["epoch_sums"], state["skipped"]
    if runtime.is_main:  # the logs cut back to the checkpoint (to nothing on a fresh start): every step once
        runlog.rewind(config.out, step, history)
    cache = None
    if teacher is not None and config.cache_teacher:
        cache = cached_logits(teacher, splits["train"], config, runtime, autocast)
    params = [p for p in student.parameters() if p.requires_grad]
    print0(runtime, f"distilling into {config.student} ({role}) on {config.dataset}: kd={config.kd}, "
                    f"beta={config.beta}, T={config.temperature}, {steps_per_epoch} steps/epoch, {config.epochs} "
                    f"epochs; outputs in {config.out}")

    def save() -> None:
        if runtime.is_main:
            save_yaml(config, os.path.join(config.out, "config.yaml"))
            ckpt.save(os.path.join(config.out, "checkpoint.pt"), {
                "model": student.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "step": step, "history": history, "epoch_sums": sums, "skipped": skipped, "rng": ckpt.capture_rng(),
                "config": to_dict(config), "role": role})

    val_loader = DataLoader(splits["val"], batch_size=config.eval_batch_size, num_workers=config.workers)
    guard = StepGuard(config.max_nonfinite_steps, runtime.device)

    def flush() -> None:
        nonlocal skipped
        skipped += sum(record["skipped"] for record in flush_steps(guard, sums, config.out, runtime.is_main))

    with stop_requests() as requested:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)[offset * config.batch_size: steps_per_epoch * config.batch_size]
            loader = DataLoader(Subset(Indexed(splits["train"]), order), batch_size=config.batch_size,
                                num_workers=config.workers)
            sums = sums or {"loss": 0.0, "ce": 0.0, "kd": 0.0, "steps": 0, "seconds": 0.0}
            started = time.time() - sums["seconds"]
            student.train()
            for images, labels, indices in _progress(runtime, loader, epoch, config.epochs, offset, steps_per_epoch):
                seed_step(config.seed, runtime.rank, step)
                images, labels = to_device(images, labels, runtime.device, config.channels_last)
                with autocast():
                    logits = student(images)
                    teacher_logits = None
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_logits = cache[indices.to(cache.device)] if cache is not None else teacher(images)
                losses = distill_loss(logits, teacher_logits, labels, config)
                losses["loss"].backward()
                flat = all_reduce_gradients(params, runtime, losses)
                optimizer.found_inf = guard.check(list(losses), flat, step + 1, schedule.get_last_lr()[0])
                optimizer.step()  # a no-op where found_inf is set (see StepGuard)
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                sums["seconds"] = time.time() - started
                at_end = step % steps_per_epoch == 0
                stop = requested or (stop_at_step is not None and step >= stop_at_step)
                checkpoint = config.checkpoint_every and step % config.checkpoint_every == 0 and not at_end
                if at_end or stop or checkpoint or step % config.log_every == 0:
                    flush()
                if stop:
                    break
                if checkpoint:
                    save()
            flush()
            if step % steps_per_epoch == 0 and sums.get("steps"):
                record = {"epoch": step // steps_per_epoch, "step": step, "lr": schedule.get_last_lr()[0],
                          **{f"train_{name}": sums[name] / sums["steps"] for name in ("loss", "ce", "kd")},
                          "skipped_steps": skipped, "seconds": sums["seconds"]}
                if runtime.is_main:
                    calibrate(student, splits["train"], config, runtime, autocast)
                    record["val_top1"] = classification_metrics(student, val_loader, runtime.device, autocast,
                                                                config.channels_last)["top1"]
                    history.append(record)
                    runlog.append_epoch(config.out, record)
                    print0(runtime, "epoch {epoch}: loss {train_loss:.4f} ce {train_ce:.3f} kd {train_kd:.4f} "
                                    "val top-1 {val_top1:.1f}%".format(**record))
                sums = {}
            save()
            if requested:
                raise Interrupted(f"interrupted at step {step}/{total}; checkpoint saved, continue with: "
                                  f"alphanet distill --resume {config.out}")
            if stop_at_step is not None and step >= stop_at_step:
                return {"step": step, "stopped": True}
    return finish(config, student, teacher, splits, history, step, skipped, runtime, autocast, role)


def finish(config, student, teacher, splits, history, step, skipped, runtime, autocast, role) -> Dict[str, object]:
    summary: Dict[str, object] = {"step": step, "skipped_steps": skipped}
    if not runtime.is_main:
        return summary
    test_loader = DataLoader(splits["test"], batch_size=config.eval_batch_size, num_workers=config.workers)
    student.eval()  # calibrated at the last epoch's end
    summary["student_test_top1"] = classification_metrics(student, test_loader, runtime.device, autocast,
                                                          config.channels_last)["top1"]
    lines = [f"{role} test top-1: {summary['student_test_top1']:.1f}%"]
    if teacher is not None:
        summary["teacher_test_top1"] = classification_metrics(teacher, test_loader, runtime.device, autocast,
                                                              config.channels_last)["top1"]
        lines.append(f"teacher test top-1: {summary['teacher_test_top1']:.1f}%")
    plot_curves(history, os.path.join(config.out, "curves.png"),
                losses={"train_loss": "training loss", "train_ce": "cross-entropy", "train_kd": "KD term"},
                accuracies={"val_top1": role})
    lines += [f"steps: {step} ({skipped} skipped for non-finite loss)",
              f"checkpoint: {os.path.join(config.out, 'checkpoint.pt')}",
              f"metrics: {os.path.join(config.out, 'metrics.csv')}, curves: {os.path.join(config.out, 'curves.png')}"]
    ckpt.atomic_write(os.path.join(config.out, "summary.txt"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines), flush=True)
    return summary


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet distill", description=__doc__)
    parser.add_argument("--preset", default="digits", help="named preset: digits or imagenet")
    parser.add_argument("--config", default=None, help="YAML file of config keys")
    parser.add_argument("--resume", default=None, help="run folder (or checkpoint) to continue")
    add_config_arguments(parser, DistillConfig)
    args = parser.parse_args(argv)

    def run() -> None:
        given = overrides(args, DistillConfig)
        if args.resume:
            config = apply(DistillConfig(), ckpt.load(args.resume)["config"], f"checkpoint {args.resume!r}")
            apply(config, given, "the command line")
            validate(config)
        resume = args.resume
        if not resume:
            config = resolve(args.preset, args.config, given)
            resume = ckpt.existing_run(config.out, to_dict(config))  # the same command again continues its run
        run_distill(config, resume=resume)

    run_command("alphanet distill", run)


if __name__ == "__main__":
    main()
