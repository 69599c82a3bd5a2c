"""`fused_adaptive_kd`: the adaptive alpha-divergence KD loss of AlphaNet as one fused op.

The kernels (csrc/cpu, and CUDA/Triton where built) implement the custom op
`alphadiv::adaptive_kd`; this file adds what the op needs to behave like a PyTorch loss: argument
checks, backend choice, the fake (meta) implementation for torch.compile, and autograd.

Autograd: the forward writes the gradient of the (reduced) loss with respect to the student logits
while it has every row in cache, and the backward only scales it by the incoming gradient, in place.
Forward + backward therefore hold one [N, C] tensor in the student's dtype beyond the inputs. When
the graph is retained (``retain_graph=True``, gradcheck, jacobians) the backward scales into a new
tensor instead, so every pass sees the saved gradient intact. The op has no second derivative: a
backward with ``create_graph=True`` raises rather than return a gradient without its graph.

Eager training calls on the C++ kernels go through `alphadiv::adaptive_kd_loss`, whose autograd node is
C++ (csrc/adaptive_kd_autograd.cpp): one op call per loss. The Triton backend takes `_EagerAdaptiveKD`,
and torch.compile / torch.func the op with the autograd registered below; all three share these rules.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Tuple, Union

import torch

from . import _extension, triton_adaptive_kd
from ._constants import REDUCTION_NONE
from ._contract import AUTO, BACKENDS, SCHEMA, OpArgs
from ._validation import check_backend, validate_kd_arguments
from .diagnostics import KDStats, adaptive_kd_stats
from .reference import adaptive_kd_reference

_DEFAULT_BACKEND = os.environ.get("ALPHADIV_BACKEND", "auto")  # read once, at import
_warned_fallback = False


def available_backends() -> List[str]:
    """Backends usable in this process, best first; `reference` is always there. Triton without a GPU
    counts where its interpreter runs it on CPU tensors (TRITON_INTERPRET=1)."""
    default = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    usable = []
    for name, backend in BACKENDS.items():
        device = default if not backend.devices or default.type in backend.devices else torch.device("cpu")
        if (not backend.devices or device.type in backend.devices) and backend.missing(device) is None:
            usable.append(name)
    return usable


def _resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call runs on: the one asked for (an error naming why it cannot run these tensors),
    or for "auto" (and ALPHADIV_BACKEND) the best of `AUTO` for the tensors' device."""
    global _warned_fallback
    check_backend(backend)
    if backend == "auto":
        backend = _DEFAULT_BACKEND
    if backend == "auto":
        for name in AUTO.get(device.type, ()):
            if BACKENDS[name].missing(device) is None:
                if name == "reference" and not _warned_fallback:
                    _warned_fallback = True
                    warnings.warn(f"alphadiv_kernels: the compiled CPU kernels are unavailable "
                                  f"({_extension.missing_reason('alphadiv_kernels._C')}); using the eager reference",
                                  stacklevel=3)
                return name
        raise RuntimeError(f"fused_adaptive_kd has no kernel for {device.type} tensors in this build "
                           "(the Triton backend needs the triton package)")
    chosen = BACKENDS[backend]
    if chosen.devices and device.type not in chosen.devices:
        raise ValueError(f"backend={backend!r} needs {' or '.join(chosen.devices).upper()} tensors, got "
                         f"{device.type} tensors")
    reason = chosen.missing(device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable for {device.type} tensors: {reason}")
    return backend


def fused_adaptive_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    clip: float = 5.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    value: str = "divergence",
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    return_stats: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, KDStats]]:
    """Adaptive alpha-divergence KD loss (AlphaNet, ICML 2021), fused.

    Per row of ``[..., C]`` logits, with ``q = softmax(student / T)`` and ``p = softmax(teacher / T)``,
    computes the alpha-divergences ``D_alpha_min(p || q)`` and ``D_alpha_max(p || q)`` with the
    importance weight ``(p / q)^alpha`` clipped at ``clip``, keeps the larger one, and backpropagates
    the clipped gradient of the kept branch (paper Eq. 5) into the student only.

    Args:
        student_logits: ``[..., C]`` floating logits of the student (receives the gradient).
        teacher_logits: ``[..., C]`` logits of the teacher, same shape and device; never differentiated.
        alpha_min, alpha_max: the two alphas (``alpha_min <= alpha_max``). ``|alpha - 1| < 1e-3`` is
            forward KL (no clip), ``|alpha| < 1e-3`` reverse KL.
        clip: upper bound of the importance weight (> 0); 5 in the paper.
        temperature: logits are divided by it and the value multiplied by its square (Hinton).
        reduction: ``"mean"`` over (unmasked) rows, ``"sum"`` or ``"none"`` (shape ``[...]``).
        value: ``"divergence"`` returns the selected divergence (>= 0, 0 when p == q);
            ``"surrogate"`` returns the AlphaNet reference code's scalar ``-sum q * rho * log q``.
            Gradients are the same in both modes.
        mask: optional bool ``[...]``; ``False`` rows give 0 value and 0 gradient and do not count in
            the mean (a mean over no rows is 0).
        backend: ``"auto"``, ``"cpu"``, ``"reference"`` (``"cuda"``, ``"triton"`` where built);
            ``auto`` honours the ``ALPHADIV_BACKEND`` environment variable.
        return_stats: also return a :class:`~alphadiv_kernels.diagnostics.KDStats` (device tensors, no host
            sync): the share of rows on the alpha_min branch and of weights clipped (see that module).

    Returns:
        The loss in the promoted dtype of the two inputs; the student's gradient has its dtype.
        With ``return_stats``, ``(loss, stats)``. Full semantics and derivation: docs/op.md.
    """
    args = validate_kd_arguments(
        student_logits, teacher_logits, alpha_min=alpha_min, alpha_max=alpha_max, clip=clip,
        temperature=temperature, reduction=reduction, value=value, mask=mask,
    )
    if return_stats:
        loss = fused_adaptive_kd(student_logits, teacher_logits, alpha_min=alpha_min, alpha_max=alpha_max, clip=clip,
                                 temperature=temperature, reduction=reduction, value=value, mask=mask, backend=backend)
        stats = adaptive_kd_stats(args.student.detach(), args.teacher.detach(), alpha_min=float(alpha_min),
                                  alpha_max=float(alpha_max), clip=float(clip), temperature=float(temperature),
                                  mask=args.mask)
        return loss, stats
    chosen = _resolve_backend(backend, student_logits.device)
    if chosen == "reference":
        return adaptive_kd_reference(
            student_logits, teacher_logits, alpha_min=alpha_min, alpha_max=alpha_max, clip=clip,
            temperature=temperature, reduction=reduction, value=value, mask=mask,
        )
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    backend_ops = BACKENDS[chosen]  # "cpu" and "cuda" share the C++ ops: the tensors' device picks the kernel
    eager_training = compute_grad and not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())
    loss_op = backend_ops.loss_op() if eager_training else None
    if loss_op is not None:  # one op call, autograd in C++
        loss = loss_op(args.student, args.teacher, args.mask, float(alpha_min), float(alpha_max), float(clip),
                       float(temperature), args.reduction, args.surrogate)
        return loss.reshape(args.leading_shape) if args.reduction == REDUCTION_NONE else loss
    op = backend_ops.op()
    op_args = OpArgs(  # float(): NumPy scalars are welcome, the schema takes Python floats
        args.student, args.teacher.detach(), args.mask, float(alpha_min), float(alpha_max), float(clip),
        float(temperature), args.reduction, args.surrogate, compute_grad,
    )
    if eager_training:
        loss, _ = _EagerAdaptiveKD.apply(*op_args, op)
    else:
        loss, _ = op(*op_args)
    return loss.reshape(args.leading_shape) if args.reduction == REDUCTION_NONE else loss


# The op's two KL limits: alpha = 1 is KL(p || q), alpha = 0 is KL(q || p); the importance weight of the
# latter unclipped (a bound fp32 holds: terms it would cut are below 1e-38 of a probability).
UNCLIPPED = 3.0e38
SYMMETRIC_KL_BRANCHES = (dict(alpha_min=1.0, alpha_max=1.0), dict(alpha_min=0.0, alpha_max=0.0, clip=UNCLIPPED))


def symmetric_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Symmetric KL distillation, ``T^2 (KL(p || q) + KL(q || p))`` (AlphaNet Table 3), as two calls of the
    fused op: its forward-KL branch (alpha = 1) and its reverse-KL branch (alpha = 0, unclipped). Same
    arguments as :func:`fused_adaptive_kd`; the student's gradient is the sum of the two."""
    common = dict(temperature=temperature, reduction=reduction, mask=mask, backend=backend)
    forward, reverse = (fused_adaptive_kd(student_logits, teacher_logits, **branch, **common)
                        for branch in SYMMETRIC_KL_BRANCHES)
    return forward + reverse


# ---------------------------------------------------------------------------------------------
# torch.library glue: fake implementation and autograd, shared by alphadiv::adaptive_kd (C++: CPU,
# and CUDA where built) and alphadiv::adaptive_kd_triton (the Triton kernel, defined in Python).


def _adaptive_kd_fake(student, teacher, mask, alpha_min, alpha_max, clip, temperature, reduction, surrogate,
                      compute_grad):
    value_dtype = torch.promote_types(student.dtype, teacher.dtype)
    value_shape = (student.shape[0],) if reduction == REDUCTION_NONE else ()
    loss = student.new_empty(value_shape, dtype=value_dtype)
    grad = student.new_empty(student.shape if compute_grad else (0,))
    return loss, grad


# Below this many elements scaling the gradient costs less than reading the incoming one on the host (.item()).
SMALL_GRADIENT = 1 << 16


def _is_exactly_one(grad_loss: torch.Tensor) -> bool:
    # loss.backward() passes 1: skip a pass over [N, C]. Only where reading it costs no sync.
    return grad_loss.device.type == "cpu" and grad_loss.item() == 1.0


def _is_traced(tensor: torch.Tensor) -> bool:
    # torch.compile, opcheck and make_fx hand the backward fake or functional tensor subclasses.
    return torch.compiler.is_compiling() or type(tensor) is not torch.Tensor


def _graph_is_retained() -> bool:
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is None or keep_graph()


def make_autograd(args_type):
    """(setup_context, backward) of an op whose inputs are `args_type` (a NamedTuple with `reduction` and
    `compute_grad`, the student first) and whose outputs are (value, d value / d student)."""

    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)  # no zeros for the gradient output's (absent) gradient
        ctx.save_for_backward(grad)
        args = args_type(*inputs)
        ctx.reduction, ctx.has_grad = args.reduction, args.compute_grad

    def backward(ctx, grad_loss, _unused):
        (grad,) = ctx.saved_tensors
        no_grads = (None,) * (len(args_type._fields) - 1)  # only the student gets a gradient
        if grad_loss is None or not (ctx.has_grad and ctx.needs_input_grad[0]):
            return (None,) + no_grads
        traced = _is_traced(grad) or _is_traced(grad_loss)
        if not traced and torch.is_grad_enabled():
            raise RuntimeError("fused_adaptive_kd has no second derivative: backward with create_graph=True (double "
                               "backward, gradient penalties, Hessians) is not supported")
        scale = grad_loss.unsqueeze(-1) if ctx.reduction == REDUCTION_NONE else grad_loss
        if traced or _graph_is_retained():
            return (grad * scale,) + no_grads  # functional; a retained graph needs the buffer intact
        if ctx.reduction != REDUCTION_NONE and grad.numel() > SMALL_GRADIENT and _is_exactly_one(grad_loss):
            return (grad,) + no_grads
        return (grad.mul_(scale),) + no_grads  # in place: the saved buffer becomes the result

    return setup_context, backward


def make_eager_function(args_type):
    """The op's autograd for eager calls, without torch.library's generic wrapper, which re-reads the
    schema's defaults on every call (about 80 us here, 15% of a 256x1000 step); the same context and
    backward as the registered autograd, which torch.compile, torch.func, opcheck and direct op calls
    use. Old-style forward(ctx, ...): the setup_context style binds its arguments with `inspect` on
    every call, which costs as much again. `apply(*inputs, op)`."""
    setup_context, backward = make_autograd(args_type)

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs_and_op):
            *inputs, op = inputs_and_op
            with torch._C._AutoDispatchBelowAutograd():  # straight to the kernel, past the registered autograd
                output = op(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, grad_loss, _unused):
            return backward(ctx, grad_loss, _unused) + (None,)

    return EagerOp


_EagerAdaptiveKD = make_eager_function(OpArgs)


def register_op(op_name: str, fake, args_type) -> None:
    torch.library.register_fake(op_name)(fake)
    setup_context, backward = make_autograd(args_type)
    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


if _extension.HAS_CPU_EXTENSION:
    register_op("alphadiv::adaptive_kd", _adaptive_kd_fake, OpArgs)

if triton_adaptive_kd.triton is not None:
    torch.library.define("alphadiv::adaptive_kd_triton", SCHEMA)
    # CPU too: Triton's interpreter (TRITON_INTERPRET=1) runs the kernel on CPU tensors.
    torch.library.impl("alphadiv::adaptive_kd_triton", ["CUDA", "CPU"])(triton_adaptive_kd.adaptive_kd_triton)
    register_op("alphadiv::adaptive_kd_triton", _adaptive_kd_fake, OpArgs)
