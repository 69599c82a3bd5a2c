"""Evaluation, the same for every command: BN calibration and classification metrics of any model on
the runtime's device, sharded over processes; and a trained supernet's subnets, calibrated and evaluated.

A supernet's (or a freshly trained network's) running BN statistics lag behind its weights, so every
evaluation first re-estimates them on a fixed set of training images (`Calibration`), then counts top-1,
top-5 and the loss. Under torchrun each process calibrates on every `world`-th batch and evaluates every
`world`-th image; the statistics and the counts are combined, so every process gets what one process
computing all of it would.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import checkpoint as ckpt
from .calibration import recalibrate_bn, share_bn_statistics
from .config import CommandLineParser, TrainConfig, config_for_resume, is_bundled, positive_int
from .data import EncodedBatch, load_splits, normalize_on_device, num_classes
from .flops import flops_and_params
from .model import ElasticSupernet, StaticSubnet, extract
from .runtime import DEVICES, Runtime, resolve_device
from .space import ArchConfig, SearchSpace, get_space

EVAL_CALIB_IMAGES = 64 * 256  # the reference's evaluation: 64 batches of 256 images
CALIB_BATCH_SIZE = 256  # the reference's calibration batch (eval and search)


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool = False):
    """A batch on the device, ImageFolder's uint8 images normalised there (still-encoded ones decoded and
    augmented there first: `decode_on_device`)."""
    if isinstance(images, EncodedBatch):
        images = images.decode(device)
    images = normalize_on_device(images.to(device, non_blocking=True))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


@torch.no_grad()
def classification_metrics(forward: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader,
                           device: torch.device, autocast=contextlib.nullcontext,
                           channels_last: bool = False, all_reduce: bool = False) -> Dict[str, float]:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy of `forward` over the loader; with
    `all_reduce`, over the union of every process's loader (counts summed in one all-reduce)."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, loss
    images_seen = 0
    for images, labels in loader:
        images, labels = to_device(images, labels, device, channels_last)
        with autocast():
            logits = forward(images).float()
        best = logits.topk(min(5, logits.size(-1)), dim=-1).indices
        sums += torch.stack([(best[:, 0] == labels).sum(), (best == labels[:, None]).any(-1).sum(),
                             F.cross_entropy(logits, labels, reduction="sum")]).double()
        images_seen += labels.numel()
    sums = torch.cat([sums, sums.new_tensor([images_seen])])
    if all_reduce and dist.is_initialized():
        dist.all_reduce(sums)
    top1, top5, loss, total = sums.tolist()  # the one read-back to the host
    return {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total, "loss": loss / total}


def shard(dataset: Dataset, rank: int, world: int) -> Dataset:
    """Every `world`-th image from `rank`: the shards cover the dataset once (sizes may differ by one)."""
    return dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))


@dataclasses.dataclass
class Calibration:
    """Which training images re-estimate the BN statistics before an evaluation: the first `images` of
    one fixed shuffled order (the same for every evaluation), in batches of `batch_size` (0 images: the
    running averages are kept)."""

    split: Dataset
    images: int
    batch_size: int
    seed: int = 0
    workers: int = 0

    @property
    def batches(self) -> int:
        return -(-self.images // self.batch_size)


def calibrate(model: nn.Module, calibration: Calibration, runtime: Runtime, autocast=contextlib.nullcontext,
              channels_last: bool = False, forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
    """Re-estimate `model`'s BN statistics (`forward`: how a batch runs through it, e.g. one subnet of a
    supernet). With several processes each takes every `world`-th batch and the statistics are combined:
    every process ends with what one process calibrating on all batches would hold."""
    if calibration.images == 0:
        return
    loader = calibration_loader(calibration.split, calibration.batch_size, calibration.seed, calibration.workers,
                                runtime.rank, runtime.world, calibration.batches)
    batches = (to_device(images, labels, runtime.device, channels_last)[0] for images, labels in loader)
    with autocast():
        used = recalibrate_bn(model, batches, calibration.batches, forward=forward, allow_empty=runtime.world > 1)
    if runtime.world > 1:
        share_bn_statistics(model, used)


def calibrated_metrics(model: nn.Module, loader: DataLoader, calibration: Calibration, runtime: Runtime,
                       autocast=contextlib.nullcontext, channels_last: bool = False,
                       forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
    """The one evaluation of every command: BN calibration, then top-1, top-5 and loss over `loader` (this
    process's shard of the split when there are several processes: see `shard`). The model is left with
    the calibrated statistics, in the mode it was in."""
    calibrate(model, calibration, runtime, autocast, channels_last, forward)
    was_training = model.training
    model.eval()
    try:
        return classification_metrics(forward or model, loader, runtime.device, autocast, channels_last,
                                      all_reduce=runtime.world > 1)
    finally:
        model.train(was_training)


def calibration_loader(train_split: Dataset, batch_size: int, seed: int, workers: int = 0, rank: int = 0,
                       world: int = 1, num_batches: Optional[int] = None) -> DataLoader:
    """Training images in one fixed shuffled order: every calibration sees the same batches. With
    `world` > 1, this process's share of the first `num_batches` batches: batch i goes to process
    i % world (combine with `share_bn_statistics`)."""
    order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed)).tolist()
    if world > 1:
        batches = range(rank, num_batches if num_batches is not None else -(-len(order) // batch_size), world)
        order = [index for batch in batches for index in order[batch * batch_size:(batch + 1) * batch_size]]
    return DataLoader(Subset(train_split, order), batch_size=batch_size, num_workers=workers)


@dataclasses.dataclass
class TrainedSupernet:
    model: ElasticSupernet
    space: SearchSpace
    config: TrainConfig
    splits: Dict[str, Dataset]
    device: torch.device = torch.device("cpu")  # where subnets are calibrated and evaluated
    calib_batch_size: int = CALIB_BATCH_SIZE

    @classmethod
    def load(cls, checkpoint: str, data_path: Optional[str] = None, device: torch.device = torch.device("cpu"),
             calib_batch_size: int = CALIB_BATCH_SIZE) -> "TrainedSupernet":
        """The checkpoint's supernet (on `device`) and data (`data_path` replaces the run's data folder)."""
        config = config_for_resume(checkpoint, {"data_path": data_path} if data_path else None)
        splits = load_splits(config.dataset, config.data_path, config.image_size)
        space = dataclasses.replace(get_space(config.space), num_classes=num_classes(config.dataset, splits))
        model = ElasticSupernet(space)
        load_weights(model, ckpt.load(checkpoint)["model"], checkpoint)
        return cls(model.to(device).eval(), space, config, splits, device, calib_batch_size)

    def loader(self, split: str) -> DataLoader:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}: choose from {', '.join(self.splits)}")
        return DataLoader(self.splits[split], batch_size=self.config.eval_batch_size, num_workers=self.config.workers)

    def default_calib_images(self, reference: int = EVAL_CALIB_IMAGES) -> int:
        """Calibration sized to the data: the reference's count for downloaded data sets, the run's own
        `calib_images` for the bundled digits (about a thousand training images); at most the split."""
        wanted = self.config.calib_images if is_bundled(self.config.dataset) else reference
        return min(wanted, len(self.splits["train"]))

    def calibration(self, calib_images: Optional[int] = None) -> Calibration:
        """`calib_images` (default: sized to the data) in batches of `calib_batch_size` (256 as the
        reference; fewer when fewer images are asked for)."""
        images = calib_images or self.default_calib_images()
        return Calibration(self.splits["train"], images, min(self.calib_batch_size, images), self.config.seed,
                           self.config.workers)

    def calibrated_subnet(self, arch: ArchConfig, calib_images: Optional[int] = None) -> StaticSubnet:
        """One subnet as a static module, BN-calibrated by this process alone (a search spreads its
        candidates, not their calibration, over processes)."""
        subnet = extract(self.model, arch)
        calibrate(subnet, self.calibration(calib_images), Runtime(0, 1, self.device))
        return subnet.eval()

    def evaluate(self, arch: ArchConfig, split: str = "val", calib_images: Optional[int] = None) -> Dict[str, object]:
        subnet = extract(self.model, arch)
        metrics = calibrated_metrics(subnet, self.loader(split), self.calibration(calib_images),
                                     Runtime(0, 1, self.device))
        flops, params = flops_and_params(self.space, arch)
        return {"arch": arch, "split": split, "mflops": flops / 1e6, "params": params, **metrics}


def load_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a one-line error naming the first missing, unexpected or mis-shaped entry."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        raise ValueError(f"{source!r} does not fit this supernet: {len(missing)} missing entries (first "
                         f"{missing[:1]}), {len(unexpected)} unexpected (first {unexpected[:1]})")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source!r} does not fit this supernet: {name} has shape {tuple(state[name].shape)}, "
                             f"expected {tuple(tensor.shape)}")
    model.load_state_dict(state)


def add_evaluation_arguments(parser: CommandLineParser, calib_help: Optional[str] = None) -> None:
    """The options of every command that evaluates subnets of a trained supernet (eval, search, export)."""
    parser.add_argument("--calib_images", type=positive_int, default=None,
                        help=calib_help or f"training images for BN calibration (default: {EVAL_CALIB_IMAGES} as the "
                                           "reference, the run's calib_images on the bundled digits; at most the "
                                           "training split)")
    parser.add_argument("--calib_batch_size", type=positive_int, default=CALIB_BATCH_SIZE,
                        help="images per BN-calibration batch (the reference's 256)")
    parser.add_argument("--data_path", default=None, help="data folder (default: the run's)")
    parser.add_argument("--device", default="auto", help=f"{DEVICES}: where subnets are calibrated and evaluated")


def load_trained(args) -> TrainedSupernet:
    """The supernet of `--checkpoint` on `--device`, calibrating in batches of `--calib_batch_size`."""
    return TrainedSupernet.load(args.checkpoint, args.data_path, resolve_device(args.device), args.calib_batch_size)
