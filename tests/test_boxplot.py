"""`alphanet boxplot`: subnets sampled per FLOPs group, the same in every run, and their statistics."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import alphadiv_kernels as ak
from supernet import boxplot
from supernet.cli import main as cli_main
from supernet.config import resolve_config
from supernet.flops import mflops
from supernet.space import DIGITS

pytestmark = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")


def test_box_statistics_are_numpys_percentiles():
    values = [71.5, 80.0, 64.25, 90.0, 77.0, 85.5, 69.0]
    stats = boxplot.box_statistics(values)
    assert stats == {"min": 64.25, "q1": float(np.percentile(values, 25)), "median": 77.0,
                     "q3": float(np.percentile(values, 75)), "max": 90.0}
    assert boxplot.box_statistics([3.0]) == dict.fromkeys(boxplot.STATISTICS, 3.0)


def test_groups_hold_distinct_subnets_within_their_flops_interval_drawn_by_the_seed():
    intervals = boxplot.group_edges(DIGITS, 3)
    groups = boxplot.sample_groups(DIGITS, intervals, 5, seed=1)
    assert groups == boxplot.sample_groups(DIGITS, intervals, 5, seed=1)
    assert groups != boxplot.sample_groups(DIGITS, intervals, 5, seed=2)
    keys = [json.dumps(arch, sort_keys=True) for group in groups for arch in group]
    assert len(keys) == len(set(keys))
    for (low, high), group in zip(intervals, groups):
        assert 0 < len(group) <= 5 and all(low <= mflops(DIGITS, arch) <= high for arch in group)
    with pytest.raises(ValueError, match="increasing"):
        boxplot.group_edges(DIGITS, 3, [1.0, 0.5])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from supernet import train

    folders = []
    for kd in ("kl", "adaptive"):
        out = str(tmp_path_factory.mktemp("runs") / kd)
        train.run_training(resolve_config("digits", overrides={"epochs": "1", "batch_size": "128", "kd": kd,
                                                               "num_random_subnets": "0", "calib_images": "128",
                                                               "out": out}))
        folders.append(out)
    return folders


def test_the_command_evaluates_the_same_subnets_in_every_run_and_writes_table_and_plot(two_runs, tmp_path, capsys):
    out = tmp_path / "boxes"
    cli_main(["boxplot", "--checkpoint", *two_runs, "--label", "kl", "adaptive", "--groups", "2", "--per_group", "3",
              "--calib_images", "128", "--out", str(out)])
    rows = json.loads((out / "groups.json").read_text())
    assert [row["label"] for row in rows] == ["kl", "kl", "adaptive", "adaptive"]
    for kl_row, adaptive_row in zip(rows[:2], rows[2:]):
        assert [r["arch"] for r in kl_row["results"]] == [r["arch"] for r in adaptive_row["results"]]
        for row in (kl_row, adaptive_row):
            assert {k: row[k] for k in boxplot.STATISTICS} == boxplot.box_statistics([r["top1"] for r in row["results"]])
    with open(out / "groups.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert (out / "groups.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out
