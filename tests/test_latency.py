"""Latency tables (`alphanet latency`), their prediction and calibration, and the search under a latency window,
on the digits space."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import alphadiv_kernels as ak
from supernet import train
from supernet.cli import main as cli_main
from supernet.config import resolve_config
from supernet.latency import LatencyTable, all_parts, build_table, calibrate, random_configs, spearman, subnet_parts
from supernet.space import SPACES, get_space

pytestmark = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_table(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("latency") / "digits.json")
    cli_main(["latency", "--space", "digits", "--quick", "--threads", "1", "--out", path])
    return path


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_subnet_runs_only_parts_of_its_space(name):
    space = get_space(name)
    parts = set(all_parts(space))
    rng = random.Random(0)
    for config in [space.min_config(), space.max_config()] + [space.random_config(rng) for _ in range(100)]:
        assert set(subnet_parts(space, config)) <= parts


def test_the_table_predicts_the_sum_of_its_parts_and_stores_its_calibration(digits_table):
    table = LatencyTable.load(digits_table)
    assert set(table.data["entries"]) == set(all_parts(get_space("digits")))
    assert {"machine", "torch", "threads", "date", "batch_size", "dtype"} <= set(table.data)
    config = get_space("digits").max_config()
    assert table.predict(config) == pytest.approx(sum(table.data["entries"][k] for k in subnet_parts(table.space,
                                                                                                      config)))
    report = calibrate(LatencyTable(json.loads(json.dumps(table.data)), digits_table + ".fit.json"),
                       random_configs(table.space, 6, seed=1), progress=False)
    fit = report["fit"]
    assert fit["subnets"] == 6 and fit["mae_ms"] >= 0 and -1 <= fit["spearman_predicted"] <= 1
    for row in report["subnets"]:
        assert row["predicted_ms"] == pytest.approx(fit["slope"] * row["parts_ms"] + fit["intercept"])


def test_spearman_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)


def test_a_killed_measurement_keeps_its_parts_and_resumes(tmp_path):
    path = str(tmp_path / "table.json")
    command = [sys.executable, "-m", "supernet.cli", "latency", "--space", "digits", "--threads", "1", "--out", path]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(path) and LatencyTable.load(path).data["entries"]):
        time.sleep(0.02)
    assert os.path.exists(path), "no table written within 2 minutes"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = LatencyTable.load(path).data["entries"]
    total = len(all_parts(get_space("digits")))
    assert 0 < len(partial) < total, "the run finished before it was killed"
    assert os.listdir(tmp_path) == ["table.json"]  # no temporary file left
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    entries = LatencyTable.load(path).data["entries"]
    assert len(entries) == total and all(entries[key] == value for key, value in partial.items())


def test_bad_latency_inputs_are_one_line(tmp_path, digits_table, capsys):
    cases = [
        (["latency", "--space", "nowhere", "--out", str(tmp_path / "t.json")], "unknown space 'nowhere'"),
        (["latency", "--space", "digits", "--out", digits_table], "holds a latency table with other settings"),
        (["latency", "--space", "digits", "--out", str(tmp_path)], "is a folder"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            cli_main(argv)
        said = f"{stop.value.code} {capsys.readouterr().err}"
        assert message in said and "Traceback" not in said, said


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-run")
    config = resolve_config("digits", overrides={"epochs": "1", "batch_size": "128", "num_random_subnets": "1",
                                                 "calib_images": "256", "out": str(out)})
    train.run_training(config)
    return str(out)


SEARCH = ["--population", "8", "--mutations", "3", "--crossovers", "3", "--iterations", "2", "--calib-images", "128"]


def test_search_under_a_latency_budget_measures_its_front(run_dir, digits_table, tmp_path, capsys):
    table = LatencyTable.load(digits_table)
    space = get_space("digits")
    budget = (table.predict(space.min_config()) + table.predict(space.max_config())) / 2
    out = tmp_path / "search"
    cli_main(["search", "--checkpoint", run_dir, *SEARCH, "--latency_table", digits_table, "--max_latency_ms",
              str(budget), "--out", str(out)])
    records = json.loads((out / "pareto.json").read_text())
    assert records and all(record["latency_ms"] <= budget for record in records)
    front = [record for record in records if record["on_front"]]
    report = json.loads((out / "latency_report.json").read_text())
    assert len(report) == len(front) and all(row["measured_ms"] > 0 for row in report)
    for row in report:
        assert row["error_ms"] == pytest.approx(row["predicted_ms"] - row["measured_ms"])
    printed = capsys.readouterr().out
    assert "measured:" in printed and "latency_report.json" in printed


def test_search_latency_errors_are_one_line(run_dir, digits_table, tmp_path, capsys):
    other = tmp_path / "tiny.json"
    build_table(get_space("slim_mbv2_digits"), str(other), quick=True, progress=False, threads=1)
    cases = [
        (["--latency_table", digits_table, "--max_latency_ms", "1e-6"], "below the smallest subnet's predicted"),
        (["--latency_table", str(other)], "measured for the 'slim_mbv2_digits' space, not 'digits'"),
        (["--max_latency_ms", "3"], "need --latency_table"),
        (["--latency_table", str(tmp_path / "missing.json")], "does not exist"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as stop:
            cli_main(["search", "--checkpoint", run_dir, *SEARCH, *extra, "--out", str(tmp_path / "s")])
        said = f"{stop.value.code} {capsys.readouterr().err}"
        assert message in said and "Traceback" not in said, said
