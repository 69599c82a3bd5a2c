"""BN recalibration: the statistics a subnet sees, re-estimated on a few training batches.

A supernet's running statistics mix every subnet it trained; before evaluating one subnet its BN
layers are reset and re-estimated in train mode as the plain (cumulative) average over K batches,
without touching any weight.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: Optional[int] = None,
                   forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> int:
    """Reset every BN layer of `model` and average its statistics over the batches; returns how many
    batches were used. `forward` (default: `model`) runs one batch, e.g. a supernet with a config
    (without `regularize`, so the statistics are those of the plain subnet)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    used = 0
    try:
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            (forward or model)(batch)
            used += 1
    finally:
        model.train(was_training)
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
    if used == 0:
        raise ValueError("BN recalibration needs at least one batch")
    return used
