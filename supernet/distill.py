"""`alphanet distill`: a student trained from a fixed teacher (AlphaNet, App. C).

    L = (1 - beta) * CE(student, labels) + beta * T^2 * KD_T(student, teacher)

with KD the adaptive alpha-divergence (`--kd adaptive`, default) or KL (`--kd kl`), both through
`fused_adaptive_kd` (its value already carries the T^2), or the labels alone (`--kd none`). beta = 0.9
and T = 1 (`--kd_temperature`) by default. The teacher runs in eval mode without gradients; its BN
statistics never change. Models are named by a spec (supernet/models.py): `arch:SPACE:ARCH`,
`supernet:RUN_DIR[:ARCH]`, `export:DIR`, `torchvision:NAME[:WEIGHTS]`. A teacher given as `arch:` (fresh
weights), and the default teacher (the max subnet of the student's space), is first trained on the
labels by this same command, in `<run folder>/teacher`. `--cache_teacher` computes the teacher's logits
of the training split once and reuses them (only for data without random augmentation: digits). The
loop, the run state and the evaluation are the engine's (supernet/engine.py), shared with `alphanet
train`: torchrun processes, AMP with a gradient scaler for fp16, the gradient clip, exact resume.

Single process: `alphanet distill`. Several: `torchrun --standalone --nproc_per_node=N -m supernet.distill`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset

from . import checkpoint as ckpt
from . import engine, models
from .config import (CommandLineParser, KDConfig, RunConfig, add_config_arguments, default_of, is_bundled, key,
                     overrides, resolve_config, to_dict, validate_kd, validate_run)
from .config import config_for_resume as saved_config
from .data import config_splits, num_classes
from .errors import run_command
from .evaluation import classification_metrics, to_device
from .flops import count_with_hooks
from .runtime import Runtime, make_autocast, print0, setup_runtime


@dataclass
class DistillConfig(KDConfig):
    """`alphanet distill`: the models, the weight of the KD term; the rest as `alphanet train`."""

    label_smoothing: float = default_of(RunConfig, "label_smoothing", 0.0)
    lr_per_256: float = default_of(RunConfig, "lr_per_256", 0.4)
    grad_clip_value: float = default_of(RunConfig, "grad_clip_value", 0.0)
    student: str = key("arch:digits:min", "models", f"the student: {models.SPEC_HELP}")
    teacher: str = key("", "models", "the teacher (same specs); default: the max subnet of the student's space, "
                                     "trained first")
    teacher_checkpoint: str = key("", "models", "a trained supernet (run folder or checkpoint) whose subnet "
                                                "--teacher_arch is the teacher (same as --teacher supernet:RUN:ARCH)")
    teacher_arch: str = key("max", "models", "the teacher's arch in --teacher_checkpoint: min, max, a0 ... or JSON")
    teacher_epochs: int = key(20, "models", "epochs of a teacher trained first on the labels")
    beta: float = key(0.9, "distillation", "weight of the KD term: (1 - beta) CE + beta T^2 KD_T")
    cache_teacher: bool = key(False, "distillation", "compute the teacher's logits once (no random augmentation)")


PRESETS: Dict[str, Dict[str, object]] = {
    "digits": {},
    # ImageNet students of App. C (e.g. torchvision:mobilenet_v3_large) from a given teacher
    "imagenet": dict(dataset="imagefolder", image_size=224, student="torchvision:mobilenet_v3_large", epochs=90,
                     batch_size=128, lr_per_256=0.1, warmup_epochs=5, weight_decay=1e-5, amp="bf16",
                     channels_last=True, workers=8),
}
RENAMED = {"temperature": "kd_temperature"}  # keys of checkpoints written before the rename


def validate(config: DistillConfig) -> None:
    validate_run(config, positive=("teacher_epochs",))
    validate_kd(config)
    if not 0 <= config.beta <= 1:
        raise ValueError(f"config key 'beta' must be in [0, 1], got {config.beta}")
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


def config_for_resume(path: str, given: Dict[str, object]) -> DistillConfig:
    """The saved config of a distill run, with the keys given on the command line on top."""
    return saved_config(path, given, cls=DistillConfig, check=validate, renamed=RENAMED)


def default_teacher(config: DistillConfig) -> str:
    if config.teacher_checkpoint:
        return f"supernet:{config.teacher_checkpoint}:{config.teacher_arch}"
    kind, _, rest = config.student.partition(":")
    space = rest.split(":")[0] if kind == "arch" else ("digits" if is_bundled(config.dataset) else "tiny")
    return f"arch:{space}:max"


# ---------------------------------------------------------------------------------------------
# The loss


def distill_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                 config: DistillConfig) -> Dict[str, torch.Tensor]:
    """(1 - beta) CE + beta T^2 KD_T (the op's value carries T^2); `kd none`: CE alone."""
    ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=config.label_smoothing)
    if config.kd == "none":
        return {"loss": ce, "ce": ce.detach(), "kd": torch.zeros((), device=ce.device)}
    kd = engine.kd_divergence(student_logits, teacher_logits, config)
    return {"loss": (1 - config.beta) * ce + config.beta * kd, "ce": ce.detach(), "kd": kd.detach().float()}


# ---------------------------------------------------------------------------------------------
# The teacher


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
def cached_logits(teacher, split: Dataset, config: DistillConfig, runtime: Runtime) -> torch.Tensor:
    """The teacher's logits of every training image, in the split's order."""
    loader = DataLoader(split, batch_size=config.eval_batch_size, num_workers=config.workers)
    autocast = make_autocast(config.amp, runtime)
    chunks = []
    for images, labels in loader:
        images = to_device(images, labels, runtime.device, config.channels_last)[0]
        with autocast():
            chunks.append(teacher(images).float())
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------
# The run


class DistillTask(engine.Task):
    """A student and its frozen teacher; evaluated by the student's calibrated top-1 (and, at the finish,
    the teacher's, as it is)."""

    command = "alphanet distill"
    loss_names = ("loss", "ce", "kd")

    def __init__(self, config: DistillConfig, splits: Dict[str, Dataset], runtime: Runtime, role: str):
        classes = num_classes(config.dataset, splits)
        self.config, self.role = config, role
        self.model = models.build(config.student, classes, config.seed, config.data_path or None)
        pixels = splits["train"][0][0].shape[-1] if is_bundled(config.dataset) else config.image_size  # digits: 8
        self.size = (f"{count_with_hooks(self.model, pixels) / 1e6:.2f} MFLOPs at {pixels} pixels, "
                     f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters")
        self.teacher = load_teacher(config, classes, runtime)
        self.cache, self.before = None, None
        if self.teacher is not None and config.cache_teacher:
            self.cache = cached_logits(self.teacher, splits["train"], config, runtime)
        self.curves = dict(losses={"train_loss": "training loss", "train_ce": "cross-entropy", "train_kd": "KD term"},
                           accuracies={"val_top1": role})

    def describe(self, run):
        config, runtime = self.config, run.runtime
        return (f"distilling into {config.student} ({self.role}; {self.size}) on {config.dataset}: "
                f"{runtime.world} process(es) on {runtime.device}, kd={config.kd}, beta={config.beta}, "
                f"T={config.kd_temperature}, {run.steps_per_epoch} steps/epoch, {config.epochs} epochs, "
                f"amp={config.amp}; outputs in {config.out}")

    def before_training(self, run):
        """A student with trained weights (`supernet:`, `export:`, a weights file): its calibrated test
        top-1 before distillation, for the summary (Figure 5's inherited-weight fine-tuning)."""
        if self.role == "student" and models.has_trained_weights(self.config.student):
            self.before = self.evaluate(run, "test")["top1"]
            print0(run.runtime, f"the student before distillation: test top-1 {self.before:.1f}%")

    def step(self, run, images, labels, indices):
        with record_function("forward"):
            with run.autocast():
                logits = self.model(images)
                teacher_logits = None
                if self.teacher is not None:
                    with torch.no_grad():
                        teacher_logits = (self.cache[indices.to(self.cache.device)] if self.cache is not None
                                          else self.teacher(images))
            losses = distill_loss(logits, teacher_logits, labels, self.config)
        with record_function("backward"):
            run.scaler.scale(losses["loss"]).backward()
        return {name: value.detach().float() for name, value in losses.items()}

    def evaluate(self, run, split):
        loader = run.evaluation_loader(split)
        metrics = {"top1": run.calibrated_metrics(self.model, loader)["top1"]}
        if split == "test" and self.teacher is not None:
            metrics["teacher_top1"] = classification_metrics(self.teacher, loader, run.runtime.device, run.autocast,
                                                             self.config.channels_last,
                                                             all_reduce=run.runtime.world > 1)["top1"]
        return metrics

    def epoch_line(self, record):
        return ("epoch {epoch}: loss {train_loss:.4f} ce {train_ce:.3f} kd {train_kd:.4f} "
                "val top-1 {val_top1:.1f}%".format(**record))

    def summary_lines(self, run, summary):
        lines = [f"{self.role} test top-1: {summary['test_top1']:.1f}%"]
        if self.before is not None:
            summary["test_top1_before"] = self.before
            lines.append(f"{self.role} test top-1 before distillation: {self.before:.1f}%")
        if "test_teacher_top1" in summary:
            lines.append(f"teacher test top-1: {summary['test_teacher_top1']:.1f}%")
        return lines + [f"steps: {run.step} ({run.skipped} skipped for non-finite loss)",
                        f"checkpoint: {os.path.join(run.out, 'checkpoint.pt')}",
                        f"metrics: {os.path.join(run.out, 'metrics.csv')}, curves: {os.path.join(run.out, 'curves.png')}"]


def setup(config: DistillConfig, resume: Optional[str], runtime: Runtime, role: str = "student") -> engine.Run:
    """The run of `config` (or the resumed one), its folder locked: see `engine.setup`."""
    return engine.setup(config, resume, runtime, lambda: config_splits(config),
                        lambda splits: DistillTask(config, splits, runtime, role), f"distill-{config.dataset}")


def run_distill(config: DistillConfig, resume: Optional[str] = None, stop_at_step: Optional[int] = None,
                runtime: Optional[Runtime] = None, role: str = "student") -> Dict[str, object]:
    """Distill (or continue); returns the final summary (or partial state when stopped at `stop_at_step`)."""
    runtime = runtime or setup_runtime(config.device)
    with contextlib.closing(setup(config, resume, runtime, role)) as run:
        return engine.train_to_the_end(run, stop_at_step)


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet distill", description=__doc__)
    parser.add_argument("--preset", default="digits", help="named preset: digits or imagenet")
    parser.add_argument("--config", default=None, help="YAML file of config keys")
    parser.add_argument("--resume", default=None, help="run folder (or checkpoint) to continue")
    add_config_arguments(parser, DistillConfig)
    args = parser.parse_args(argv)

    def run() -> None:
        given, resume = overrides(args, DistillConfig), args.resume
        if resume:
            config = config_for_resume(resume, given)
        else:
            config = resolve(args.preset, args.config, given)
            resume = ckpt.existing_run(config.out, to_dict(config))  # the same command again continues its run
        run_distill(config, resume=resume)

    run_command("alphanet distill", run)


if __name__ == "__main__":
    main()
