"""BN recalibration: the statistics a subnet sees, re-estimated on a few training batches.

A supernet's running statistics mix every subnet it trained; before evaluating one subnet its BN
layers are reset and re-estimated in train mode as the plain (cumulative) average over K batches,
without touching any weight. Under torch.distributed the K batches can be split across processes
(`calibration_loader(..., rank, world)`); `share_bn_statistics` then combines the per-process averages
into the K-batch average every process holds, as one process computing all K batches would.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: Optional[int] = None,
                   forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, allow_empty: bool = False) -> int:
    """Reset every BN layer of `model` and average its statistics over the batches; returns how many
    batches were used. `forward` (default: `model`) runs one batch, e.g. a supernet with a config
    (without `regularize`, so the statistics are those of the plain subnet). `allow_empty`: a process
    whose share of a split calibration is no batch at all (it still joins `share_bn_statistics`)."""
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
    if used == 0 and not allow_empty:
        raise ValueError("BN recalibration needs at least one batch")
    return used


@torch.no_grad()
def share_bn_statistics(model: nn.Module, used: int) -> int:
    """All-reduce the statistics of a recalibration whose batches were split across processes: each
    process's averages over its `used` batches, weighted by their count (one all-reduce). Returns the
    total number of batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not norms:
        return used
    parts = [tensor for bn in norms for tensor in (bn.running_mean, bn.running_var)]
    flat = torch.cat([part.double().flatten() * used for part in parts]
                     + [torch.tensor([float(used)], dtype=torch.float64, device=parts[0].device)])
    dist.all_reduce(flat)
    total = int(flat[-1].item())
    offset = 0
    for part in parts:
        part.copy_((flat[offset:offset + part.numel()] / total).view_as(part))
        offset += part.numel()
    for bn in norms:
        bn.num_batches_tracked.fill_(total)
    return total
