"""`fused_linear_adaptive_kd`: the output projection and the adaptive KD loss, chunk by chunk.

Distilling a language model, the student's and the teacher's logits and the logits' gradient are
three `[tokens, vocab]` tensors, often larger than the model's activations. Here the logits of one
chunk of rows exist at a time: per chunk,

    s = x_c W_s^T + b_s,   t = x_t,c W_t^T + b_t           (the teacher under no_grad)
    loss_c, g = the fused op on (s, t), reduction "sum"    (g = d loss_c / d s, from the op's forward)
    dx_c = g W_s,   dW_s += g^T x_c,   db_s += sum_rows g  (dW_s, db_s accumulate in float32; float64 weights in float64)

so the gradients of the student's input, weight and bias are complete when the forward returns,
and the backward only scales them by the incoming gradient. A mean divides by the number of valid
rows at the end (a device scalar: no host synchronisation). The teacher is never differentiated.
`reduction="none"` returns a value per row, and its backward, which gets a weight per row, recomputes
each chunk's logits instead (the weight gradient sums rows with their weights, so it cannot be scaled
afterwards). Heads of different row counts are compared on their shared rows (`vocabulary.py`).
`fused_linear_sparse_adaptive_kd` is the same loop with a teacher given as its top-k log-probabilities per
row (a cache, or a live teacher's top-k): only the student's head is projected.

Chunk size (rows), unless given: every method holds the float32 weight gradient (V x H x 4 bytes);
the chunk's three `[chunk, V]` temporaries (student logits, teacher logits, their gradient, of
`itemsize` bytes each) are kept below 3/4 of it, and a chunk is a power of two of at most N rows:

    3 * chunk * V * itemsize <= 0.75 * V * H * 4   =>   chunk = clamp(2 ** floor(log2(H / itemsize)), 1, N)

e.g. N = 4096 tokens, H = 1024, V = 32000, float32: 256 rows, 3 x 256 x 32000 x 4 B = 98 MB of
logits, where the unfused computation holds 3 x 4096 x 32000 x 4 B = 1.5 GB. Larger chunks make
better matrix products (fewer, fuller GEMMs, and fewer passes over the weight gradient).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from ._validation import check_backend, check_loss_parameters, check_sparse_teacher_shapes
from ._constants import REDUCTION_NONE, REDUCTION_SUM
from ._contract import BACKENDS
from .adaptive_kd import _graph_is_retained, _resolve_backend, fused_adaptive_kd
from .sparse import fused_sparse_adaptive_kd
from .diagnostics import KDStats, adaptive_kd_stats
from .vocabulary import shared_vocabulary

REDUCTIONS = ("mean", "sum", "none")


def default_chunk_size(rows: int, hidden: int, itemsize: int) -> int:
    """Rows per chunk (see the module doc): the largest power of two <= H / itemsize, within [1, N]."""
    target = hidden / itemsize
    chunk = 2 ** math.floor(math.log2(target)) if target >= 1 else 1
    return max(1, min(rows, chunk))


def _check_settings(alpha_min, alpha_max, clip, temperature, reduction, chunk_size, backend) -> None:
    """The loss settings, for the function and (at construction) the module."""
    check_loss_parameters(alpha_min, alpha_max, clip, temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a whole number of rows >= 1, got {chunk_size!r}")
    check_backend(backend)


def _check_tensors(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, mask):
    for name, tensor in (("student_input", student_input), ("student_weight", student_weight),
                         ("teacher_input", teacher_input), ("teacher_weight", teacher_weight)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if student_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError(f"the weights must be [V, H] matrices, got {list(student_weight.shape)} and "
                         f"{list(teacher_weight.shape)}")
    if student_input.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"student_input's last dimension ({student_input.shape[-1]}) must equal student_weight's "
                         f"hidden size ({student_weight.shape[1]})")
    if teacher_input.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(f"teacher_input's last dimension ({teacher_input.shape[-1]}) must equal teacher_weight's "
                         f"hidden size ({teacher_weight.shape[1]})")
    for role, tensors in (("student", (student_input, student_weight, student_bias, mask)),
                          ("teacher", (teacher_input, teacher_weight, teacher_bias))):
        devices = {tensor.device for tensor in tensors if isinstance(tensor, torch.Tensor)}
        if len(devices) > 1:
            raise ValueError(f"the {role}'s tensors must be on one device, got {', '.join(map(str, devices))}")
    if student_input.shape[:-1] != teacher_input.shape[:-1]:
        raise ValueError(f"student_input and teacher_input must have the same leading shape, got "
                         f"{list(student_input.shape[:-1])} and {list(teacher_input.shape[:-1])}")
    for name, bias, weight in (("student_bias", student_bias, student_weight),
                               ("teacher_bias", teacher_bias, teacher_weight)):
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
            raise ValueError(f"{name} must be a [{weight.shape[0]}] tensor")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                             or mask.shape != student_input.shape[:-1]):
        raise ValueError(f"mask must be a bool tensor of shape {list(student_input.shape[:-1])}")


def _leading_rows(tensor: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
    return tensor if tensor is None or tensor.shape[0] == rows else tensor[:rows]


class _DenseTeacher:
    """A teacher given by its hidden states and output projection: the chunk's logits, projected on its device."""

    sparse = False

    def __init__(self, x, weight, bias=None):
        self.x, self.weight, self.bias = x, weight, bias  # the weight and bias already cut to the shared rows
        self.dtype = x.dtype

    def tensors(self) -> List[torch.Tensor]:
        return [self.x, self.weight] + ([] if self.bias is None else [self.bias])

    def chunk(self, rows: slice, device) -> tuple:
        logits = torch.nn.functional.linear(self.x[rows], self.weight, self.bias)
        return (logits.to(device, non_blocking=True),)  # a teacher on another device projects there

    @staticmethod
    def kernel(backend: str):
        return BACKENDS[backend].op()

    @staticmethod
    def loss(logits, teacher, **kwargs):
        return fused_adaptive_kd(logits, *teacher, **kwargs)

    @staticmethod
    def stats(logits, teacher, mask, loss_args):
        return adaptive_kd_stats(logits, *teacher, mask=mask, **{k: v for k, v in loss_args.items() if k != "backend"})


class _SparseTeacher:
    """A teacher given by its top-k classes and log-probabilities per row (`fused_sparse_adaptive_kd`)."""

    sparse = True

    def __init__(self, indices, logprobs):
        self.indices, self.logprobs, self.dtype = indices, logprobs, logprobs.dtype

    def tensors(self) -> List[torch.Tensor]:
        return [self.indices, self.logprobs]

    def chunk(self, rows: slice, device) -> tuple:
        return self.indices[rows].to(device, non_blocking=True), self.logprobs[rows].to(device, non_blocking=True)

    @staticmethod
    def kernel(backend: str):
        return BACKENDS[backend].sparse_op()

    @staticmethod
    def loss(logits, teacher, **kwargs):
        return fused_sparse_adaptive_kd(logits, *teacher, **kwargs)


def _teacher_of(tensors: List[torch.Tensor], sparse: bool):
    return _SparseTeacher(*tensors) if sparse else _DenseTeacher(*tensors)


class _Chunks:
    """The chunk loop both autograd functions share: the student's logits of one chunk on the shared rows with the
    teacher's chunk, and the gradients of the student's input, weight and bias from the chunk's logit gradient."""

    def __init__(self, x, weight, bias, teacher, mask, vocab, chunk_size, needs):
        self.x, self.teacher, self.mask = x, teacher, mask
        self.chunk_size = chunk_size or default_chunk_size(x.shape[0], x.shape[1], x.element_size())
        self.weight, self.bias = _leading_rows(weight, vocab), _leading_rows(bias, vocab)
        need_x, need_w, need_b = needs[0], needs[1], bias is not None and needs[2]
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for float64 weights
        self.accumulate = accumulate
        self.grad_x = torch.zeros_like(x) if need_x else None
        # Full-size gradients (the rows past the shared vocabulary stay 0), written through views of the shared rows.
        self.grad_w = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_w else None
        self.grad_b = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if need_b else None
        self.need_grad = need_x or need_w or need_b

    def __iter__(self):
        """(rows, student logits, the teacher's chunk, mask) per chunk."""
        for start in range(0, self.x.shape[0], self.chunk_size):
            rows = slice(start, min(start + self.chunk_size, self.x.shape[0]))
            logits = torch.nn.functional.linear(self.x[rows], self.weight, self.bias)
            yield rows, logits, self.teacher.chunk(rows, logits.device), None if self.mask is None else self.mask[rows]

    def add_gradient(self, rows: slice, grad_logits: torch.Tensor) -> None:
        vocab = grad_logits.shape[1]
        if self.grad_x is not None:
            self.grad_x[rows] = grad_logits @ self.weight
        if self.grad_w is not None:
            shared = self.grad_w[:vocab]
            if grad_logits.dtype == self.accumulate:
                shared.addmm_(grad_logits.t(), self.x[rows])  # no [V, H] temporary
            else:  # 16-bit matmul (fp32 inside the GEMM), accumulated across chunks in fp32
                shared += (grad_logits.t() @ self.x[rows]).to(self.accumulate)
        if self.grad_b is not None:
            self.grad_b[:vocab] += grad_logits.to(self.accumulate).sum(0)

    def gradients(self, scale: Optional[torch.Tensor], like: Tuple[torch.Tensor, ...]):
        grads = []
        for grad, tensor in zip((self.grad_x, self.grad_w, self.grad_b), like):
            if grad is not None and scale is not None:
                grad = grad.mul_(scale)
            grads.append(None if grad is None else grad.to(tensor.dtype))
        return grads


def _chunk_loss(teacher, kernel, logits, teacher_chunk, mask, reduction: int, compute_grad: bool, loss_args):
    """One chunk's value and (compute_grad) its gradient wrt the chunk's logits, per row for REDUCTION_NONE.
    A kernel writes the gradient in its forward (called below autograd: this also runs inside a custom op);
    the eager reference (kernel None) gets it from autograd."""
    if kernel is not None:
        with torch._C._AutoDispatchBelowAutograd():
            value, grad = kernel(logits, *teacher_chunk, mask, loss_args["alpha_min"], loss_args["alpha_max"],
                                 loss_args["clip"], loss_args["temperature"], reduction, False, compute_grad)
        return value, grad if compute_grad else None
    name = {REDUCTION_NONE: "none", REDUCTION_SUM: "sum"}[reduction]
    if not compute_grad:
        return teacher.loss(logits, teacher_chunk, reduction=name, mask=mask, **loss_args), None
    leaf = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        value = teacher.loss(leaf, teacher_chunk, reduction=name, mask=mask, **loss_args)
        (grad,) = torch.autograd.grad(value.sum(), leaf)  # rows are independent: the sum gives each row's own
    return value.detach(), grad


def _kernel(teacher, loss_args, device):
    chosen = _resolve_backend(loss_args["backend"], device)
    return None if chosen == "reference" else teacher.kernel(chosen)


def _stats_vector(stats: Optional[KDStats], device) -> torch.Tensor:
    return torch.stack(tuple(stats)) if stats is not None else torch.zeros(4, dtype=torch.float64, device=device)


def _forward(x, weight, bias, mask, teacher, loss_args, reduction, chunk_size, vocab, with_stats, needs):
    """The chunk loop: (the loss or, for "none", its values per row, the stats vector, the student's gradients).
    For "mean" / "sum" the gradients of (x, weight, bias) are complete (None where not needed); "none" has none."""
    kernel = _kernel(teacher, loss_args, x.device)
    stats = KDStats.zeros(x.device) if with_stats else None
    value_dtype = torch.promote_types(x.dtype, teacher.dtype)
    if reduction == "none":
        chunks = _Chunks(x, weight, bias, teacher, mask, vocab, chunk_size, (False, False, False))
        values = torch.empty(x.shape[0], dtype=value_dtype, device=x.device)
        for rows, logits, teacher_chunk, chunk_mask in chunks:
            if with_stats:
                stats = stats + teacher.stats(logits, teacher_chunk, chunk_mask, loss_args)
            values[rows], _ = _chunk_loss(teacher, kernel, logits, teacher_chunk, chunk_mask, REDUCTION_NONE, False,
                                          loss_args)
        return values, _stats_vector(stats, x.device), [None, None, None]
    chunks = _Chunks(x, weight, bias, teacher, mask, vocab, chunk_size, needs)
    total = torch.zeros((), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for rows, logits, teacher_chunk, chunk_mask in chunks:
        if with_stats:
            stats = stats + teacher.stats(logits, teacher_chunk, chunk_mask, loss_args)
        loss, grad_logits = _chunk_loss(teacher, kernel, logits, teacher_chunk, chunk_mask, REDUCTION_SUM,
                                        chunks.need_grad, loss_args)
        total += loss.to(total.dtype)
        del logits, teacher_chunk, loss
        if grad_logits is not None:
            chunks.add_gradient(rows, grad_logits)
        del grad_logits
    scale = None
    if reduction == "mean":
        count = mask.sum() if mask is not None else torch.tensor(x.shape[0], device=x.device)
        scale = 1.0 / count.clamp(min=1).to(total.dtype)
        total = total * scale
    return total.to(value_dtype), _stats_vector(stats, x.device), chunks.gradients(scale, (x, weight, bias))


def _rows_backward(x, weight, bias, mask, teacher, loss_args, chunk_size, vocab, grad_values, needs):
    """Gradients of sum_i grad_values[i] * value_i (reduction "none"): each chunk's logits again, weighted rows."""
    kernel = _kernel(teacher, loss_args, x.device)
    chunks = _Chunks(x, weight, bias, teacher, mask, vocab, chunk_size, needs)
    for rows, logits, teacher_chunk, chunk_mask in chunks:
        _, grad_logits = _chunk_loss(teacher, kernel, logits, teacher_chunk, chunk_mask, REDUCTION_NONE, True,
                                     loss_args)
        del logits, teacher_chunk
        chunks.add_gradient(rows, grad_logits.mul_(grad_values[rows].unsqueeze(-1).to(grad_logits.dtype)))
    return chunks.gradients(None, (x, weight, bias))


class _FusedLinearAdaptiveKD(torch.autograd.Function):
    """Eager autograd, reduction "mean" / "sum": the gradients are complete when the forward returns."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, teacher, loss_args, reduction, chunk_size, vocab, with_stats):
        value, stats_vector, grads = _forward(x, weight, bias, mask, teacher, loss_args, reduction, chunk_size, vocab,
                                              with_stats, ctx.needs_input_grad[:3])
        # Kept on ctx rather than saved: the backward hands them over, and a leaf's AccumulateGrad can only
        # adopt a gradient nothing else references (a saved tensor would make it copy the [V, H] one).
        ctx.grads = grads
        ctx.mark_non_differentiable(stats_vector)
        return value, stats_vector

    @staticmethod
    def backward(ctx, grad_loss, _stats):
        if torch.is_grad_enabled():
            raise RuntimeError("fused_linear_adaptive_kd has no second derivative (create_graph=True)")
        # A graph kept for another backward keeps the gradients and gets scaled copies. Otherwise they are
        # handed over (loss.backward() passes 1: no pass over the [V, H] weight gradient) or scaled in place.
        if _graph_is_retained():
            grads = [None if grad is None else grad * grad_loss for grad in ctx.grads]
        else:
            grads, ctx.grads = ctx.grads, None
            if not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
                grads = [None if grad is None else grad.mul_(grad_loss) for grad in grads]
        return (*grads, *(None,) * 7)


class _FusedLinearAdaptiveKDRows(torch.autograd.Function):
    """Eager autograd, reduction "none": the forward computes the per-row values only; the backward, given a
    gradient per row, recomputes each chunk's logits and takes their weighted gradient (one more pass of both
    projections)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, teacher, loss_args, chunk_size, vocab, with_stats):
        values, stats_vector, _ = _forward(x, weight, bias, mask, teacher, loss_args, "none", chunk_size, vocab,
                                           with_stats, (False, False, False))
        ctx.save_for_backward(x, weight, bias, mask)
        ctx.settings = (teacher, loss_args, chunk_size, vocab)  # the teacher is never differentiated
        ctx.mark_non_differentiable(stats_vector)
        return values, stats_vector

    @staticmethod
    def backward(ctx, grad_values, _stats):
        if torch.is_grad_enabled():
            raise RuntimeError("fused_linear_adaptive_kd has no second derivative (create_graph=True)")
        x, weight, bias, mask = ctx.saved_tensors
        teacher, loss_args, chunk_size, vocab = ctx.settings
        grads = _rows_backward(x, weight, bias, mask, teacher, loss_args, chunk_size, vocab, grad_values,
                               ctx.needs_input_grad[:3])
        return (*grads, *(None,) * 6)


# ---------------------------------------------------------------------------------------------
# Under torch.compile: the same chunk loop as custom ops, opaque to the compiler, so the graph around the loss
# compiles whole and with dynamic shapes (the chunk count depends on the rows; the chunk size is chosen inside).
# The gradients are outputs of the forward op and the backward scales them (one more [V, H] buffer than the
# eager path, which hands them over); "none" has a backward op that recomputes the chunks.

_EMPTY = (0,)


def _placeholder(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(_EMPTY) if grad is None else grad


@torch.library.custom_op("alphadiv::fused_linear_adaptive_kd", mutates_args=())
def _fused_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                     teacher: List[torch.Tensor], sparse: bool, alpha_min: float, alpha_max: float, clip: float,
                     temperature: float, backend: str, reduction: str, chunk_size: int, vocab: int, with_stats: bool,
                     needs: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss_args = dict(alpha_min=alpha_min, alpha_max=alpha_max, clip=clip, temperature=temperature, backend=backend)
    value, stats_vector, grads = _forward(x, weight, bias, mask, _teacher_of(teacher, sparse), loss_args, reduction,
                                          chunk_size, vocab, with_stats, needs)
    return (value, stats_vector, *(_placeholder(grad, x) for grad in grads))


@torch.library.custom_op("alphadiv::fused_linear_adaptive_kd_rows_backward", mutates_args=())
def _rows_backward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                      teacher: List[torch.Tensor], sparse: bool, alpha_min: float, alpha_max: float, clip: float,
                      temperature: float, backend: str, chunk_size: int, vocab: int, grad_values: torch.Tensor,
                      needs: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss_args = dict(alpha_min=alpha_min, alpha_max=alpha_max, clip=clip, temperature=temperature, backend=backend)
    grads = _rows_backward(x, weight, bias, mask, _teacher_of(teacher, sparse), loss_args, chunk_size, vocab,
                           grad_values, needs)
    return tuple(_placeholder(grad, x) for grad in grads)


def _fake_gradients(x, weight, bias, needs):
    return tuple(tensor.new_empty(tensor.shape) if tensor is not None and need else x.new_empty(_EMPTY)
                 for tensor, need in zip((x, weight, bias), needs))


@_fused_linear_op.register_fake
def _(x, weight, bias, mask, teacher, sparse, alpha_min, alpha_max, clip, temperature, backend, reduction, chunk_size,
      vocab, with_stats, needs):
    value_dtype = torch.promote_types(x.dtype, teacher[1].dtype if sparse else teacher[0].dtype)
    value = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=value_dtype)
    grads = _fake_gradients(x, weight, bias, (False,) * 3 if reduction == "none" else needs)
    return (value, x.new_empty((4,), dtype=torch.float64), *grads)


@_rows_backward_op.register_fake
def _(x, weight, bias, mask, teacher, sparse, alpha_min, alpha_max, clip, temperature, backend, chunk_size, vocab,
      grad_values, needs):
    return _fake_gradients(x, weight, bias, needs)


def _op_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.inputs = inputs
    ctx.reduction = inputs[11]
    if ctx.reduction == "none":
        x, weight, bias, mask, teacher = inputs[:5]
        ctx.save_for_backward(x, weight, bias, mask, *teacher)
    else:
        ctx.save_for_backward(*output[2:])


def _op_backward(ctx, grad_value, *_unused):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("fused_linear_adaptive_kd has no second derivative (create_graph=True)")
    needs = ctx.needs_input_grad[:3]
    if ctx.reduction == "none":
        x, weight, bias, mask, *teacher = ctx.saved_tensors
        _, _, _, _, _, sparse, alpha_min, alpha_max, clip, temperature, backend, _, chunk_size, vocab = ctx.inputs[:14]
        grads = _rows_backward_op(x, weight, bias, mask, teacher, sparse, alpha_min, alpha_max, clip, temperature,
                                  backend, chunk_size, vocab, grad_value, list(needs))
    else:
        grads = [grad * grad_value for grad in ctx.saved_tensors]
    teacher_grads = [None] * len(ctx.inputs[4])  # the teacher (a list input) is never differentiated
    return (*(grad if need else None for grad, need in zip(grads, needs)), None, teacher_grads, *(None,) * 11)


_fused_linear_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _apply(x, weight, bias, mask, teacher, loss_args, reduction, chunk, vocab, with_stats, leading_shape):
    """The loss (values reshaped to `leading_shape` for "none") and the stats vector."""
    if torch.compiler.is_compiling():
        if _resolve_backend(loss_args["backend"], x.device) == "reference":
            raise RuntimeError("the fused projection under torch.compile needs a compiled kernel (backend 'cpu', "
                               "'cuda' or 'triton'); the eager reference runs in eager mode only")
        needs = [torch.is_grad_enabled() and tensor is not None and tensor.requires_grad for tensor in (x, weight, bias)]
        value, stats, *_ = _fused_linear_op(x, weight, bias, mask, teacher.tensors(), teacher.sparse,
                                            loss_args["alpha_min"], loss_args["alpha_max"], loss_args["clip"],
                                            loss_args["temperature"], loss_args["backend"], reduction, chunk or 0,
                                            vocab, with_stats, needs)
    elif reduction == "none":
        value, stats = _FusedLinearAdaptiveKDRows.apply(x, weight, bias, mask, teacher, loss_args, chunk, vocab,
                                                        with_stats)
    else:
        value, stats = _FusedLinearAdaptiveKD.apply(x, weight, bias, mask, teacher, loss_args, reduction, chunk,
                                                    vocab, with_stats)
    return (value.reshape(leading_shape) if reduction == "none" else value), stats


def fused_linear_adaptive_kd(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    clip: float = 5.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    tokenizer_size: Optional[int] = None,
    return_stats: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, KDStats]]:
    """``fused_adaptive_kd(student_input @ student_weight.T + student_bias, teacher_input @ teacher_weight.T +
    teacher_bias)`` without ever holding the ``[N, V]`` logits (see the module doc).

    Args:
        student_input: ``[..., H]`` hidden states of the student (differentiated).
        student_weight, student_bias: ``[V_s, H]`` and ``[V_s]`` output projection of the student (differentiated
            when they require grad; a frozen head gets no gradient and no ``[V, H]`` buffer).
        teacher_input, teacher_weight, teacher_bias: the teacher's ``[..., H_t]``, ``[V_t, H_t]``, ``[V_t]``
            (``H_t`` may differ from ``H``; never differentiated; any dtype, and any device: each chunk of
            teacher logits is projected there and copied to the student's device).
        alpha_min, alpha_max, clip, temperature, backend: as :func:`fused_adaptive_kd`.
        reduction: ``"mean"`` over unmasked rows, ``"sum"``, or ``"none"`` (``[...]``, masked rows 0; its
            backward recomputes each chunk's logits to weight the rows by their incoming gradient).
        mask: optional bool ``[...]``; ``False`` rows (padding, prompt tokens) give 0 and do not count.
        chunk_size: rows per chunk (default: :func:`default_chunk_size`).
        vocab_size, tokenizer_size: heads of different row counts (a padded embedding) are compared on their
            first ``vocab_size`` rows, by default the smaller head's; ``tokenizer_size`` (``len(tokenizer)``)
            checks that every token has a row in both (see :mod:`alphadiv_kernels.vocabulary`).
        return_stats: also return a :class:`~alphadiv_kernels.diagnostics.KDStats` of the call (device tensors).
    """
    _check_tensors(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, mask)
    _check_settings(alpha_min, alpha_max, clip, temperature, reduction, chunk_size, backend)
    vocab = shared_vocabulary(student_weight.shape[0], teacher_weight.shape[0], vocab_size, tokenizer_size)
    x = student_input.reshape(-1, student_input.shape[-1])
    teacher_x = teacher_input.reshape(-1, teacher_input.shape[-1]).detach()
    flat_mask = None if mask is None else mask.reshape(-1)
    loss_args = dict(alpha_min=float(alpha_min), alpha_max=float(alpha_max), clip=float(clip),
                     temperature=float(temperature), backend=backend)
    teacher = _DenseTeacher(teacher_x, _leading_rows(teacher_weight.detach(), vocab),
                            None if teacher_bias is None else _leading_rows(teacher_bias.detach(), vocab))
    values, stats = _apply(x, student_weight, student_bias, flat_mask, teacher, loss_args, reduction, chunk_size,
                           vocab, return_stats, student_input.shape[:-1])
    return (values, KDStats(*stats.unbind())) if return_stats else values


def fused_linear_sparse_adaptive_kd(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    clip: float = 5.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    tokenizer_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``fused_sparse_adaptive_kd(student_input @ student_weight.T + student_bias, topk_indices, topk_logprobs)``
    chunk by chunk, without the ``[N, V]`` logits: the teacher is its top-k classes and log-probabilities per
    row (a cache made by ``alphadiv-cache-teacher``, or a live teacher's ``topk``).

    Args:
        student_input, student_weight, student_bias: as :func:`fused_linear_adaptive_kd`.
        topk_indices, topk_logprobs: ``[..., k]`` (int32 / int64, and floating), rows as ``student_input``'s;
            any device (each chunk is copied to the student's).
        vocab_size: the student's rows the softmax covers (default all of them; a padded head's extra rows
            are cut by giving the shared size, e.g. the teacher's row count from the cache's manifest); every
            index must be below it. ``tokenizer_size`` checks that it covers the tokenizer.
        reduction, mask, chunk_size, alpha_min, alpha_max, clip, temperature, backend: as
            :func:`fused_linear_adaptive_kd` (the temperature divides the student's logits; the cached
            log-probabilities are used as given).
    """
    if not isinstance(student_weight, torch.Tensor) or student_weight.dim() != 2:
        raise ValueError("student_weight must be a [V, H] matrix")
    check_sparse_teacher_shapes(student_input, topk_indices, topk_logprobs,
                                names=("student_input", "topk_indices", "topk_logprobs"))
    if student_input.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"student_input's last dimension ({student_input.shape[-1]}) must equal student_weight's "
                         f"hidden size ({student_weight.shape[1]})")
    if student_bias is not None and (not isinstance(student_bias, torch.Tensor)
                                     or student_bias.shape != student_weight.shape[:1]):
        raise ValueError(f"student_bias must be a [{student_weight.shape[0]}] tensor")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                             or mask.shape != student_input.shape[:-1]):
        raise ValueError(f"mask must be a bool tensor of shape {list(student_input.shape[:-1])}")
    _check_settings(alpha_min, alpha_max, clip, temperature, reduction, chunk_size, backend)
    rows = student_weight.shape[0]
    vocab = shared_vocabulary(rows, rows, vocab_size, tokenizer_size)
    x = student_input.reshape(-1, student_input.shape[-1])
    k = topk_indices.shape[-1]
    teacher = _SparseTeacher(topk_indices.reshape(-1, k), topk_logprobs.detach().reshape(-1, k))
    loss_args = dict(alpha_min=float(alpha_min), alpha_max=float(alpha_max), clip=float(clip),
                     temperature=float(temperature), backend=backend)
    flat_mask = None if mask is None else mask.reshape(-1)
    values, _ = _apply(x, student_weight, student_bias, flat_mask, teacher, loss_args, reduction, chunk_size, vocab,
                       False, student_input.shape[:-1])
    return values


class FusedLinearAdaptiveKDLoss(nn.Module):
    """The module form: ``loss_fn(student_input, student_weight, teacher_input, teacher_weight, student_bias=None,
    teacher_bias=None, mask=None)``; settings checked at construction (``vocab_size`` when the call sees the
    heads)."""

    def __init__(self, alpha_min: float = -1.0, alpha_max: float = 1.0, clip: float = 5.0, *,
                 temperature: float = 1.0, reduction: str = "mean", chunk_size: Optional[int] = None,
                 vocab_size: Optional[int] = None, backend: str = "auto") -> None:
        super().__init__()
        _check_settings(alpha_min, alpha_max, clip, temperature, reduction, chunk_size, backend)
        self.settings = dict(alpha_min=float(alpha_min), alpha_max=float(alpha_max), clip=float(clip),
                             temperature=float(temperature), reduction=reduction, chunk_size=chunk_size,
                             vocab_size=vocab_size, backend=backend)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, student_bias=None,
                teacher_bias=None, mask=None):
        return fused_linear_adaptive_kd(student_input, student_weight, teacher_input, teacher_weight,
                                        student_bias=student_bias, teacher_bias=teacher_bias, mask=mask,
                                        **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings.items())
