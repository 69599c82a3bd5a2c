"""Shared inputs and checks: logits of every shape of trouble, drawn fresh for each case.

Each test draws its inputs from a generator seeded by the session seed and the test's id, so two
cases never share inputs and a failure is reproducible: the seed is printed in the header and can be
fixed with ALPHADIV_TEST_SEED.
"""
from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import alphadiv_kernels as ak  # noqa: E402  (after TRITON_INTERPRET: triton reads it when kernels are defined)

SESSION_SEED = int(os.environ.get("ALPHADIV_TEST_SEED", random.randrange(2**31)))

# Kinds of (student, teacher) logits pairs; each name says what makes it hard.
LOGIT_KINDS = (
    "random",                 # both N(0, 3^2)
    "confident_teacher",      # teacher max p >= 0.999
    "flat",                   # both close to uniform
    "equal",                  # p == q exactly
    "overconfident_student",  # student sharper than the teacher
    "underconfident_student", # student flatter than the teacher
    "masked_classes",         # the same classes at -inf in both
    "huge_gaps",              # logit gaps of hundreds: fp32 probabilities underflow
)


def pytest_report_header(config):
    return f"alphadiv test seed: ALPHADIV_TEST_SEED={SESSION_SEED}; backends: {ak.available_backends()}"


@pytest.fixture
def gen(request) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    return generator


def make_logits(kind: str, rows: int, cols: int, generator: torch.Generator, dtype=torch.float32):
    """A (student, teacher) pair of [rows, cols] logits of the given kind, in `dtype`."""
    randn = lambda scale=1.0: torch.randn(rows, cols, generator=generator, dtype=torch.float64) * scale
    if kind == "random":
        student, teacher = randn(3.0), randn(3.0)
    elif kind == "confident_teacher":
        teacher = randn(1.0)
        top = torch.randint(cols, (rows,), generator=generator)
        teacher[torch.arange(rows), top] += 12.0 + torch.log(torch.tensor(float(cols)))
        student = randn(2.0)
    elif kind == "flat":
        student, teacher = randn(0.05), randn(0.05)
    elif kind == "equal":
        teacher = randn(3.0)
        student = teacher.clone()
    elif kind == "overconfident_student":
        teacher = randn(1.0)
        student = teacher * 4.0 + randn(0.5)
    elif kind == "underconfident_student":
        teacher = randn(4.0)
        student = teacher * 0.25 + randn(0.5)
    elif kind == "masked_classes":
        student, teacher = randn(3.0), randn(3.0)
        if cols > 1:
            masked = torch.rand(cols, generator=generator) < 0.3
            masked[torch.randint(cols, (1,), generator=generator)] = False  # keep one class
            student[:, masked] = float("-inf")
            teacher[:, masked] = float("-inf")
    elif kind == "huge_gaps":
        student, teacher = randn(80.0), randn(80.0)
    else:
        raise ValueError(kind)
    return student.to(dtype), teacher.to(dtype)


def value_and_grad(fn, student: torch.Tensor, teacher: torch.Tensor, **kwargs):
    """fn(student, teacher, **kwargs) and its gradient with respect to the student (summed if not scalar)."""
    student = student.detach().clone().requires_grad_(True)
    value = fn(student, teacher, **kwargs)
    (grad,) = torch.autograd.grad(value.sum(), student)
    return value.detach(), grad


def reference64(student: torch.Tensor, teacher: torch.Tensor, **kwargs):
    """The float64 reference on the same (already rounded) inputs."""
    return value_and_grad(ak.adaptive_kd_reference, student.double(), teacher.double(), **kwargs)


def _resolve_ties(student, teacher, grad, ref_value, ref_grad, tie_rtol, tie_atol, **kwargs):
    """Rows whose two divergences agree within rounding may take either branch: a lower-precision
    computation legitimately picks the other one (for p close to q every alpha-divergence is about
    chi^2 / 2). For those rows the reference takes the branch the tested gradient is closer to."""
    alpha_min, alpha_max = kwargs.pop("alpha_min", -1.0), kwargs.pop("alpha_max", 1.0)
    reduction, mask = kwargs.pop("reduction", "mean"), kwargs.pop("mask", None)
    if alpha_min == alpha_max:
        return ref_value, ref_grad
    cols = student.shape[-1]
    s64, t64 = student.double().reshape(-1, cols), teacher.double().reshape(-1, cols)
    divergence = {a: ak.adaptive_kd_reference(s64, t64, alpha_min=a, alpha_max=a, reduction="none",
                                              **{**kwargs, "value": "divergence"}) for a in (alpha_min, alpha_max)}
    d_lo, d_hi = divergence[alpha_min], divergence[alpha_max]
    ties = (d_lo - d_hi).abs() <= tie_rtol * torch.maximum(d_lo.abs(), d_hi.abs()) + tie_atol
    if not ties.any():
        return ref_value, ref_grad
    row_mask = mask.reshape(-1) if mask is not None else torch.ones(s64.shape[0], dtype=torch.bool)
    weights = row_mask.double() / (row_mask.sum().clamp(min=1) if reduction == "mean" else 1)
    per_branch = {a: value_and_grad(ak.adaptive_kd_reference, s64, t64, alpha_min=a, alpha_max=a,
                                    reduction="none", **kwargs) for a in (alpha_min, alpha_max)}
    g_lo, g_hi = (per_branch[a][1] * weights[:, None] for a in (alpha_min, alpha_max))
    flat_grad = grad.double().reshape(-1, cols)
    closer_to_lo = (flat_grad - g_lo).abs().amax(-1) < (flat_grad - g_hi).abs().amax(-1)
    use_lo = torch.where(ties, closer_to_lo, d_lo > d_hi)
    rows = torch.where(use_lo, per_branch[alpha_min][0], per_branch[alpha_max][0]) * row_mask
    if reduction == "none":
        value = rows.reshape(ref_value.shape)
    else:
        value = (rows * weights).sum()
    grad_rows = torch.where(use_lo[:, None], g_lo, g_hi)
    return value, grad_rows.reshape(ref_grad.shape)


def fp32_gradient_floor(student, teacher, temperature=1.0, reduction="mean", mask=None):
    """Per-element absolute error no fp32 computation of the gradient can beat, in the reduction's units.

    The specified atol is 1e-7 / N (docs/op.md, Testing). Each gradient element is q_j (or p_j) times a difference of terms
    (q - p, R - log c_j, ...), and fp32 holds q_j to eps * q_j and log-weights of magnitude L to eps * L
    (torch's own fp32 F.kl_div gradient is 0.9e-7 off on two-class rows, where q is near 1/2). So the
    floor is  weight * T * (1e-7 + 2 eps max(q_j, p_j) (1 + |log w_j| + sum_k q_k |log w_k|)).
    Where probabilities are small (most classes, large C) this is the specified 1e-7 / N.
    """
    cols = student.shape[-1]
    lq = torch.log_softmax(student.double().reshape(-1, cols) / temperature, -1)
    lp = torch.log_softmax(teacher.double().reshape(-1, cols) / temperature, -1)
    q, p = lq.exp(), lp.exp()
    seen = (q > 0) | (p > 0)
    abs_log_w = torch.where(seen & (q > 0) & (p > 0), (lp - lq).abs(), 0.0)
    row_scale = (q * abs_log_w).sum(-1, keepdim=True)
    eps = torch.finfo(torch.float32).eps
    floor = 1e-7 + 2 * eps * torch.maximum(q, p) * (1 + abs_log_w + row_scale)
    rows = floor.shape[0]
    row_mask = mask.reshape(-1, 1).double() if mask is not None else torch.ones(rows, 1, dtype=torch.float64)
    weight = row_mask / (row_mask.sum().clamp(min=1) if reduction == "mean" else 1)
    return (max(1.0, temperature) * floor * weight).reshape(student.shape)


def assert_close_elementwise(actual, expected, rtol, atol):
    """assert_close with a tensor of absolute tolerances."""
    actual, expected = actual.double(), expected.double()
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    same_inf = torch.isinf(expected) & (actual == expected)
    ok = ((actual - expected).abs() <= atol + rtol * expected.abs()) | both_nan | same_inf
    if not ok.all():
        bad = (~ok).nonzero()[0].tolist()
        where = tuple(bad)
        raise AssertionError(
            f"{int((~ok).sum())} / {ok.numel()} elements differ; first at {where}: got {actual[where].item():.9g}, "
            f"expected {expected[where].item():.9g}, allowed {atol[where].item() + rtol * abs(expected[where].item()):.3g}")


def half_precision_tolerances(dtype: torch.dtype, rows: int) -> dict:
    """check_against_reference's tolerances for fp16 / bf16 results on `rows` rows: one full ulp of
    the dtype, relative, and absolutely the smallest fp16 subnormal plus the specified 1e-7 / N."""
    eps = torch.finfo(dtype).eps
    return dict(value_rtol=eps, value_atol=1e-6, grad_rtol=eps, grad_atol=2.0**-24 + 1e-7 / rows)


def assert_bf16_rows_within_half_percent(value, grad, student, teacher):
    """Per-row values (reduction "none") within a bf16 rounding of the float64 reference on the same
    bf16 logits, and the gradient within 0.5 % of it in relative L2 norm."""
    ref_value, ref_grad = value_and_grad(ak.adaptive_kd_reference, student.double(), teacher.double(),
                                         reduction="none")
    torch.testing.assert_close(value.double(), ref_value, rtol=2 ** -7, atol=1e-6)
    error = (grad.double() - ref_grad).norm() / ref_grad.norm().clamp(min=1e-30)
    assert error <= 5e-3 or ref_grad.abs().max() < 1e-9, f"relative gradient error {error:.2e}"


def check_against_reference(fn, student, teacher, *, value_rtol=1e-5, value_atol=1e-7, grad_rtol=1e-4,
                            grad_atol=None, tie_rtol=1e-4, tie_atol=1e-6, **kwargs):
    """fn's value and student gradient against the float64 reference on the same inputs.

    Defaults are the specified fp32 tolerances (docs/op.md): value rtol 1e-5, gradient rtol 1e-4 with
    atol 1e-7 / N (see fp32_gradient_floor). Returns fn's (value, grad).
    """
    value, grad = value_and_grad(fn, student, teacher, **kwargs)
    ref_value, ref_grad = reference64(student, teacher, **kwargs)
    ref_value, ref_grad = _resolve_ties(student, teacher, grad, ref_value, ref_grad, tie_rtol, tie_atol,
                                        **dict(kwargs))
    if grad_atol is None:
        grad_atol = fp32_gradient_floor(student, teacher, kwargs.get("temperature", 1.0),
                                        kwargs.get("reduction", "mean"), kwargs.get("mask"))
    else:
        grad_atol = torch.full(grad.shape, float(grad_atol), dtype=torch.float64)
    torch.testing.assert_close(value.double(), ref_value, rtol=value_rtol, atol=value_atol, equal_nan=True)
    assert_close_elementwise(grad, ref_grad, grad_rtol, grad_atol)
    return value, grad


def check_symmetric_kl(fn, student, teacher, *, value_rtol=1e-5, value_atol=1e-7, grad_rtol=1e-4, **kwargs):
    """fn (a symmetric KL) against `symmetric_kl_reference` in float64 on the same inputs: value, and the
    student's gradient within the fp32 floor of each of its two KL terms."""
    value, grad = value_and_grad(fn, student, teacher, **kwargs)
    kwargs.pop("backend", None)
    ref_value, ref_grad = value_and_grad(ak.symmetric_kl_reference, student.double(), teacher.double(), **kwargs)
    floor = 2 * fp32_gradient_floor(student, teacher, kwargs.get("temperature", 1.0), kwargs.get("reduction", "mean"),
                                    kwargs.get("mask"))
    torch.testing.assert_close(value.double(), ref_value, rtol=value_rtol, atol=value_atol)
    assert_close_elementwise(grad, ref_grad, grad_rtol, floor)
    return value, grad
