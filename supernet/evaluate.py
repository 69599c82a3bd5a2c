"""`alphanet eval`: calibrated evaluation of subnets of a trained supernet.

A subnet is extracted from the checkpoint's supernet as a static module, its BN statistics are
re-estimated on `--calib_images` training images (always the same ones, in a fixed order, in batches
of `--calib_batch_size`, 256 as the reference), and it is evaluated on a split: top-1, top-5 and loss,
with its MFLOPs and parameters. The default calibration is sized to the data: 16384 images (the
reference evaluation's 64 batches of 256) for downloaded data sets, the run's own `calib_images` for
the bundled digits; never more than the training split holds. Everything runs on `--device` (the GPU
when one is visible).
"""
from __future__ import annotations

import json
import random
from typing import List, Optional

from . import checkpoint as ckpt
from .config import CommandLineParser
from .errors import run_command
from .evaluation import TrainedSupernet, add_evaluation_arguments, load_trained
from .space import ArchConfig, SearchSpace, load_arch


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
    parser = CommandLineParser(prog="alphanet eval", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt or a run folder")
    parser.add_argument("--arch", default="max",
                        help="min, max, a published model (a0 ... a6, a5_1), random:N, or a JSON arch config file")
    parser.add_argument("--widths", default=None,
                        help="slimmable spaces: width multipliers low:high:step (e.g. 0.25:1.0:0.05), a comma list, "
                             "or all; prints one row per width (replaces --arch)")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--seed", type=int, default=0, help="seed of random:N")
    add_evaluation_arguments(parser)
    parser.add_argument("--out", default=None,
                        help="JSON file for the results (default: print only); with --widths also .csv and .png")
    args = parser.parse_args(argv)

    def evaluate() -> None:
        trained = load_trained(args)
        if args.widths is not None:
            return evaluate_widths(trained, parse_widths(args.widths, trained.space), args.split, args.calib_images,
                                   args.out)
        archs = parse_archs(args.arch, trained.space, args.seed)
        results = [trained.evaluate(arch, args.split, args.calib_images) for arch in archs]
        if args.out:
            ckpt.atomic_write(args.out, json.dumps(results if len(results) > 1 else results[0], indent=2).encode())
        for result in results:
            print(f"{result['split']} top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss "
                  f"{result['loss']:.4f}  {result['mflops']:.2f} MFLOPs  {result['params'] / 1e6:.3f} M params  "
                  f"arch {json.dumps(result['arch'])}")
        if args.out:
            print(f"wrote {args.out}")

    run_command("alphanet eval", evaluate)


if __name__ == "__main__":
    main()
