"""The Triton kernel against the float64 reference; on CPU tensors through Triton's interpreter."""
from __future__ import annotations

import functools

import pytest
import torch

import alphadiv_kernels as ak
from alphadiv_kernels import triton_adaptive_kd
from conftest import LOGIT_KINDS, check_against_reference, check_symmetric_kl, half_precision_tolerances, make_logits

pytestmark = pytest.mark.skipif("triton" not in ak.available_backends(), reason="Triton backend unavailable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_op = functools.partial(ak.fused_adaptive_kd, backend="triton")


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("alphas", [(-1.0, 1.0), (-2.0, 0.5), (0.0, 1.0), (1.0, 1.0)],
                         ids=lambda a: f"alpha{a[0]:g},{a[1]:g}")
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 2), (5, 37), (3, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_matches_float64_reference(shape, kind, alphas, gen):
    student, teacher = on_device(*make_logits(kind, *shape, gen))
    check_against_reference(triton_op, student, teacher, alpha_min=alphas[0], alpha_max=alphas[1])


@pytest.mark.parametrize("alphas", [(-1.0, 1.0), (1.0, 2.0), (0.0, 0.0)], ids=str)
@pytest.mark.parametrize("kind", ["random", "masked_classes", "huge_gaps"])
def test_triton_streams_rows_longer_than_one_block(kind, alphas, gen, monkeypatch):
    # the streamed path at interpreter-sized shapes: rows of 1000 columns in blocks of 128
    monkeypatch.setattr(triton_adaptive_kd, "MAX_SINGLE_BLOCK", 256)
    monkeypatch.setattr(triton_adaptive_kd, "MAX_STREAMED_BLOCK", 128)
    student, teacher = on_device(*make_logits(kind, 2, 1000, gen))
    check_against_reference(triton_op, student, teacher, alpha_min=alphas[0], alpha_max=alphas[1])


def test_triton_alpha_pairs_with_forward_kl_low_or_one_alpha(gen):
    student, teacher = on_device(*make_logits("random", 5, 300, gen))
    for alphas in [(1.0, 2.0), (0.0, 0.0), (-1.0, -1.0), (0.5, 0.5)]:
        check_against_reference(triton_op, student, teacher, alpha_min=alphas[0], alpha_max=alphas[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("value_mode", ["divergence", "surrogate"])
def test_triton_reductions_value_modes_temperature_and_mask(reduction, value_mode, gen):
    student, teacher = on_device(*make_logits("random", 9, 50, gen))
    mask = (torch.rand(9, generator=gen) < 0.6).to(DEVICE)
    mask[0] = True
    for kwargs in (dict(temperature=2.0), dict(mask=mask)):
        check_against_reference(triton_op, student, teacher, reduction=reduction, value=value_mode, **kwargs)


def test_triton_non_contiguous_inputs(gen):
    student = torch.randn(40, 6, generator=gen).t().to(DEVICE)  # column stride 6
    teacher = torch.randn(6, 80, generator=gen)[:, ::2].to(DEVICE)
    check_against_reference(triton_op, student, teacher)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_within_one_rounding(dtype, gen):
    student, teacher = on_device(*make_logits("random", 4, 100, gen, dtype=dtype))
    value, grad = check_against_reference(triton_op, student, teacher, **half_precision_tolerances(dtype, rows=4))
    assert value.dtype == dtype and grad.dtype == dtype


def test_triton_rejects_float64_with_a_clear_error():
    with pytest.raises(TypeError, match="fp32"):
        triton_op(torch.randn(2, 3, dtype=torch.float64, device=DEVICE), torch.randn(2, 3, dtype=torch.float64,
                                                                                     device=DEVICE))


@pytest.mark.parametrize("kind", LOGIT_KINDS)
def test_symmetric_kl_on_the_triton_kernel_matches_the_float64_reference(kind, gen):
    student, teacher = make_logits(kind, 5, 33, gen)
    check_symmetric_kl(ak.symmetric_kl, student, teacher, temperature=1.5, backend="triton")
