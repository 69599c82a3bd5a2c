"""Where a command runs: the device, the torchrun process group, autocast; the same for every command.

`--device auto` (the default) takes this process's GPU when one is visible (under torchrun the one of
its LOCAL_RANK) and the CPU otherwise; `cpu`, `cuda` and `cuda:N` force one, and asking for a GPU that
is not there is a one-line error before anything runs. Several processes (WORLD_SIZE > 1, as torchrun
sets) share one process group: NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist

DEVICES = "auto | cpu | cuda | cuda:N"


@dataclasses.dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(text: str) -> torch.device:
    """The device `--device` names (ValueError in one line when it cannot be had), for this process."""
    text = text.strip().lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if text == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"--device {text!r}: write cuda or cuda:N with N a GPU index")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: no CUDA device is visible (use --device cpu or auto)")
        index = int(index) if index else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: GPU {index} does not exist ({torch.cuda.device_count()} visible)")
        return torch.device("cuda", index)
    raise ValueError(f"--device {text!r}: choose {DEVICES}")


def setup_runtime(device: str = "auto") -> Runtime:
    """This process's device, and the process group when torchrun started several processes."""
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Runtime(rank, dist.get_world_size() if dist.is_initialized() else 1, chosen)


def print0(runtime: Runtime, *args) -> None:
    if runtime.is_main:
        print(*args, flush=True)


def make_autocast(amp: str, runtime: Runtime):
    """A factory of autocast contexts for `amp` (off | bf16 | fp16; fp16 only on a GPU)."""
    if amp == "off":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if amp == "fp16" and runtime.device.type != "cuda":
        raise ValueError("--amp fp16 needs a GPU; use --amp bf16 on CPU")
    return lambda: torch.autocast(runtime.device.type, dtype=dtype)
