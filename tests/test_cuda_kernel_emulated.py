"""The CUDA kernel against the float64 reference, run on the CPU with CUDA's thread model emulated.

tests/cuda_emulation compiles csrc/cuda/adaptive_kd_cuda.cuh (the kernel, its launch plan and host
wrapper) with g++ and runs every CUDA thread as a fiber: warp shuffles, __syncthreads, 128-bit packs,
the register and shared-memory caches and the streamed rest of long rows all execute as written.
Shapes are chosen to reach each launch path: warp per row (packs or single elements), block per row
with 1, 2, 4 or the maximum packs in registers, rows split between registers, shared memory and the
stream, and the strided fallback.

The build adds UBSan's alignment check: a 16-byte pack read from an address a GPU would fault on
aborts the test process (run with -s to see UBSan's message).
"""
from __future__ import annotations

import functools
import os
import pathlib
import shutil

import pytest
import torch

from alphadiv_kernels._validation import validate_kd_arguments
from conftest import (LOGIT_KINDS, assert_bf16_rows_within_half_percent, check_against_reference,
                      check_symmetric_kl, half_precision_tolerances, make_logits, value_and_grad)

SOURCE = pathlib.Path(__file__).parent / "cuda_emulation" / "emulated_adaptive_kd.cpp"


@functools.lru_cache(maxsize=None)
def emulated_kernel():
    """The kernel built with g++ (cached by torch in ~/.cache/torch_extensions). A compile error fails."""
    from torch.utils.cpp_extension import load, verify_ninja_availability
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    verify_ninja_availability()
    return load(name="alphadiv_cuda_emulation", sources=[str(SOURCE)],
                extra_cflags=["-O1", "-Wno-unknown-pragmas", "-fsanitize=alignment",
                              "-fno-sanitize-recover=alignment"],
                extra_ldflags=["-fsanitize=alignment"], verbose=False)


H100_SHARED_BYTES = 227 * 1024 - 2048  # what the CUDA launcher offers a block on an H100


class _EmulatedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, mask, alpha_min, alpha_max, clip, temperature, reduction, surrogate,
                shared_bytes):
        loss, grad = emulated_kernel().adaptive_kd(student, teacher, mask, alpha_min, alpha_max, clip, temperature,
                                                   reduction, surrogate, True, shared_bytes)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        scale = grad_loss.unsqueeze(-1) if ctx.reduction == 0 else grad_loss
        return (grad * scale,) + (None,) * 9


def emulated_cuda_kd(student, teacher, *, alpha_min=-1.0, alpha_max=1.0, clip=5.0, temperature=1.0,
                     reduction="mean", value="divergence", mask=None, shared_bytes=H100_SHARED_BYTES):
    """fused_adaptive_kd's semantics on the emulated CUDA kernel, with `shared_bytes` of shared memory."""
    args = validate_kd_arguments(student, teacher, alpha_min=alpha_min, alpha_max=alpha_max, clip=clip,
                                 temperature=temperature, reduction=reduction, value=value, mask=mask)
    loss = _EmulatedOp.apply(args.student, args.teacher.detach(), args.mask, float(alpha_min), float(alpha_max),
                             float(clip), float(temperature), args.reduction, args.surrogate, shared_bytes)
    return loss.reshape(args.leading_shape) if args.reduction == 0 else loss


# (rows, cols) -> launch path for fp32: 13x37 warp, single elements, rows not a multiple of 8 rows per
# block; 9x1000 warp, packs of 4, 8 in registers; 3x2000 block, 1 pack; 2x4000 block, 2 packs; 2x8000
# block, 4 packs; 2x16384 block, 8 packs (the whole row in registers); 2x20000 block, 8 packs + 2 in
# shared memory; 2x4099 block, single elements, 8 in registers + 1 in shared memory.
LAUNCH_PATH_SHAPES = [(1, 1), (7, 2), (13, 37), (9, 1000), (3, 2000), (2, 4000), (2, 8000), (2, 16384), (2, 20000),
                      (2, 4099)]


@pytest.mark.parametrize("alphas", [(-1.0, 1.0), (-2.0, 0.5), (0.0, 1.0), (1.0, 1.0)],
                         ids=lambda a: f"alpha{a[0]:g},{a[1]:g}")
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 2), (13, 37), (9, 1000), (2, 4000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_emulated_cuda_kernel_matches_float64_reference(shape, kind, alphas, gen):
    student, teacher = make_logits(kind, *shape, gen)
    check_against_reference(emulated_cuda_kd, student, teacher, alpha_min=alphas[0], alpha_max=alphas[1])


@pytest.mark.parametrize("shape", LAUNCH_PATH_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["random", "confident_teacher", "masked_classes", "huge_gaps"])
def test_emulated_cuda_kernel_every_launch_path(shape, kind, gen):
    student, teacher = make_logits(kind, *shape, gen)
    check_against_reference(emulated_cuda_kd, student, teacher, alpha_min=-2.0, alpha_max=0.5)


# (dtype, cols, shared bytes): the row split between registers, shared memory and the streamed rest.
# A round of packs (one per thread of 512) of both inputs is 16 KB in packs, 2 KB/4 KB as fp16/fp32 elements.
TIERS = [
    (torch.float32, 20000, 0),          # 8 packs per thread in registers, 2 streamed
    (torch.float32, 20000, 16384),      # 8 in registers, 1 in shared memory, 1 streamed
    (torch.float32, 20000, 65536),      # 8 in registers, 2 in shared memory: the row on chip
    (torch.bfloat16, 40000, 32768),     # 4 in registers, 2 in shared memory, 4 streamed
    (torch.float32, 9001, 16384),       # single elements: 8 in registers, 4 in shared memory, 6 streamed
    (torch.float16, 9001, 4096),        # single elements: 8 in registers, 2 in shared memory, 8 streamed
]


@pytest.mark.parametrize("dtype,cols,shared_bytes", TIERS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("alphas", [(-1.0, 1.0), (-2.0, 0.5)], ids=str)
def test_emulated_cuda_rows_split_between_registers_shared_memory_and_stream(dtype, cols, shared_bytes, alphas, gen):
    student, teacher = make_logits("confident_teacher", 2, cols, gen, dtype=dtype)
    tolerances = half_precision_tolerances(dtype, rows=2) if dtype != torch.float32 else {}
    fn = functools.partial(emulated_cuda_kd, shared_bytes=shared_bytes)
    check_against_reference(fn, student, teacher, alpha_min=alphas[0], alpha_max=alphas[1], **tolerances)


@pytest.mark.parametrize("cols", [300, 6000])
def test_emulated_cuda_alpha_pairs_with_forward_kl_low_or_one_alpha(cols, gen):
    student, teacher = make_logits("random", 3, cols, gen)
    for alphas in [(1.0, 2.0), (0.0, 0.0), (-1.0, -1.0), (0.5, 0.5)]:
        check_against_reference(emulated_cuda_kd, student, teacher, alpha_min=alphas[0], alpha_max=alphas[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("value_mode", ["divergence", "surrogate"])
@pytest.mark.parametrize("cols", [50, 1000, 6000])
def test_emulated_cuda_reductions_value_modes_temperature_and_mask(reduction, value_mode, cols, gen):
    rows = 11 if cols <= 1000 else 3
    student, teacher = make_logits("random", rows, cols, gen)
    mask = torch.rand(rows, generator=gen) < 0.6
    mask[0], mask[-1] = True, False
    for kwargs in (dict(temperature=2.0), dict(mask=mask), dict(mask=torch.zeros(rows, dtype=torch.bool))):
        check_against_reference(emulated_cuda_kd, student, teacher, reduction=reduction, value=value_mode, **kwargs)


@pytest.mark.parametrize("cols", [64, 3000])
def test_emulated_cuda_strided_and_misaligned_inputs_take_the_element_path(cols, gen):
    base_s, base_t = make_logits("random", 3, 2 * cols + 1, gen)
    cases = {
        "column stride 2": (base_s[:, ::2][:, :cols], base_t[:, ::2][:, :cols]),
        "offset by one element": (base_s[:, 1:cols + 1], base_t[:, 1:cols + 1]),
        "transposed": (base_s[:, :cols].t().contiguous().t(), base_t[:, :cols]),
    }
    for student, teacher in cases.values():
        check_against_reference(emulated_cuda_kd, student, teacher)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [96, 1000, 3000, 20000])
def test_emulated_cuda_half_precision_packs_within_one_rounding(dtype, cols, gen):
    student, teacher = make_logits("random", 2, cols, gen, dtype=dtype)
    value, grad = check_against_reference(emulated_cuda_kd, student, teacher,
                                          **half_precision_tolerances(dtype, rows=2))
    assert value.dtype == dtype and grad.dtype == dtype


@pytest.mark.parametrize("kind", ["random", "confident_teacher", "equal", "flat", "huge_gaps"])
def test_emulated_cuda_bf16_gradient_within_half_a_percent(kind, gen):
    # the GPU criterion at a CPU-sized shape: block per row, registers + shared memory + stream
    student, teacher = make_logits(kind, 3, 24000, gen, dtype=torch.bfloat16)
    fn = functools.partial(emulated_cuda_kd, reduction="none", shared_bytes=32768)
    assert_bf16_rows_within_half_percent(*value_and_grad(fn, student, teacher), student, teacher)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float64, torch.float64), (torch.float32, torch.float64)], ids=str)
def test_emulated_cuda_mixed_and_double_precision(dtypes, gen):
    student, teacher = make_logits("confident_teacher", 3, 1500, gen)
    student, teacher = student.to(dtypes[0]), teacher.to(dtypes[1])
    half_student = dtypes[0] == torch.bfloat16  # the gradient is rounded to bf16 once
    value, grad = check_against_reference(emulated_cuda_kd, student, teacher,
                                          grad_rtol=torch.finfo(dtypes[0]).eps if half_student else 1e-4,
                                          grad_atol=1e-6 if half_student else None)
    assert value.dtype == torch.promote_types(*dtypes) and grad.dtype == dtypes[0]


def test_emulated_cuda_no_rows_and_no_gradient():
    empty = torch.zeros(0, 5)
    value, grad = emulated_kernel().adaptive_kd(empty, empty, None, -1.0, 1.0, 5.0, 1.0, 1, False, True, 0)
    assert value.item() == 0 and grad.shape == (0, 5)
    student, teacher = torch.randn(4, 300), torch.randn(4, 300)
    value, grad = emulated_kernel().adaptive_kd(student, teacher, None, -1.0, 1.0, 5.0, 1.0, 2, False, False, 0)
    assert grad.numel() == 0 and torch.isfinite(value)


@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("rows,cols", [(13, 37), (2, 20000)])
def test_symmetric_kl_on_the_emulated_cuda_kernel_matches_the_float64_reference(kind, rows, cols, gen):
    """`symmetric_kl`'s two branches, as the CUDA kernel computes them (warp and block launch paths)."""
    from alphadiv_kernels.adaptive_kd import SYMMETRIC_KL_BRANCHES

    def emulated_symmetric_kl(student, teacher, **kwargs):
        return sum(emulated_cuda_kd(student, teacher, **branch, **kwargs) for branch in SYMMETRIC_KL_BRANCHES)

    student, teacher = make_logits(kind, rows, cols, gen)
    check_symmetric_kl(emulated_symmetric_kl, student, teacher, temperature=2.0)
