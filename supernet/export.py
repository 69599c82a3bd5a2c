"""`alphanet export`: a searched subnet as a standalone model.

Writes to the output folder: `arch.json` (the config, MFLOPs, parameters, calibrated validation
accuracy), `weights.pt` (the state dict of the calibrated static subnet) and `model.pt2`, a
`torch.export` program that loads with plain torch (`torch.export.load(path).module()`), without
this package, and takes any batch size of the training images' shape.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

import torch

from .cli import load_arch
from .evaluate import TrainedSupernet, classification_metrics
from .flops import flops_and_params


def export_subnet(trained: TrainedSupernet, arch, out: str, calib_batches: Optional[int] = None) -> dict:
    os.makedirs(out, exist_ok=True)
    subnet = trained.calibrated_subnet(arch, calib_batches)
    example = trained.splits["train"][0][0].unsqueeze(0).repeat(2, 1, 1, 1)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(subnet, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, os.path.join(out, "model.pt2"))
    torch.save(subnet.state_dict(), os.path.join(out, "weights.pt"))
    flops, params = flops_and_params(trained.space, arch)
    metrics = classification_metrics(subnet, trained.loader("val"), torch.device("cpu"))
    record = {"arch": arch, "mflops": flops / 1e6, "params": params, "val_top1": metrics["top1"],
              "input_shape": list(example.shape[1:]), "num_classes": trained.space.num_classes}
    with open(os.path.join(out, "arch.json"), "w") as handle:
        json.dump(record, handle, indent=2)
    return record


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="alphanet export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt or a run folder")
    parser.add_argument("--arch", required=True, help="JSON arch config, min or max")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--calib-batches", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        trained = TrainedSupernet.load(args.checkpoint)
        record = export_subnet(trained, load_arch(args.arch, trained.space), args.out, args.calib_batches)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"alphanet export: {error}") from None
    print(f"exported {record['mflops']:.2f} MFLOPs subnet (val top-1 {record['val_top1']:.2f}%) to {args.out}: "
          "arch.json, weights.pt, model.pt2")


if __name__ == "__main__":
    main()
