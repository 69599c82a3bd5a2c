"""The fused CPU kernel against the float64 reference."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import alphadiv_kernels as ak
from conftest import LOGIT_KINDS, check_against_reference, check_symmetric_kl, make_logits, value_and_grad

pytestmark = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")

cpu_op = functools.partial(ak.fused_adaptive_kd, backend="cpu")
ALPHA_PAIRS = [(-1.0, 1.0), (-2.0, 0.5), (0.0, 1.0), (1.0, 1.0)]


@pytest.mark.parametrize("alphas", ALPHA_PAIRS, ids=lambda a: f"alpha{a[0]:g},{a[1]:g}")
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 2), (256, 10), (7, 1000), (256, 1271), (7, 32000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_fp32_matches_float64_reference(shape, kind, alphas, gen):
    student, teacher = make_logits(kind, *shape, gen)
    kwargs = dict(alpha_min=alphas[0], alpha_max=alphas[1])
    check_against_reference(cpu_op, student, teacher, **kwargs)


@pytest.mark.parametrize("shape", [(1, 50257), (7, 50257), (256, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["random", "masked_classes", "confident_teacher"])
def test_fp32_large_vocabulary_matches_reference(shape, kind, gen):
    student, teacher = make_logits(kind, *shape, gen)
    check_against_reference(cpu_op, student, teacher)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("value_mode", ["divergence", "surrogate"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_reductions_value_modes_and_temperature(reduction, value_mode, temperature, gen):
    student, teacher = make_logits("random", 33, 257, gen)
    kwargs = dict(reduction=reduction, value=value_mode, temperature=temperature)
    check_against_reference(cpu_op, student, teacher, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_rows_give_zero_value_and_gradient_and_do_not_count(reduction, gen):
    student, teacher = (t.reshape(4, 6, 100) for t in make_logits("random", 24, 100, gen))
    mask = torch.rand(4, 6, generator=gen) < 0.5
    mask[0, 0] = True
    value, grad = check_against_reference(cpu_op, student, teacher, reduction=reduction, mask=mask)
    assert torch.all(grad[~mask] == 0)
    # Independent of the reference: the mean is over the unmasked rows only.
    rows, _ = value_and_grad(cpu_op, student, teacher, reduction="none")
    expected = {"mean": rows[mask].mean(), "sum": rows[mask].sum(), "none": torch.where(mask, rows, 0.0)}[reduction]
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)


def test_mean_over_no_valid_rows_is_zero_with_zero_gradient(gen):
    student, teacher = make_logits("random", 5, 11, gen)
    value, grad = value_and_grad(cpu_op, student, teacher, mask=torch.zeros(5, dtype=torch.bool))
    assert value.item() == 0.0 and not torch.isnan(value)
    assert torch.all(grad == 0)


def test_leading_dimensions_are_rows(gen):
    student, teacher = make_logits("random", 2 * 3 * 5, 64, gen)
    student3, teacher3 = student.reshape(2, 3, 5, 64), teacher.reshape(2, 3, 5, 64)
    rows3, grad3 = value_and_grad(cpu_op, student3, teacher3, reduction="none")
    rows2, grad2 = value_and_grad(cpu_op, student, teacher, reduction="none")
    assert rows3.shape == (2, 3, 5) and grad3.shape == student3.shape
    torch.testing.assert_close(rows3.reshape(-1), rows2, rtol=0, atol=0)
    torch.testing.assert_close(grad3.reshape(-1, 64), grad2, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["transposed", "sliced_columns", "strided_rows", "expanded_teacher"])
def test_non_contiguous_inputs(layout, gen):
    if layout == "transposed":
        student = torch.randn(300, 37, generator=gen).t()  # [37, 300], column stride 37
        teacher = torch.randn(300, 37, generator=gen).t()
    elif layout == "sliced_columns":
        student = torch.randn(37, 600, generator=gen)[:, ::2]
        teacher = torch.randn(37, 900, generator=gen)[:, 100:400]
    elif layout == "strided_rows":
        student = torch.randn(74, 300, generator=gen)[::2]
        teacher = torch.randn(111, 300, generator=gen)[::3]
    else:
        student = torch.randn(37, 300, generator=gen)
        teacher = torch.randn(1, 300, generator=gen).expand(37, 300)
    assert not student.is_contiguous() or not teacher.is_contiguous()
    check_against_reference(cpu_op, student, teacher)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["random", "confident_teacher", "equal", "masked_classes", "huge_gaps"])
def test_half_precision_within_one_rounding(dtype, kind, gen):
    student, teacher = make_logits(kind, 64, 1000, gen, dtype=dtype)
    if kind == "huge_gaps":  # keep within fp16's range; gaps of tens still underflow fp16 probabilities
        student, teacher = (student.float() / 8).to(dtype), (teacher.float() / 8).to(dtype)
    eps = torch.finfo(dtype).eps  # one rounding is at most eps/2 relative; allow one full ulp
    # Below the smallest normal a rounding is absolute (2^-24 in fp16, 2^-133 in bf16).
    tiny = 2.0**-24 if dtype == torch.float16 else 1e-30
    value, grad = check_against_reference(cpu_op, student, teacher, value_rtol=eps, value_atol=1e-6,
                                          grad_rtol=eps, grad_atol=tiny + 1e-7 / 64)
    assert value.dtype == dtype and grad.dtype == dtype


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float64, torch.float32)], ids=str)
def test_mixed_input_dtypes(dtypes, gen):
    student, teacher = make_logits("random", 16, 500, gen)
    student, teacher = student.to(dtypes[0]), teacher.to(dtypes[1])
    eps = torch.finfo(dtypes[0]).eps if dtypes[0] != torch.float64 else 0.0
    value, grad = check_against_reference(cpu_op, student, teacher, value_rtol=max(eps, 1e-5),
                                          grad_rtol=max(eps, 1e-4))
    assert value.dtype == torch.promote_types(*dtypes) and grad.dtype == dtypes[0]


def test_float64_inputs_are_computed_in_float64(gen):
    student, teacher = make_logits("random", 9, 333, gen, dtype=torch.float64)
    check_against_reference(cpu_op, student, teacher, alpha_min=-2.0, alpha_max=0.5, value_rtol=1e-12,
                            value_atol=1e-14, grad_rtol=1e-10, grad_atol=1e-15, tie_rtol=1e-12, tie_atol=0)


def test_equal_distributions_give_exactly_zero(gen):
    student, teacher = make_logits("equal", 31, 1000, gen)
    for alphas in ALPHA_PAIRS:
        value, grad = value_and_grad(cpu_op, student, teacher, alpha_min=alphas[0], alpha_max=alphas[1])
        assert value.item() == 0.0
        assert grad.abs().max().item() < 1e-9


def test_kl_pair_equals_torch_kl_div(gen):
    student, teacher = make_logits("random", 64, 1000, gen)
    value, grad = value_and_grad(cpu_op, student, teacher, alpha_min=1.0, alpha_max=1.0)
    kl = lambda s, t: F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    ref_value, ref_grad = value_and_grad(kl, student.double(), teacher.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7 / 64)


def test_surrogate_mean_matches_alphanet_reference_code(gen):
    student, teacher = make_logits("random", 128, 1000, gen)
    value, grad = value_and_grad(cpu_op, student, teacher, value="surrogate")
    ref_value, ref_grad = value_and_grad(ak.alphanet_adaptive_loss_soft, student.double(), teacher.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7 / 128)
    module_value, _ = value_and_grad(ak.AdaptiveKDLoss(-1.0, 1.0, 5.0, value="surrogate", backend="cpu"), student, teacher)
    assert module_value.item() == value.item()


def test_finite_where_alphanet_reference_code_gives_nan(gen):
    # Student logit gaps above ~104 underflow q in fp32: AlphaNet's p / q is inf and its loss NaN.
    student, teacher = make_logits("random", 16, 100, gen)
    student[:, 0] += 150.0
    alphanet_value = ak.alphanet_adaptive_loss_soft(student, teacher)
    assert torch.isnan(alphanet_value)
    value, grad = check_against_reference(cpu_op, student, teacher)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_kl_with_student_zero_where_teacher_positive_is_inf_with_finite_gradient(gen):
    student, teacher = make_logits("random", 3, 20, gen)
    student[1, 4] = float("-inf")
    value, grad = value_and_grad(cpu_op, student, teacher, alpha_min=1.0, alpha_max=1.0, reduction="none")
    assert math.isinf(value[1].item()) and value[1].item() > 0
    assert torch.isfinite(value[[0, 2]]).all() and torch.isfinite(grad).all()
    q, p = F.softmax(student.double(), -1), F.softmax(teacher.double(), -1)
    torch.testing.assert_close(grad.double(), q - p, rtol=1e-4, atol=1e-7)


def test_nan_inputs_give_nan_rows(gen):
    student, teacher = make_logits("random", 4, 50, gen)
    student[2, 7] = float("nan")
    value, grad = value_and_grad(cpu_op, student, teacher, reduction="none")
    assert torch.isnan(value[2]) and torch.isnan(grad[2]).all()
    assert torch.isfinite(value[[0, 1, 3]]).all() and torch.isfinite(grad[[0, 1, 3]]).all()


def test_teacher_gets_no_gradient_and_eval_mode_builds_no_graph(gen):
    student, teacher = make_logits("random", 8, 30, gen)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    ak.fused_adaptive_kd(student, teacher, backend="cpu").backward()
    assert teacher.grad is None and student.grad is not None
    with torch.no_grad():
        assert ak.fused_adaptive_kd(student, teacher, backend="cpu").grad_fn is None


def test_backward_scales_by_incoming_gradient_also_through_a_retained_graph(gen):
    student, teacher = make_logits("random", 8, 30, gen)
    _, grad = value_and_grad(cpu_op, student, teacher)
    leaf = student.clone().requires_grad_(True)
    loss = cpu_op(leaf, teacher)
    for factor in (3.0, 1.0, -0.5):  # the saved gradient survives every retained pass
        (scaled,) = torch.autograd.grad(loss * factor, leaf, retain_graph=True)
        torch.testing.assert_close(scaled, factor * grad, rtol=1e-6, atol=0)
    (last,) = torch.autograd.grad(loss * 2.0, leaf)  # not retained: scaled in place
    torch.testing.assert_close(last, 2.0 * grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_eager_training_call_is_one_op_whose_cpp_node_gives_the_python_autograd_gradient(reduction, gen):
    """alphadiv::adaptive_kd_loss (C++ node) against the op's Python-registered autograd, under an incoming
    gradient of 1 (loss.backward(): the saved gradient is returned as is) and of other weights."""
    student, teacher = make_logits("confident_teacher", 6, 40, gen)
    for weights in (None, torch.linspace(-1.0, 2.0, 6) if reduction == "none" else torch.tensor(-0.75)):
        leaf, twin = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
        loss = cpu_op(leaf, teacher, reduction=reduction, temperature=2.0)
        assert "AdaptiveKDFunction" in loss.grad_fn.name() or any(
            "AdaptiveKDFunction" in node.name() for node, _ in loss.grad_fn.next_functions)
        expected, _ = torch.ops.alphadiv.adaptive_kd(twin, teacher, None, -1.0, 1.0, 5.0, 2.0,
                                                     {"none": 0, "mean": 1, "sum": 2}[reduction], False, True)
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        upstream = torch.ones_like(loss) if weights is None else weights
        loss.backward(upstream)
        expected.backward(upstream)
        torch.testing.assert_close(leaf.grad, twin.grad, rtol=1e-6, atol=0)


def test_thread_count_does_not_change_results(gen):
    student, teacher = make_logits("random", 97, 777, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = value_and_grad(cpu_op, student, teacher)
        torch.set_num_threads(max(2, threads))
        many = value_and_grad(cpu_op, student, teacher)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_gradcheck_float64_with_inactive_clip(gen):
    for alphas in [(-1.0, 1.0), (-2.0, 0.5), (0.0, 1.0), (0.5, 2.0)]:
        student, teacher = make_logits("random", 5, 9, gen, dtype=torch.float64)
        student = (student / 3).requires_grad_(True)
        teacher = teacher / 3
        fn = lambda s: cpu_op(s, teacher, alpha_min=alphas[0], alpha_max=alphas[1], clip=1e6, reduction="none")
        assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_opcheck_passes(gen):
    student, teacher = make_logits("random", 6, 40, gen)
    mask = torch.tensor([True, False, True, True, False, True])
    op = torch.ops.alphadiv.adaptive_kd.default
    without_grad = [
        (student, teacher, None, -1.0, 1.0, 5.0, 1.0, 1, False, True),
        (student.to(torch.bfloat16), teacher, mask, 0.0, 1.0, 5.0, 1.0, 2, False, False),
        (student, teacher.double(), mask, -2.0, 0.5, 3.0, 2.0, 0, True, True),
    ]
    for args in without_grad:
        torch.library.opcheck(op, args)
    # With a differentiable student the backward reuses the op's gradient output in place (it is
    # internal to fused_adaptive_kd), which the AOT dispatch test would see as a changed output;
    # test_torch_compile_fullgraph_equals_eager covers compiled backward through the public API.
    with_grad = [
        (student.clone().requires_grad_(True), teacher, None, -1.0, 1.0, 5.0, 1.0, 1, False, True),
        (student.clone().requires_grad_(True), teacher, mask, -2.0, 0.5, 3.0, 2.0, 0, True, True),
    ]
    for args in with_grad:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph_equals_eager(gen):
    student, teacher = make_logits("random", 32, 100, gen)
    mask = torch.rand(32, generator=gen) < 0.7

    def loss_fn(s, t, m):
        return ak.fused_adaptive_kd(s, t, mask=m, temperature=2.0) + ak.fused_adaptive_kd(s, t, alpha_min=-2.0,
                                                                                          alpha_max=0.5)

    compiled = torch.compile(loss_fn, fullgraph=True)
    value, grad = value_and_grad(lambda s, t: compiled(s, t, mask), student, teacher)
    ref_value, ref_grad = value_and_grad(lambda s, t: loss_fn(s, t, mask), student, teacher)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)


# -- the op's contract ------------------------------------------------------------------------

def test_the_cpp_and_triton_ops_declare_one_schema_the_named_arguments_follow():
    from alphadiv_kernels._contract import OpArgs

    cpp = torch.ops.alphadiv.adaptive_kd.default._schema
    assert [argument.name for argument in cpp.arguments] == list(OpArgs._fields)
    if not hasattr(torch.ops.alphadiv, "adaptive_kd_triton"):
        pytest.skip("the Triton op is not defined (no triton package)")
    triton_op = torch.ops.alphadiv.adaptive_kd_triton.default._schema
    describe = lambda schema: ([(a.name, str(a.type)) for a in schema.arguments],  # noqa: E731
                               [str(r.type) for r in schema.returns])
    assert describe(triton_op) == describe(cpp)


def test_forcing_each_backend_names_why_it_cannot_run(monkeypatch):
    from alphadiv_kernels import _contract, _extension

    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    monkeypatch.setattr(_extension, "HAS_CPU_EXTENSION", False)
    with pytest.raises(RuntimeError, match="backend='cpu' is unavailable .*alphadiv_kernels._C"):
        ak.fused_adaptive_kd(student, teacher, backend="cpu")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors, got cpu"):
        ak.fused_adaptive_kd(student, teacher, backend="cuda")
    assert "cpu" not in ak.available_backends() and "reference" in ak.available_backends()
    assert set(_contract.AUTO["cpu"]) <= set(_contract.BACKENDS)


# -- symmetric KL: the op's two KL branches -----------------------------------------------------

@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("reduction,temperature", [("mean", 1.0), ("none", 2.0), ("sum", 0.5)])
def test_symmetric_kl_matches_the_float64_reference(kind, reduction, temperature, gen):
    student, teacher = make_logits(kind, 9, 37, gen)
    check_symmetric_kl(ak.symmetric_kl, student, teacher, reduction=reduction, temperature=temperature,
                       backend="cpu")


def test_symmetric_kl_on_views_and_masks_and_at_p_equal_q(gen):
    student, teacher = make_logits("random", 12, 40, gen)
    mask = torch.rand(6, generator=gen) < 0.5
    check_symmetric_kl(ak.symmetric_kl, student.t().contiguous().t()[::2, ::2], teacher[::2, ::2], mask=mask,
                       backend="cpu")
    value, grad = value_and_grad(ak.symmetric_kl, teacher, teacher.clone(), backend="cpu")
    assert value.item() == 0.0 and grad.abs().max().item() < 1e-7
    # the sum of the two KLs, not their max: different from the adaptive op at alphas (0, 1)
    assert ak.symmetric_kl(student, teacher) > ak.fused_adaptive_kd(student, teacher, alpha_min=0.0, alpha_max=1.0)
