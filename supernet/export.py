"""`alphanet export`: a searched subnet as a standalone model.

Writes to the output folder: `arch.json` (the config, MFLOPs, parameters, calibrated validation
accuracy), `weights.pt` (the state dict of the calibrated static subnet) and `model.pt2`, a
`torch.export` program that loads with plain torch (`torch.export.load(path).module()`), without
this package, and takes any batch size of the training images' shape.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

import torch

from .checkpoint import atomic_write
from .config import CommandLineParser, add_arch_or_width, arch_or_width
from .data import normalize_on_device
from .errors import run_command
from .evaluation import TrainedSupernet, add_evaluation_arguments, classification_metrics, load_trained
from .flops import flops_and_params


def export_subnet(trained: TrainedSupernet, arch, out: str, calib_images: Optional[int] = None,
                  width: Optional[float] = None) -> dict:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a folder")
    subnet = trained.calibrated_subnet(arch, calib_images)
    metrics = classification_metrics(subnet, trained.loader("val"), trained.device)
    subnet = subnet.cpu()  # calibrated where the supernet is; exported for any machine
    example = normalize_on_device(trained.splits["train"][0][0].unsqueeze(0).repeat(2, 1, 1, 1))
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(subnet, (example,), dynamic_shapes=({0: batch},))
    flops, params = flops_and_params(trained.space, arch)
    record = {"arch": arch, "mflops": flops / 1e6, "params": params, "val_top1": metrics["top1"],
              "input_shape": list(example.shape[1:]), "num_classes": trained.space.num_classes,
              "space": trained.space.name, **({"width_mult": width} if width is not None else {})}
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "model.pt2"), lambda stream: torch.export.save(program, stream))
    atomic_write(os.path.join(out, "weights.pt"), lambda stream: torch.save(subnet.state_dict(), stream))
    atomic_write(os.path.join(out, "arch.json"), json.dumps(record, indent=2).encode())
    return record


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet export", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt or a run folder")
    add_arch_or_width(parser)
    parser.add_argument("--out", required=True, help="output folder")
    add_evaluation_arguments(parser)
    args = parser.parse_args(argv)

    def export() -> dict:
        trained = load_trained(args)
        return export_subnet(trained, arch_or_width(args, trained.space), args.out, args.calib_images, args.width)

    record = run_command("alphanet export", export)
    print(f"exported {record['mflops']:.2f} MFLOPs subnet (val top-1 {record['val_top1']:.2f}%) to {args.out}: "
          "arch.json, weights.pt, model.pt2")


if __name__ == "__main__":
    main()
