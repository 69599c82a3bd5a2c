"""Elastic layers: each holds the largest weights and runs any prefix slice of them.

A layer reads its active input width from the input itself and is told its output width (and
kernel size) per call, so one set of weights serves every subnet. Smaller depthwise kernels are
the centre crop of the largest. BatchNorm keeps statistics for the largest width and uses (and
updates) their prefix; with momentum None it accumulates a plain average (for BN calibration).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .space import se_width


class ElasticConv2d(nn.Conv2d):
    """Dense conv (1x1 or the stem) running weight[:out_channels, :in_channels]."""

    def __init__(self, max_in: int, max_out: int, kernel_size: int = 1, stride: int = 1, bias: bool = False):
        super().__init__(max_in, max_out, kernel_size, stride, padding=kernel_size // 2, bias=bias)

    def forward(self, x: torch.Tensor, out_channels: Optional[int] = None) -> torch.Tensor:
        out_channels = out_channels or self.out_channels
        weight = self.weight[:out_channels, : x.size(1)]
        bias = self.bias[:out_channels] if self.bias is not None else None
        return F.conv2d(x, weight, bias, self.stride, self.padding)


class ElasticDepthwiseConv2d(nn.Conv2d):
    """Depthwise conv over the input's channels; a kernel of size k is the centre k x k crop."""

    def __init__(self, max_channels: int, max_kernel_size: int, stride: int = 1):
        super().__init__(max_channels, max_channels, max_kernel_size, stride, padding=max_kernel_size // 2,
                         groups=max_channels, bias=False)

    def active_weight(self, channels: int, kernel_size: int) -> torch.Tensor:
        start = (self.kernel_size[0] - kernel_size) // 2
        return self.weight[:channels, :, start:start + kernel_size, start:start + kernel_size]

    def forward(self, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        channels = x.size(1)
        return F.conv2d(x, self.active_weight(channels, kernel_size), None, self.stride, kernel_size // 2,
                        groups=channels)


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm on the first C channels of its statistics and affine parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.size(1)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            # momentum None: cumulative average over the batches since the last reset
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        else:
            factor = 0.0
        use_batch_stats = self.training or not self.track_running_stats
        return F.batch_norm(x, self.running_mean[:channels], self.running_var[:channels], self.weight[:channels],
                            self.bias[:channels], use_batch_stats, factor, self.eps)


class ElasticLinear(nn.Linear):
    """Linear layer on the input's first features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, : x.size(1)], self.bias)


class ElasticSqueezeExcite(nn.Module):
    """SE of MobileNetV3: pool, 1x1 to make_divisible(C/4, 8), ReLU, 1x1 back, hard-sigmoid gate."""

    def __init__(self, max_channels: int):
        super().__init__()
        self.reduce = ElasticConv2d(max_channels, se_width(max_channels), bias=True)
        self.expand = ElasticConv2d(se_width(max_channels), max_channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.size(1)
        gate = F.adaptive_avg_pool2d(x, 1)
        gate = F.relu(self.reduce(gate, se_width(channels)))
        return x * F.hardsigmoid(self.expand(gate, channels))
