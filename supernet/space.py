"""The search space as data, and arch configs: sampling, mutation, crossover, validation.

An arch config is a JSON dict in the AlphaNet / AttentiveNAS naming, so published configs paste in:
    {"resolution": 224, "width": [9 ints: first conv, 7 stages, last conv],
     "depth": [7], "kernel_size": [7], "expand_ratio": [7]}
Width, kernel and expand ratio are shared by the blocks of a stage; a stage runs its first d blocks.

Slimmable spaces (`slim_mbv1`, `slim_mbv2` and their digits-sized variants) are the same machinery
with width as the only elastic dimension: a width multiplier w in the space's range gives every
layer make_divisible(base * w) channels (the universally slimmable networks' rounding), and their
max / min / random configs are those of the range's ends and of a uniform w.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

# Channel arithmetic (MobileNet rounding), shared by the layers and the FLOPs count
HEAD_EXPANSION = 6  # the last stage's 1x1 expansion before pooling


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round to a multiple of divisor, not below min_value and not more than 10% down (MobileNet)."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def expanded_width(in_channels: int, expand_ratio: int) -> int:
    return make_divisible(round(in_channels * expand_ratio), 8)


def se_width(channels: int) -> int:
    return make_divisible(channels // 4, 8)


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
    # The network family. AttentiveNAS: swish, every block residual (a projection where shapes change),
    # the MobileNetV3 head. MobileNetV2: ReLU6, identity residuals only, a 1x1 conv head. MobileNetV1:
    # ReLU6 after both convs of a depthwise-separable block, no residuals, pooling straight after.
    activation: str = "swish"  # swish | relu6
    shortcut: str = "always"  # always | identity | none
    project_activation: bool = False  # activation after the block's 1x1 projection (MobileNetV1)
    head: str = "attentive"  # attentive | conv | pool
    # Slimmable spaces: the width multiplier range and the channels of every width gene at w = 1; a
    # gene whose base is None keeps its one width (MobileNetV2's 1280-channel head conv).
    width_range: Optional[Tuple[float, float]] = None
    base_widths: Optional[Tuple[Optional[int], ...]] = None

    @property
    def total_stride(self) -> int:
        """Input pixels per pixel of the last feature map: below this image size the last stages see less
        than one pixel of the image."""
        return self.first_conv_stride * math.prod(stage.stride for stage in self.stages)

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
        return self.width_config(self.width_range[1]) if self.width_range else self._build(max)

    def min_config(self) -> ArchConfig:
        return self.width_config(self.width_range[0]) if self.width_range else self._build(min)

    def random_config(self, rng: random.Random) -> ArchConfig:
        if self.width_range:
            return self.width_config(rng.uniform(*self.width_range))
        return self._build(rng.choice)

    # -- slimmable spaces --------------------------------------------------------------------------
    def width_config(self, width_mult: float) -> ArchConfig:
        """The config of a slimmable space at width multiplier `width_mult` (any value in its range)."""
        if not self.width_range:
            raise ValueError(f"the {self.name!r} space is not slimmable: a width multiplier needs one of "
                             f"{', '.join(name for name, space in SPACES.items() if space.width_range)}")
        low, high = self.width_range
        if not low - 1e-9 <= width_mult <= high + 1e-9:
            raise ValueError(f"width {width_mult:g} is outside the {self.name!r} space's range [{low:g}, {high:g}]")
        config = self._build(min)
        config["width"] = [scaled_width(base, width_mult) if base else options[0]
                           for base, options in zip(self.base_widths, self.choices()["width"])]
        return config

    def width_grid(self, step: float = 0.05) -> List[float]:
        """The range's widths `step` apart, both ends included (the paper's Table 1 columns)."""
        low, high = self.width_range
        count = int(round((high - low) / step))
        return sorted({round(min(high, low + i * step), 4) for i in range(count + 1)} | {high})

    def random_config_in_window(self, rng: random.Random, flops_fn: Callable[[ArchConfig], float],
                                min_mflops: float, max_mflops: float, max_tries: int = 10_000,
                                accept: Optional[Callable[[ArchConfig], bool]] = None) -> ArchConfig:
        """Rejection sampling of a uniform random config with min <= MFLOPs <= max (and `accept`, e.g. a
        latency window)."""
        for _ in range(max_tries):
            config = self.random_config(rng)
            if min_mflops <= flops_fn(config) <= max_mflops and (accept is None or accept(config)):
                return config
        window = "" if accept is None else " and the latency window"
        raise ValueError(f"no config of the {self.name!r} space within [{min_mflops}, {max_mflops}] MFLOPs{window} "
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
        if self.head == "pool":  # no head conv: the classifier's width is the last stage's
            result["width"][-1] = result["width"][-2]
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
        if self.head == "pool" and config["width"][-1] != config["width"][-2]:
            raise ValueError(f"arch config width[-1] = {config['width'][-1]} must equal the last stage's width "
                             f"{config['width'][-2]} in the {self.name!r} space (no head conv)")
        return config


def _stage(widths, depths, kernel_sizes, expand_ratios, stride, use_se) -> Stage:
    return Stage(tuple(widths), tuple(depths), tuple(kernel_sizes), tuple(expand_ratios), stride, use_se)


def scaled_width(base: int, width_mult: float) -> int:
    """Channels of a layer with `base` channels at w = 1, as universally slimmable networks round them."""
    return make_divisible(base * width_mult)


def width_choices(base: Optional[int], width_range: Tuple[float, float]) -> Tuple[int, ...]:
    """Every width `scaled_width` gives over the range (it is monotone and steps by 8 channels)."""
    low, high = (scaled_width(base, w) for w in width_range)
    return tuple(range(low, high + 1, 8))


def slimmable_space(name: str, resolution: int, blocks, stem: int, last: Optional[int], width_range, num_classes: int,
                    first_conv_stride: int = 2, **family) -> SearchSpace:
    """A slimmable MobileNet from its block table [(expand ratio, channels, blocks, stride)]; `last` is
    the head conv's width (None: MobileNetV1, pooling straight after the last stage)."""
    stages = tuple(_stage(width_choices(channels, width_range), [count], [3], [ratio], stride, False)
                   for ratio, channels, count, stride in blocks)
    last_options = stages[-1].widths if last is None else (last,)
    return SearchSpace(name=name, resolutions=(resolution,), first_conv_widths=width_choices(stem, width_range),
                       stages=stages, last_conv_widths=last_options, num_classes=num_classes,
                       first_conv_stride=first_conv_stride, width_range=width_range,
                       base_widths=(stem, *(channels for _, channels, _, _ in blocks),
                                    blocks[-1][1] if last is None else None),
                       activation="relu6", **family)


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

# Slimmable MobileNetV1 / V2 at ImageNet scale, with the block tables and width ranges of universally
# slimmable networks; MobileNetV2's head conv keeps 1280 channels at every width <= 1.
MOBILENET_V1_BLOCKS = [(1, 64, 1, 1), (1, 128, 2, 2), (1, 256, 2, 2), (1, 512, 6, 2), (1, 1024, 2, 2)]
MOBILENET_V2_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)]
MOBILENET_V1 = dict(shortcut="none", project_activation=True, head="pool")
MOBILENET_V2 = dict(shortcut="identity", head="conv")
SLIM_MBV1 = slimmable_space("slim_mbv1", 224, MOBILENET_V1_BLOCKS, 32, None, (0.25, 1.0), 1000, **MOBILENET_V1)
SLIM_MBV2 = slimmable_space("slim_mbv2", 224, MOBILENET_V2_BLOCKS, 32, 1280, (0.35, 1.0), 1000, **MOBILENET_V2)
# Digits-sized variants (8x8 images upsampled to 16, 10 classes): a quarter of the channels, stride-1
# stem, one block per stage and three stride-2 stages, so the last maps are 2x2.
SLIM_MBV1_DIGITS = slimmable_space("slim_mbv1_digits", 16, [(1, 32, 1, 1), (1, 64, 1, 2), (1, 128, 2, 2),
                                                            (1, 256, 1, 2)],
                                   16, None, (0.25, 1.0), 10, first_conv_stride=1, **MOBILENET_V1)
SLIM_MBV2_DIGITS = slimmable_space("slim_mbv2_digits", 16, [(1, 16, 1, 1), (6, 24, 1, 2), (6, 32, 2, 1),
                                                            (6, 64, 2, 2), (6, 96, 1, 1), (6, 160, 1, 2)],
                                   32, 320, (0.35, 1.0), 10, first_conv_stride=1, **MOBILENET_V2)

SPACES = {space.name: space for space in (ALPHANET, TINY, DIGITS, SLIM_MBV1, SLIM_MBV2, SLIM_MBV1_DIGITS,
                                          SLIM_MBV2_DIGITS)}

# Published MobileNets at the ends of the slimmable ranges, (MFLOPs, M parameters), from the tables of
# the TensorFlow-Slim MobileNetV1 / V2 checkpoints (224 pixels, 1000 classes).
PUBLISHED_WIDTHS = {
    "slim_mbv1": {1.0: (569, 4.24), 0.25: (41, 0.47)},
    "slim_mbv2": {1.0: (300, 3.47), 0.35: (59, 1.66)},
}


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
    from .errors import read_text

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
