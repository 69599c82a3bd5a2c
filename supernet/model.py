"""The elastic supernet (AlphaNet / AttentiveNAS, slimmable MobileNets) and its static subnets.

Layout, as in AttentiveNAS with the MobileNetV3 head: stem conv 3x3 (BN, swish); seven stages of
MBConv blocks (1x1 expand unless the stage's ratio is 1, depthwise kxk, optional SE, 1x1 project;
every block residual: identity, or avg-pool and/or a 1x1 projection when the shape changes; the
last BN's gamma starts at zero); then 1x1 to 6x the width (BN, swish), global pool, 1x1 to the last
width (swish, no BN), dropout and the classifier. The input is resized (bicubic) to the config's
resolution inside the model.

The slimmable spaces change four things, named by the space: ReLU6 for swish; MobileNetV2 blocks add
their input only where the shape is unchanged (no projections, gamma starts at one) and its head is
1x1 conv (BN, ReLU6), pool, classifier; MobileNetV1 blocks are depthwise (BN, ReLU6) + pointwise (BN,
ReLU6) without residual, and the classifier follows the pool directly.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .ops import ElasticBatchNorm2d, ElasticConv2d, ElasticDepthwiseConv2d, ElasticLinear, ElasticSqueezeExcite
from .space import HEAD_EXPANSION, ArchConfig, SearchSpace, expanded_width, se_width

ACTIVATIONS = {"swish": nn.SiLU, "relu6": nn.ReLU6}


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    if x.shape[-2:] == (resolution, resolution):
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False)


def drop_connect(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Drop whole residual branches per sample (stochastic depth)."""
    if rate <= 0:
        return x
    keep = torch.rand(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype) >= rate
    return x * keep / (1 - rate)


def downsample(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The shortcut's average pool, as AttentiveNAS: a stride-sized window, padded by one (zeros counted
    in the mean) when the input's width is odd, so the output matches the strided conv's size."""
    return F.avg_pool2d(x, stride, padding=0 if x.size(-1) % 2 == 0 else 1)


class Downsample(nn.Module):
    """`downsample` as a module of the static subnets."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return downsample(x, self.stride)


class ElasticMBConv(nn.Module):
    def __init__(self, max_in: int, max_out: int, max_kernel: int, max_expand: int, stride: int, use_se: bool,
                 drop_connect_rate: float = 0.0, activation: str = "swish", shortcut: str = "always",
                 project_activation: bool = False):
        super().__init__()
        max_mid = expanded_width(max_in, max_expand)
        self.stride = stride
        self.act = ACTIVATIONS[activation]()
        self.shortcut_kind = shortcut  # always | identity | none (see SearchSpace)
        self.project_activation = project_activation
        # drop_connect * i / n for the i-th of the max network's n blocks in its last two stages, else 0;
        # applied (to the max subnet) only where the shortcut is the identity, as AttentiveNAS
        self.drop_connect_rate = drop_connect_rate
        self.has_expand = max_expand > 1
        if self.has_expand:
            self.expand_conv = ElasticConv2d(max_in, max_mid)
            self.expand_bn = ElasticBatchNorm2d(max_mid)
        self.depthwise = ElasticDepthwiseConv2d(max_mid, max_kernel, stride)
        self.depthwise_bn = ElasticBatchNorm2d(max_mid)
        self.se = ElasticSqueezeExcite(max_mid) if use_se else None
        self.project = ElasticConv2d(max_mid, max_out)
        self.project_bn = ElasticBatchNorm2d(max_out)
        if shortcut == "always":
            nn.init.zeros_(self.project_bn.weight)  # each block starts as its shortcut
            # Every block owns a projection (as in AttentiveNAS); it runs only when the active widths differ.
            self.shortcut = ElasticConv2d(max_in, max_out)

    def forward(self, x: torch.Tensor, out_channels: int, kernel_size: int, expand_ratio: int,
                regularize: bool = False) -> torch.Tensor:
        in_channels = x.size(1)
        h = x
        if self.has_expand:
            h = self.act(self.expand_bn(self.expand_conv(h, expanded_width(in_channels, expand_ratio))))
        h = self.act(self.depthwise_bn(self.depthwise(h, kernel_size)))
        if self.se is not None:
            h = self.se(h)
        h = self.project_bn(self.project(h, out_channels))
        if self.project_activation:
            h = self.act(h)
        identity = self.stride == 1 and in_channels == out_channels
        if self.shortcut_kind == "none" or (self.shortcut_kind == "identity" and not identity):
            return h
        if regularize and self.drop_connect_rate > 0 and identity:
            h = drop_connect(h, self.drop_connect_rate)
        return self.shortcut_of(x, out_channels) + h

    def shortcut_of(self, x: torch.Tensor, out_channels: int) -> torch.Tensor:
        if self.stride > 1:
            x = downsample(x, self.stride)
        if x.size(1) != out_channels:
            x = self.shortcut(x, out_channels)
        return x


class ElasticSupernet(nn.Module):
    """The supernet. `model(images, cfg)` runs the subnet `cfg`; `regularize=True` (the max subnet's
    forward in training, as AlphaNet) turns on dropout before the classifier and drop-connect, which
    acts on the blocks of the last two stages whose shortcut is the identity, at `drop_connect * i / n`
    for the i-th of the max network's n blocks. `bn_momentum` is that of every BN layer."""

    def __init__(self, space: SearchSpace, dropout: float = 0.0, drop_connect: float = 0.0,
                 bn_momentum: float = 0.1):
        super().__init__()
        self.space = space
        self.dropout = dropout
        self.act = ACTIVATIONS[space.activation]()
        width = max(space.first_conv_widths)
        self.stem = ElasticConv2d(space.in_channels, width, 3, space.first_conv_stride)
        self.stem_bn = ElasticBatchNorm2d(width)
        self.stages = nn.ModuleList()
        total_blocks = sum(max(stage.depths) for stage in space.stages)
        index = 0
        for stage_index, stage in enumerate(space.stages):
            blocks = nn.ModuleList()
            in_last_two_stages = stage_index >= len(space.stages) - 2
            for position in range(max(stage.depths)):
                rate = drop_connect * index / total_blocks if in_last_two_stages else 0.0
                blocks.append(ElasticMBConv(width, max(stage.widths), max(stage.kernel_sizes), max(stage.expand_ratios),
                                            stage.stride if position == 0 else 1, stage.use_se, rate,
                                            space.activation, space.shortcut, space.project_activation))
                width = max(stage.widths)
                index += 1
            self.stages.append(blocks)
        if space.head == "attentive":
            self.head_expand = ElasticConv2d(width, HEAD_EXPANSION * width)
            self.head_expand_bn = ElasticBatchNorm2d(HEAD_EXPANSION * width)
            self.head_mix = ElasticConv2d(HEAD_EXPANSION * width, max(space.last_conv_widths))
        elif space.head == "conv":
            self.head_conv = ElasticConv2d(width, max(space.last_conv_widths))
            self.head_conv_bn = ElasticBatchNorm2d(max(space.last_conv_widths))
        self.classifier = ElasticLinear(max(space.last_conv_widths), space.num_classes)
        for module in self.modules():
            if isinstance(module, ElasticBatchNorm2d):
                module.momentum = bn_momentum
        self.active: ArchConfig = space.max_config()

    def set_active(self, config: ArchConfig) -> None:
        self.active = self.space.validate(config)

    def forward(self, x: torch.Tensor, config: Optional[ArchConfig] = None, regularize: bool = False) -> torch.Tensor:
        if config is not None:
            self.set_active(config)
        cfg = self.active
        regularize = regularize and self.training
        widths = cfg["width"]
        x = resize(x, cfg["resolution"])
        x = self.act(self.stem_bn(self.stem(x, widths[0])))
        for stage_index, blocks in enumerate(self.stages):
            for block in blocks[: cfg["depth"][stage_index]]:
                x = block(x, widths[stage_index + 1], cfg["kernel_size"][stage_index],
                          cfg["expand_ratio"][stage_index], regularize)
        if self.space.head == "attentive":
            x = self.act(self.head_expand_bn(self.head_expand(x, HEAD_EXPANSION * x.size(1))))
            x = F.adaptive_avg_pool2d(x, 1)
            x = self.act(self.head_mix(x, widths[-1]))
        elif self.space.head == "conv":
            x = F.adaptive_avg_pool2d(self.act(self.head_conv_bn(self.head_conv(x, widths[-1]))), 1)
        else:
            x = F.adaptive_avg_pool2d(x, 1)
        x = x.flatten(1)
        if regularize and self.dropout > 0:
            x = F.dropout(x, self.dropout)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------
# Static subnets: plain conv / BN / linear layers holding copies of the active slices.

def _conv(weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, groups: int = 1) -> nn.Conv2d:
    out_channels, in_per_group, kernel, _ = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_channels, kernel, stride, kernel // 2, groups=groups,
                     bias=bias is not None)
    conv.weight.data.copy_(weight)
    if bias is not None:
        conv.bias.data.copy_(bias)
    return conv


def _bn(elastic: ElasticBatchNorm2d, channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=elastic.eps, momentum=elastic.momentum)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).data.copy_(getattr(elastic, name)[:channels])
    bn.num_batches_tracked.copy_(elastic.num_batches_tracked)
    return bn


class StaticSqueezeExcite(nn.Module):
    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d):
        super().__init__()
        self.reduce, self.expand = reduce, expand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))
        return x * F.hardsigmoid(self.expand(gate))


class StaticMBConv(nn.Module):
    def __init__(self, expand: Optional[nn.Sequential], depthwise: nn.Sequential, se: Optional[nn.Module],
                 project: nn.Sequential, residual: bool, pool_stride: int = 1, shortcut: Optional[nn.Conv2d] = None):
        super().__init__()
        self.expand = expand if expand is not None else nn.Identity()
        self.depthwise, self.project = depthwise, project
        self.se = se if se is not None else nn.Identity()
        self.residual = residual
        self.pool = Downsample(pool_stride) if pool_stride > 1 else nn.Identity()
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project(self.se(self.depthwise(self.expand(x))))
        return self.shortcut(self.pool(x)) + h if self.residual else h


class StaticSubnet(nn.Module):
    """A subnet as plain layers: inference and fine-tuning (no dropout or drop-connect of its own)."""

    def __init__(self, resolution: int, stem: nn.Sequential, blocks: nn.Sequential, head: nn.Sequential,
                 classifier: nn.Linear):
        super().__init__()
        self.resolution = resolution
        self.stem, self.blocks, self.head, self.classifier = stem, blocks, head, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-1) != self.resolution or x.size(-2) != self.resolution:
            x = F.interpolate(x, size=[self.resolution, self.resolution], mode="bicubic", align_corners=False)
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(x, 1))


@torch.no_grad()
def static_stem(supernet: ElasticSupernet, width: int) -> nn.Sequential:
    space = supernet.space
    return nn.Sequential(_conv(supernet.stem.weight[:width], None, space.first_conv_stride),
                         _bn(supernet.stem_bn, width), ACTIVATIONS[space.activation]())


@torch.no_grad()
def static_block(space: SearchSpace, block: ElasticMBConv, in_channels: int, out_channels: int, kernel: int,
                 ratio: int) -> StaticMBConv:
    """One elastic block at the given widths, kernel and expansion, as plain layers with copied weights."""
    act = ACTIVATIONS[space.activation]
    mid = expanded_width(in_channels, ratio) if block.has_expand else in_channels
    expand = None
    if block.has_expand:
        expand = nn.Sequential(_conv(block.expand_conv.weight[:mid, :in_channels], None, 1),
                               _bn(block.expand_bn, mid), act())
    depthwise = nn.Sequential(_conv(block.depthwise.active_weight(mid, kernel), None, block.stride, groups=mid),
                              _bn(block.depthwise_bn, mid), act())
    se = None
    if block.se is not None:
        squeeze = se_width(mid)
        se = StaticSqueezeExcite(
            _conv(block.se.reduce.weight[:squeeze, :mid], block.se.reduce.bias[:squeeze], 1),
            _conv(block.se.expand.weight[:mid, :squeeze], block.se.expand.bias[:mid], 1))
    project = nn.Sequential(_conv(block.project.weight[:out_channels, :mid], None, 1),
                            _bn(block.project_bn, out_channels), *([act()] if space.project_activation else []))
    if space.shortcut == "always":
        shortcut = None
        if in_channels != out_channels:
            shortcut = _conv(block.shortcut.weight[:out_channels, :in_channels], None, 1)
        return StaticMBConv(expand, depthwise, se, project, True, block.stride, shortcut)
    identity = space.shortcut == "identity" and block.stride == 1 and in_channels == out_channels
    return StaticMBConv(expand, depthwise, se, project, identity)


@torch.no_grad()
def static_head(supernet: ElasticSupernet, in_channels: int, last_width: int) -> Tuple[nn.Sequential, nn.Linear]:
    """The head (expansion / conv and pooling) and the classifier of a subnet, as plain layers."""
    space = supernet.space
    act = ACTIVATIONS[space.activation]
    if space.head == "attentive":
        head_width = HEAD_EXPANSION * in_channels
        head = nn.Sequential(_conv(supernet.head_expand.weight[:head_width, :in_channels], None, 1),
                             _bn(supernet.head_expand_bn, head_width), act(), nn.AdaptiveAvgPool2d(1),
                             _conv(supernet.head_mix.weight[:last_width, :head_width], None, 1), act())
    elif space.head == "conv":
        head = nn.Sequential(_conv(supernet.head_conv.weight[:last_width, :in_channels], None, 1),
                             _bn(supernet.head_conv_bn, last_width), act(), nn.AdaptiveAvgPool2d(1))
    else:
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1))
    classifier = nn.Linear(last_width, space.num_classes)
    classifier.weight.copy_(supernet.classifier.weight[:, :last_width])
    classifier.bias.copy_(supernet.classifier.bias)
    return head, classifier


@torch.no_grad()
def extract(supernet: ElasticSupernet, config: ArchConfig) -> StaticSubnet:
    """The subnet of `config` as plain layers with copied weights and BN statistics."""
    space = supernet.space
    cfg = space.validate(copy.deepcopy(config))
    widths = cfg["width"]
    blocks: List[nn.Module] = []
    in_channels = widths[0]
    for stage_index, stage_blocks in enumerate(supernet.stages):
        out_channels = widths[stage_index + 1]
        kernel, ratio = cfg["kernel_size"][stage_index], cfg["expand_ratio"][stage_index]
        for block in stage_blocks[: cfg["depth"][stage_index]]:
            blocks.append(static_block(space, block, in_channels, out_channels, kernel, ratio))
            in_channels = out_channels
    head, classifier = static_head(supernet, in_channels, widths[-1])
    subnet = StaticSubnet(cfg["resolution"], static_stem(supernet, widths[0]), nn.Sequential(*blocks), head, classifier)
    return subnet.train(supernet.training)
