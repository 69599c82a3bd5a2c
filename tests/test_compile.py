"""The losses as training code calls them: torch.compile with dynamic shapes, fullgraph, no recompile per length.

Every case compares the compiled call (value and gradients) with the eager one on inputs drawn fresh, over
several row counts: what a language model's batches of changing sequence length give the loss.
"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import alphadiv_kernels as ak
from alphadiv_kernels.sparse import fused_sparse_adaptive_kd
from conftest import make_logits

pytestmark = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="needs the compiled CPU kernels")

CLASSES, HIDDEN = 33, 12
LENGTHS = (3, 5, 8, 13, 21)  # five sequence lengths in a row


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graphs(counter: CompileCounterWithBackend) -> int:
    """Graphs compiled, not counting empty ones (frames dynamo enters that hold no operation)."""
    return sum(any(node.op == "call_function" for node in graph.graph.nodes) for graph in counter.graphs)


def _topk(gen, rows, k=5):
    teacher = make_logits("random", rows, CLASSES, gen)[1]
    top = torch.log_softmax(teacher, -1).topk(k, -1)
    return top.indices, top.values


# name -> (function, inputs(gen, rows) -> (differentiated tensors, other args), keyword arguments)
def _dense(gen, rows):
    student, teacher = make_logits("confident_teacher", rows, CLASSES, gen)
    return (student,), (teacher,)


def _dense_masked(gen, rows):
    (student,), (teacher,) = _dense(gen, rows)
    mask = torch.rand(rows, generator=gen) < 0.6
    return (student,), (teacher, mask)


def _sparse(gen, rows):
    student = make_logits("random", rows, CLASSES, gen)[0]
    return (student,), _topk(gen, rows)


def _linear(gen, rows):
    x = torch.randn(rows, HIDDEN, generator=gen)
    weight = torch.randn(CLASSES, HIDDEN, generator=gen) * 0.5
    bias = torch.randn(CLASSES, generator=gen)
    teacher_x, teacher_w = torch.randn(rows, HIDDEN + 4, generator=gen), torch.randn(CLASSES + 3, HIDDEN + 4,
                                                                                       generator=gen)
    mask = torch.rand(rows, generator=gen) < 0.7
    return (x, weight, bias), (teacher_x, teacher_w, mask)


def _linear_sparse(gen, rows):
    x = torch.randn(rows, HIDDEN, generator=gen)
    weight = torch.randn(CLASSES, HIDDEN, generator=gen) * 0.5
    return (x, weight), _topk(gen, rows)


CASES = {
    "fused_adaptive_kd": (ak.fused_adaptive_kd, _dense, {}),
    "fused_adaptive_kd mask": (lambda s, t, m: ak.fused_adaptive_kd(s, t, mask=m), _dense_masked, {}),
    "fused_adaptive_kd none": (ak.fused_adaptive_kd, _dense, dict(reduction="none")),
    "fused_adaptive_kd surrogate sum T=2": (ak.fused_adaptive_kd, _dense,
                                            dict(value="surrogate", reduction="sum", temperature=2.0)),
    "symmetric_kl": (ak.symmetric_kl, _dense, {}),
    "AdaptiveKDLoss": (ak.AdaptiveKDLoss(-0.5, 1.5, 3.0), _dense_masked, {}),
    "fused_sparse_adaptive_kd": (fused_sparse_adaptive_kd, _sparse, {}),
    "fused_sparse_adaptive_kd none": (fused_sparse_adaptive_kd, _sparse, dict(reduction="none")),
    "fused_linear mean": (lambda x, w, b, tx, tw, m: ak.fused_linear_adaptive_kd(
        x, w, tx, tw, student_bias=b, mask=m, chunk_size=4), _linear, {}),
    "fused_linear none": (lambda x, w, b, tx, tw, m: ak.fused_linear_adaptive_kd(
        x, w, tx, tw, student_bias=b, mask=m, reduction="none"), _linear, {}),
    "fused_linear sparse": (lambda x, w, i, lp: ak.fused_linear_sparse_adaptive_kd(x, w, i, lp, chunk_size=4),
                            _linear_sparse, {}),
}


def _run(fn, grads_of, others, kwargs, mark_rows=False):
    leaves = [tensor.detach().clone().requires_grad_(True) for tensor in grads_of]
    if mark_rows:  # the row dimension of every tensor that has one (the weights have none)
        rows = leaves[0].shape[0]
        for tensor in (*leaves, *others):
            if tensor.dim() and tensor.shape[0] == rows and tensor.shape != (CLASSES, HIDDEN):
                torch._dynamo.mark_dynamic(tensor, 0)
    value = fn(*leaves, *others, **kwargs)
    # A weighted sum: a reduction="none" result gets a different weight per row in the backward.
    weights = torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape).to(value.dtype)
    (value * weights).sum().backward()
    return value.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dynamic", ["dynamic=True", "mark_dynamic"])
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_with_dynamic_rows_equals_eager(gen, name, dynamic):
    fn, make, kwargs = CASES[name]
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True if dynamic == "dynamic=True" else None)
    for rows in LENGTHS[:3]:
        grads_of, others = make(gen, rows)
        value, grads = _run(compiled, grads_of, others, kwargs, mark_rows=dynamic == "mark_dynamic")
        expected_value, expected_grads = _run(fn, grads_of, others, kwargs)
        torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-6)
        for grad, expected in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert graphs(counter) == 1, f"{graphs(counter)} compilations for {len(LENGTHS[:3])} row counts"


def test_the_dynamic_snippet_matches_eager_and_the_float64_reference(gen):
    compiled = torch.compile(ak.fused_adaptive_kd, dynamic=True, fullgraph=True)
    for kwargs in ({}, dict(mask=torch.tensor([True, False, True])), dict(reduction="none")):
        student, teacher = make_logits("huge_gaps", 3, 33, gen)
        leaf = student.clone().requires_grad_(True)
        value = compiled(leaf, teacher, **kwargs)
        value.sum().backward()
        twin = student.double().requires_grad_(True)
        expected = ak.adaptive_kd_reference(twin, teacher.double(), **kwargs)
        expected.sum().backward()
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(leaf.grad.double(), twin.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dynamic", [True, None])
def test_five_lengths_recompile_at_most_once_after_the_first_dynamic_compile(gen, dynamic):
    """dynamic=True: one compile for all five lengths. The default (dynamic=None): the first length compiles
    static, the second recompiles with a dynamic row count, and no later length recompiles."""
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(ak.fused_adaptive_kd, backend=counter, fullgraph=True, dynamic=dynamic)
    linear_counter = CompileCounterWithBackend("inductor")
    compiled_linear = torch.compile(ak.fused_linear_adaptive_kd, backend=linear_counter, fullgraph=True,
                                    dynamic=dynamic)
    frames = []
    for rows in LENGTHS:
        student, teacher = make_logits("random", rows, 1000, gen)
        compiled(student.requires_grad_(True), teacher).backward()
        (x, weight, _), (teacher_x, teacher_w, mask) = _linear(gen, rows)
        compiled_linear(x.requires_grad_(True), weight.requires_grad_(True), teacher_x, teacher_w, mask=mask).backward()
        frames.append((graphs(counter), graphs(linear_counter)))
    print(f"\ncompilations after each of the lengths {LENGTHS} (fused_adaptive_kd, fused_linear_adaptive_kd), "
          f"dynamic={dynamic}: {frames}")
    first_dynamic = 1 if dynamic else 2
    for kernel_frames in zip(*frames):
        assert kernel_frames[-1] <= first_dynamic, kernel_frames
        assert kernel_frames[first_dynamic - 1:] == (kernel_frames[first_dynamic - 1],) * (6 - first_dynamic)


def test_bad_arguments_give_the_same_error_compiled_and_eager(gen):
    student, teacher = make_logits("random", 4, 10, gen)
    compiled = torch.compile(ak.fused_adaptive_kd, dynamic=True)
    for kwargs, message in ((dict(clip=-1.0), "clip must be positive"),
                            (dict(temperature=float("nan")), "temperature must be finite"),
                            (dict(reduction="avg"), "reduction must be one of")):
        for fn in (ak.fused_adaptive_kd, compiled):
            with pytest.raises(ValueError, match=message):
                fn(student, teacher, **kwargs)


def test_the_fused_projection_refuses_the_eager_reference_under_compile(gen):
    (x, weight, _), (teacher_x, teacher_w, _) = _linear(gen, 4)
    compiled = torch.compile(ak.fused_linear_adaptive_kd, fullgraph=True)
    with pytest.raises(Exception, match="needs a compiled kernel"):
        compiled(x, weight, teacher_x, teacher_w, backend="reference")


def test_a_compiled_training_step_of_a_causal_lm_equals_eager():
    """The student's forward, the fused loss and the backward under torch.compile, on a tiny Llama pair. The graph
    breaks where the loss captures the decoders' hidden states (a forward hook is registered per call); the loss
    itself compiles as one custom op."""
    pytest.importorskip("transformers", reason="the [hf] extra is not installed")
    import copy

    from hf_models import collate, examples, student_and_teacher

    from alphadiv_kernels.integrations.transformers import causal_lm_adaptive_kd

    student, teacher = student_and_teacher("llama", torch.float32)
    twin = copy.deepcopy(student)

    def step(model, batch):
        return causal_lm_adaptive_kd(model, teacher, batch, temperature=2.0, ce_weight=0.5).loss

    compiled = torch.compile(step)
    for seed, count in ((3, 3), (4, 2)):  # two batches of other lengths
        inputs = collate(examples(count, seed=seed))
        loss = compiled(student, inputs)
        loss.backward()
        expected = step(twin, inputs)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for (name, parameter), (_, reference) in zip(student.named_parameters(), twin.named_parameters()):
            torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-4, atol=1e-5, msg=name)
