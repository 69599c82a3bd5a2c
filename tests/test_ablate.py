"""`alphanet ablate`: the grid, the aggregation against hand-computed values, and resume after a kill."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import alphadiv_kernels as ak
from supernet import ablate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_parses_keys_aliases_and_alpha_pairs():
    grid = ablate.parse_grid(["kd=none,kl,adaptive", "kd_temperature=1,2", "alphas=-1:1,-0.5:0.5"])
    assert grid == {"kd": ["none", "kl", "adaptive"], "kd_temperature": ["1", "2"], "alphas": ["-1:1", "-0.5:0.5"]}
    assert ablate.config_values((("alphas", "-0.5:0.5"), ("kd", "kl"))) == {"alpha_min": "-0.5", "alpha_max": "0.5",
                                                                           "kd": "kl"}
    for items, message in ((["kd"], "KEY=V1,V2"), (["nonsense=1"], "not a train config key"),
                           (["kd=kl", "kd=none"], "twice"), (["alphas=-1"], "MIN:MAX"), (["seed=1,2"], "--seeds")):
        with pytest.raises(ValueError, match=message):
            ablate.parse_grid(items)


def test_plan_adds_the_kl_baseline_only_when_the_grid_lacks_it_and_checks_every_value():
    with_kl = ablate.make_plan("ablation", {"kd": ["none", "kl", "adaptive"]}, [0, 1], {}, None, False)
    assert with_kl.baseline == (("kd", "kl"),) and len(with_kl.points) == 3
    clips = ablate.make_plan("ablation", {"kd_clip": ["2", "10"]}, [0], {}, None, False)
    assert clips.points[0] == clips.baseline == (("kd", "kl"),) and len(clips.points) == 3
    temperature = ablate.make_plan("ablation", {"kd": ["kl"], "kd_temperature": ["1.0", "4"]}, [0], {}, None, True)
    assert temperature.baseline == (("kd", "kl"), ("kd_temperature", "1.0")) and len(temperature.points) == 2
    assert temperature.train_values(temperature.points[0], 0, "x")["epochs"] == "20"  # --quick: a third of 60
    with pytest.raises(ValueError, match="kd_clip"):
        ablate.make_plan("ablation", {"kd_clip": ["-1"]}, [0], {}, None, False)
    with pytest.raises(ValueError, match="both a grid key"):
        ablate.make_plan("ablation", {"kd": ["kl"]}, [0], {"kd": "none"}, None, False)


def fabricated(plan, table):
    """Run results as the trainer writes them: {(point, seed): summary}."""
    return {(point, seed): {"test_top1_max": table[ablate.point_label(point)][seed][0],
                            "test_top1_min": table[ablate.point_label(point)][seed][1]}
            for point in plan.points for seed in plan.seeds}


def test_aggregation_matches_values_computed_by_hand():
    plan = ablate.make_plan("ablation", {"kd": ["none", "kl", "adaptive"]}, [0, 1, 2], {}, None, False)
    table = {"kd=kl": {0: (90.0, 80.0), 1: (91.0, 82.0), 2: (92.0, 81.0)},
             "kd=adaptive": {0: (91.0, 83.0), 1: (93.0, 84.0), 2: (92.0, 86.0)},
             "kd=none": {0: (89.0, 70.0), 1: (91.0, 72.0), 2: (90.0, 71.0)}}
    rows = {(row["point"], row["metric"]): row for row in ablate.aggregate(plan, fabricated(plan, table))}
    t2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom
    # adaptive, min subnet: values 83, 84, 86 -> mean 84.333, std sqrt(2.3333); paired differences 3, 2, 5
    adaptive = rows[("kd=adaptive", "min")]
    assert adaptive["mean"] == pytest.approx(253 / 3) and adaptive["std"] == pytest.approx(math.sqrt(7 / 3))
    assert adaptive["diff"] == pytest.approx(10 / 3)
    half = t2 * math.sqrt(7 / 3) / math.sqrt(3)  # differences 3, 2, 5: mean 10/3, variance 7/3
    assert (adaptive["ci_low"], adaptive["ci_high"]) == pytest.approx((10 / 3 - half, 10 / 3 + half))
    # none, max subnet: 89, 91, 90 against 90, 91, 92 -> differences -1, 0, -2
    none = rows[("kd=none", "max")]
    assert none["mean"] == pytest.approx(90.0) and none["std"] == pytest.approx(1.0)
    assert none["diff"] == pytest.approx(-1.0)
    assert none["ci_high"] - none["diff"] == pytest.approx(t2 * 1.0 / math.sqrt(3))
    baseline = rows[("kd=kl", "max")]
    assert baseline["baseline"] and baseline["diff"] == 0 and baseline["ci_low"] == baseline["ci_high"] == 0
    # one seed: no spread, no interval
    single = ablate.summarise({0: 90.0}, {0: 89.0})
    assert single["diff"] == 1.0 and math.isnan(single["std"]) and math.isnan(single["ci_low"])


def test_outputs_hold_the_table_csv_json_and_plot(tmp_path):
    plan = ablate.make_plan("ablation", {"kd": ["none", "kl", "adaptive"]}, [0, 1], {}, None, True)
    table = {label: {0: (90.0 + i, 80.0 + i), 1: (91.0 + i, 82.0 - i)}
             for i, label in enumerate(("kd=none", "kd=kl", "kd=adaptive"))}
    results = fabricated(plan, table)
    paths = ablate.write_outputs(plan, str(tmp_path), ablate.aggregate(plan, results), results)
    markdown = open(paths[0]).read()
    assert "| kd=adaptive | 2 |" in markdown and "(KL)" in markdown and "[95% confidence interval]" in markdown
    record = json.load(open(paths[2]))
    assert record["baseline"] == "kd=kl" and len(record["runs"]) == 6 and record["quick"]
    assert open(paths[1]).read().startswith("point,baseline,metric,kd,n,mean,std")
    assert os.path.getsize(paths[3]) > 0


@pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")
def test_killed_ablation_resumes_without_rerunning_finished_runs(tmp_path):
    out = str(tmp_path / "ablation")
    command = [sys.executable, "-m", "supernet.cli", "ablate", "--grid", "kd=kl,adaptive", "--seeds", "0",
               "--epochs", "1", "--calib_images", "64", "--boxplot", "2", "--out", out]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    first = os.path.join(out, "runs", "kd-kl", "seed-0", "summary.json")
    deadline = time.time() + 300
    while not os.path.exists(first) and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)
    assert os.path.exists(first), "the first run did not finish"
    os.killpg(process.pid, signal.SIGKILL)  # the ablation and its current run, at once
    process.wait()
    stamp = os.path.getmtime(first)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 of 2 runs already finished" in done.stdout
    assert os.path.getmtime(first) == stamp  # not run again
    record = json.load(open(os.path.join(out, "ablation.json")))
    assert [run["point"] for run in record["runs"]] == ["kd=kl", "kd=adaptive"]
    groups = json.load(open(os.path.join(out, "groups.json")))  # --boxplot: one box per point and FLOPs group
    assert [row["label"] for row in groups] == ["kd=kl"] * 4 + ["kd=adaptive"] * 4
    assert os.path.exists(os.path.join(out, "groups.png"))
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "runs", "kd-adaptive", "seed-0",
                                                                       "steps.jsonl"))]
    assert steps == sorted(set(steps))  # every step of the resumed run exactly once
    leftovers = [name for _, _, names in os.walk(out) for name in names if name.endswith(".partial")]
    assert not leftovers


def test_bad_command_lines_are_one_line_errors_before_anything_is_created(tmp_path):
    out = tmp_path / "never"
    for argv, message in ((["--grid", "kd=foo"], "kd"), (["--grid", "kd=kl", "--seeds", "a"], "--seeds"),
                          (["--grid", "kd=kl", "--jobs", "0"], "--jobs")):
        done = subprocess.run([sys.executable, "-m", "supernet.cli", "ablate", *argv, "--out", str(out)], cwd=REPO,
                              capture_output=True, text=True)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_more_seeds_extend_an_ablation_folder_and_a_different_grid_is_refused(tmp_path):
    out = str(tmp_path / "ablation")
    first = ablate.make_plan("ablation", {"kd": ["none", "kl"]}, [0], {}, None, False)
    ablate.open_folder(out, first)
    more_seeds = ablate.make_plan("ablation", {"kd": ["none", "kl"]}, [0, 1, 2], {}, None, False)
    ablate.open_folder(out, more_seeds)  # the same ablation, extended
    assert json.load(open(os.path.join(out, "plan.json")))["seeds"] == [0, 1, 2]
    assert first.default_folder() == more_seeds.default_folder()
    other = ablate.make_plan("ablation", {"kd": ["none", "adaptive"]}, [0], {}, None, False)
    with pytest.raises(ValueError, match="different ablation"):
        ablate.open_folder(out, other)
    assert other.default_folder() != first.default_folder()
