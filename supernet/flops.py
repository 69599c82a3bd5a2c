"""FLOPs (multiply-adds of conv and linear layers) and parameters of a subnet, from its config.

Convention (the AttentiveNAS / AlphaNet counter's): a conv costs out_h * out_w * out_c * in_c/groups
* k^2, a linear in * out; biases, BN, activations and pooling are free. SE convs run on 1x1 maps and
shortcut projections at the block's output resolution. `count_with_hooks` measures the same on
a module, as an independent check.
"""
from __future__ import annotations

from typing import Tuple

from typing import TYPE_CHECKING

from .space import HEAD_EXPANSION, ArchConfig, SearchSpace, expanded_width, se_width

if TYPE_CHECKING:  # torch only for the hook counter: `alphanet flops` starts without it
    from torch import nn


def _conv_out(size: int, stride: int) -> int:
    return (size + stride - 1) // stride  # padding k // 2 with odd k


def flops_and_params(space: SearchSpace, config: ArchConfig) -> Tuple[float, int]:
    """(multiply-adds, parameters) of the subnet; parameters include BN affine and biases."""
    cfg = space.validate(config)
    widths = cfg["width"]
    size = _conv_out(cfg["resolution"], space.first_conv_stride)
    flops = size * size * widths[0] * space.in_channels * 9
    params = widths[0] * space.in_channels * 9 + 2 * widths[0]
    in_channels = widths[0]
    for index, stage in enumerate(space.stages):
        out_channels, kernel = widths[index + 1], cfg["kernel_size"][index]
        for block in range(cfg["depth"][index]):
            stride = stage.stride if block == 0 else 1
            out_size = _conv_out(size, stride)
            mid = in_channels
            if max(stage.expand_ratios) > 1:
                mid = expanded_width(in_channels, cfg["expand_ratio"][index])
                flops += size * size * mid * in_channels
                params += mid * in_channels + 2 * mid
            flops += out_size * out_size * mid * kernel * kernel
            params += mid * kernel * kernel + 2 * mid
            if stage.use_se:
                squeeze = se_width(mid)
                flops += 2 * mid * squeeze
                params += 2 * mid * squeeze + squeeze + mid
            flops += out_size * out_size * out_channels * mid
            params += out_channels * mid + 2 * out_channels
            if space.shortcut == "always" and in_channels != out_channels:  # the projection shortcut
                flops += out_size * out_size * out_channels * in_channels
                params += out_channels * in_channels
            size, in_channels = out_size, out_channels
    last = widths[-1]
    if space.head == "attentive":
        head = HEAD_EXPANSION * in_channels
        flops += size * size * head * in_channels + head * last
        params += head * in_channels + 2 * head + head * last
    elif space.head == "conv":
        flops += size * size * last * in_channels
        params += last * in_channels + 2 * last
    flops += last * space.num_classes
    params += last * space.num_classes + space.num_classes
    return float(flops), params


def mflops(space: SearchSpace, config: ArchConfig) -> float:
    return flops_and_params(space, config)[0] / 1e6


def count_with_hooks(module: nn.Module, resolution: int, in_channels: int = 3) -> float:
    """Multiply-adds of every Conv2d and Linear in one forward of a 1-image batch."""
    import torch
    from torch import nn

    total = [0.0]

    def conv_hook(layer: nn.Conv2d, inputs, output):
        kernel = layer.kernel_size[0] * layer.kernel_size[1]
        total[0] += output.numel() * (layer.in_channels // layer.groups) * kernel

    def linear_hook(layer: nn.Linear, inputs, output):
        total[0] += output.numel() * layer.in_features

    handles = [m.register_forward_hook(conv_hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(linear_hook) for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        was_training = module.training
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, in_channels, resolution, resolution))
        module.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return total[0]
