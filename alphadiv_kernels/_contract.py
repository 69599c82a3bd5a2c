"""The op's contract in one place: its arguments as one named structure, the schema every backend's
custom op declares (the C++ `TORCH_LIBRARY` in csrc/registration.cpp reads the same: a test compares
the two registered schemas; the same for the sparse-teacher op), and the backends with what each needs to run."""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from . import _extension, triton_adaptive_kd


class OpArgs(NamedTuple):
    """The arguments of `alphadiv::adaptive_kd` and `alphadiv::adaptive_kd_triton`, in schema order."""

    student: torch.Tensor  # [N, C] logits, any strides
    teacher: torch.Tensor  # [N, C], never differentiated
    mask: Optional[torch.Tensor]  # bool [N], True = the row counts
    alpha_min: float
    alpha_max: float
    clip: float
    temperature: float
    reduction: int  # _constants.REDUCTION_*
    surrogate: bool  # the value is the reference code's surrogate instead of the divergence
    compute_grad: bool  # also return d value / d student


class SparseOpArgs(NamedTuple):
    """The arguments of `alphadiv::sparse_adaptive_kd` and `alphadiv::sparse_adaptive_kd_triton`, in schema order."""

    student: torch.Tensor  # [N, C] logits, any strides
    topk_indices: torch.Tensor  # int32 / int64 [N, k]: the teacher's classes, distinct within a row
    topk_logprobs: torch.Tensor  # [N, k]: their log-probabilities, never differentiated
    mask: Optional[torch.Tensor]
    alpha_min: float
    alpha_max: float
    clip: float
    temperature: float
    reduction: int
    surrogate: bool
    compute_grad: bool


SCHEMA = ("(Tensor student, Tensor teacher, Tensor? mask, float alpha_min, float alpha_max, float clip, "
          "float temperature, int reduction, bool surrogate, bool compute_grad) -> (Tensor, Tensor)")

SPARSE_SCHEMA = ("(Tensor student, Tensor topk_indices, Tensor topk_logprobs, Tensor? mask, float alpha_min, "
                 "float alpha_max, float clip, float temperature, int reduction, bool surrogate, bool compute_grad) "
                 "-> (Tensor, Tensor)")


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend: the tensor devices it runs on (empty: any), why it cannot run in this process (None: it
    can), its custom ops (None: the eager reference), and the op that returns the value with its autograd
    in C++ (None: eager training calls take a Python autograd.Function around `op`)."""

    devices: Tuple[str, ...]
    missing: Callable[[torch.device], Optional[str]]
    op: Callable[[], Optional[object]] = lambda: None  # the OpOverload: a call skips the packet's overload lookup
    sparse_op: Callable[[], Optional[object]] = lambda: None
    loss_op: Callable[[], Optional[object]] = lambda: None


def _cpu_missing(device: torch.device) -> Optional[str]:
    if _extension.HAS_CPU_EXTENSION:
        return None
    return (f"it needs the compiled extension alphadiv_kernels._C, which did not load: "
            f"{_extension.missing_reason('alphadiv_kernels._C')}. Reinstall with "
            "`pip install --no-build-isolation -e .`")


def _cuda_missing(device: torch.device) -> Optional[str]:
    if _extension.HAS_CUDA_EXTENSION:
        return None
    return (f"it needs the CUDA extension alphadiv_kernels._C_cuda, which did not load: "
            f"{_extension.missing_reason('alphadiv_kernels._C_cuda')}. Build it with "
            "ALPHADIV_CUDA=1 pip install --no-build-isolation -e .")


def _triton_missing(device: torch.device) -> Optional[str]:
    if triton_adaptive_kd.available(device):
        return None
    if triton_adaptive_kd.triton is None:
        return "the triton package is not installed"
    return "on CPU tensors it needs Triton's interpreter (TRITON_INTERPRET=1)"


def _cpp_ops():  # the C++ ops, shared by the "cpu" and "cuda" backends: the tensors' device picks the kernel
    return (lambda: torch.ops.alphadiv.adaptive_kd.default, lambda: torch.ops.alphadiv.sparse_adaptive_kd.default,
            lambda: torch.ops.alphadiv.adaptive_kd_loss.default)


BACKENDS = {  # best first
    "cuda": Backend(("cuda",), _cuda_missing, *_cpp_ops()),
    "cpu": Backend(("cpu",), _cpu_missing, *_cpp_ops()),
    "triton": Backend(("cuda", "cpu"), _triton_missing, lambda: torch.ops.alphadiv.adaptive_kd_triton.default,
                      lambda: torch.ops.alphadiv.sparse_adaptive_kd_triton.default),
    "reference": Backend((), lambda device: None),
}
AUTO = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton")}  # what `backend="auto"` tries, per device
