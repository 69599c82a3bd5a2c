"""fused_linear_adaptive_kd against the unfused computation in float64: value and the gradients of the
student's input, weight and bias, chunk by chunk."""
from __future__ import annotations

import pytest
import torch

import alphadiv_kernels as ak
from alphadiv_kernels.fused_linear import default_chunk_size

BACKENDS = [b for b in ("cpu", "reference", "triton") if b in ak.available_backends()]


def make_problem(gen, rows, hidden, vocab, teacher_hidden=None, bias=True, dtype=torch.float32):
    teacher_hidden = teacher_hidden or hidden
    draw = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype)
    return dict(
        student_input=draw(rows, hidden), student_weight=draw(vocab, hidden, scale=hidden ** -0.5 * 2),
        student_bias=draw(vocab, scale=0.5) if bias else None,
        teacher_input=draw(rows, teacher_hidden), teacher_weight=draw(vocab, teacher_hidden,
                                                                      scale=teacher_hidden ** -0.5 * 3),
        teacher_bias=draw(vocab, scale=0.5) if bias else None)


def unfused64(problem, row_weights=None, **kwargs):
    """The logits in float64, the reference loss, autograd: value and grads of input, weight, bias (of the
    weighted sum of the rows' values when `row_weights` is given, with reduction "none")."""
    leaves = {k: problem[k].double().requires_grad_(True) for k in ("student_input", "student_weight", "student_bias")
              if problem[k] is not None}
    logits = torch.nn.functional.linear(leaves["student_input"], leaves["student_weight"], leaves.get("student_bias"))
    teacher_bias = problem["teacher_bias"].double() if problem["teacher_bias"] is not None else None
    teacher = torch.nn.functional.linear(problem["teacher_input"].double(), problem["teacher_weight"].double(),
                                         teacher_bias)
    loss = ak.adaptive_kd_reference(logits, teacher, **kwargs)
    objective = loss if row_weights is None else (loss * row_weights.double()).sum()
    grads = torch.autograd.grad(objective, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def fused(problem, backend, row_weights=None, **kwargs):
    leaves = {k: problem[k].clone().requires_grad_(True) for k in ("student_input", "student_weight", "student_bias")
              if problem[k] is not None}
    loss = ak.fused_linear_adaptive_kd(
        leaves["student_input"], leaves["student_weight"], problem["teacher_input"], problem["teacher_weight"],
        student_bias=leaves.get("student_bias"), teacher_bias=problem["teacher_bias"], backend=backend, **kwargs)
    (loss if row_weights is None else (loss * row_weights).sum()).backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def assert_matches(got, expected, rows):
    (value, grads), (ref_value, ref_grads) = got, expected
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-7)
    for name, grad in grads.items():
        ref = ref_grads[name]
        scale = ref.abs().max().item()
        torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=2e-5 * scale + 1e-7 / rows, msg=name)


CASES = [
    # (rows, hidden, vocab, teacher_hidden, chunk, reduction, temperature, masked, bias)
    (37, 16, 50, None, 8, "mean", 1.0, False, True),      # N not a multiple of the chunk
    (9, 12, 30, 20, 1, "sum", 1.0, False, True),          # a chunk of one row; teacher of another size
    (40, 16, 64, 24, None, "mean", 2.5, True, True),      # masked rows, temperature, default chunk
    (33, 8, 100, None, 16, "sum", 1.0, True, False),      # no biases
    (16, 32, 40, None, 64, "mean", 1.0, False, True),     # one chunk larger than N
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,hidden,vocab,teacher_hidden,chunk,reduction,temperature,masked,bias", CASES)
def test_fused_linear_equals_the_unfused_float64_computation(gen, backend, rows, hidden, vocab, teacher_hidden,
                                                             chunk, reduction, temperature, masked, bias):
    if backend == "triton" and vocab > 64:
        pytest.skip("the interpreter is slow")
    problem = make_problem(gen, rows, hidden, vocab, teacher_hidden, bias)
    mask = (torch.rand(rows, generator=gen) < 0.7) if masked else None
    kwargs = dict(alpha_min=-1.0, alpha_max=1.0, clip=5.0, temperature=temperature, reduction=reduction, mask=mask)
    expected = unfused64(problem, **kwargs)
    assert_matches(fused(problem, backend, chunk_size=chunk, **kwargs), expected, rows)


def test_leading_dimensions_and_alpha_pairs(gen):
    problem = make_problem(gen, 24, 10, 30)
    problem["student_input"] = problem["student_input"].reshape(4, 6, 10)
    problem["teacher_input"] = problem["teacher_input"].reshape(4, 6, 10)
    mask = torch.rand(4, 6, generator=gen) < 0.5
    for alphas in ((-2.0, 0.5), (0.0, 1.0), (1.0, 1.0)):
        kwargs = dict(alpha_min=alphas[0], alpha_max=alphas[1], clip=3.0, mask=mask)
        value, grads = fused(problem, "auto", chunk_size=5, **kwargs)
        ref_value, ref_grads = unfused64(problem, **kwargs)
        assert grads["student_input"].shape == (4, 6, 10)
        assert_matches((value, grads), (ref_value, ref_grads), 24)


def test_teacher_gets_no_gradient_and_no_rows_means_zero(gen):
    problem = make_problem(gen, 6, 8, 20)
    teacher_weight = problem["teacher_weight"].requires_grad_(True)
    student_input = problem["student_input"].requires_grad_(True)
    loss = ak.fused_linear_adaptive_kd(student_input, problem["student_weight"], problem["teacher_input"],
                                       teacher_weight, mask=torch.zeros(6, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and teacher_weight.grad is None and (student_input.grad == 0).all()


def test_bf16_accumulates_the_weight_gradient_in_fp32(gen):
    problem = make_problem(gen, 64, 16, 40, dtype=torch.bfloat16)
    value, grads = fused(problem, "auto", chunk_size=4)
    ref_value, ref_grads = unfused64(problem)
    assert grads["student_weight"].dtype == torch.bfloat16
    error = (grads["student_weight"].double() - ref_grads["student_weight"]).abs().max()
    assert error <= 0.02 * ref_grads["student_weight"].abs().max()
    assert abs(value.double() - ref_value) <= 0.02 * abs(ref_value)


def test_default_chunk_keeps_the_logits_below_three_quarters_of_the_weight_gradient():
    assert default_chunk_size(4096, 1024, 4) == 256 and default_chunk_size(4096, 1024, 2) == 512
    assert default_chunk_size(10, 4096, 4) == 10 and default_chunk_size(100, 2, 4) == 1
    for rows, hidden, vocab, itemsize in ((4096, 1024, 32000, 4), (8192, 4096, 128256, 2), (100, 64, 50257, 4)):
        chunk = default_chunk_size(rows, hidden, itemsize)
        assert 3 * chunk * vocab * itemsize <= 0.75 * vocab * hidden * 4 or chunk == 1
        assert chunk == rows or 3 * (2 * chunk) * vocab * itemsize > 0.75 * vocab * hidden * 4


@pytest.mark.parametrize("kwargs,message", [
    ({"reduction": "batchmean"}, "reduction must be one of 'mean', 'sum', 'none'"),
    ({"vocab_size": 21}, "vocab_size=21 exceeds"),
    ({"vocab_size": 0}, "vocab_size must be a whole number"),
    ({"tokenizer_size": 25}, "do not share a vocabulary: the tokenizer has 25 tokens"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"temperature": -1.0}, "temperature"),
    ({"mask": torch.ones(3, dtype=torch.bool)}, "mask must be a bool tensor of shape"),
])
def test_bad_arguments_are_named(gen, kwargs, message):
    problem = make_problem(gen, 6, 8, 20)
    with pytest.raises((ValueError, TypeError), match=message):
        ak.fused_linear_adaptive_kd(problem["student_input"], problem["student_weight"], problem["teacher_input"],
                                    problem["teacher_weight"], **kwargs)
    with pytest.raises(ValueError, match="hidden size"):
        ak.fused_linear_adaptive_kd(problem["student_input"], problem["student_weight"][:, :5],
                                    problem["teacher_input"], problem["teacher_weight"])


def test_module_form(gen):
    problem = make_problem(gen, 10, 8, 20)
    loss_fn = ak.FusedLinearAdaptiveKDLoss(temperature=2.0, chunk_size=3)
    expected = ak.fused_linear_adaptive_kd(problem["student_input"], problem["student_weight"],
                                           problem["teacher_input"], problem["teacher_weight"],
                                           student_bias=problem["student_bias"], teacher_bias=problem["teacher_bias"],
                                           temperature=2.0, chunk_size=3)
    got = loss_fn(problem["student_input"], problem["student_weight"], problem["teacher_input"],
                  problem["teacher_weight"], problem["student_bias"], problem["teacher_bias"])
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="reduction"):
        ak.FusedLinearAdaptiveKDLoss(reduction="batchmean")


def test_retained_graph_and_scaled_backward_give_the_same_gradients(gen):
    problem = make_problem(gen, 12, 8, 20)
    x = problem["student_input"].clone().requires_grad_(True)
    loss = ak.fused_linear_adaptive_kd(x, problem["student_weight"], problem["teacher_input"],
                                       problem["teacher_weight"], chunk_size=5)
    (once,) = torch.autograd.grad(loss, x, retain_graph=True)
    (again,) = torch.autograd.grad(3.0 * loss, x)
    torch.testing.assert_close(again, 3.0 * once)
    assert x.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_gives_each_row_and_weighted_rows_their_gradient(gen, backend):
    problem = make_problem(gen, 29, 12, 40, teacher_hidden=20)
    problem["student_input"] = problem["student_input"].reshape(29, 1, 12)
    problem["teacher_input"] = problem["teacher_input"].reshape(29, 1, 20)
    mask = torch.rand(29, 1, generator=gen) < 0.7
    row_weights = torch.rand(29, 1, generator=gen) * 3
    kwargs = dict(temperature=1.5, mask=mask, chunk_size=8)
    values, grads = fused(problem, backend, row_weights=row_weights, reduction="none", **kwargs)
    ref_values, ref_grads = unfused64(problem, row_weights=row_weights, reduction="none", mask=mask,
                                     temperature=1.5)
    assert values.shape == (29, 1) and torch.all(values[~mask] == 0) and torch.all(values[mask] > 0)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-7)
    assert_matches((values.sum(), grads), (ref_values.sum(), ref_grads), 29)
    total = ak.fused_linear_adaptive_kd(problem["student_input"], problem["student_weight"], problem["teacher_input"],
                                        problem["teacher_weight"], student_bias=problem["student_bias"],
                                        teacher_bias=problem["teacher_bias"], reduction="sum", backend=backend,
                                        **kwargs)
    torch.testing.assert_close(values.sum(), total, rtol=1e-6, atol=0)


def sliced(problem, rows):
    """The problem with both heads cut to their first `rows` rows."""
    return dict(problem, **{name: problem[name][:rows] for name in ("student_weight", "student_bias",
                                                                     "teacher_weight", "teacher_bias")})


@pytest.mark.parametrize("student_extra, teacher_extra, vocab_size", [(0, 64, None), (64, 0, None), (8, 64, 30)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_padded_heads_equal_the_computation_on_the_shared_rows_in_float64(gen, student_extra, teacher_extra,
                                                                          vocab_size, reduction):
    vocab = 37
    problem = make_problem(gen, 21, 12, vocab + max(student_extra, teacher_extra), teacher_hidden=16,
                           dtype=torch.float64)
    padded = dict(problem, student_weight=problem["student_weight"][:vocab + student_extra],
                  student_bias=problem["student_bias"][:vocab + student_extra],
                  teacher_weight=problem["teacher_weight"][:vocab + teacher_extra],
                  teacher_bias=problem["teacher_bias"][:vocab + teacher_extra])
    shared = vocab_size or vocab
    row_weights = torch.rand(21, generator=gen, dtype=torch.float64) if reduction == "none" else None
    got_value, got = fused(padded, "auto", row_weights=row_weights, reduction=reduction, vocab_size=vocab_size,
                           chunk_size=6)
    want_value, want = fused(sliced(padded, shared), "auto", row_weights=row_weights, reduction=reduction,
                             chunk_size=6)
    ref_value, ref = unfused64(sliced(padded, shared), row_weights=row_weights, reduction=reduction)
    torch.testing.assert_close(got_value, want_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_value, ref_value, rtol=1e-10, atol=0)
    assert got["student_weight"].shape == padded["student_weight"].shape
    for name in ("student_weight", "student_bias"):
        assert torch.all(got[name][shared:] == 0), "a padded row of the student got a gradient"
        torch.testing.assert_close(got[name][:shared], ref[name], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got["student_input"], ref["student_input"], rtol=1e-10, atol=1e-13)


def test_a_frozen_head_gets_no_gradient_and_no_weight_gradient_buffer(gen):
    vocab, hidden = 4096, 64
    problem = make_problem(gen, 32, hidden, vocab)
    x = problem["student_input"].requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        ak.fused_linear_adaptive_kd(x, problem["student_weight"], problem["teacher_input"], problem["teacher_weight"],
                                    chunk_size=8).backward()
    assert problem["student_weight"].grad is None and x.grad is not None
    largest = max(event.cpu_memory_usage for event in profile.events())
    assert 0 < largest < vocab * hidden * 4, f"an allocation of {largest} bytes: a [V, H] buffer"
    # The same call with a trainable head allocates it (the check above can see one).
    weight = problem["student_weight"].clone().requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        ak.fused_linear_adaptive_kd(x, weight, problem["teacher_input"], problem["teacher_weight"],
                                    chunk_size=8).backward()
    assert max(event.cpu_memory_usage for event in profile.events()) >= vocab * hidden * 4


# ---------------------------------------------------------------------------------------------
# The sparse teacher through the student's head


def _sparse_case(gen, rows=40, hidden=16, vocab=50, k=7, dtype=torch.float64):
    x = torch.randn(rows, hidden, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=dtype) * 0.5
    bias = torch.randn(vocab, generator=gen, dtype=dtype)
    teacher = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 2
    lp = torch.log_softmax(teacher, -1)
    indices = lp.topk(k, -1).indices
    return x, weight, bias, indices, lp.gather(1, indices).to(dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("padded", [0, 6])
def test_sparse_teacher_through_the_head_equals_the_unfused_computation(reduction, padded, gen):
    x, weight, bias, indices, logprobs = _sparse_case(gen)
    mask = torch.rand(40, generator=gen) < 0.7
    head = torch.cat([weight, torch.randn(padded, 16, generator=gen, dtype=weight.dtype)])  # padded rows past V
    head_bias = torch.cat([bias, torch.randn(padded, generator=gen, dtype=bias.dtype)])
    params = [tensor.clone().requires_grad_(True) for tensor in (x, head, head_bias)]
    kwargs = dict(alpha_min=-1.0, alpha_max=0.5, temperature=1.5, reduction=reduction, mask=mask)
    value = ak.fused_linear_sparse_adaptive_kd(params[0], params[1], indices, logprobs, student_bias=params[2],
                                               chunk_size=16, vocab_size=50, **kwargs)
    weights = torch.rand(value.shape, generator=gen, dtype=value.dtype) if reduction == "none" else 1.0
    grads = torch.autograd.grad((value * weights).sum(), params)
    unfused = [tensor.clone().requires_grad_(True) for tensor in (x, head, head_bias)]
    logits = unfused[0] @ unfused[1][:50].T + unfused[2][:50]
    expected = ak.sparse_adaptive_kd_reference(logits, indices, logprobs, **kwargs)
    expected_grads = torch.autograd.grad((expected * weights).sum(), unfused)
    torch.testing.assert_close(value, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    assert bool((grads[1][50:] == 0).all()) and bool((grads[2][50:] == 0).all())


def test_sparse_teacher_through_the_head_in_fp32_and_int32_indices(gen):
    x, weight, bias, indices, logprobs = _sparse_case(gen, dtype=torch.float32, k=12)
    xs = x.clone().requires_grad_(True)
    ws = weight.clone().requires_grad_(True)
    value = ak.fused_linear_sparse_adaptive_kd(xs, ws, indices.int(), logprobs, chunk_size=8)
    value.backward()
    x64, w64 = x.double().requires_grad_(True), weight.double().requires_grad_(True)
    expected = ak.sparse_adaptive_kd_reference(x64 @ w64.T, indices, logprobs.double())
    expected.backward()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(xs.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ws.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_sparse_teacher_through_the_head_bad_calls_are_one_line(gen):
    x, weight, bias, indices, logprobs = _sparse_case(gen)
    with pytest.raises(ValueError, match="leading shape"):
        ak.fused_linear_sparse_adaptive_kd(x[:3], weight, indices, logprobs)
    with pytest.raises(ValueError, match="vocab_size"):
        ak.fused_linear_sparse_adaptive_kd(x, weight, indices, logprobs, vocab_size=51)
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        ak.fused_linear_sparse_adaptive_kd(x, weight, indices, logprobs, tokenizer_size=60)
    with pytest.raises(ValueError, match="is not a class"):
        ak.fused_linear_sparse_adaptive_kd(x, weight, indices, logprobs, vocab_size=10)
