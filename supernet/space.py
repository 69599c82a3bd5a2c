"""The search space as data, and arch configs: sampling, mutation, crossover, validation.

An arch config is a JSON dict in the AlphaNet / AttentiveNAS naming, so published configs paste in:
    {"resolution": 224, "width": [9 ints: first conv, 7 stages, last conv],
     "depth": [7], "kernel_size": [7], "expand_ratio": [7]}
Width, kernel and expand ratio are shared by the blocks of a stage; a stage runs its first d blocks.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

ArchConfig = Dict[str, object]
ARCH_KEYS = ("resolution", "width", "depth", "kernel_size", "expand_ratio")


@dataclass(frozen=True)
class Stage:
    """One stage of MBConv blocks: the choices of each elastic dimension."""

    widths: Tuple[int, ...]
    depths: Tuple[int, ...]
    kernel_sizes: Tuple[int, ...]
    expand_ratios: Tuple[int, ...]
    stride: int
    use_se: bool


@dataclass(frozen=True)
class SearchSpace:
    name: str
    resolutions: Tuple[int, ...]
    first_conv_widths: Tuple[int, ...]
    stages: Tuple[Stage, ...]
    last_conv_widths: Tuple[int, ...]
    num_classes: int
    in_channels: int = 3
    first_conv_stride: int = 2

    # -- the choices per gene, in config order ---------------------------------------------------
    def choices(self) -> Dict[str, List[Tuple[int, ...]]]:
        return {
            "resolution": [self.resolutions],
            "width": [self.first_conv_widths] + [s.widths for s in self.stages] + [self.last_conv_widths],
            "depth": [s.depths for s in self.stages],
            "kernel_size": [s.kernel_sizes for s in self.stages],
            "expand_ratio": [s.expand_ratios for s in self.stages],
        }

    def _build(self, pick: Callable[[Tuple[int, ...]], int]) -> ArchConfig:
        config = {key: [pick(options) for options in genes] for key, genes in self.choices().items()}
        config["resolution"] = config["resolution"][0]
        return config

    def max_config(self) -> ArchConfig:
        return self._build(max)

    def min_config(self) -> ArchConfig:
        return self._build(min)

    def random_config(self, rng: random.Random) -> ArchConfig:
        return self._build(rng.choice)

    def random_config_in_window(self, rng: random.Random, flops_fn: Callable[[ArchConfig], float],
                                min_mflops: float, max_mflops: float, max_tries: int = 10_000) -> ArchConfig:
        """Rejection sampling of a uniform random config with min <= MFLOPs <= max."""
        for _ in range(max_tries):
            config = self.random_config(rng)
            if min_mflops <= flops_fn(config) <= max_mflops:
                return config
        raise ValueError(f"no config of the {self.name!r} space within [{min_mflops}, {max_mflops}] MFLOPs "
                         f"after {max_tries} samples")

    def mutate(self, config: ArchConfig, rng: random.Random, probability: float = 0.2) -> ArchConfig:
        """With the given probability per gene, replace it by a *different* value of its choices (a gene
        with a single choice keeps it), as the reference's `mutate_and_reset`."""
        def pick_another(options, value):
            if rng.random() >= probability or len(options) == 1:
                return value
            return rng.choice([option for option in options if option != value])

        return self._map_genes(pick_another, config)

    def crossover(self, first: ArchConfig, second: ArchConfig, rng: random.Random) -> ArchConfig:
        """Each gene from either parent with a fair coin."""
        return self._map_genes(lambda options, a, b: a if rng.random() < 0.5 else b, first, second)

    def _map_genes(self, combine: Callable, *configs: ArchConfig) -> ArchConfig:
        for config in configs:
            self.validate(config)
        result: ArchConfig = {}
        for key, genes in self.choices().items():
            columns = [[config[key]] if key == "resolution" else list(config[key]) for config in configs]
            values = [combine(options, *column) for options, *column in zip(genes, *columns)]
            result[key] = values[0] if key == "resolution" else values
        return result

    def validate(self, config: ArchConfig) -> ArchConfig:
        """Raise ValueError naming the bad key and value; returns the config."""
        if not isinstance(config, dict):
            raise ValueError(f"an arch config is a dict with keys {', '.join(ARCH_KEYS)}, got {type(config).__name__}")
        missing = [key for key in ARCH_KEYS if key not in config]
        extra = [key for key in config if key not in ARCH_KEYS]
        if missing or extra:
            raise ValueError(f"arch config keys: missing {missing}, unknown {extra} (expected {list(ARCH_KEYS)})")
        for key, genes in self.choices().items():
            values = [config[key]] if key == "resolution" else config[key]
            if not isinstance(values, (list, tuple)) or len(values) != len(genes):
                raise ValueError(f"arch config {key!r} must be a list of {len(genes)} ints, got {config[key]!r}")
            for index, (value, options) in enumerate(zip(values, genes)):
                if isinstance(value, bool) or not isinstance(value, int) or value not in options:
                    where = key if key == "resolution" else f"{key}[{index}]"
                    raise ValueError(f"arch config {where} = {value!r} is not in the {self.name!r} space: "
                                     f"choose from {list(options)}")
        return config


def _stage(widths, depths, kernel_sizes, expand_ratios, stride, use_se) -> Stage:
    return Stage(tuple(widths), tuple(depths), tuple(kernel_sizes), tuple(expand_ratios), stride, use_se)


# AlphaNet = AttentiveNAS: the search space of their training and search configs.
ALPHANET = SearchSpace(
    name="alphanet",
    resolutions=(192, 224, 256, 288),
    first_conv_widths=(16, 24),
    stages=(
        _stage([16, 24], [1, 2], [3, 5], [1], 1, False),
        _stage([24, 32], [3, 4, 5], [3, 5], [4, 5, 6], 2, False),
        _stage([32, 40], [3, 4, 5, 6], [3, 5], [4, 5, 6], 2, True),
        _stage([64, 72], [3, 4, 5, 6], [3, 5], [4, 5, 6], 2, False),
        _stage([112, 120, 128], [3, 4, 5, 6, 7, 8], [3, 5], [4, 5, 6], 1, True),
        _stage([192, 200, 208, 216], [3, 4, 5, 6, 7, 8], [3, 5], [6], 2, True),
        _stage([216, 224], [1, 2], [3, 5], [6], 1, True),
    ),
    last_conv_widths=(1792, 1984),
    num_classes=1000,
)

# Every elastic dimension of the AlphaNet space, sized for 32x32 inputs, 10 classes and a CPU.
TINY = SearchSpace(
    name="tiny",
    resolutions=(24, 28, 32),
    first_conv_widths=(8, 16),
    stages=(
        _stage([8, 16], [1, 2], [3, 5], [1], 1, False),
        _stage([16, 24], [1, 2], [3, 5], [3, 4], 2, False),
        _stage([24, 32], [1, 2], [3, 5], [3, 4], 2, True),
        _stage([32, 40], [1, 2], [3, 5], [3, 4], 1, False),
        _stage([40, 48], [1, 2], [3, 5], [3, 4], 1, True),
        _stage([48, 56], [1, 2], [3, 5], [4], 2, True),
        _stage([56, 64], [1], [3, 5], [4], 1, True),
    ),
    last_conv_widths=(256, 320),
    num_classes=10,
    first_conv_stride=1,
)

# The tiny space at the scale of 8x8 digit images (upsampled in the model to 12 or 16 pixels).
DIGITS = dataclasses.replace(TINY, name="digits", resolutions=(12, 16))

SPACES = {space.name: space for space in (ALPHANET, TINY, DIGITS)}


@dataclass(frozen=True)
class PublishedModel:
    """A named model of AlphaNet's evaluation config, with the MFLOPs and ImageNet top-1 it reports."""

    name: str
    mflops: int
    top1: float
    arch: Dict[str, object]


def _published(name, mflops, top1, resolution, width, kernel_size, expand_ratio, depth) -> PublishedModel:
    return PublishedModel(name, mflops, top1, {"resolution": resolution, "width": width, "depth": depth,
                                               "kernel_size": kernel_size, "expand_ratio": expand_ratio})


# AlphaNet-A0 ... A6 (the `a5` of AlphaNet is its "small" A5; `a5_1` the "base" A5-1).
PUBLISHED = {model.name: model for model in (
    _published("a0", 203, 77.87, 192, [16, 16, 24, 32, 64, 112, 192, 216, 1792], [3, 3, 3, 3, 3, 3, 3],
               [1, 4, 4, 4, 4, 6, 6], [1, 3, 3, 3, 3, 3, 1]),
    _published("a1", 279, 78.94, 224, [16, 16, 24, 32, 64, 112, 192, 216, 1984], [3, 3, 3, 5, 3, 5, 3],
               [1, 4, 4, 4, 4, 6, 6], [1, 3, 3, 3, 3, 3, 1]),
    _published("a2", 317, 79.20, 224, [16, 16, 24, 32, 64, 112, 200, 224, 1984], [3, 3, 3, 3, 3, 5, 3],
               [1, 4, 5, 4, 4, 6, 6], [1, 3, 3, 3, 3, 4, 1]),
    _published("a3", 357, 79.41, 224, [16, 16, 24, 32, 64, 112, 208, 224, 1984], [3, 3, 3, 5, 3, 3, 3],
               [1, 4, 4, 4, 4, 6, 6], [2, 3, 3, 4, 3, 5, 1]),
    _published("a4", 444, 80.01, 256, [16, 16, 24, 32, 64, 112, 192, 216, 1984], [3, 3, 3, 5, 3, 5, 3],
               [1, 4, 4, 5, 4, 6, 6], [1, 3, 3, 4, 3, 5, 1]),
    _published("a5", 491, 80.29, 256, [16, 16, 24, 32, 64, 112, 208, 216, 1984], [3, 3, 3, 3, 3, 5, 3],
               [1, 4, 4, 5, 4, 6, 6], [1, 3, 3, 4, 4, 5, 1]),
    _published("a5_1", 596, 80.62, 288, [16, 16, 24, 32, 64, 112, 200, 216, 1984], [3, 3, 5, 5, 3, 3, 3],
               [1, 4, 4, 4, 5, 6, 6], [2, 3, 4, 3, 3, 5, 1]),
    _published("a6", 709, 80.78, 288, [16, 16, 24, 32, 64, 112, 216, 224, 1984], [3, 3, 3, 3, 3, 5, 3],
               [1, 4, 6, 5, 4, 6, 6], [1, 3, 3, 4, 4, 6, 1]),
)}


def get_space(name: str) -> SearchSpace:
    try:
        return SPACES[name]
    except KeyError:
        raise ValueError(f"unknown search space {name!r}: choose from {', '.join(SPACES)}") from None


def load_arch(text: str, space: SearchSpace) -> ArchConfig:
    """An arch by name or file: `min`, `max`, a published model (`a0` ... `a6`, `a5_1`; alphanet space
    only), or the path of a JSON arch config. Raises ValueError naming the problem."""
    if text in ("min", "max"):
        return space.min_config() if text == "min" else space.max_config()
    if text in PUBLISHED:
        if space.name != ALPHANET.name:
            raise ValueError(f"--arch {text!r} is a published AlphaNet model: it needs the alphanet space, "
                             f"not {space.name!r}")
        return json.loads(json.dumps(PUBLISHED[text].arch))
    from .config import read_text

    names = ", ".join(["min", "max", *PUBLISHED])
    contents = read_text(text, "--arch", f" (give a JSON arch config, or one of {names})")
    try:
        config = json.loads(contents)
    except json.JSONDecodeError as error:
        raise ValueError(f"--arch {text!r} is not valid JSON: {error}") from None
    try:
        return space.validate(config)
    except ValueError as error:
        raise ValueError(f"--arch {text!r}: {error}") from None
