"""Calibrated evaluation of subnets of a trained supernet, and `alphanet eval`.

A subnet is extracted from the checkpoint's supernet as a static module, its BN statistics are
re-estimated on `--calib_images` training images (always the same ones, in a fixed order, in batches
of the run's batch size), and it is evaluated on a split: top-1, top-5 and loss, with its MFLOPs and
parameters. The default calibration is sized to the data: 16384 images (the reference evaluation's 64
batches of 256) for downloaded data sets, the run's own `calib_images` for the bundled digits; never
more than the training split holds.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from . import checkpoint as ckpt
from .calibration import recalibrate_bn
from .config import CommandLineParser, TrainConfig, error_line, is_bundled
from .data import EncodedBatch, load_splits, normalize_on_device, num_classes
from .flops import flops_and_params
from .model import ElasticSupernet, StaticSubnet, extract
from .runtime import DEVICES, resolve_device
from .space import ArchConfig, SearchSpace, get_space, load_arch

EVAL_CALIB_IMAGES = 64 * 256  # the reference's evaluation: 64 batches of 256 images


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


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

    @classmethod
    def load(cls, checkpoint: str, data_path: Optional[str] = None,
             device: torch.device = torch.device("cpu")) -> "TrainedSupernet":
        """The checkpoint's supernet (on `device`) and data (`data_path` replaces the run's data folder)."""
        config = ckpt.config_for_resume(checkpoint, {"data_path": data_path} if data_path else None)
        splits = load_splits(config.dataset, config.data_path, config.image_size)
        space = dataclasses.replace(get_space(config.space), num_classes=num_classes(config.dataset, splits))
        model = ElasticSupernet(space)
        load_weights(model, ckpt.load(checkpoint)["model"], checkpoint)
        return cls(model.to(device).eval(), space, config, splits, device)

    def loader(self, split: str) -> DataLoader:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}: choose from {', '.join(self.splits)}")
        return DataLoader(self.splits[split], batch_size=self.config.eval_batch_size, num_workers=self.config.workers)

    def default_calib_images(self, reference: int = EVAL_CALIB_IMAGES) -> int:
        """Calibration sized to the data: the reference's count for downloaded data sets, the run's own
        `calib_images` for the bundled digits (about a thousand training images); at most the split."""
        wanted = self.config.calib_images if is_bundled(self.config.dataset) else reference
        return min(wanted, len(self.splits["train"]))

    def calibrated_subnet(self, arch: ArchConfig, calib_images: int) -> StaticSubnet:
        subnet = extract(self.model, arch)
        batches = calibration_loader(self.splits["train"], self.config.batch_size, self.config.seed,
                                     self.config.workers)
        recalibrate_bn(subnet, (normalize_on_device(images.to(self.device)) for images, _ in batches),
                       -(-calib_images // self.config.batch_size))
        return subnet.eval()

    def evaluate(self, arch: ArchConfig, split: str = "val", calib_images: Optional[int] = None) -> Dict[str, object]:
        subnet = self.calibrated_subnet(arch, calib_images or self.default_calib_images())
        metrics = classification_metrics(subnet, self.loader(split), self.device)
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


def parse_archs(text: str, space: SearchSpace, seed: int = 0) -> List[ArchConfig]:
    """min, max, a published model name, random:N (seeded), or the path of a JSON arch config."""
    if text.startswith("random:"):
        count = text.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--arch {text!r}: write random:N with N a whole number of at least 1")
        rng = random.Random(seed)
        return [space.random_config(rng) for _ in range(int(count))]
    return [load_arch(text, space)]


def parse_widths(text: str, space: SearchSpace) -> List[float]:
    """Width multipliers: `low:high:step` (both ends included), a comma list, or `all` (the range, 0.05 apart)."""
    if not space.width_range:
        space.width_config(1.0)  # raises: the space is not slimmable
    if text == "all":
        return space.width_grid()
    try:
        if ":" in text:
            low, high, step = (float(part) for part in text.split(":"))
            if step <= 0 or high < low:
                raise ValueError
            widths = [round(low + i * step, 6) for i in range(int(round((high - low) / step)) + 1)]
        else:
            widths = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--widths {text!r}: write low:high:step (e.g. 0.25:1.0:0.05), a comma list (0.25,0.5,1.0) "
                         "or all") from None
    for width in widths:
        space.width_config(width)  # raises for a width outside the range
    return widths


def evaluate_widths(trained: TrainedSupernet, widths: List[float], split: str, calib_images: Optional[int],
                    out: Optional[str]) -> None:
    """Table 1 of the paper for a slimmable supernet: one row per width, and the JSON / CSV / PNG."""
    from tqdm import tqdm

    from .report import width_table_lines, write_width_table

    rows = []
    for width in tqdm(widths, desc="widths", unit="width", leave=False):
        result = trained.evaluate(trained.space.width_config(width), split, calib_images)
        rows.append({"width": width, "mflops": result["mflops"], "params": result["params"], "top1": result["top1"],
                     "top5": result["top5"], "loss": result["loss"]})
    print("\n".join(width_table_lines(rows, split)))
    if out:
        prefix = out[:-5] if out.endswith(".json") else out
        for path in write_width_table(rows, prefix, f"{trained.space.name}, {split} split"):
            print(f"wrote {path}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet eval", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt or a run folder")
    parser.add_argument("--arch", default="max",
                        help="min, max, a published model (a0 ... a6, a5_1), random:N, or a JSON arch config file")
    parser.add_argument("--widths", default=None,
                        help="slimmable spaces: width multipliers low:high:step (e.g. 0.25:1.0:0.05), a comma list, "
                             "or all; prints one row per width (replaces --arch)")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--calib_images", type=positive_int, default=None,
                        help=f"training images for BN calibration (default: {EVAL_CALIB_IMAGES} as the reference, "
                             "the run's calib_images on the bundled digits; at most the training split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random:N")
    parser.add_argument("--data_path", default=None, help="data folder (default: the run's)")
    parser.add_argument("--device", default="auto", help=f"{DEVICES}: where subnets are calibrated and evaluated")
    parser.add_argument("--out", default=None,
                        help="JSON file for the results (default: print only); with --widths also .csv and .png")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        trained = TrainedSupernet.load(args.checkpoint, args.data_path, device)
        if args.widths is not None:
            return evaluate_widths(trained, parse_widths(args.widths, trained.space), args.split, args.calib_images,
                                   args.out)
        archs = parse_archs(args.arch, trained.space, args.seed)
        results = [trained.evaluate(arch, args.split, args.calib_images) for arch in archs]
        if args.out:
            ckpt.atomic_write(args.out, json.dumps(results if len(results) > 1 else results[0], indent=2).encode())
    except (ValueError, OSError) as error:
        raise SystemExit(f"alphanet eval: {error_line(error)}") from None
    for result in results:
        print(f"{result['split']} top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
              f"{result['mflops']:.2f} MFLOPs  {result['params'] / 1e6:.3f} M params  arch {json.dumps(result['arch'])}")
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
