"""`alphanet`: the command line of the supernet package."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .flops import flops_and_params
from .space import SPACES, ArchConfig, SearchSpace, get_space


SUBCOMMANDS = {"train": "train", "eval": "evaluate", "search": "search", "export": "export"}


def load_arch(text: str, space: SearchSpace) -> ArchConfig:
    """`min`, `max`, or the path of a JSON arch config."""
    if text in ("min", "max"):
        return space.min_config() if text == "min" else space.max_config()
    if not os.path.exists(text):
        raise SystemExit(f"--arch {text!r}: no such file (give a JSON arch config, or min / max)")
    try:
        with open(text) as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--arch {text!r} is not valid JSON: {error}") from None
    try:
        return space.validate(config)
    except ValueError as error:
        raise SystemExit(f"--arch {text!r}: {error}") from None


def cmd_flops(args: argparse.Namespace) -> None:
    space = get_space(args.space)
    config = load_arch(args.arch, space)
    flops, params = flops_and_params(space, config)
    print(f"{flops / 1e6:.1f} MFLOPs, {params / 1e6:.2f} M parameters "
          f"({space.name} space, resolution {config['resolution']})")


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:  # each has its own parser (train takes any config key)
        module = __import__(f"supernet.{SUBCOMMANDS[argv[0]]}", fromlist=["main"])
        return module.main(argv[1:])
    parser = argparse.ArgumentParser(prog="alphanet", description="AlphaNet supernet tools")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train a supernet"), ("eval", "calibrated evaluation of subnets"),
                            ("search", "evolutionary search for the Pareto front"),
                            ("export", "a subnet as a standalone model")):
        commands.add_parser(name, help=f"{help_text} (alphanet {name} --help)")
    flops = commands.add_parser("flops", help="MFLOPs and parameters of an arch config")
    flops.add_argument("--arch", required=True, help="JSON arch config, or min / max")
    flops.add_argument("--space", default="alphanet", choices=sorted(SPACES))
    flops.set_defaults(run=cmd_flops)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
