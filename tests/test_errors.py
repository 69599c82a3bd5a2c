"""Bad calls fail with a clear error before any kernel runs (DESIGN section 3)."""
from __future__ import annotations

import pytest
import torch

import alphadiv_kernels as ak

BACKENDS = [b for b in ("cpu", "reference") if b in ak.available_backends()]
S, T = torch.randn(4, 10), torch.randn(4, 10)

BAD_CALLS = [
    # (description, args, kwargs, exception, message fragment)
    ("shape mismatch", (S, torch.randn(4, 11)), {}, ValueError, "same shape"),
    ("integer logits", (S.long(), T), {}, TypeError, "floating-point"),
    ("integer teacher", (S, T.int()), {}, TypeError, "floating-point"),
    ("not a tensor", (S.tolist(), T), {}, TypeError, "torch.Tensor"),
    ("scalar logits", (torch.tensor(1.0), torch.tensor(1.0)), {}, ValueError, "at least one dimension"),
    ("no classes", (torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "at least one class"),
    ("alpha order", (S, T), {"alpha_min": 1.0, "alpha_max": -1.0}, ValueError, "alpha_min"),
    ("zero clip", (S, T), {"clip": 0.0}, ValueError, "clip must be positive"),
    ("negative clip", (S, T), {"clip": -5.0}, ValueError, "clip must be positive"),
    ("zero temperature", (S, T), {"temperature": 0.0}, ValueError, "temperature must be positive"),
    ("nan alpha", (S, T), {"alpha_min": float("nan")}, ValueError, "alpha_min must be finite"),
    ("string clip", (S, T), {"clip": "5"}, TypeError, "clip must be a real number"),
    ("tensor temperature", (S, T), {"temperature": torch.tensor(2.0)}, TypeError, "temperature must be a real"),
    ("bad reduction", (S, T), {"reduction": "avg"}, ValueError, "reduction must be one of"),
    ("bad value mode", (S, T), {"value": "loss"}, ValueError, "value must be one of"),
    ("mask shape", (S, T), {"mask": torch.ones(5, dtype=torch.bool)}, ValueError, "mask must have"),
    ("mask dtype", (S, T), {"mask": torch.ones(4)}, TypeError, "mask must be a bool tensor"),
    ("mask type", (S, T), {"mask": [True] * 4}, TypeError, "mask must be a bool tensor"),
    ("unknown backend", (S, T), {"backend": "gpu"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("description,args,kwargs,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_clear_error(backend, description, args, kwargs, error, message):
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(error, match=message):
        ak.fused_adaptive_kd(*args, **kwargs)


def test_module_rejects_bad_arguments_at_call():
    with pytest.raises(ValueError, match="clip must be positive"):
        ak.AdaptiveKDLoss(clip=-1.0)(S, T)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forcing_a_backend_that_cannot_run_these_tensors_names_it(backend):
    if backend in ak.available_backends():
        pytest.skip(f"{backend} runs CPU tensors here")
    with pytest.raises((RuntimeError, ValueError), match=backend):  # not built, or not for CPU tensors
        ak.fused_adaptive_kd(S, T, backend=backend)


@pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")
def test_the_op_itself_checks_its_arguments():
    op = torch.ops.alphadiv.adaptive_kd
    with pytest.raises(ValueError, match="2-D"):
        op(torch.randn(2, 3, 4), torch.randn(2, 3, 4), None, -1.0, 1.0, 5.0, 1.0, 1, False, False)
    with pytest.raises(ValueError, match="alpha_min"):
        op(S, T, None, 2.0, 1.0, 5.0, 1.0, 1, False, False)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        op(S, T, torch.ones(4), -1.0, 1.0, 5.0, 1.0, 1, False, False)
    with pytest.raises(ValueError, match="reduction code"):
        op(S, T, None, -1.0, 1.0, 5.0, 1.0, 7, False, False)
