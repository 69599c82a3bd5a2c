"""`alphanet`: the command line of the supernet package."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import List, Optional

SUBCOMMANDS = {  # name: (module, help)
    "train": ("train", "train a supernet (sandwich rule, in-place adaptive KD)"),
    "eval": ("evaluate", "calibrated evaluation of subnets"),
    "search": ("search", "evolutionary search for the accuracy-vs-FLOPs (or latency) front"),
    "latency": ("latency", "a latency table of a space's blocks measured on this device, and its check"),
    "export": ("export", "a subnet as a standalone model"),
    "boxplot": ("boxplot", "accuracy of sampled subnets per FLOPs group, one box per run (Figures 4, 9, 10)"),
    "convert": ("convert", "a supernet checkpoint of the AlphaNet reference code, in this project's format"),
    "distill": ("distill", "a student from a fixed teacher: (1 - beta) CE + beta T^2 adaptive KD"),
    "finetune": ("finetune", "transfer a trained model to new classes or data (hold-out LR / WD search)"),
    "ablate": ("ablate", "the paper's comparisons (KD kind, temperature, clip, alphas) over seeds, with intervals"),
}
EXTRA_MODULES = {"yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib", "sklearn": "scikit-learn",
                 "torchvision": "torchvision"}


def require_extra() -> None:
    """The trainer's dependencies come with `pip install -e ".[supernet]"`; say so instead of failing later."""
    missing = [package for module, package in EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"alphanet: needs {', '.join(missing)}; install the trainer's extra: "
                         "pip install -e \".[supernet]\" (or pip install \"alphadiv-kernels[supernet]\")")


def cmd_flops(args: argparse.Namespace) -> None:
    from .config import arch_or_width
    from .flops import flops_and_params
    from .space import PUBLISHED, PUBLISHED_WIDTHS, get_space

    space = get_space(args.space)
    config = arch_or_width(args, space)
    flops, params = flops_and_params(space, config)
    published = f"; published: {PUBLISHED[args.arch].mflops} MFLOPs" if args.arch in PUBLISHED else ""
    width = ""
    if args.width is not None:
        width = f", width {args.width:g}"
        if args.width in PUBLISHED_WIDTHS.get(space.name, {}):
            published_flops, published_params = PUBLISHED_WIDTHS[space.name][args.width]
            published = f"; published: {published_flops} MFLOPs, {published_params} M parameters"
    print(f"{flops / 1e6:.1f} MFLOPs, {params / 1e6:.2f} M parameters "
          f"({space.name} space{width}, resolution {config['resolution']}{published})")


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    require_extra()
    if argv[:1] and argv[0] in SUBCOMMANDS:  # each has its own parser (train takes every config key)
        module = importlib.import_module(f"supernet.{SUBCOMMANDS[argv[0]][0]}")
        try:
            return module.main(argv[1:])
        except KeyboardInterrupt:  # train handles its own (it saves first); the others keep what they wrote
            hint = " (rerun the same command to resume)" if argv[0] == "search" else ""
            print(f"alphanet {argv[0]}: interrupted{hint}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
    from .config import CommandLineParser, add_arch_or_width
    from .space import SPACES

    parser = CommandLineParser(prog="alphanet", description="AlphaNet supernet tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        commands.add_parser(name, help=f"{help_text} (alphanet {name} --help)")
    flops = commands.add_parser("flops", help="MFLOPs and parameters of an arch (or of a slimmable space's width)")
    add_arch_or_width(flops)
    flops.add_argument("--space", default="alphanet", choices=sorted(SPACES))
    flops.set_defaults(run=cmd_flops)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        raise SystemExit(f"alphanet flops: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
