"""`alphanet finetune`: transfer a trained model to a new dataset (AlphaNet §4.3).

The model (`--model export:DIR`, `supernet:RUN_DIR[:ARCH]` or `torchvision:NAME[:WEIGHTS]`) gets a new
classifier for the new classes, behind dropout 0.5, and is fine-tuned with SGD (momentum 0.9,
Nesterov, label smoothing 0.1, cosine LR), its BN statistics re-estimated before every evaluation.
With `--holdout 0.2`, 20% of the training split is held out, each (LR, weight decay) of the grid is
fine-tuned on the rest and evaluated on it, and the best pair (by held-out top-1) is fine-tuned again
on the whole training split; the test split is used once, at the end. `--classes 0,1,2` keeps a
subset of the classes (relabelled 0..k-1).

Every fine-tuning is a run of the training engine (supernet/engine.py, as `alphanet train`): its own
run folder with checkpoints, logs and curves (`OUT/holdout/lr=...,wd=.../`, then `OUT/final/`), exact
resume, AMP, `--device`, torchrun. The same command again continues an interrupted fine-tuning and
reads finished runs back instead of repeating them. Outputs: `finetune.json` (the grid's results, the
choice, the test top-1) and `weights.pt` (the final model's state dict, on the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.data import Dataset, Subset

from . import checkpoint as ckpt
from . import engine, models
from .config import (CommandLineParser, RunConfig, add_config_arguments, apply, default_of, key, overrides,
                     validate_run, to_dict)
from .config import config_for_resume as saved_config
from .data import config_splits, num_classes
from .errors import run_command
from .runtime import Runtime, print0, setup_runtime


@dataclass
class FinetuneConfig(RunConfig):
    """`alphanet finetune`: the model, the classes, the hold-out fraction; the rest as `alphanet train`.
    `lr_per_256` and `weight_decay` are set per run from the --lr and --weight_decay grids."""

    epochs: int = default_of(RunConfig, "epochs", 10)
    warmup_epochs: int = default_of(RunConfig, "warmup_epochs", 0)
    grad_clip_value: float = default_of(RunConfig, "grad_clip_value", 0.0)
    model: str = key("", "finetune", f"the model: {models.SPEC_HELP}")
    classes: str = key("", "finetune", "comma-separated class indices to keep (default: all)")
    holdout: float = key(0.2, "finetune", "fraction held out to choose LR and weight decay (0: no search, the "
                                          "first values of the grids)")


GRID_KEYS = ("lr_per_256", "weight_decay")  # set per run from the grids, not on the command line


def validate(config: FinetuneConfig) -> None:
    validate_run(config, fractions=("holdout",))
    if not config.model:
        raise ValueError("give the model to fine-tune: --model SPEC")


class Relabelled(Dataset):
    """The images of some classes, labelled by their position in `classes`."""

    def __init__(self, dataset: Dataset, classes: Sequence[int]):
        self.dataset, self.mapping = dataset, {label: index for index, label in enumerate(classes)}
        self.indices = [i for i in range(len(dataset)) if int(dataset[i][1]) in self.mapping]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.dataset[self.indices[index]]
        return image, self.mapping[int(label)]


def new_head(model: nn.Module, classes: int, dropout: float = 0.5) -> nn.Module:
    """Replace the last linear layer by dropout and a fresh classifier for `classes` classes."""
    parent, name = models.classifier_of(model)
    old = getattr(parent, name)
    setattr(parent, name, nn.Sequential(nn.Dropout(dropout), nn.Linear(old.in_features, classes)))
    return model


class FinetuneTask(engine.Task):
    """A model with a new classifier, trained on the labels; evaluated by its calibrated top-1."""

    command = "alphanet finetune"
    loss_names = ("ce",)
    curves = dict(losses={"train_ce": "cross-entropy"}, accuracies={"val_top1": "top-1"})

    def __init__(self, base: nn.Module, classes: int, config: FinetuneConfig):
        self.config = config
        self.model = new_head(copy.deepcopy(base), classes)

    def describe(self, run):
        config = self.config
        return (f"fine-tuning {config.model} on {config.dataset} ({run.runtime.world} process(es) on "
                f"{run.runtime.device}): lr {learning_rate(config):g}, weight decay {config.weight_decay:g}, "
                f"{run.steps_per_epoch} steps/epoch, {config.epochs} epochs; outputs in {config.out}")

    def step(self, run, images, labels, indices):
        with record_function("forward"), run.autocast():
            ce = F.cross_entropy(self.model(images).float(), labels, label_smoothing=self.config.label_smoothing)
        with record_function("backward"):
            run.scaler.scale(ce).backward()
        return {"ce": ce.detach()}

    def evaluate(self, run, split):
        return {"top1": run.calibrated_metrics(self.model, run.evaluation_loader(split))["top1"]}

    def epoch_line(self, record):
        return "epoch {epoch}: ce {train_ce:.3f} val top-1 {val_top1:.1f}%".format(**record)

    def summary_lines(self, run, summary):
        return [f"top-1: {summary['test_top1']:.1f}%", f"checkpoint: {os.path.join(run.out, 'checkpoint.pt')}"]


def learning_rate(config: FinetuneConfig) -> float:
    return config.lr_per_256 * config.batch_size / 256


def fit(base: nn.Module, classes: int, splits: Dict[str, Dataset], config: FinetuneConfig, runtime: Runtime,
        stop_at_step: Optional[int] = None) -> Dict[str, object]:
    """One fine-tuning run in `config.out` (`splits`: train, then val scored every epoch and test at the
    end); returns its summary and the trained model. A finished run is read back; an unfinished one
    with the same settings continues."""
    summary_file = os.path.join(config.out, "summary.json")
    resume = ckpt.existing_run(config.out, to_dict(config))
    if resume and os.path.exists(summary_file):
        model = new_head(copy.deepcopy(base), classes)
        model.load_state_dict(ckpt.load(config.out)["model"])
        with open(summary_file) as handle:
            return {**json.load(handle), "model": model.eval()}
    with contextlib.closing(start(base, classes, splits, config, resume, runtime)) as run:
        summary = engine.train_to_the_end(run, stop_at_step)
    return {**summary, "model": run.model.eval()}


def load(config: FinetuneConfig):
    """The chosen classes' train / val / test splits, relabelled, their count, and the model to fine-tune."""
    splits = config_splits(config)
    classes = chosen_classes(config.classes, num_classes(config.dataset, splits))
    data = {name: Relabelled(splits[name], classes) for name in ("train", "val", "test")}
    base = models.build(config.model, num_classes(config.dataset, splits), config.seed, config.data_path or None)
    return data, len(classes), base


def start(base: nn.Module, classes: int, splits: Dict[str, Dataset], config: FinetuneConfig,
          resume: Optional[str], runtime: Runtime) -> engine.Run:
    """The run of fine-tuning `base` with a new `classes`-way head on `splits`, its folder locked: see
    `engine.setup`."""
    return engine.setup(config, resume, runtime, lambda: splits, lambda _: FinetuneTask(base, classes, config),
                        "finetune")


def setup(config: FinetuneConfig, resume: Optional[str], runtime: Runtime) -> engine.Run:
    """One fine-tuning run of `config` on its dataset's splits."""
    data, classes, base = load(config)
    return start(base, classes, data, config, resume, runtime)


def run_single(config: FinetuneConfig, resume: Optional[str] = None, stop_at_step: Optional[int] = None,
               runtime: Optional[Runtime] = None) -> Dict[str, object]:
    """One fine-tuning of `config` (its lr_per_256 and weight_decay; no grid, no hold-out) in `config.out`."""
    data, classes, base = load(config)
    config.out = ckpt.run_folder(config.out, resume, "finetune")
    summary = fit(base, classes, data, config, runtime or setup_runtime(config.device), stop_at_step)
    summary.pop("model")
    return summary


def config_for_resume(path: str) -> FinetuneConfig:
    """The saved config of one fine-tuning run."""
    return saved_config(path, cls=FinetuneConfig, check=validate)


def finetune(base: nn.Module, train: Dataset, test: Dataset, val: Dataset, classes: int, config: FinetuneConfig,
             lrs: List[float], weight_decays: List[float], runtime: Runtime,
             fit: Callable[..., Dict[str, object]] = fit) -> Dict[str, object]:
    """The hold-out grid search (when `holdout` > 0), then the final fine-tuning on all of `train`."""
    def configured(folder: str, lr: float, weight_decay: float) -> FinetuneConfig:
        return dataclasses.replace(config, lr_per_256=lr * 256 / config.batch_size, weight_decay=weight_decay,
                                   out=os.path.join(config.out, folder))

    grid = []
    if config.holdout > 0 and len(lrs) * len(weight_decays) > 1:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed)).tolist()
        held = int(round(config.holdout * len(train)))
        fit_split, held_split = Subset(train, order[held:]), Subset(train, order[:held])
        for lr, weight_decay in itertools.product(lrs, weight_decays):
            result = fit(base, classes, {"train": fit_split, "val": held_split, "test": held_split},
                         configured(os.path.join("holdout", f"lr={lr:g},wd={weight_decay:g}"), lr, weight_decay),
                         runtime)
            grid.append({"lr": lr, "weight_decay": weight_decay, "holdout_top1": result["test_top1"]})
            print0(runtime, f"hold-out: lr {lr:g} weight decay {weight_decay:g}: top-1 "
                            f"{grid[-1]['holdout_top1']:.1f}%")
        best = max(grid, key=lambda row: row["holdout_top1"])  # the first of equals
        lr, weight_decay = best["lr"], best["weight_decay"]
    else:
        lr, weight_decay = lrs[0], weight_decays[0]
    result = fit(base, classes, {"train": train, "val": val, "test": test}, configured("final", lr, weight_decay),
                 runtime)
    return {"grid": grid, "lr": lr, "weight_decay": weight_decay, "test_top1": result["test_top1"],
            "model": result["model"]}


def numbers(text: str, name: str) -> List[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{name}: expected non-negative numbers, got {text!r}")
    return values


def chosen_classes(text: str, available: int) -> List[int]:
    if not text:
        return list(range(available))
    try:
        wanted = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--classes {text!r}: expected comma-separated class indices") from None
    if len(set(wanted)) < 2 or any(not 0 <= c < available for c in wanted):
        raise ValueError(f"--classes {text!r}: give at least 2 distinct indices of 0..{available - 1}")
    return wanted


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet finetune", description=__doc__)
    parser.add_argument("--lr", dest="lrs", metavar="LR[,LR...]", type=lambda t: numbers(t, "--lr"),
                        default=[0.01, 0.03, 0.1],
                        help="LR, or a comma-separated grid for the hold-out search")
    parser.add_argument("--weight_decay", dest="weight_decays", metavar="WD[,WD...]",
                        type=lambda t: numbers(t, "--weight_decay"),
                        default=[1e-5, 1e-4],
                        help="weight decay, or a grid")
    add_config_arguments(parser, FinetuneConfig, exclude=GRID_KEYS, yaml=False)
    args = parser.parse_args(argv)

    def work() -> Dict[str, object]:
        config = apply(FinetuneConfig(), overrides(args, FinetuneConfig), "the command line")
        validate(config)
        runtime = setup_runtime(config.device)
        data, classes, base = load(config)
        config.out = ckpt.run_folder(config.out, None, "finetune")
        with ckpt.RunFolderLock(config.out) if runtime.is_main else contextlib.nullcontext():
            result = finetune(base, data["train"], data["test"], data["val"], classes, config, args.lrs,
                              args.weight_decays, runtime)
            if runtime.is_main:
                model = result.pop("model").cpu()  # saved for any machine
                ckpt.atomic_write(os.path.join(config.out, "weights.pt"),
                                  lambda stream: torch.save(model.state_dict(), stream))
                record = {**result, "model": config.model, "classes": classes, "epochs": config.epochs}
                ckpt.atomic_write(os.path.join(config.out, "finetune.json"), json.dumps(record, indent=1).encode())
                print(f"chosen: lr {result['lr']:g}, weight decay {result['weight_decay']:g}")
                print(f"finetune test top-1: {result['test_top1']:.1f}%")
                print(f"wrote {os.path.join(config.out, 'finetune.json')} and weights.pt")
        return result

    run_command("alphanet finetune", work)


if __name__ == "__main__":
    main()
