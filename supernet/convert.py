"""`alphanet convert SRC DST`: a supernet checkpoint of the AlphaNet reference code as a checkpoint of
this project, for `alphanet eval / search / export --checkpoint DST`.

The reference (AlphaNet on AttentiveNAS) saves `{"epoch", "args", "state_dict", "optimizer",
"lr_scheduler"}` with DDP's `module.` prefix on every key, two unused `bn_tracking` BatchNorms per
dynamic BN, and `args`, a pickled `utils.config.Config`. The file is read with `weights_only=True`:
no pickled code runs; `Config` and `AttrDict` are allow-listed as plain ordered dicts (their values
are data), and anything else that is not plain data is refused. Every parameter and buffer of the
`alphanet` supernet (1000 classes) must be filled, and every reference entry used (or be one of the
`bn_tracking` buffers, which are dropped); otherwise the first mismatching key is named.
"""
from __future__ import annotations

import collections
import os
import pickle
import re
import zipfile
from typing import Dict, List, Optional, Tuple

import torch

from . import checkpoint as ckpt
from .config import CommandLineParser, TrainConfig, apply, to_dict
from .errors import brief, run_command
from .model import ElasticSupernet
from .space import ALPHANET, SearchSpace

REFERENCE_CONFIG_CLASSES = ("utils.config.Config", "utils.config.AttrDict")

# reference name (after the block index) -> this supernet's name, inside one MBConv block
_BLOCK_PARTS = {
    "mobile_inverted_conv.inverted_bottleneck.conv.conv.weight": "expand_conv.weight",
    "mobile_inverted_conv.inverted_bottleneck.bn.bn.": "expand_bn.",
    "mobile_inverted_conv.depth_conv.conv.conv.weight": "depthwise.weight",
    "mobile_inverted_conv.depth_conv.bn.bn.": "depthwise_bn.",
    "mobile_inverted_conv.depth_conv.se.fc.reduce.": "se.reduce.",
    "mobile_inverted_conv.depth_conv.se.fc.expand.": "se.expand.",
    "mobile_inverted_conv.point_linear.conv.conv.weight": "project.weight",
    "mobile_inverted_conv.point_linear.bn.bn.": "project_bn.",
    "shortcut.conv.conv.weight": "shortcut.weight",
}
_TOP_PARTS = {
    "first_conv.conv.conv.weight": "stem.weight",
    "first_conv.bn.bn.": "stem_bn.",
    "last_conv.final_expand_layer.conv.conv.weight": "head_expand.weight",
    "last_conv.final_expand_layer.bn.bn.": "head_expand_bn.",
    "last_conv.feature_mix_layer.conv.conv.weight": "head_mix.weight",
    "classifier.linear.linear.": "classifier.",
}


def block_positions(space: SearchSpace) -> List[Tuple[int, int]]:
    """(stage, position in the stage) of each of the reference's flat list of blocks."""
    return [(stage, position) for stage, spec in enumerate(space.stages) for position in range(max(spec.depths))]


def _rename(name: str, positions: List[Tuple[int, int]]) -> Optional[str]:
    """This supernet's name of a reference entry; None for the unused `bn_tracking` buffers."""
    if ".bn_tracking." in name:
        return None
    for prefix, ours in _TOP_PARTS.items():
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match and int(match.group(1)) < len(positions):
        stage, position = positions[int(match.group(1))]
        rest = match.group(2)
        for prefix, ours in _BLOCK_PARTS.items():
            if rest.startswith(prefix):
                return f"stages.{stage}.{position}.{ours}{rest[len(prefix):]}"
    raise ValueError(f"reference entry {name!r} has no counterpart in the alphanet supernet")


def read_reference(path: str) -> Dict[str, object]:
    """The reference checkpoint, loaded without running pickled code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no reference checkpoint at {path!r}")
    stand_ins = [(collections.OrderedDict, name) for name in REFERENCE_CONFIG_CLASSES]
    try:
        with torch.serialization.safe_globals(stand_ins):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ValueError(f"{path!r} holds objects other than plain data ({detail[:200]}); refusing to unpickle "
                         "them") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"{path!r} is not a readable checkpoint ({brief(error)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} is not a checkpoint dict")
    return state


def convert_state_dict(reference: Dict[str, torch.Tensor], space: SearchSpace = ALPHANET) -> Dict[str, torch.Tensor]:
    """The reference's supernet weights under this supernet's names, checked entry by entry."""
    expected = ElasticSupernet(space).state_dict()
    positions = block_positions(space)
    converted: Dict[str, torch.Tensor] = {}
    for name, tensor in reference.items():
        plain = name[len("module."):] if name.startswith("module.") else name
        ours = _rename(plain, positions)
        if ours is None:
            continue
        if ours not in expected:
            raise ValueError(f"reference entry {name!r} (here {ours!r}) has no counterpart in the alphanet supernet")
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise ValueError(f"reference entry {name!r} has shape {tuple(tensor.shape)}; {ours!r} needs "
                             f"{tuple(expected[ours].shape)}")
        converted[ours] = tensor.to(expected[ours].dtype)
    missing = [name for name in expected if name not in converted]
    if missing:
        raise ValueError(f"the reference checkpoint lacks {len(missing)} entries of the alphanet supernet, first "
                         f"{missing[0]!r}")
    return converted


def convert(source: str, destination: str, data_path: str = "") -> Dict[str, object]:
    reference = read_reference(source)
    weights = reference.get("state_dict")
    if not isinstance(weights, dict):
        raise ValueError(f"{source!r} has no 'state_dict' entry; keys: {sorted(map(str, reference))[:8]}")
    model = convert_state_dict(weights)
    config = apply(TrainConfig(), {"dataset": "imagefolder", "space": "alphanet", "image_size": 224,
                                   "batch_size": 32, "calib_images": 2048, "data_path": data_path}, "convert")
    epoch = reference.get("epoch")
    state = {"model": model, "config": to_dict(config), "step": 0, "history": [],
             "converted_from": {"path": os.path.abspath(source), "epoch": epoch if isinstance(epoch, int) else None}}
    folder = os.path.dirname(os.path.abspath(destination))
    if not os.path.isdir(folder):
        raise ValueError(f"the folder of {destination!r} does not exist")
    ckpt.save(destination, state)
    return state


def main(argv: Optional[List[str]] = None) -> None:
    parser = CommandLineParser(prog="alphanet convert", description=__doc__)
    parser.add_argument("source", help="supernet checkpoint of the AlphaNet reference code (.pth.tar)")
    parser.add_argument("destination", help="checkpoint file to write (this project's format)")
    parser.add_argument("--data_path", default="", help="ImageNet folder (train/, val/) for eval and search")
    args = parser.parse_args(argv)
    state = run_command("alphanet convert", lambda: convert(args.source, args.destination, args.data_path))
    print(f"converted {len(state['model'])} entries into {args.destination} (alphanet space, 1000 classes); "
          f"evaluate with: alphanet eval --checkpoint {args.destination} --arch a0 --data_path IMAGENET_DIR")
