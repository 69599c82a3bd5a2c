"""docs/figure2.py: the paper's Figure 2 from the project's own loss, and the claim it illustrates."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "docs", "figure2.py")


def load_script():
    spec = importlib.util.spec_from_file_location("figure2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kl_misses_over_estimation_that_a_negative_alpha_penalises():
    figure2 = load_script()
    under, over = (figure2.divergences(student) for student in figure2.EXAMPLES.values())
    assert over[1.0] < under[1.0]  # KL(p || q): the over-estimating student, wrong top class, looks closer
    assert over[-1.0] > 4 * under[-1.0]  # alpha = -1 penalises it heavily
    assert under[2.0] > 4 * over[2.0]  # and a large positive alpha the under-estimation


def test_the_script_writes_the_figure_and_prints_its_table(tmp_path):
    out = tmp_path / "figure2.png"
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| over-estimation |" in done.stdout
