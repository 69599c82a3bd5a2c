"""`alphanet finetune`: transfer a trained model to a new dataset (AlphaNet §4.3).

The model (`--model export:DIR`, `supernet:RUN_DIR[:ARCH]` or `torchvision:NAME[:WEIGHTS]`) gets a new
classifier for the new classes, behind dropout 0.5, and is fine-tuned with SGD (momentum 0.9,
Nesterov, label smoothing 0.1, cosine LR), then its BN statistics are re-estimated on 8 training
batches. With `--holdout 0.2`, 20% of the training split is held
out, each (LR, weight decay) of the grid is fine-tuned on the rest and evaluated on it, and the best
pair (by held-out top-1) is fine-tuned again on the whole training split; the test split is used
once, at the end. `--classes 0,1,2` keeps a subset of the classes (relabelled 0..k-1).
Outputs: `finetune.json` (the grid's results, the choice, the test top-1) and `weights.pt`.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import checkpoint as ckpt
from . import models
from .calibration import recalibrate_bn
from .config import DATASETS, CommandLineParser
from .data import load_splits, normalize_on_device, num_classes
from .errors import run_command
from .evaluation import classification_metrics
from .runtime import DEVICES, resolve_device


CALIBRATION_BATCHES = 8


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


def fit(model: nn.Module, train: Dataset, epochs: int, lr: float, weight_decay: float, batch_size: int,
        seed: int, device: torch.device = torch.device("cpu")) -> nn.Module:
    """SGD-Nesterov with label smoothing 0.1 and a cosine LR, then BN recalibration; returns the model in
    eval mode."""
    torch.manual_seed(seed)
    model = model.to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}],
                                lr=lr, momentum=0.9, nesterov=True)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=len(train) > batch_size,
                        generator=torch.Generator().manual_seed(seed))
    total = max(1, epochs * len(loader))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            logits = model(normalize_on_device(images.to(device)))
            F.cross_entropy(logits, torch.as_tensor(labels).to(device), label_smoothing=0.1).backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    # BN statistics of the final weights (a short fine-tuning's running averages lag behind them)
    recalibrate_bn(model, (normalize_on_device(images.to(device)) for images, _ in loader), CALIBRATION_BATCHES)
    return model.eval()


def top1(model: nn.Module, split: Dataset, device: torch.device = torch.device("cpu"), batch_size: int = 256) -> float:
    return classification_metrics(model, DataLoader(split, batch_size=batch_size), device)["top1"]


def finetune(base: nn.Module, train: Dataset, test: Dataset, classes: int, epochs: int, batch_size: int,
             lrs: List[float], weight_decays: List[float], holdout: float, seed: int = 0,
             device: torch.device = torch.device("cpu")) -> Dict[str, object]:
    """The hold-out grid search (when `holdout` > 0), then the final fine-tuning on all of `train`."""
    grid = []
    if holdout > 0 and len(lrs) * len(weight_decays) > 1:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        held = int(round(holdout * len(train)))
        fit_split, val_split = Subset(train, order[held:]), Subset(train, order[:held])
        for lr, weight_decay in itertools.product(lrs, weight_decays):
            model = fit(new_head(copy.deepcopy(base), classes), fit_split, epochs, lr, weight_decay, batch_size, seed,
                        device)
            grid.append({"lr": lr, "weight_decay": weight_decay, "holdout_top1": top1(model, val_split, device)})
            print(f"hold-out: lr {lr:g} weight decay {weight_decay:g}: top-1 {grid[-1]['holdout_top1']:.1f}%",
                  flush=True)
        best = max(grid, key=lambda row: row["holdout_top1"])  # the first of equals
        lr, weight_decay = best["lr"], best["weight_decay"]
    else:
        lr, weight_decay = lrs[0], weight_decays[0]
    model = fit(new_head(copy.deepcopy(base), classes), train, epochs, lr, weight_decay, batch_size, seed, device)
    return {"grid": grid, "lr": lr, "weight_decay": weight_decay, "test_top1": top1(model, test, device), "model": model}


def _numbers(text: str, name: str) -> List[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{name}: expected non-negative numbers, got {text!r}")
    return values


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet finetune", description=__doc__)
    parser.add_argument("--model", required=True, help=f"the model: {models.SPEC_HELP}")
    parser.add_argument("--dataset", default="digits", choices=list(DATASETS))
    parser.add_argument("--data_path", default="", help="folder of cifar10 / imagefolder data")
    parser.add_argument("--image_size", type=int, default=32, help="image size of cifar10 / imagefolder")
    parser.add_argument("--classes", default=None, help="comma-separated class indices to keep (default: all)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=lambda t: _numbers(t, "--lr"), default=[0.01, 0.03, 0.1],
                        help="LR, or a comma-separated grid for the hold-out search")
    parser.add_argument("--weight_decay", type=lambda t: _numbers(t, "--weight_decay"), default=[1e-5, 1e-4],
                        help="weight decay, or a grid")
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction held out to choose LR and weight decay "
                                                                   "(0: no search, the first values of the grids)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="auto", help=f"{DEVICES}: where the model is fine-tuned and evaluated")
    args = parser.parse_args(argv)
    if not 0 <= args.holdout < 1:
        parser.error("--holdout must be in [0, 1)")
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch_size must be at least 1")

    def work() -> dict:
        device = resolve_device(args.device)
        splits = load_splits(args.dataset, args.data_path, args.image_size)
        classes = list(range(num_classes(args.dataset, splits)))
        if args.classes:
            try:
                wanted = [int(part) for part in args.classes.split(",")]
            except ValueError:
                raise ValueError(f"--classes {args.classes!r}: expected comma-separated class indices") from None
            if len(set(wanted)) < 2 or any(c not in classes for c in wanted):
                raise ValueError(f"--classes {args.classes!r}: give at least 2 distinct indices of 0..{len(classes) - 1}")
            classes = wanted
        train, test = Relabelled(splits["train"], classes), Relabelled(splits["test"], classes)
        base = models.build(args.model, num_classes(args.dataset, splits), args.seed, args.data_path or None)
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out!r} is a file, not a folder")
        with ckpt.RunFolderLock(args.out):  # one process per output folder
            result = finetune(base, train, test, len(classes), args.epochs, args.batch_size, args.lr,
                              args.weight_decay, args.holdout, args.seed, device)
            model = result.pop("model").cpu()  # saved for any machine
            ckpt.atomic_write(os.path.join(args.out, "weights.pt"),
                              lambda stream: torch.save(model.state_dict(), stream))
            record = {**result, "model": args.model, "classes": classes, "epochs": args.epochs}
            ckpt.atomic_write(os.path.join(args.out, "finetune.json"), json.dumps(record, indent=1).encode())
        return result

    result = run_command("alphanet finetune", work)
    print(f"chosen: lr {result['lr']:g}, weight decay {result['weight_decay']:g}")
    print(f"finetune test top-1: {result['test_top1']:.1f}%")
    print(f"wrote {os.path.join(args.out, 'finetune.json')} and weights.pt")


if __name__ == "__main__":
    main()
