"""The sparse-teacher op's CUDA kernel against the float64 reference, run on the CPU with CUDA's thread model
emulated (tests/cuda_emulation: csrc/cuda/sparse_adaptive_kd_cuda.cuh compiled with g++)."""
from __future__ import annotations

import functools
import os
import pathlib
import shutil

import pytest
import torch

import alphadiv_kernels as ak
from alphadiv_kernels._validation import validate_sparse_arguments
from conftest import LOGIT_KINDS, assert_close_elementwise, fp32_gradient_floor, make_logits, value_and_grad
from test_sparse_op import ALPHA_PAIRS, BAD_TEACHERS, check_sparse, sparse_teacher, sparse_value_and_grad

SOURCE = pathlib.Path(__file__).parent / "cuda_emulation" / "emulated_sparse_adaptive_kd.cpp"
H100_SHARED_BYTES = 227 * 1024 - 2048


@functools.lru_cache(maxsize=None)
def emulated_kernel():
    from torch.utils.cpp_extension import load, verify_ninja_availability
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    verify_ninja_availability()
    return load(name="alphadiv_sparse_cuda_emulation", sources=[str(SOURCE)],
                extra_cflags=["-O1", "-Wno-unknown-pragmas"], verbose=False)


class _EmulatedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, indices, logprobs, mask, alpha_min, alpha_max, clip, temperature, reduction, surrogate,
                shared_bytes):
        loss, grad = emulated_kernel().sparse_adaptive_kd(student, indices, logprobs, mask, alpha_min, alpha_max, clip,
                                                          temperature, reduction, surrogate, True, shared_bytes)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        scale = grad_loss.unsqueeze(-1) if ctx.reduction == 0 else grad_loss
        return (grad * scale,) + (None,) * 10


def emulated_sparse_kd(student, indices, logprobs, *, alpha_min=-1.0, alpha_max=1.0, clip=5.0, temperature=1.0,
                       reduction="mean", value="divergence", mask=None, shared_bytes=H100_SHARED_BYTES):
    args = validate_sparse_arguments(student, indices, logprobs, alpha_min=alpha_min, alpha_max=alpha_max, clip=clip,
                                     temperature=temperature, reduction=reduction, value=value, mask=mask)
    loss = _EmulatedOp.apply(args.student, args.indices, args.logprobs, args.mask, float(alpha_min),
                             float(alpha_max), float(clip), float(temperature), args.reduction, args.surrogate,
                             shared_bytes)
    return loss.reshape(args.leading_shape) if args.reduction == 0 else loss


@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("k", [1, 5, 37])
def test_emulated_cuda_matches_float64_reference(kind, k, gen):
    student, teacher = make_logits(kind, 5, 37, gen)
    indices, logprobs = sparse_teacher(teacher, k, gen, order="random" if k == 37 else "top")
    for alphas in ALPHA_PAIRS:
        check_sparse(emulated_sparse_kd, student, indices, logprobs, alpha_min=alphas[0], alpha_max=alphas[1],
                     teacher=teacher)


@pytest.mark.parametrize("cols, k", [(300, 300), (700, 290), (2, 1), (1, 1)])
def test_emulated_cuda_rows_longer_than_the_block_and_int32_indices(cols, k, gen):
    student, teacher = make_logits("random", 3, cols, gen)
    indices, logprobs = sparse_teacher(teacher, k, gen, order="random")
    check_sparse(emulated_sparse_kd, student, indices.int(), logprobs, teacher=teacher)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("value", ["divergence", "surrogate"])
def test_emulated_cuda_reductions_value_modes_temperature_mask_and_views(reduction, value, gen):
    student, teacher = make_logits("random", 8, 40, gen)
    indices, logprobs = sparse_teacher(teacher, 6, gen, temperature=2.0)
    mask = torch.rand(8, generator=gen) < 0.6
    mask[0] = True
    check_sparse(emulated_sparse_kd, student.t().contiguous().t(), indices, logprobs, reduction=reduction, value=value,
                 temperature=2.0, mask=mask, teacher=teacher)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_cuda_half_precision(dtype, gen):
    student, teacher = make_logits("random", 4, 64, gen, dtype=dtype)
    indices, logprobs = sparse_teacher(teacher, 8, gen)
    eps = torch.finfo(dtype).eps
    check_sparse(emulated_sparse_kd, student, indices, logprobs, value_rtol=eps, value_atol=1e-6, grad_rtol=eps,
                 grad_atol=2.0**-24 + 1e-7 / 4, teacher=teacher)


@pytest.mark.parametrize("bad", BAD_TEACHERS)
def test_emulated_cuda_bad_teacher_entries_make_their_row_nan(bad, gen):
    student, teacher = make_logits("random", 4, 20, gen)
    indices, logprobs = BAD_TEACHERS[bad](*sparse_teacher(teacher, 4, gen))
    value, grad = sparse_value_and_grad(emulated_sparse_kd, student, indices, logprobs, reduction="none")
    bad_row = 1 if bad == "duplicate" else 2 if bad in ("out_of_range", "negative") else 0
    assert value[bad_row].isnan() and bool(grad[bad_row].isnan().all())
    assert bool(value[[row for row in range(4) if row != bad_row]].isfinite().all())


def test_emulated_cuda_vocabulary_beyond_shared_memory_is_one_clear_error(gen):
    student, teacher = make_logits("random", 2, 4096, gen)
    indices, logprobs = sparse_teacher(teacher, 4, gen)
    with pytest.raises(ValueError, match="shared memory"):
        emulated_sparse_kd(student, indices, logprobs, shared_bytes=256)


@pytest.mark.parametrize("kind", ["random", "confident_teacher", "masked_classes", "huge_gaps"])
def test_emulated_cuda_all_classes_equal_the_emulated_dense_kernel(kind, gen):
    from test_cuda_kernel_emulated import emulated_cuda_kd
    student, teacher = make_logits(kind, 6, 37, gen)
    indices, logprobs = sparse_teacher(teacher, 37, gen, order="random")
    for alphas in [(-1.0, 1.0), (0.0, 0.0), (1.0, 1.0)]:
        kwargs = dict(alpha_min=alphas[0], alpha_max=alphas[1], reduction="none")
        value, grad = sparse_value_and_grad(emulated_sparse_kd, student, indices, logprobs, **kwargs)
        dense_value, dense_grad = value_and_grad(emulated_cuda_kd, student, teacher, **kwargs)
        d_lo, d_hi = (ak.adaptive_kd_reference(student.double(), teacher.double(), alpha_min=a, alpha_max=a,
                                               reduction="none") for a in alphas)
        untied = ((d_lo - d_hi).abs() > 1e-4 * torch.maximum(d_lo.abs(), d_hi.abs()) + 1e-6) | (alphas[0] == alphas[1])
        torch.testing.assert_close(value[untied], dense_value[untied], rtol=2e-5, atol=1e-6, equal_nan=True)
        floor = fp32_gradient_floor(student, teacher, 1.0, "none")  # both within it of the float64 computation
        assert_close_elementwise(grad[untied], dense_grad[untied], 1e-4, 2 * floor[untied])

