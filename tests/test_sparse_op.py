"""fused_sparse_adaptive_kd (a teacher given as top-k log-probabilities) on every backend: equal to
fused_adaptive_kd when k = C, and to the float64 reference sparse_adaptive_kd_reference when k < C, on
inputs drawn fresh for each case."""
from __future__ import annotations

import pytest
import torch

import alphadiv_kernels as ak
from alphadiv_kernels import _extension, triton_sparse_adaptive_kd
from alphadiv_kernels._contract import SPARSE_SCHEMA, SparseOpArgs
from conftest import LOGIT_KINDS, assert_close_elementwise, fp32_gradient_floor, make_logits, value_and_grad

BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _extension.HAS_CPU_EXTENSION, reason="no CPU extension")),
    pytest.param("triton", marks=pytest.mark.skipif(not triton_sparse_adaptive_kd.available(torch.device("cpu")),
                                                    reason="needs triton with TRITON_INTERPRET=1")),
]
ALPHA_PAIRS = [(-1.0, 1.0), (-2.0, 0.5), (0.0, 0.0), (1.0, 1.0), (0.5, 2.0)]


def sparse_teacher(teacher: torch.Tensor, k: int, generator: torch.Generator, *, temperature=1.0, order="top",
                   dtype=None):
    """(indices, log-probabilities) of the teacher's k classes: its top k (descending, as a cache holds them) or
    k classes drawn at random ("random"); log-probabilities at `temperature`, in `dtype` (default the logits')."""
    lp = torch.log_softmax(teacher.double() / temperature, dim=-1)
    rows, cols = lp.shape
    if order == "top":
        indices = lp.topk(k, dim=-1).indices
    else:
        indices = torch.stack([torch.randperm(cols, generator=generator)[:k] for _ in range(rows)])
    return indices, lp.gather(1, indices).to(dtype or teacher.dtype)


def sparse_value_and_grad(fn, student, indices, logprobs, **kwargs):
    """fn(student, indices, logprobs, **kwargs) and its gradient wrt the student (summed if not scalar)."""
    return value_and_grad(lambda s, _, **kw: fn(s, indices, logprobs, **kw), student, None, **kwargs)


def sparse_fn(backend):
    def fn(student, indices, logprobs, **kwargs):
        return ak.fused_sparse_adaptive_kd(student, indices, logprobs, backend=backend, **kwargs)
    return fn


def reference_rows(student, indices, logprobs, alpha, **kwargs):
    kwargs = {**kwargs, "reduction": "none"}
    return sparse_value_and_grad(ak.sparse_adaptive_kd_reference, student.double(), indices, logprobs.double(),
                          alpha_min=alpha, alpha_max=alpha, **kwargs)


def check_sparse(fn, student, indices, logprobs, *, value_rtol=1e-5, value_atol=1e-7, grad_rtol=1e-4, grad_atol=None,
                 teacher=None, **kwargs):
    """fn's value and gradient against the float64 reference on the same inputs. Rows whose two divergences tie
    within rounding may take either branch (a lower precision legitimately picks the other one): for those the
    reference takes the branch closer to fn's gradient."""
    value, grad = sparse_value_and_grad(fn, student, indices, logprobs, **kwargs)
    ref_value, ref_grad = sparse_value_and_grad(ak.sparse_adaptive_kd_reference, student.double(), indices,
                                         logprobs.double(), **kwargs)
    alpha_min, alpha_max = kwargs.pop("alpha_min", -1.0), kwargs.pop("alpha_max", 1.0)
    reduction, mask = kwargs.pop("reduction", "mean"), kwargs.get("mask")
    if alpha_min != alpha_max:
        divergence = {a: reference_rows(student, indices, logprobs, a, **{**kwargs, "value": "divergence"})[0]
                      for a in (alpha_min, alpha_max)}
        ties = (divergence[alpha_min] - divergence[alpha_max]).abs() <= 1e-4 * torch.maximum(
            divergence[alpha_min].abs(), divergence[alpha_max].abs()) + 1e-6
        if ties.any():
            valid = mask.double() if mask is not None else torch.ones(ties.shape, dtype=torch.float64)
            weight = valid / (valid.sum().clamp(min=1) if reduction == "mean" else 1)
            rows = {a: reference_rows(student, indices, logprobs, a, **kwargs) for a in (alpha_min, alpha_max)}
            g_lo, g_hi = (rows[a][1] * weight[:, None] for a in (alpha_min, alpha_max))
            closer_to_lo = (grad.double() - g_lo).abs().amax(-1) < (grad.double() - g_hi).abs().amax(-1)
            if reduction == "none":  # per-row values tell the branch too, where both gradients are ~0
                v = value.double().reshape(-1)
                value_distance = ((v - rows[alpha_min][0]).abs(), (v - rows[alpha_max][0]).abs())
                closer_to_lo = torch.where(value_distance[0] != value_distance[1],
                                           value_distance[0] < value_distance[1], closer_to_lo)
            use_lo = torch.where(ties, closer_to_lo, divergence[alpha_min] > divergence[alpha_max])
            row_values = torch.where(use_lo, rows[alpha_min][0], rows[alpha_max][0]) * valid
            ref_value = row_values if reduction == "none" else (row_values * weight).sum()
            ref_grad = torch.where(use_lo[:, None], g_lo, g_hi)
    if grad_atol is None:
        dense_teacher = teacher if teacher is not None else student
        grad_atol = fp32_gradient_floor(student, dense_teacher, kwargs.get("temperature", 1.0), reduction, mask)
    else:
        grad_atol = torch.full(grad.shape, float(grad_atol), dtype=torch.float64)
    torch.testing.assert_close(value.double(), ref_value, rtol=value_rtol, atol=value_atol, equal_nan=True)
    # an infinite divergence (reverse KL where the teacher's tail is 0 and the student's is not) has no
    # gradient: the reference's is NaN, the kernels' is not finite either
    undefined = ~ref_grad.isfinite()
    assert bool((~grad[undefined].isfinite()).all()), "a finite gradient where the divergence is infinite"
    assert_close_elementwise(grad.double().where(~undefined, 0.0), ref_grad.where(~undefined, 0.0), grad_rtol,
                             grad_atol)
    return value, grad


@pytest.mark.parametrize("kind", LOGIT_KINDS)
def test_reference_with_all_classes_is_the_dense_reference(kind, gen):
    student, teacher = make_logits(kind, 6, 37, gen, dtype=torch.float64)
    indices, logprobs = sparse_teacher(teacher, 37, gen, temperature=1.5, order="random")
    for alphas in ALPHA_PAIRS:
        kwargs = dict(alpha_min=alphas[0], alpha_max=alphas[1], temperature=1.5, reduction="none")
        value, grad = sparse_value_and_grad(ak.sparse_adaptive_kd_reference, student, indices, logprobs, **kwargs)
        dense_value, dense_grad = value_and_grad(ak.adaptive_kd_reference, student, teacher, **kwargs)
        torch.testing.assert_close(value, dense_value, rtol=1e-10, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("alphas", [(-1.0, 1.0), (-2.0, 0.5), (0.0, 0.0)])
def test_all_classes_equal_the_dense_op(backend, kind, alphas, gen):
    student, teacher = make_logits(kind, 6, 37, gen)
    indices, logprobs = sparse_teacher(teacher, 37, gen, temperature=1.5, order="random")
    kwargs = dict(alpha_min=alphas[0], alpha_max=alphas[1], temperature=1.5, reduction="none")
    value, grad = check_sparse(sparse_fn(backend), student, indices, logprobs, teacher=teacher, **kwargs)
    dense_value, dense_grad = value_and_grad(ak.fused_adaptive_kd, student, teacher, backend=backend, **kwargs)
    # rows whose two divergences tie within rounding may take either branch in either op
    divergences = [ak.adaptive_kd_reference(student.double(), teacher.double(), alpha_min=a, alpha_max=a,
                                            temperature=1.5, reduction="none") for a in alphas]
    untied = (divergences[0] - divergences[1]).abs() > 1e-4 * torch.maximum(*map(torch.abs, divergences)) + 1e-6
    untied |= alphas[0] == alphas[1]
    torch.testing.assert_close(value[untied], dense_value[untied], rtol=2e-5, atol=1e-6, equal_nan=True)
    floor = fp32_gradient_floor(student, teacher, 1.5, "none")  # both within it of the float64 computation
    assert_close_elementwise(grad[untied], dense_grad[untied], 1e-4, 2 * floor[untied])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("k", [1, 4, 36])
def test_top_k_matches_float64_reference(backend, kind, k, gen):
    student, teacher = make_logits(kind, 7, 37, gen)
    indices, logprobs = sparse_teacher(teacher, k, gen)
    for alphas in ALPHA_PAIRS:
        check_sparse(sparse_fn(backend), student, indices, logprobs, alpha_min=alphas[0], alpha_max=alphas[1],
                     teacher=teacher)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cols", [1, 2, 300, 5000])
def test_random_classes_long_rows_and_int32_indices(backend, cols, gen):
    student, teacher = make_logits("random", 3, cols, gen)
    k = max(1, cols // 3)
    indices, logprobs = sparse_teacher(teacher, k, gen, order="random")
    check_sparse(sparse_fn(backend), student, indices.int(), logprobs, teacher=teacher)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_tail_mass_zero_and_near_one(backend, gen):
    student, teacher = make_logits("random", 4, 40, gen)
    teacher[:, 8:] = float("-inf")  # the teacher's mass is all on its top 8 classes: an empty tail bin
    indices, logprobs = sparse_teacher(teacher, 8, gen)
    check_sparse(sparse_fn(backend), student, indices, logprobs, teacher=teacher)
    flat = torch.randn(4, 40, generator=gen) * 0.01  # one of 40 near-equal classes: the tail holds ~97%
    indices, logprobs = sparse_teacher(flat, 1, gen)
    check_sparse(sparse_fn(backend), student, indices, logprobs, teacher=flat)


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_teacher_keeps_its_tiny_tail(backend, gen):
    # p_top = 1 - 1e-6: the tail is 1e-6 and must not drown in the rounding of 1 - p_top
    student, teacher = make_logits("random", 5, 50, gen)
    teacher = torch.zeros(5, 50, dtype=torch.float64)
    teacher[:, 0] = 13.8 + torch.log(torch.tensor(49.0))
    indices, logprobs = sparse_teacher(teacher.float(), 2, gen)
    check_sparse(sparse_fn(backend), student, indices, logprobs, alpha_min=1.0, alpha_max=1.0, teacher=teacher)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_classes_at_minus_infinity_inside_and_outside_the_top_k(backend, gen):
    student, teacher = make_logits("random", 6, 30, gen)
    indices, logprobs = sparse_teacher(teacher, 5, gen)
    student[0, indices[0, 0]] = float("-inf")  # a teacher class the student rules out: reverse-KL side only
    outside = torch.ones(30, dtype=torch.bool)
    outside[indices[1]] = False
    student[1, outside] = float("-inf")  # the student's tail is empty
    for alphas in [(0.0, 0.0), (-1.0, 0.5), (1.0, 1.0)]:
        check_sparse(sparse_fn(backend), student, indices, logprobs, alpha_min=alphas[0], alpha_max=alphas[1],
                     teacher=teacher)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("value", ["divergence", "surrogate"])
def test_reductions_value_modes_temperature_and_mask(backend, reduction, value, gen):
    student, teacher = make_logits("random", 9, 64, gen)
    indices, logprobs = sparse_teacher(teacher, 10, gen, temperature=2.0)
    mask = torch.rand(9, generator=gen) < 0.6
    mask[0] = True
    check_sparse(sparse_fn(backend), student, indices, logprobs, reduction=reduction, value=value, temperature=2.0,
                 mask=mask, teacher=teacher)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dimensions_and_non_contiguous_views(backend, gen):
    student, teacher = make_logits("random", 24, 33, gen)
    indices, logprobs = sparse_teacher(teacher, 6, gen)
    strided = student.t().contiguous().t()  # column-major
    check_sparse(sparse_fn(backend), strided, indices.t().contiguous().t(), logprobs[:, :6], teacher=teacher)
    value = ak.fused_sparse_adaptive_kd(student.reshape(4, 6, 33), indices.reshape(4, 6, 6),
                                        logprobs.reshape(4, 6, 6), reduction="none", backend=backend)
    expected = ak.fused_sparse_adaptive_kd(student, indices, logprobs, reduction="none", backend=backend)
    torch.testing.assert_close(value, expected.reshape(4, 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_and_log_probabilities(backend, dtype, gen):
    student, teacher = make_logits("random", 8, 100, gen, dtype=dtype)
    indices, logprobs = sparse_teacher(teacher, 16, gen)
    eps = torch.finfo(dtype).eps
    value, grad = check_sparse(sparse_fn(backend), student, indices, logprobs, value_rtol=eps, value_atol=1e-6,
                               grad_rtol=eps, grad_atol=2.0**-24 + 1e-7 / 8, teacher=teacher)
    assert value.dtype == dtype and grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_without_a_teacher_is_zero(backend, gen):
    student, teacher = make_logits("random", 3, 20, gen)
    indices, logprobs = sparse_teacher(teacher, 4, gen)
    logprobs[1] = float("-inf")
    value, grad = sparse_value_and_grad(sparse_fn(backend), student, indices, logprobs, reduction="none")
    assert value[1] == 0 and bool((grad[1] == 0).all())
    check_sparse(sparse_fn(backend), student, indices, logprobs, teacher=teacher)


BAD_TEACHERS = {
    "duplicate": lambda indices, logprobs: (indices.index_put((torch.tensor([1]), torch.tensor([1])), indices[1, 0]),
                                            logprobs),
    "out_of_range": lambda indices, logprobs: (indices.index_put((torch.tensor([2]), torch.tensor([0])),
                                                                 torch.tensor(20)), logprobs),
    "negative": lambda indices, logprobs: (indices.index_put((torch.tensor([2]), torch.tensor([0])),
                                                             torch.tensor(-1)), logprobs),
    "positive_logprob": lambda indices, logprobs: (indices, logprobs.index_put((torch.tensor([0]),), torch.tensor(0.1))),
    "nan_logprob": lambda indices, logprobs: (indices, logprobs.index_put((torch.tensor([0]),),
                                                                          torch.tensor(float("nan")))),
}


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"] + ["reference"])
@pytest.mark.parametrize("bad", BAD_TEACHERS)
def test_bad_teacher_entries_are_one_clear_error_on_cpu(backend, bad, gen):
    student, teacher = make_logits("random", 4, 20, gen)
    indices, logprobs = BAD_TEACHERS[bad](*sparse_teacher(teacher, 4, gen))
    with pytest.raises(ValueError, match="topk_indices|topk_logprobs"):
        ak.fused_sparse_adaptive_kd(student.requires_grad_(), indices, logprobs, backend=backend)


@pytest.mark.parametrize("bad", BAD_TEACHERS)
@pytest.mark.skipif(not triton_sparse_adaptive_kd.available(torch.device("cpu")), reason="needs TRITON_INTERPRET=1")
def test_bad_teacher_entries_make_their_row_nan_on_the_gpu_kernels(bad, gen):
    student, teacher = make_logits("random", 4, 20, gen)
    indices, logprobs = BAD_TEACHERS[bad](*sparse_teacher(teacher, 4, gen))
    value, grad = sparse_value_and_grad(sparse_fn("triton"), student, indices, logprobs, reduction="none")
    bad_row = 1 if bad == "duplicate" else 2 if bad in ("out_of_range", "negative") else 0
    assert value[bad_row].isnan() and bool(grad[bad_row].isnan().all())
    others = [row for row in range(4) if row != bad_row]
    assert bool(value[others].isfinite().all())


@pytest.mark.parametrize("bad_call, message", [
    (lambda s, i, lp: ak.fused_sparse_adaptive_kd(s, i.float(), lp), "int32 or int64"),
    (lambda s, i, lp: ak.fused_sparse_adaptive_kd(s, i, lp[:, :2]), "same shape"),
    (lambda s, i, lp: ak.fused_sparse_adaptive_kd(s[:2], i, lp), "leading shape"),
    (lambda s, i, lp: ak.fused_sparse_adaptive_kd(s[:, :3], i, lp), "more than the student"),
    (lambda s, i, lp: ak.fused_sparse_adaptive_kd(s, i[:, :0], lp[:, :0]), "k = 0"),
    (lambda s, i, lp: ak.fused_sparse_adaptive_kd(s, i, lp.long()), "floating-point"),
    (lambda s, i, lp: ak.fused_sparse_adaptive_kd(s, i, lp, clip=0.0), "clip must be positive"),
])
def test_bad_arguments_are_one_clear_error(bad_call, message, gen):
    student, teacher = make_logits("random", 4, 20, gen)
    indices, logprobs = sparse_teacher(teacher, 4, gen)
    with pytest.raises((ValueError, TypeError), match=message):
        bad_call(student, indices, logprobs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, gen):
    op = torch.ops.alphadiv.sparse_adaptive_kd if backend == "cpu" else torch.ops.alphadiv.sparse_adaptive_kd_triton
    student, teacher = make_logits("random", 5, 24, gen)
    indices, logprobs = sparse_teacher(teacher, 6, gen)
    for reduction, compute_grad, mask in [(1, True, None), (0, True, torch.rand(5, generator=gen) < 0.5),
                                          (2, False, None)]:
        args = SparseOpArgs(student.clone().requires_grad_(True), indices, logprobs, mask, -1.0, 1.0, 5.0, 1.0,
                            reduction, False, compute_grad)
        torch.library.opcheck(op, tuple(args), test_utils=("test_schema", "test_autograd_registration",
                                                           "test_faketensor"))


def test_the_cpp_and_triton_ops_declare_the_schema_the_named_arguments_follow():
    describe = lambda schema: [(a.name, str(a.type)) for a in schema.arguments]  # noqa: E731
    expected = torch._C.parse_schema("alphadiv::sparse_adaptive_kd" + SPARSE_SCHEMA)
    assert [name for name, _ in describe(expected)] == list(SparseOpArgs._fields)
    if _extension.HAS_CPU_EXTENSION:
        assert describe(torch.ops.alphadiv.sparse_adaptive_kd.default._schema) == describe(expected)
    if triton_sparse_adaptive_kd.triton is not None:
        assert describe(torch.ops.alphadiv.sparse_adaptive_kd_triton.default._schema) == describe(expected)


def test_module_form_and_gradient_reaches_the_student_only(gen):
    student, teacher = make_logits("random", 4, 20, gen)
    indices, logprobs = sparse_teacher(teacher, 5, gen)
    logprobs.requires_grad_(True)
    loss_fn = ak.SparseAdaptiveKDLoss(-1.0, 1.0, 5.0, temperature=2.0)
    student.requires_grad_(True)
    loss_fn(student, indices, logprobs).backward()
    assert student.grad is not None and logprobs.grad is None
    with pytest.raises(ValueError, match="alpha_min"):
        ak.SparseAdaptiveKDLoss(2.0, 1.0)
