"""Calibrated evaluation, evolutionary search and export on a small trained digits supernet."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import alphadiv_kernels as ak
from supernet import train
from supernet.cli import main as cli_main
from supernet.config import resolve_config
from supernet.evaluation import TrainedSupernet, classification_metrics
from supernet.search import pareto_front

pytestmark = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = ["--population", "8", "--mutations", "3", "--crossovers", "3", "--calib-images", "256"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-run")
    config = resolve_config("digits", overrides={"epochs": "2", "batch_size": "128", "num_random_subnets": "1",
                                                 "calib_images": "256", "out": str(out)})
    train.run_training(config)
    return str(out)


def test_eval_of_the_max_subnet_matches_the_trainers_last_validation(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    cli_main(["eval", "--checkpoint", run_dir, "--arch", "max", "--split", "val", "--calib-images", "256",
              "--calib-batch-size", "128",  # the run's batch size: the calibration the trainer did
              "--out", str(out)])
    result = json.loads(out.read_text())
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        last_epoch = [json.loads(line) for line in handle][-1]
    assert result["top1"] == pytest.approx(last_epoch["val_top1_max"], abs=1e-9)  # same calibration, same data
    assert set(result) >= {"arch", "mflops", "params", "top1", "top5", "loss", "split"}
    assert result["top5"] >= result["top1"]
    assert "val top-1" in capsys.readouterr().out


def test_eval_random_subnets_and_bad_arch_file(run_dir, tmp_path):
    out = tmp_path / "random.json"
    cli_main(["eval", "--checkpoint", run_dir, "--arch", "random:2", "--split", "test", "--out", str(out)])
    # default calibration on the bundled digits: the run's own calib_images (not the reference's 16384)
    results = json.loads(out.read_text())
    assert len(results) == 2 and all(r["split"] == "test" for r in results)
    trained = TrainedSupernet.load(run_dir)
    subnet = trained.calibrated_subnet(results[0]["arch"], trained.config.calib_images)  # an independent recount
    recount = classification_metrics(subnet, trained.loader("test"), torch.device("cpu"))
    assert recount["top1"] == results[0]["top1"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"resolution": 16}))
    with pytest.raises(SystemExit, match="missing"):
        cli_main(["eval", "--checkpoint", run_dir, "--arch", str(bad)])


def test_search_starts_from_the_min_subnet_and_resumes_after_a_finished_iteration(run_dir, tmp_path, capsys):
    out = tmp_path / "search"
    cli_main(["search", "--checkpoint", run_dir, "--iterations", "1", "--out", str(out)] + SEARCH)
    cli_main(["search", "--checkpoint", run_dir, "--iterations", "2", "--out", str(out)] + SEARCH)
    assert "resuming after iteration 1" in capsys.readouterr().out
    records = json.loads((out / "pareto.json").read_text())
    assert (out / "pareto.png").stat().st_size > 0
    assert all(r["split"] == "val" for r in records)
    fresh = tmp_path / "fresh"
    cli_main(["search", "--checkpoint", run_dir, "--iterations", "2", "--out", str(fresh)] + SEARCH)
    assert [r["arch"] for r in json.loads((fresh / "pareto.json").read_text())] == [r["arch"] for r in records]
    trained = TrainedSupernet.load(run_dir)
    front = [records[i] for i in pareto_front(records)]
    assert [bool(r["on_front"]) for r in records] == [i in pareto_front(records) for i in range(len(records))]
    assert records[0]["arch"] == trained.space.min_config()  # the initial population starts from it
    assert any(f["arch"] == records[0]["arch"] or f["top1"] >= records[0]["top1"] for f in front)


def test_search_gives_the_same_results_with_one_and_two_processes(run_dir, tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    base = [sys.executable, "-m", "supernet.search", "--checkpoint", run_dir, "--iterations", "1"] + SEARCH
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(base + ["--out", str(single)], cwd=REPO, check=True, capture_output=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(torchrun + base[1:] + ["--out", str(double)], cwd=REPO, capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    keep = ("arch", "mflops", "params", "top1", "top5", "on_front")
    one, two = (json.loads((folder / "pareto.json").read_text()) for folder in (single, double))
    assert [{k: r[k] for k in keep} for r in one] == [{k: r[k] for k in keep} for r in two]


def test_exported_program_runs_in_plain_torch_and_matches_the_extracted_subnet(run_dir, tmp_path):
    trained = TrainedSupernet.load(run_dir)
    arch = trained.space.max_config()
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(arch))
    out = tmp_path / "export"
    cli_main(["export", "--checkpoint", run_dir, "--arch", str(arch_file), "--out", str(out), "--calib-images", "256"])
    assert json.loads((out / "arch.json").read_text())["arch"] == arch
    images = torch.randn(7, 3, 8, 8)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        expected = trained.calibrated_subnet(arch, 256)(images)
    script = ("import sys, torch; m = torch.export.load(sys.argv[1]).module(); x = torch.load(sys.argv[2]);"
              "torch.save(m(x), sys.argv[3]); assert 'supernet' not in sys.modules")
    subprocess.run([sys.executable, "-c", script, str(out / "model.pt2"), str(tmp_path / "images.pt"),
                    str(tmp_path / "out.pt")], cwd=tmp_path, check=True, capture_output=True)
    assert (torch.load(tmp_path / "out.pt") - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("command", ["eval", "search", "export"])
def test_device_cpu_runs_and_a_missing_gpu_is_one_line_before_anything_is_written(command, run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = {"eval": ["--arch", "min", "--out", str(out)], "search": [*SEARCH, "--iterations", "1", "--out", str(out)],
            "export": ["--arch", "min", "--out", str(out)]}[command]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as stop:
            cli_main([command, "--checkpoint", run_dir, *argv, "--device", "cuda"])
        assert str(stop.value) == f"alphanet {command}: --device cuda: no CUDA device is visible (use --device cpu or auto)"
        assert not out.exists()
    cli_main([command, "--checkpoint", run_dir, *argv, "--device", "cpu"])
    assert out.exists()


def test_train_device_is_checked_before_the_run_folder_is_made(tmp_path):
    with pytest.raises(SystemExit, match="config key 'device' must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        train.main(["--device", "gpu", "--out", str(tmp_path / "run")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device is visible"):
            train.main(["--device", "cuda", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
