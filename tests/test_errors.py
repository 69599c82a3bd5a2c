"""Bad calls fail with a clear error before any kernel runs."""
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
    ("zero temperature", (S, T), {"temperature": 0.0}, ValueError, r"temperature must be in \(0, 100\]"),
    ("huge temperature", (S, T), {"temperature": 1e5}, ValueError, "below the float32 rounding"),
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


@pytest.mark.parametrize("kwargs,error,message", [
    ({"clip": -1.0}, ValueError, "clip must be positive"),
    ({"alpha_min": 2.0}, ValueError, "alpha_min"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"value": "loss"}, ValueError, "value must be one of"),
    ({"backend": "gpu"}, ValueError, "backend must be one of"),
    ({"clip": "5"}, TypeError, "clip must be a real number"),
])
def test_module_rejects_bad_arguments_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        ak.AdaptiveKDLoss(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_are_numbers(backend):
    np = pytest.importorskip("numpy")
    expected = ak.fused_adaptive_kd(S, T, alpha_min=-0.5, clip=3.0, temperature=2.0, backend=backend)
    given = ak.fused_adaptive_kd(S, T, alpha_min=np.float32(-0.5), clip=np.float64(3.0), temperature=np.int64(2),
                                 backend=backend)
    assert torch.equal(given, expected)
    assert torch.equal(ak.AdaptiveKDLoss(np.float64(-0.5), clip=np.float32(3.0), temperature=2,
                                         backend=backend)(S, T), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_instead_of_a_wrong_second_derivative(backend):
    student = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    loss = ak.fused_adaptive_kd(student, torch.randn(4, 10, dtype=torch.float64), backend=backend)
    with pytest.raises(RuntimeError, match="second derivative|differentiate twice|once_differentiable"):
        (grad,) = torch.autograd.grad(loss, student, create_graph=True)
        grad.square().sum().backward()


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
    with pytest.raises(ValueError, match="temperature"):
        op(S, T, None, -1.0, 1.0, 5.0, 1e5, 1, False, False)


def test_the_triton_op_applies_the_same_checks_as_the_cpp_op():
    from alphadiv_kernels._validation import check_op_arguments

    calls = [((torch.randn(2, 3, 4), torch.randn(2, 3, 4), None, -1.0, 1.0, 5.0, 1.0, 1), ValueError, "2-D"),
             ((S, T, None, 2.0, 1.0, 5.0, 1.0, 1), ValueError, "alpha_min"),
             ((S, T, torch.ones(4), -1.0, 1.0, 5.0, 1.0, 1), TypeError, "mask must be a bool tensor"),
             ((S, T, None, -1.0, 1.0, 5.0, 1.0, 7), ValueError, "reduction code"),
             ((S, T, None, -1.0, 1.0, 5.0, 1e5, 1), ValueError, "temperature")]
    for args, error, message in calls:
        with pytest.raises(error, match=message):
            check_op_arguments(*args)


def test_python_constants_equal_the_cpp_header():
    import os
    import re

    from alphadiv_kernels import _constants as c

    header = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "adaptive_kd_math.h")).read()
    assert float(re.search(r"kAlphaLimitTolerance = ([0-9.e-]+);", header).group(1)) == c.ALPHA_LIMIT_TOLERANCE
    assert float(re.search(r"kMaxTemperature = ([0-9.e-]+);", header).group(1)) == c.MAX_TEMPERATURE
    branches = dict(re.findall(r"(ForwardKL|ReverseKL|General|NegOne) = (\d)", header))
    assert branches == {"ForwardKL": str(c.BRANCH_FORWARD_KL), "ReverseKL": str(c.BRANCH_REVERSE_KL),
                        "General": str(c.BRANCH_GENERAL), "NegOne": str(c.BRANCH_NEG_ONE)}
    reductions = dict(re.findall(r"kReduction(None|Mean|Sum) = (\d)", header))
    assert reductions == {"None": str(c.REDUCTION_NONE), "Mean": str(c.REDUCTION_MEAN), "Sum": str(c.REDUCTION_SUM)}


@pytest.mark.parametrize("command", ["train", "distill", "eval", "search", "export", "finetune", "convert", "ablate"])
def test_every_command_shows_underscores_and_reads_dashes_as_underscores(command, capsys):
    from supernet.cli import main as cli_main
    from supernet.config import CommandLineParser

    with pytest.raises(SystemExit):
        cli_main([command, "--help"])
    shown = capsys.readouterr().out
    assert "--data_path" in shown or command == "ablate"
    options = [word for word in shown.split() if word.startswith("--")]
    assert not [word for word in options if "-" in word[2:].split("=")[0]], "an option shown with dashes"
    parser = CommandLineParser(prog="x")
    parser.add_argument("--data_path")
    assert parser.parse_args(["--data-path", "a"]).data_path == "a"
    assert parser.parse_args(["--data-path=b"]).data_path == "b"
