"""Training configuration: a typed dataclass, named presets, an optional YAML file, --key value overrides.

Every key has a type, a default, a group and one line of help (shown by `alphanet train --help`);
`validate` checks every value (type, range, finiteness, consistency) before anything is created.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import typing
from dataclasses import dataclass, field, fields
from typing import Dict, Optional

from .space import SPACES

# The datasets a config can name; torch-free, like this whole module, so the CLI starts fast
DIGITS_SPLITS = {"digits": (0.2, 0.1), "digits_lowdata": (0.8, 0.1)}  # (test, val) fractions; train: the rest
DATASETS = (*DIGITS_SPLITS, "cifar10", "imagefolder")
IMAGENET_SPACES = tuple(name for name, space in SPACES.items() if min(space.resolutions) >= 192)


def is_bundled(dataset: str) -> bool:
    """Data that ships with the dependencies: no folder, no augmentation."""
    return dataset in DIGITS_SPLITS


def key(default, group: str, help: str):
    """A config key: its default, its --help group and its one line of help."""
    return field(default=default, metadata={"group": group, "help": help})


def default_of(base: type, name: str, default):
    """A key of `base` with another default, for a command whose recipe differs (same help, same place)."""
    inherited = base.__dataclass_fields__[name]
    return field(default=default, metadata=inherited.metadata)


@dataclass
class RunConfig:
    """The keys of every training command (train, distill): data, optimisation, execution, outputs."""

    dataset: str = key("digits", "data", "digits | digits_lowdata (bundled, no download) | cifar10 | imagefolder")
    data_path: str = key("", "data", "folder of cifar10 / imagefolder data")
    image_size: int = key(32, "data", "training crop / evaluation size of the images (pixels)")
    augment: str = key("autoaugment", "data", "imagefolder training augmentation: autoaugment (AttentiveNAS, "
                                              "AlphaNet) | usnets (US-Nets' imagenet1k_mobile)")
    label_smoothing: float = key(0.1, "optimisation", "label smoothing of the cross-entropy with the labels")
    epochs: int = key(30, "optimisation", "training epochs")
    batch_size: int = key(64, "optimisation", "images per process and step")
    lr_per_256: float = key(0.1, "optimisation", "SGD-Nesterov LR per 256 images of the global batch")
    momentum: float = key(0.9, "optimisation", "SGD momentum")
    weight_decay: float = key(1e-5, "optimisation", "weight decay (not on BN parameters and biases)")
    warmup_epochs: int = key(2, "optimisation", "linear LR warm-up from 0.001x, then cosine")
    grad_clip_value: float = key(1.0, "optimisation", "clip of each gradient element (0: off)")
    max_nonfinite_steps: int = key(5, "optimisation", "consecutive non-finite steps before the run stops")
    device: str = key("auto", "execution", "auto (the GPU when one is visible) | cpu | cuda | cuda:N")
    amp: str = key("off", "execution", "autocast: off | bf16 | fp16 (GPU only; with a gradient scaler)")
    channels_last: bool = key(False, "execution", "channels-last memory format")
    workers: int = key(0, "execution", "data-loading worker processes")
    decode_on_device: bool = key(False, "execution", "imagefolder: training JPEGs decoded (nvJPEG) and augmented on "
                                                     "the GPU; the workers only read files")
    seed: int = key(0, "execution", "seed of the weights, data order, subnets and dropout")
    calib_images: int = key(512, "outputs", "training images that re-estimate the BN statistics before each "
                                            "evaluation")
    eval_batch_size: int = key(256, "outputs", "batch size of evaluation")
    checkpoint_every: int = key(0, "outputs", "steps between mid-epoch checkpoints (0: end of epoch only)")
    log_every: int = key(20, "outputs", "steps between reads of the losses back to the host (steps.jsonl "
                                        "still gets every step; a GPU is not made to wait every step)")
    out: str = key("", "outputs", "run folder; empty: runs/<dataset>-<time> (distill: runs/distill-<dataset>-<time>)")


@dataclass
class KDConfig(RunConfig):
    """A training command that distills: the divergence and its parameters."""

    kd: str = key("adaptive", "distillation", "students' loss: adaptive (alpha-divergence) | kl | symmetric "
                                              "(KL(p||q) + KL(q||p)) | none (labels)")
    alpha_min: float = key(-1.0, "distillation", "negative alpha of the adaptive KD")
    alpha_max: float = key(1.0, "distillation", "positive alpha of the adaptive KD")
    kd_clip: float = key(5.0, "distillation", "clip of the importance weight (p/q)^alpha, > 0")
    kd_temperature: float = key(1.0, "distillation", "temperature T of the KD: T^2 D(teacher_T, student_T), (0, 100]")
    kd_t_squared: bool = key(True, "distillation", "the KD term carries T^2 (Hinton, the paper's App. C); false: "
                                                   "D(teacher_T, student_T) alone, as the reference's KLLossSoft")


@dataclass
class TrainConfig(KDConfig):
    """`alphanet train`: the supernet, the sandwich rule and its regularisation."""

    space: str = key("tiny", "supernet", "search space: alphanet | tiny | digits | slim_mbv1 | slim_mbv2 | "
                                         "slim_mbv1_digits | slim_mbv2_digits")
    num_random_subnets: int = key(2, "supernet", "random subnets per step, besides the max and the min")
    sampler: str = key("uniform", "supernet", "how the random subnets are drawn: uniform (AlphaNet) | attentive "
                                              "(AttentiveNAS: the best or worst of k at a FLOPs target)")
    attentive_candidates: int = key(3, "supernet", "attentive sampler: candidates per slot, k (BestUp-3: 3)")
    attentive_choice: str = key("best", "supernet", "attentive sampler: keep the candidate of lowest (best) or "
                                                    "highest (worst) minibatch loss")
    dropout: float = key(0.0, "supernet", "dropout before the classifier, max subnet only")
    drop_connect: float = key(0.0, "supernet", "drop-connect rate, max subnet only, last two stages")
    bn_momentum: float = key(0.1, "supernet", "momentum of the BN running statistics in training (0: never updated)")


PRESETS: Dict[str, Dict[str, object]] = {
    "digits": dict(space="digits", epochs=30, lr_per_256=0.4, warmup_epochs=2),
    # Slimmable MobileNetV2 on digits: widths 0.35-1.0, the sandwich over widths (section 4.1)
    "slim-digits": dict(space="slim_mbv2_digits", epochs=15, lr_per_256=0.4, warmup_epochs=2),
    # Comparisons that can show a difference on a laptop (alphanet ablate): slimmable MobileNetV1 on
    # 181 training digits, tested on 1437; its narrowest width (6 k parameters) is capacity-limited
    "ablation": dict(dataset="digits_lowdata", space="slim_mbv1_digits", epochs=60, batch_size=32, lr_per_256=0.4,
                     warmup_epochs=2, calib_images=180),
    # Section 4.1's ImageNet recipe: 16 processes x 128 = 2048 images at LR 0.8, cosine, 360 epochs
    "slim-imagenet": dict(dataset="imagefolder", space="slim_mbv2", image_size=224, num_random_subnets=2,
                          epochs=360, batch_size=128, lr_per_256=0.1, warmup_epochs=0, weight_decay=1e-5,
                          dropout=0.2, kd="adaptive", calib_images=2048, channels_last=True, workers=4),
    # The same with US-Nets' recipe (imagenet1k_mobile), which the paper says its slimmable runs follow: its
    # augmentation, no label smoothing, no gradient clip
    "slim-imagenet-usnets": dict(dataset="imagefolder", space="slim_mbv2", image_size=224, num_random_subnets=2,
                                 epochs=360, batch_size=128, lr_per_256=0.1, warmup_epochs=0, weight_decay=1e-5,
                                 dropout=0.2, kd="adaptive", calib_images=2048, channels_last=True, workers=4,
                                 augment="usnets", label_smoothing=0.0, grad_clip_value=0.0),
    # AlphaNet's training config: 64 processes x 32 images = 2048 at LR 0.8, 64 x 32 calibration images
    "imagenet": dict(dataset="imagefolder", space="alphanet", image_size=224, num_random_subnets=2, epochs=360,
                     batch_size=32, lr_per_256=0.1, warmup_epochs=5, weight_decay=1e-5, label_smoothing=0.1,
                     dropout=0.2, drop_connect=0.2, bn_momentum=0.0, grad_clip_value=1.0, kd="adaptive",
                     alpha_min=-1.0, alpha_max=1.0, kd_clip=5.0, calib_images=2048, amp="off", channels_last=True,
                     workers=4),
}

KD_CHOICES = ("adaptive", "kl", "symmetric", "none")


def validate_run(config: RunConfig, choices=(), positive=(), non_negative=(), fractions=()) -> None:
    """The checks of the keys every training command shares, plus a command's own; ValueError naming
    the first bad key."""
    check_ranges(config, {"dataset": DATASETS, "amp": ("bf16", "fp16", "off"), "augment": ("autoaugment", "usnets"),
                          **dict(choices)},
                 ("epochs", "batch_size", "eval_batch_size", "max_nonfinite_steps", "image_size", "log_every",
                  "lr_per_256", *positive),
                 ("warmup_epochs", "workers", "seed", "checkpoint_every", "weight_decay", "grad_clip_value",
                  "momentum", "calib_images", *non_negative),
                 ("label_smoothing", *fractions))
    if not is_bundled(config.dataset) and not config.data_path:
        raise ValueError(f"dataset {config.dataset!r} needs a data folder (--data_path; the same key for "
                         "eval / search / export)")
    if config.augment != "autoaugment" and config.dataset != "imagefolder":
        raise ValueError(f"config key 'augment' chooses an ImageFolder's augmentation; {config.dataset!r} has its own")
    if config.decode_on_device and config.augment != "autoaugment":
        raise ValueError("config key 'decode_on_device' runs the autoaugment pipeline on the GPU; with augment "
                         f"{config.augment!r} the images are augmented by the workers (decode_on_device false)")
    if config.decode_on_device and config.dataset != "imagefolder":
        raise ValueError(f"config key 'decode_on_device' decodes image files: it needs dataset imagefolder, not "
                         f"{config.dataset!r}")


def validate_kd(config: KDConfig) -> None:
    from alphadiv_kernels._constants import MAX_TEMPERATURE

    check_ranges(config, {"kd": KD_CHOICES}, ("kd_clip", "kd_temperature"))
    if config.alpha_min > config.alpha_max:
        raise ValueError(f"config keys alpha_min ({config.alpha_min}) must not exceed alpha_max ({config.alpha_max})")
    if config.kd_temperature > MAX_TEMPERATURE:
        raise ValueError(f"config key 'kd_temperature' must be at most {MAX_TEMPERATURE:g}, got {config.kd_temperature}")


def field_types(cls: type = None) -> Dict[str, type]:
    """The keys and types of a config dataclass (TrainConfig by default)."""
    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _convert(name: str, value: object, kind: type) -> object:
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"config key {name!r} expects true/false, got {value!r}")
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"config key {name!r} expects {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config key {name!r} expects {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def apply(config, values: Dict[str, object], source: str):
    """Set config keys from strings or values, each converted and type-checked."""
    known = field_types(type(config))
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"unknown config key {name!r} in {source}; see --help for the keys")
        setattr(config, name, _convert(name, value, known[name]))
    return config


def read_yaml(path: str) -> Dict[str, object]:
    import yaml

    from .errors import read_text

    text = read_text(path, "config file")
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(f"config file {path!r} is not valid YAML{line}: {getattr(error, 'problem', error)}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of keys to values")
    return values


def resolve_config(preset: str = "digits", yaml_path: Optional[str] = None,
                   overrides: Optional[Dict[str, object]] = None, *, cls: type = TrainConfig,
                   presets: Optional[Dict[str, Dict[str, object]]] = None, check=None):
    """Preset, then the YAML file, then the overrides; every key and value checked. A TrainConfig by
    default; another command passes its config class, presets and check."""
    presets = PRESETS if presets is None else presets
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(presets)}")
    config = apply(cls(), presets[preset], f"preset {preset!r}")
    if yaml_path:
        apply(config, read_yaml(yaml_path), yaml_path)
    apply(config, overrides or {}, "the command line")
    (check or validate)(config)
    return config


def check_ranges(config, choices: Dict[str, tuple], positive=(), non_negative=(), fractions=()) -> None:
    """ValueError naming the first key out of its choices or range, or not finite (and a `device` key that
    names no device)."""
    device = getattr(config, "device", "auto")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {device!r}")
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"config key {name!r} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    for name, kind in field_types(type(config)).items():
        value = getattr(config, name)
        if kind is float and not math.isfinite(value):
            raise ValueError(f"config key {name!r} must be a finite number, got {value}")
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"config key {name!r} must be positive, got {getattr(config, name)}")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ValueError(f"config key {name!r} must be 0 or more, got {getattr(config, name)}")
    for name in fractions:
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f"config key {name!r} must be in [0, 1), got {getattr(config, name)}")


def validate(config: TrainConfig) -> None:
    """Raise ValueError naming the first bad key: choices, ranges, finiteness and consistency."""
    validate_run(config, {"space": tuple(SPACES), "sampler": ("uniform", "attentive"),
                          "attentive_choice": ("best", "worst")},
                 positive=("calib_images", "attentive_candidates"), non_negative=("num_random_subnets",),
                 fractions=("dropout", "drop_connect", "bn_momentum"))
    validate_kd(config)
    smallest = SPACES[config.space].total_stride
    if config.image_size < smallest:
        raise ValueError(f"config key 'image_size' must be at least {smallest} pixels for the {config.space} space "
                         f"(its total stride), got {config.image_size}")
    if is_bundled(config.dataset) and config.space in IMAGENET_SPACES:
        raise ValueError(f"the {config.space} space is ImageNet-sized (224 pixels and more, 1000 classes); train digits "
                         "on the digits, tiny, slim_mbv1_digits or slim_mbv2_digits space")


def to_dict(config) -> Dict[str, object]:
    return dataclasses.asdict(config)


def config_for_resume(path: str, overrides: Optional[Dict[str, object]] = None, *, cls: type = TrainConfig,
                      check=None, renamed: Optional[Dict[str, str]] = None):
    """A run's saved config, with explicit overrides (e.g. more epochs) on top, checked (`check`: the
    TrainConfig `validate` by default). Keys of earlier versions are read as they are named now:
    `renamed` (old name: new name), and calibration counted in batches becomes images."""
    from .checkpoint import load

    values = {(renamed or {}).get(name, name): value for name, value in load(path)["config"].items()}
    if "calib_batches" in values:
        values["calib_images"] = values.pop("calib_batches") * values.get("batch_size", cls.batch_size)
    config = apply(cls(), values, f"checkpoint {path!r}")
    apply(config, overrides or {}, "the command line")
    (check or validate)(config)
    return config


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default (unless it is None or the help
    already says it)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class CommandLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (`alphanet train: error: ...`) instead of usage + error, the defaults
    in --help, and both spellings of every option: options are declared (and shown) with underscores,
    like the config keys and the YAML files, and `--some-key` is read as `--some_key`."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, allow_abbrev=False, **kwargs)  # --epoch is a typo, not --epochs

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        for index, word in enumerate(args):
            if word == "--":
                break
            name, equals, value = word.partition("=")
            spelled = "--" + name[2:].replace("-", "_")
            if name.startswith("--") and name not in self._option_string_actions and \
                    spelled in self._option_string_actions:
                args[index] = spelled + equals + value
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_arch_or_width(parser: argparse.ArgumentParser) -> None:
    """--arch NAME|FILE, or --width W for the slimmable spaces (one of them)."""
    from .space import PUBLISHED

    parser.add_argument("--arch", default=None,
                        help=f"min, max, a published model ({', '.join(PUBLISHED)}), or a JSON arch config file")
    parser.add_argument("--width", type=float, default=None,
                        help="slimmable spaces (slim_mbv1, slim_mbv2, ...): the width multiplier, e.g. 0.25")


def arch_or_width(args: argparse.Namespace, space):
    """The arch config that --arch or --width names; ValueError when neither or both are given."""
    from .space import load_arch

    if (args.arch is None) == (args.width is None):
        raise ValueError("give one of --arch and --width")
    return load_arch(args.arch, space) if args.arch is not None else space.width_config(args.width)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = None, exclude=(), yaml: bool = True) -> None:
    """Every key of a config dataclass (but `exclude`) as `--key VALUE` (also `--key=VALUE`; the parser
    reads dashes as underscores), grouped in --help with its type, default and help. Values stay strings
    here; `overrides` collects them."""
    cls = cls or TrainConfig
    types = field_types(cls)
    groups = dict.fromkeys(item.metadata["group"] for item in fields(cls))
    for group in groups:
        section = parser.add_argument_group(f"{group} keys" + (" (also in the YAML file of --config)" if yaml else ""))
        for item in fields(cls):
            if item.metadata["group"] != group or item.name in exclude:
                continue
            kind = types[item.name]
            default = item.default if item.default != "" else "''"
            extra = dict(nargs="?", const="true") if kind is bool else {}
            section.add_argument(f"--{item.name}", dest=item.name, metavar=kind.__name__.upper(), default=argparse.SUPPRESS,
                                 help=f"{item.metadata['help']} (default {default})", **extra)


def overrides(args: argparse.Namespace, cls: type = None) -> Dict[str, str]:
    """The config keys given on the command line."""
    return {name: value for name, value in vars(args).items() if name in field_types(cls)}


def save_yaml(config, path: str) -> None:
    import yaml

    from .checkpoint import atomic_write

    atomic_write(path, yaml.safe_dump(to_dict(config), sort_keys=False).encode())
