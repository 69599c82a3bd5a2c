"""Stand-alone models for `alphanet distill` and `alphanet finetune`, named by a short spec.

    arch:SPACE:ARCH        a subnet of a search space (ARCH: min, max, a0 ... a6, or a JSON file), fresh weights
    supernet:RUN_DIR[:ARCH]  a subnet of a trained supernet (default max), BN-recalibrated, trained weights
    export:DIR             a model written by `alphanet export` (arch.json + weights.pt)
    torchvision:NAME[:FILE][:width=W]  a torchvision classification model, weights from a local state-dict
                           file; width=W scales a MobileNet's channels (the paper's Table 5 students:
                           torchvision:mobilenet_v3_large:width=0.75)

Nothing is downloaded: torchvision models start from random weights unless FILE is given. Every
model is a plain `nn.Module` mapping images to logits; subnets resize the images to their
resolution themselves.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch
from torch import nn

from .errors import brief
from .model import ElasticSupernet, StaticSubnet, extract
from .space import SPACES, get_space, load_arch

SPEC_HELP = "arch:SPACE:ARCH, supernet:RUN_DIR[:ARCH], export:DIR or torchvision:NAME[:WEIGHTS_FILE][:width=W]"


def fresh_subnet(space_name: str, arch_text: str, num_classes: int, seed: int) -> StaticSubnet:
    space = dataclasses.replace(get_space(space_name), num_classes=num_classes)
    arch = load_arch(arch_text, space)
    torch.manual_seed(seed)
    return extract(ElasticSupernet(space), arch)


def trained_subnet(run_dir: str, arch_text: str, data_path: Optional[str]) -> nn.Module:
    from .evaluation import TrainedSupernet

    trained = TrainedSupernet.load(run_dir, data_path)
    return trained.calibrated_subnet(load_arch(arch_text, trained.space), trained.config.calib_images)


def exported(folder: str) -> StaticSubnet:
    """A subnet from `alphanet export`'s arch.json and weights.pt (its space is recorded, or found)."""
    try:
        with open(os.path.join(folder, "arch.json")) as handle:
            record = json.load(handle)
        weights = torch.load(os.path.join(folder, "weights.pt"), map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ValueError(f"export:{folder}: {os.path.basename(error.filename)} is missing (expected the folder "
                         "written by alphanet export)") from None
    except (json.JSONDecodeError, RuntimeError, OSError) as error:
        raise ValueError(f"export:{folder}: unreadable ({brief(error)})") from None
    names = [record["space"]] if "space" in record else list(SPACES)
    for name in names:
        space = dataclasses.replace(get_space(name), num_classes=record["num_classes"])
        try:
            arch = space.validate(record["arch"])
        except ValueError:
            continue
        subnet = extract(ElasticSupernet(space), arch)
        if {k: tuple(v.shape) for k, v in subnet.state_dict().items()} == {k: tuple(v.shape) for k, v in
                                                                          weights.items()}:
            subnet.load_state_dict(weights)
            return subnet
    raise ValueError(f"export:{folder}: its arch.json and weights.pt match no search space of this version")


def torchvision_model(name: str, weights_file: Optional[str], num_classes: int,
                      width: Optional[float] = None) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"torchvision:{name} is not a torchvision classification model")
    options = {} if width is None else {"width_mult": width}
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
    except TypeError:
        raise ValueError(f"torchvision:{name} takes no width multiplier (width= is for the MobileNets)") from None
    if weights_file:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except (FileNotFoundError, IsADirectoryError):
            raise ValueError(f"torchvision:{name}: no weights file {weights_file!r}") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"torchvision:{name}: {weights_file!r} does not fit ({len(missing)} missing entries, "
                             f"first {missing[:1]}; {len(unexpected)} unexpected, first {unexpected[:1]})")
    return model


def has_trained_weights(spec: str) -> bool:
    """Whether the spec's model starts from trained weights (a supernet's, an export's, a weights file)."""
    kind, _, rest = spec.partition(":")
    return kind in ("supernet", "export") or (kind == "torchvision" and
                                              any(not part.startswith("width=") for part in rest.split(":")[1:]))


def width_of(option: str, spec: str) -> float:
    try:
        width = float(option.partition("=")[2])
    except ValueError:
        width = 0.0
    if not 0 < width <= 4:
        raise ValueError(f"model {spec!r}: width=W needs a multiplier in (0, 4], e.g. width=0.75")
    return width


def build(spec: str, num_classes: int, seed: int = 0, data_path: Optional[str] = None) -> nn.Module:
    """The model a spec names (see the module doc); ValueError naming what is wrong."""
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    if kind == "arch" and len(parts) == 2:
        return fresh_subnet(parts[0], parts[1], num_classes, seed)
    if kind == "supernet" and len(parts) in (1, 2):
        return trained_subnet(parts[0], parts[1] if len(parts) == 2 else "max", data_path)
    if kind == "export" and rest:
        return exported(rest)
    if kind == "torchvision" and parts:
        options = [part for part in parts[1:] if part.startswith("width=")]
        files = [part for part in parts[1:] if not part.startswith("width=")]
        if len(options) <= 1 and len(files) <= 1:
            return torchvision_model(parts[0], files[0] if files else None, num_classes,
                                     width_of(options[0], spec) if options else None)
    raise ValueError(f"model {spec!r}: expected {SPEC_HELP}")


def classifier_of(model: nn.Module) -> tuple:
    """(parent module, attribute name) of the model's last nn.Linear: the classifier to replace."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError("the model has no nn.Linear classifier to replace")
    parent_name, _, attribute = last.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attribute
