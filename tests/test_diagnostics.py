"""The loss's diagnostics (share of rows on the alpha_min branch, share of clipped weights) against a float64
count written from the op's semantics: the branch each row takes, from the reference's two divergences, and the
classes whose clipped weight hits the clip."""
from __future__ import annotations

import math

import pytest
import torch

import alphadiv_kernels as ak
from alphadiv_kernels.diagnostics import KDStats
from conftest import LOGIT_KINDS, make_logits


def count64(student, teacher, alpha_min, alpha_max, clip, temperature=1.0, mask=None):
    """(rows on alpha_min, clipped entries of the kept branch, valid rows) in float64."""
    s64, t64 = student.double(), teacher.double()
    kwargs = dict(clip=clip, temperature=temperature, reduction="none")
    d_min = ak.adaptive_kd_reference(s64, t64, alpha_min=alpha_min, alpha_max=alpha_min, **kwargs)
    d_max = ak.adaptive_kd_reference(s64, t64, alpha_min=alpha_max, alpha_max=alpha_max, **kwargs)
    use_min = d_min > d_max
    lq, lp = torch.log_softmax(s64 / temperature, -1), torch.log_softmax(t64 / temperature, -1)

    def clipped(alpha):
        if abs(alpha - 1) < 1e-3:
            return torch.zeros(s64.shape[0], dtype=torch.float64)
        factor = 1.0 if abs(alpha) < 1e-3 else alpha
        return ((factor * (lp - lq) > math.log(clip)) & (lq > -math.inf)).sum(-1).double()

    per_row = torch.where(use_min, clipped(alpha_min), clipped(alpha_max))
    valid = torch.ones_like(use_min) if mask is None else mask
    return (use_min & valid).sum().item(), (per_row * valid).sum().item(), valid.sum().item()


@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("alphas, clip", [((-1.0, 1.0), 5.0), ((-2.0, 0.5), 2.0), ((0.0, 1.0), 3.0)])
def test_shares_match_a_float64_count(gen, kind, alphas, clip):
    student, teacher = make_logits(kind, 64, 300, gen, dtype=torch.float64)
    mask = torch.rand(64, generator=gen) < 0.8
    loss, stats = ak.fused_adaptive_kd(student, teacher, alpha_min=alphas[0], alpha_max=alphas[1], clip=clip,
                                       mask=mask, return_stats=True)
    torch.testing.assert_close(loss, ak.fused_adaptive_kd(student, teacher, alpha_min=alphas[0], alpha_max=alphas[1],
                                                          clip=clip, mask=mask))
    on_min, clipped, rows = count64(student, teacher, *alphas, clip, mask=mask)
    assert stats.rows.item() == rows and stats.entries.item() == rows * 300
    assert stats.alpha_min_rows.item() == on_min
    assert stats.clipped.item() == clipped
    assert stats.alpha_min_share.item() == pytest.approx(on_min / rows)
    assert stats.clip_share.item() == pytest.approx(clipped / (rows * 300))


def test_float32_logits_count_as_their_float64_values(gen):
    teacher = torch.randn(128, 1000, generator=gen) * 2
    sharpness = torch.linspace(0.2, 3.0, 128)[:, None]  # from flatter to sharper than the teacher: both branches
    student = teacher * sharpness + torch.randn(128, 1000, generator=gen) * 0.5
    _, stats = ak.fused_adaptive_kd(student, teacher, temperature=2.0, return_stats=True)
    on_min, clipped, rows = count64(student, teacher, -1.0, 1.0, 5.0, temperature=2.0)
    assert 0 < on_min < rows and clipped > 0  # both branches and the clip are exercised
    assert abs(stats.alpha_min_rows.item() - on_min) <= 1  # a row at a tie may round either way
    assert abs(stats.clipped.item() - clipped) <= 1e-4 * rows * 1000


def test_stats_are_device_tensors_that_pool_across_calls(gen):
    student, teacher = make_logits("random", 40, 50, gen)
    _, whole = ak.fused_adaptive_kd(student, teacher, return_stats=True)
    _, first = ak.fused_adaptive_kd(student[:15], teacher[:15], return_stats=True)
    _, second = ak.fused_adaptive_kd(student[15:], teacher[15:], return_stats=True)
    pooled = first + second
    assert isinstance(whole, KDStats) and all(isinstance(value, torch.Tensor) for value in whole)
    for name in KDStats._fields:
        assert getattr(pooled, name).item() == getattr(whole, name).item(), name
    # Forward KL alone never clips; a mean over no rows gives shares of 0, not NaN.
    _, kl = ak.fused_adaptive_kd(student, teacher, alpha_min=1.0, alpha_max=1.0, return_stats=True)
    assert kl.clip_share.item() == 0 and kl.alpha_min_share.item() == 0
    _, none = ak.fused_adaptive_kd(student, teacher, mask=torch.zeros(40, dtype=torch.bool), return_stats=True)
    assert none.alpha_min_share.item() == 0 and none.clip_share.item() == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_stats_equal_those_of_the_materialised_logits(gen, reduction):
    x, w = torch.randn(50, 16, generator=gen), torch.randn(70, 16, generator=gen)
    xt, wt = torch.randn(50, 24, generator=gen), torch.randn(64, 24, generator=gen)  # a teacher of fewer rows
    mask = torch.rand(50, generator=gen) < 0.7
    loss, stats = ak.fused_linear_adaptive_kd(x, w, xt, wt, mask=mask, chunk_size=7, reduction=reduction,
                                              return_stats=True)
    expected_loss, expected = ak.fused_adaptive_kd(x @ w[:64].T, xt @ wt.T, mask=mask, reduction=reduction,
                                                   return_stats=True)
    torch.testing.assert_close(loss, expected_loss)
    assert stats.entries.item() == mask.sum().item() * 64
    for name in KDStats._fields:
        assert getattr(stats, name).item() == getattr(expected, name).item(), name
