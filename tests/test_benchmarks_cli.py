"""`python -m benchmarks` writes every output and measures what it says, on a tiny case."""
from __future__ import annotations

import csv
import os

import pytest

import alphadiv_kernels as ak
from benchmarks import run

pytestmark = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")


def test_benchmark_cli_writes_table_csv_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "results"
    rows = run.main(["--shapes", "64x500", "--providers", "alphanet-eager", "reference-eager", "alphanet-compile",
                     "fused-cpu", "log_softmax (floor)", "--repeats", "3",
                     "--budget", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "fused-cpu" in printed and "copy bandwidth" in printed and "fastest compiled alphanet-compile" in printed
    for name in ("results.csv", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    providers = ("alphanet-eager", "reference-eager", "alphanet-compile", "fused-cpu", "log_softmax (floor)")
    assert {(r["provider"], r["mode"]) for r in table} == {(p, m) for p in providers for m in ("fwd", "fwd+bwd")}
    by_key = {(row.provider, row.mode): row for row in rows}
    assert all(row.runs >= 3 and row.min_ms <= row.p20_ms <= row.median_ms <= row.p80_ms <= row.max_ms
               for row in rows)
    for mode in ("fwd", "fwd+bwd"):
        # speed-ups are against the faster of the two eager baselines, which is named, and reads 1.0 itself
        eager = {name: by_key[(name, mode)].median_ms for name in ("alphanet-eager", "reference-eager")}
        best = min(eager, key=eager.get)
        assert all(row.eager_baseline == best and row.compile_baseline == "alphanet-compile"
                   for row in rows if row.mode == mode)
        assert by_key[(best, mode)].speedup_vs_eager == pytest.approx(1.0)
        fused = by_key[("fused-cpu", mode)]
        assert fused.speedup_vs_eager == pytest.approx(eager[best] / fused.median_ms)
        assert fused.speedup_vs_floor == pytest.approx(by_key[("log_softmax (floor)", mode)].median_ms / fused.median_ms)
    if os.path.exists("/proc/self/clear_refs"):
        # Peak memory is measured for fwd+bwd: the fused op holds about inputs + one gradient.
        fused = by_key[("fused-cpu", "fwd+bwd")]
        assert fused.peak_vs_ideal is not None and 0.5 < fused.peak_vs_ideal < 1.5


def test_kl_eager_row_is_forward_kl_and_the_summary_compares_fused_to_it(tmp_path, capsys):
    """The small-shape comparison row computes KL(p || q) (the fused op at alpha 1, 1), and the summary gives
    the fused op's time as a multiple of it."""
    import torch

    from benchmarks.cases import KL_EAGER, kl_eager

    generator = torch.Generator().manual_seed(11)
    student, teacher = (torch.randn(5, 13, generator=generator, dtype=torch.float64) * 3 for _ in range(2))
    q, p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    expected = (p.exp() * (p - q)).sum(-1).mean()
    torch.testing.assert_close(kl_eager(student, teacher), expected)
    torch.testing.assert_close(kl_eager(student.float(), teacher.float()).double(),
                               ak.fused_adaptive_kd(student.float(), teacher.float(), alpha_min=1.0, alpha_max=1.0).double(),
                               rtol=1e-5, atol=1e-6)
    rows = run.main(["--shapes", "1x10", "--providers", "fused-cpu", KL_EAGER, "--modes", "fwd+bwd", "--repeats", "5",
                     "--no-memory", "--out", str(tmp_path)])
    by_provider = {row.provider: row for row in rows}
    ratio = by_provider["fused-cpu"].median_ms / by_provider[KL_EAGER].median_ms
    assert f"{ratio:.2f}x eager KL's time" in capsys.readouterr().out


def test_benchmark_cli_rejects_bad_shapes_and_providers():
    with pytest.raises(SystemExit, match="NxC"):
        run.main(["--shapes", "64by500", "--no-memory"])
    with pytest.raises(SystemExit, match="not available"):
        run.main(["--shapes", "8x8", "--providers", "nonexistent", "--no-memory"])


def test_lm_suite_baselines_compute_the_fused_linear_loss_and_gradients():
    """The token-chunked compiled baseline (AlphaNet's loss per chunk) and the materialised-logit one compute what
    fused_linear_adaptive_kd computes: the timings compare equal work."""
    import torch

    from benchmarks import lm

    case = lm.LinearCase(96, 32, 700, torch.float32, "cpu")
    inputs = case.make_inputs(seed=7)
    x, w, b = (inputs[k].clone().requires_grad_(True) for k in ("x", "w", "b"))
    fused = ak.fused_linear_adaptive_kd(x, w, inputs["xt"], inputs["wt"], student_bias=b, teacher_bias=inputs["bt"])
    fused.backward()
    loss, grad_x, grad_w, grad_b = lm.chunked_compile_loss(inputs["x"], inputs["w"], inputs["b"], inputs["xt"],
                                                           inputs["wt"], inputs["bt"], chunk_size=32)
    # AlphaNet's loss returns the surrogate, whose gradient (not value) is the adaptive divergence's.
    for got, expected in ((grad_x, x.grad), (grad_w, w.grad), (grad_b, b.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(loss)


def test_lm_suite_top_k_baseline_computes_the_sparse_fused_linear_gradients():
    """The DistillKit-style eager top-k loss (gather + tail, AlphaNet's loss on the bins) has the gradients of
    fused_linear_sparse_adaptive_kd: the sparse rows compare equal work."""
    import torch

    from benchmarks import lm

    case = lm.LinearCase(64, 32, 500, torch.float32, "cpu")
    inputs = case.make_inputs(seed=3)
    indices, logprobs = lm.teacher_top_k(inputs, 20)
    grads = []
    for loss in (lambda x, w, b: ak.fused_linear_sparse_adaptive_kd(x, w, indices, logprobs, student_bias=b),
                 lambda x, w, b: lm.topk_eager_loss(x, w, b, indices, logprobs)):
        x, w, b = (inputs[k].clone().requires_grad_(True) for k in ("x", "w", "b"))
        loss(x, w, b).backward()
        grads.append((x.grad, w.grad, b.grad))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_lm_suite_prints_the_sparse_rows_and_plots(tmp_path, capsys):
    run.main(["--suite", "lm", "--linear-shapes", "64x16x300", "--topk", "8", "--repeats", "3", "--no-memory",
              "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for provider in ("top-k eager", "top-k compile", "top-k fused-linear", "fused-linear"):
        assert provider in printed
    assert (tmp_path / "lm.png").stat().st_size > 0


def test_lm_memory_probe_runs_a_top_k_provider_in_a_fresh_process():
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "benchmarks.lm", "top-k fused-linear", "64x16x300", "float32", "8"],
                          capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["extra_bytes"] >= 0
