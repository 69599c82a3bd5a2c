"""The eager reference against the paper's formulas, AlphaNet's code and torch's KL, in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import alphadiv_kernels as ak
from conftest import make_logits, value_and_grad


def paper_divergence_and_gradient(s: np.ndarray, t: np.ndarray, alpha: float, clip: float):
    """Paper Eq. 3 / 5 for one row in probability space: D_alpha with the clipped weight, and
    grad_j = (q_j / alpha) (sum_i q_i c_i - c_j), c = min((p / q)^alpha, clip)."""
    q = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    p = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
    if abs(alpha - 1) < 1e-3:
        return float(np.sum(p * np.log(p / q))), q - p
    if abs(alpha) < 1e-3:
        log_c = np.log(np.minimum(p / q, clip))
        return float(-np.sum(q * log_c)), q * (np.sum(q * log_c) - log_c)
    c = np.minimum((p / q) ** alpha, clip)
    return float(np.sum(q * (c - 1)) / (alpha * (alpha - 1))), q / alpha * (np.sum(q * c) - c)


@pytest.mark.parametrize("alphas", [(-1.0, 1.0), (-2.0, 0.5), (0.0, 1.0), (1.0, 1.0), (-0.5, 2.0), (1.5, 3.0)])
@pytest.mark.parametrize("clip", [5.0, 1.5])
def test_reference_follows_paper_formulas_row_by_row(alphas, clip, gen):
    student, teacher = make_logits("random", 12, 30, gen, dtype=torch.float64)
    value, grad = value_and_grad(ak.adaptive_kd_reference, student, teacher, alpha_min=alphas[0],
                                 alpha_max=alphas[1], clip=clip, reduction="none")
    for row in range(12):
        s, t = student[row].numpy(), teacher[row].numpy()
        d_lo, g_lo = paper_divergence_and_gradient(s, t, alphas[0], clip)
        d_hi, g_hi = paper_divergence_and_gradient(s, t, alphas[1], clip)
        expected_value, expected_grad = (d_lo, g_lo) if d_lo > d_hi else (d_hi, g_hi)
        assert value[row].item() == pytest.approx(expected_value, rel=1e-10, abs=1e-12)
        np.testing.assert_allclose(grad[row].numpy(), expected_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alphas", [(-1.0, 1.0), (-2.0, 0.5), (0.0, 1.0), (0.5, 2.0)])
def test_reference_gradient_is_exact_where_clip_is_inactive(alphas, gen):
    student, teacher = make_logits("random", 4, 7, gen, dtype=torch.float64)
    student = (student / 3).requires_grad_(True)
    fn = lambda s: ak.adaptive_kd_reference(s, teacher / 3, alpha_min=alphas[0], alpha_max=alphas[1], clip=1e6,
                                            reduction="none")
    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_reference_surrogate_equals_alphanet_code(gen):
    student, teacher = make_logits("random", 40, 100, gen, dtype=torch.float64)
    for alphas in [(-1.0, 1.0), (-2.0, 0.5), (0.0, 1.0)]:
        value, grad = value_and_grad(ak.adaptive_kd_reference, student, teacher, alpha_min=alphas[0],
                                     alpha_max=alphas[1], value="surrogate")
        expected, expected_grad = value_and_grad(lambda s, t: ak.alphanet_adaptive_loss_soft(s, t, *alphas),
                                                 student, teacher)
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-15)


def test_reference_kl_pair_equals_torch_kl_div(gen):
    student, teacher = make_logits("random", 16, 50, gen, dtype=torch.float64)
    value, grad = value_and_grad(ak.adaptive_kd_reference, student, teacher, alpha_min=1.0, alpha_max=1.0)
    kl = lambda s, t: F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    expected, expected_grad = value_and_grad(kl, student, teacher)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-15)


def test_reference_divergence_is_nonnegative_and_zero_only_for_equal_distributions(gen):
    for kind in ("random", "flat", "confident_teacher", "overconfident_student", "underconfident_student"):
        student, teacher = make_logits(kind, 64, 20, gen, dtype=torch.float64)
        rows = ak.adaptive_kd_reference(student, teacher, reduction="none")
        assert (rows > 0).all(), kind
    student, _ = make_logits("equal", 8, 20, gen, dtype=torch.float64)
    assert (ak.adaptive_kd_reference(student, student, reduction="none") == 0).all()


def test_temperature_scales_value_by_t_squared_of_softened_logits(gen):
    student, teacher = make_logits("random", 8, 20, gen, dtype=torch.float64)
    soft = ak.adaptive_kd_reference(student, teacher, temperature=3.0, reduction="none")
    plain = ak.adaptive_kd_reference(student / 3.0, teacher / 3.0, reduction="none")
    torch.testing.assert_close(soft, 9.0 * plain, rtol=1e-12, atol=0)


def test_reference_is_finite_where_alphanet_code_is_nan(gen):
    student, teacher = make_logits("random", 4, 10, gen, dtype=torch.float32)
    student[:, 3] += 200.0
    assert torch.isnan(ak.alphanet_adaptive_loss_soft(student, teacher))
    value, grad = value_and_grad(ak.adaptive_kd_reference, student, teacher)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_masked_classes_take_the_mathematical_limit(gen):
    student, teacher = make_logits("random", 6, 12, gen, dtype=torch.float64)
    student[:, :4] = teacher[:, :4] = float("-inf")
    value, grad = value_and_grad(ak.adaptive_kd_reference, student, teacher, reduction="none")
    expected, expected_grad = value_and_grad(ak.adaptive_kd_reference, student[:, 4:], teacher[:, 4:],
                                             reduction="none")
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    assert (grad[:, :4] == 0).all()
    torch.testing.assert_close(grad[:, 4:], expected_grad, rtol=1e-12, atol=1e-15)  # fp64 rounding of small terms


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in ak.available_backends()])
def test_forward_kl_at_a_minus_inf_student_logit_is_inf_with_the_finite_gradient_q_minus_p(gen, backend):
    student, teacher = make_logits("random", 3, 8, gen, dtype=torch.float64)
    student[0, 2] = float("-inf")  # q = 0 < p there
    value, grad = value_and_grad(ak.fused_adaptive_kd, student, teacher, alpha_min=1.0, alpha_max=1.0,
                                 reduction="none", backend=backend)
    assert value[0] == float("inf") and torch.isfinite(value[1:]).all()
    q, p = F.softmax(student, -1), F.softmax(teacher, -1)
    torch.testing.assert_close(grad, q - p, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in ak.available_backends()])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_out_nan_rows_give_zero_value_and_zero_gradient(gen, backend, reduction):
    student, teacher = make_logits("random", 5, 9, gen, dtype=torch.float64)
    student[1] = float("nan")
    teacher[3, 4] = float("nan")
    mask = torch.tensor([True, False, True, False, True])
    value, grad = value_and_grad(ak.fused_adaptive_kd, student, teacher, mask=mask, reduction=reduction,
                                 backend=backend)
    kept, kept_grad = value_and_grad(ak.fused_adaptive_kd, student[mask], teacher[mask], reduction=reduction,
                                     backend=backend)
    assert torch.isfinite(value).all() and (grad[~mask] == 0).all()
    torch.testing.assert_close(value[mask] if reduction == "none" else value, kept, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad[mask], kept_grad, rtol=1e-12, atol=1e-16)
