"""Training configuration: a typed dataclass, named presets, an optional YAML file, --key value overrides."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import yaml


@dataclass
class TrainConfig:
    # data and model
    dataset: str = "digits"              # digits | cifar10 | imagefolder
    data_path: str = ""                  # folder for cifar10 / imagefolder
    space: str = "tiny"                  # search space preset (supernet.space)
    image_size: int = 32                 # crop/resize of the input images
    # the sandwich step
    num_random_subnets: int = 2          # random subnets per step, besides the max and the min
    kd: str = "adaptive"                 # adaptive | kl | none
    alpha_min: float = -1.0
    alpha_max: float = 1.0
    kd_clip: float = 5.0
    label_smoothing: float = 0.1         # on the max subnet's cross-entropy
    dropout: float = 0.0
    drop_connect: float = 0.0
    # optimisation
    epochs: int = 30
    batch_size: int = 64                 # per process
    lr_per_256: float = 0.1              # SGD-Nesterov, scaled by the global batch / 256
    momentum: float = 0.9
    weight_decay: float = 1e-5           # not on BN parameters and biases
    warmup_epochs: int = 2
    grad_clip_value: float = 1.0
    max_nonfinite_steps: int = 5         # consecutive skipped steps before the run stops
    # execution
    amp: str = "off"                     # bf16 | fp16 | off
    channels_last: bool = False
    workers: int = 0
    seed: int = 0
    # evaluation and outputs
    calib_batches: int = 8               # BN recalibration batches before each evaluation
    eval_batch_size: int = 256
    checkpoint_every: int = 0            # steps between mid-epoch checkpoints (0: end of epoch only)
    out: str = ""                        # run folder (default runs/<preset>-<time>)


PRESETS: Dict[str, Dict[str, object]] = {
    "digits": dict(space="digits", epochs=30, lr_per_256=0.4, warmup_epochs=2),
    "imagenet": dict(dataset="imagefolder", space="alphanet", image_size=224, num_random_subnets=2, epochs=360,
                     batch_size=64, lr_per_256=0.1, warmup_epochs=5, weight_decay=1e-5, label_smoothing=0.1,
                     dropout=0.2, drop_connect=0.2, grad_clip_value=1.0, kd="adaptive", alpha_min=-1.0,
                     alpha_max=1.0, kd_clip=5.0, calib_batches=64, amp="bf16", channels_last=True, workers=8),
}


def _field_types() -> Dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _convert(key: str, value: object) -> object:
    kind = _field_types()[key]
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"config key {key!r} expects true/false, got {value!r}")
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"config key {key!r} expects {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config key {key!r} expects {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _apply(config: TrainConfig, values: Dict[str, object], source: str) -> TrainConfig:
    known = _field_types()
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown config key {key!r} in {source}; known keys: {', '.join(known)}")
        setattr(config, key, _convert(key, value))
    return config


def parse_overrides(tokens: List[str]) -> Dict[str, str]:
    """['--epochs', '5', '--kd=kl', '--channels-last'] -> {'epochs': '5', 'kd': 'kl', 'channels_last': 'true'}.

    Dashes in keys read as underscores; a boolean key given alone means true."""
    values: Dict[str, str] = {}
    types = _field_types()
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--"):
            raise ValueError(f"expected --key value, got {token!r}")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            key = key.replace("-", "_")
        elif index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
            key = key.replace("-", "_")
            index += 1
            value = tokens[index]
        elif types.get(key.replace("-", "_")) is bool:
            key, value = key.replace("-", "_"), "true"
        else:
            raise ValueError(f"config key {key!r} needs a value")
        values[key] = value
        index += 1
    return values


def resolve_config(preset: str = "digits", yaml_path: Optional[str] = None,
                   overrides: Optional[Dict[str, object]] = None) -> TrainConfig:
    """Preset, then the YAML file, then the overrides; every key and type checked."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    config = _apply(TrainConfig(), PRESETS[preset], f"preset {preset!r}")
    if yaml_path:
        try:
            with open(yaml_path) as handle:
                values = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {yaml_path!r} does not exist") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {yaml_path!r} must hold a mapping of keys to values")
        _apply(config, values, yaml_path)
    _apply(config, overrides or {}, "the command line")
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    choices = {"dataset": ("digits", "cifar10", "imagefolder"), "kd": ("adaptive", "kl", "none"),
               "amp": ("bf16", "fp16", "off")}
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ValueError(f"config key {key!r} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    for key in ("epochs", "batch_size", "calib_batches", "eval_batch_size", "max_nonfinite_steps"):
        if getattr(config, key) <= 0:
            raise ValueError(f"config key {key!r} must be positive, got {getattr(config, key)}")
    if config.dataset != "digits" and not config.data_path:
        raise ValueError(f"dataset {config.dataset!r} needs --data_path (a local folder)")


def to_dict(config: TrainConfig) -> Dict[str, object]:
    return dataclasses.asdict(config)


def save_yaml(config: TrainConfig, path: str) -> None:
    with open(path, "w") as handle:
        yaml.safe_dump(to_dict(config), handle, sort_keys=False)
