"""GPU tests of the CUDA and Triton backends (marked gpu; skipped without a CUDA device)."""
from __future__ import annotations

import functools

import pytest
import torch

import alphadiv_kernels as ak
from conftest import (LOGIT_KINDS, assert_bf16_rows_within_half_percent, check_against_reference, make_logits,
                      value_and_grad)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU_BACKENDS = [b for b in ("cuda", "triton") if b in ak.available_backends()]


def on_gpu(*tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("alphas", [(-1.0, 1.0), (-2.0, 0.5), (0.0, 1.0), (1.0, 1.0)], ids=str)
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 2), (256, 1000), (5, 4000), (4, 16384), (7, 32000), (3, 262144)],
                         ids=str)
def test_gpu_backends_match_float64_reference(backend, shape, kind, alphas, gen):
    student, teacher = on_gpu(*make_logits(kind, *shape, gen))
    fn = functools.partial(ak.fused_adaptive_kd, backend=backend)
    check_against_reference(fn, student, teacher, alpha_min=alphas[0], alpha_max=alphas[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["random", "confident_teacher", "equal"])
def test_bf16_llm_vocabulary_rows_within_half_percent(backend, kind, gen):
    rows, cols = 8192, 128256
    student, teacher = make_logits(kind, 64, cols, gen, dtype=torch.bfloat16)
    big_s = student.cuda().repeat(rows // 64, 1)  # 8192 x 128256 bf16; the first 64 rows are checked
    big_t = teacher.cuda().repeat(rows // 64, 1)
    value, grad = value_and_grad(functools.partial(ak.fused_adaptive_kd, backend=backend, reduction="none"),
                                 big_s, big_t)
    assert_bf16_rows_within_half_percent(value[:64], grad[:64], student.cuda(), teacher.cuda())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_unaligned_views_and_half_precision_packs(backend, dtype, gen):
    base_s, base_t = on_gpu(*make_logits("random", 6, 4097, gen, dtype=dtype))
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    tolerances = dict(value_rtol=eps, value_atol=1e-6, grad_rtol=eps, grad_atol=2.0**-24) if eps else {}
    fn = functools.partial(ak.fused_adaptive_kd, backend=backend)
    for student, teacher in [(base_s[:, 1:], base_t[:, 1:]),        # rows start off 16-byte boundaries
                             (base_s[:, :4096], base_t[:, :4096]),  # odd row stride: single elements
                             (base_s[:, :4096].contiguous(), base_t[:, :4096].contiguous())]:  # packs
        check_against_reference(fn, student, teacher, **tolerances)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_non_contiguous_compile_and_cuda_graph(backend, gen):
    student = torch.randn(300, 64, generator=gen).cuda().t()
    teacher = torch.randn(64, 600, generator=gen).cuda()[:, ::2]
    fn = functools.partial(ak.fused_adaptive_kd, backend=backend)
    check_against_reference(fn, student, teacher)
    compiled = torch.compile(fn, fullgraph=True)
    value, grad = value_and_grad(compiled, student.contiguous(), teacher.contiguous())
    expected, expected_grad = value_and_grad(fn, student.contiguous(), teacher.contiguous())
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
    static_s, static_t = student.contiguous(), teacher.contiguous()
    with torch.no_grad():
        fn(static_s, static_t)  # warm up (and compile) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn(static_s, static_t)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, expected, rtol=1e-6, atol=0)


def sparse_on_gpu(backend):
    """fused_sparse_adaptive_kd on the GPU for CPU inputs (autograd carries the gradient back)."""
    def fn(student, indices, logprobs, mask=None, **kwargs):
        value = ak.fused_sparse_adaptive_kd(student.cuda(), indices.cuda(), logprobs.cuda(), backend=backend,
                                            mask=None if mask is None else mask.cuda(), **kwargs)
        return value.cpu()
    return fn


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("shape, k", [((7, 37), 37), ((64, 1000), 32), ((5, 32000), 1024), ((3, 128256), 128)],
                         ids=str)
def test_gpu_sparse_teacher_matches_float64_reference(backend, shape, k, kind, gen):
    from test_sparse_op import ALPHA_PAIRS, check_sparse, sparse_teacher
    student, teacher = make_logits(kind, *shape, gen)
    indices, logprobs = sparse_teacher(teacher, k, gen, order="random" if k == shape[1] else "top")
    for alphas in ALPHA_PAIRS[:3]:
        check_sparse(sparse_on_gpu(backend), student, indices, logprobs, alpha_min=alphas[0], alpha_max=alphas[1],
                     teacher=teacher)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_sparse_teacher_bad_entries_make_their_row_nan(backend, gen):
    from test_sparse_op import BAD_TEACHERS, sparse_teacher, sparse_value_and_grad
    for bad, make_bad in BAD_TEACHERS.items():
        student, teacher = make_logits("random", 4, 20, gen)
        indices, logprobs = make_bad(*sparse_teacher(teacher, 4, gen))
        value, grad = sparse_value_and_grad(sparse_on_gpu(backend), student, indices, logprobs, reduction="none")
        assert bool(value.isnan().any()) and bool(grad.isnan().any(-1).sum() == 1), bad
