"""The whole output projection of a sharded model, for a loss computed outside the model's forward.

The fused loss reads `lm_head.weight` after the model's forward has returned, where a sharding engine keeps
only this process's shard of it (FSDP2 `fully_shard` with `reshard_after_forward=True`, DeepSpeed ZeRO-3).

- The trainable head (the student's) is read inside a call of the head module itself: the loss runs as the
  module's forward (`run_as_forward`), so the engine's own hooks gather the weight before it, free it after,
  gather it again for the backward and reduce-scatter its gradient, exactly as for an `nn.Linear` call.
  When the head is not sharded on its own but inside an enclosing FSDP2 module (the root, say), that module
  is unsharded instead; FSDP's end-of-backward callback reduce-scatters the gradient and reshards it.
- The frozen head (the teacher's) is gathered for the span of the loss and released after it.
- Under FSDP2 the student's forward and the loss run together as the root module's forward
  (`as_one_forward`): the loss starts from the decoder's hidden states, which are not an output of the
  root, and FSDP only prepares the backward of the root's parameters from its outputs.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch import nn


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule


def fsdp_owner(model: nn.Module, head: nn.Module) -> Optional[nn.Module]:
    """The FSDP2 module whose parameter group holds `head`'s parameters: the innermost `fully_shard`-ed module
    on the path from `model` down to `head` (None when nothing there is sharded with FSDP2)."""
    fsdp_module = _fsdp_module_type()
    if fsdp_module is None:
        return None
    head_path = next((name for name, module in model.named_modules() if module is head), None)
    if head_path is None:
        return None
    owners = [(name, module) for name, module in model.named_modules() if isinstance(module, fsdp_module)
              and (name == "" or head_path == name or head_path.startswith(name + "."))]
    return max(owners, key=lambda owner: len(owner[0]))[1] if owners else None


def is_zero3_partitioned(module: nn.Module) -> bool:
    return any(hasattr(parameter, "ds_id") for parameter in module.parameters(recurse=False))


def full_rows(weight: torch.Tensor) -> int:
    """Rows of a weight as the model defines it (a ZeRO-3 partitioned parameter holds none of them)."""
    return weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]


def run_as_forward(module: nn.Module, function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` called as `module`'s forward, inside the module's hooks."""
    module.forward = function  # an instance attribute: nn.Module.__call__ runs the hooks, then it
    try:
        return module(*args)
    finally:
        del module.forward


def as_one_forward(model: nn.Module, function: Callable[[Callable[..., Any]], Any]) -> Any:
    """`function(forward)`, where `forward` runs `model`. Under FSDP2 the whole function runs as the root
    module's forward and `forward` is the model's own, unhooked: the root's hooks then surround the model and
    the loss, so its backward hook fires for a loss computed from an inner activation (the decoder's hidden
    states), not only from the model's outputs. Otherwise `forward` is the model, called as usual."""
    fsdp_module = _fsdp_module_type()
    if fsdp_module is not None and isinstance(model, fsdp_module):
        own_forward = type(model).forward.__get__(model)
        return run_as_forward(model, lambda: function(own_forward))
    return function(model)


def with_trainable_head(model: nn.Module, head: nn.Linear, function: Callable[[nn.Linear, torch.Tensor], Any],
                        hidden: torch.Tensor) -> Any:
    """`function(head, hidden)` with the head's whole parameters and their gradient reaching the engine."""
    fsdp_module = _fsdp_module_type()
    if (fsdp_module is not None and isinstance(head, fsdp_module)) or is_zero3_partitioned(head):
        return run_as_forward(head, lambda states: function(head, states), hidden)
    owner = fsdp_owner(model, head)
    if owner is not None:
        owner.unshard()  # resharded after its gradient is reduce-scattered, at the end of the backward
    return function(head, hidden)


@contextlib.contextmanager
def frozen_head(model: nn.Module, head: nn.Linear, keep: bool = False
                ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The head's (weight, bias), whole, for the span; copies when `keep` (a backward will read them after
    the span, when the engine has freed the gathered ones)."""
    owner = fsdp_owner(model, head)
    if owner is not None:
        owner.unshard()
        gathered = contextlib.nullcontext()
    elif is_zero3_partitioned(head):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None)
    else:
        gathered = contextlib.nullcontext()
    try:
        with gathered:
            weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
            if keep and (owner is not None or is_zero3_partitioned(head)):
                weight, bias = weight.clone(), None if bias is None else bias.clone()
            yield weight, bias
    finally:
        if owner is not None:
            owner.reshard()
