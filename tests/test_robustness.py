"""Run folders that survive kills and interrupts, one-line errors for bad input, --help, packaging."""
from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch

import alphadiv_kernels as ak
from supernet import checkpoint as ckpt
from supernet import runlog, train
from supernet.cli import main as cli_main
from supernet.config import TrainConfig, config_for_resume, resolve_config
from supernet.errors import NonFiniteLossError

pytestmark = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--epochs", "3", "--batch_size", "128", "--num_random_subnets", "1", "--calib_images", "256"]


def train_command(*args):
    return [sys.executable, "-m", "supernet.train", *args]


def epochs_without_time(out):
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in handle]


def leftover_temporaries(out):
    return glob.glob(os.path.join(out, "*" + ckpt.TEMPORARY_SUFFIX))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "run")
    done = subprocess.run(train_command(*SMALL, "--out", out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


# -- kills and interrupts -----------------------------------------------------------------------

def test_sigkill_at_random_moments_then_resume_leaves_every_step_and_epoch_once(straight_run, tmp_path):
    out = str(tmp_path / "killed")
    rng = random.Random(int(os.environ.get("ALPHADIV_TEST_SEED", "0")) or None)
    command = train_command(*SMALL, "--checkpoint_every", "1", "--out", out)
    kills = 0
    while kills < 6:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen = len(runlog.read_steps(out))
        deadline = time.time() + 120
        while time.time() < deadline and len(runlog.read_steps(out)) <= seen and process.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # anywhere: mid-step, mid-save, mid-evaluation
        if process.poll() is not None:
            break  # finished before this kill
        process.kill()
        process.wait()
        kills += 1
        command = train_command("--resume", out)
    assert kills >= 5
    done = subprocess.run(train_command("--resume", out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = runlog.read_steps(out)
    assert [record["step"] for record in steps] == list(range(1, 28))
    assert steps == runlog.read_steps(straight_run)
    assert epochs_without_time(out) == epochs_without_time(straight_run)
    with open(os.path.join(out, "metrics.csv")) as handle:
        assert [line.split(",")[0] for line in handle.read().splitlines()] == ["epoch", "1", "2", "3"]
    assert not leftover_temporaries(out)
    summary = open(os.path.join(out, "summary.txt")).read()
    assert summary.splitlines()[:2] == open(os.path.join(straight_run, "summary.txt")).read().splitlines()[:2]


def test_ctrl_c_saves_prints_the_resume_command_and_exits_130(tmp_path):
    out = str(tmp_path / "interrupted")
    process = subprocess.Popen(train_command(*SMALL, "--out", out), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(runlog.read_steps(out)) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("alphanet train: interrupted at step") and f"--resume {out}" in last
    assert "Traceback" not in stderr
    state = ckpt.load(out)
    assert state["step"] == len(runlog.read_steps(out)) >= 2
    assert not leftover_temporaries(out)


def test_epoch_aggregates_cover_the_whole_epoch_after_a_resume(tmp_path):
    config = resolve_config("digits", overrides={"epochs": "1", "batch_size": "128", "num_random_subnets": "1",
                                                 "calib_images": "256", "out": str(tmp_path / "run")})
    assert train.run_training(config, stop_at_step=4)["stopped"]
    train.run_training(config_for_resume(config.out), resume=config.out)
    steps = runlog.read_steps(config.out)
    (epoch,) = epochs_without_time(config.out)
    assert epoch["train_ce"] == pytest.approx(sum(r["ce"] for r in steps) / len(steps), rel=1e-12)
    assert epoch["train_kd"] == pytest.approx(sum(r["kd"] for r in steps) / len(steps), rel=1e-12)


def test_a_failed_atomic_write_leaves_no_temporary_file_and_the_old_file_whole(tmp_path):
    target = tmp_path / "state.json"
    ckpt.atomic_write(str(target), b"old")

    def full_disk(stream):
        stream.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        ckpt.atomic_write(str(target), full_disk)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.json"]


def test_a_full_disk_during_training_is_one_line(tmp_path, monkeypatch, capsys):
    def full_disk(path, data):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(ckpt, "atomic_write", full_disk)
    monkeypatch.setattr(train.ckpt, "atomic_write", full_disk)
    with pytest.raises(SystemExit) as stop:
        train.main([*SMALL, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert "No space left on device" in str(stop.value) and "\n" not in str(stop.value)


# -- bad input: one line, non-zero, nothing created ----------------------------------------------

def expect_one_line_error(argv, *fragments):
    with pytest.raises(SystemExit) as stop:
        cli_main(argv)
    message = str(stop.value.code)
    assert stop.value.code not in (0, None) and "\n" not in message.strip() and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "random.pt").write_bytes(os.urandom(4096))
    good = folder / "good.pt"
    torch.save({"model": {"w": torch.ones(3)}, "config": {}}, good)
    (folder / "truncated.pt").write_bytes(good.read_bytes()[:200])
    (folder / "reference.pt").write_bytes(b"")
    torch.save({"state_dict": {}}, folder / "reference.pt")
    return folder


@pytest.mark.parametrize("name,fragment", [("empty.pt", "not a readable checkpoint"),
                                           ("random.pt", "not a readable checkpoint"),
                                           ("truncated.pt", "not a readable checkpoint"),
                                           ("reference.pt", "alphanet convert")])
@pytest.mark.parametrize("command", ["eval", "search", "export", "train"])
def test_bad_checkpoints_are_one_line(bad_checkpoints, tmp_path, name, fragment, command):
    path = str(bad_checkpoints / name)
    argv = {"eval": ["eval", "--checkpoint", path], "search": ["search", "--checkpoint", path],
            "export": ["export", "--checkpoint", path, "--arch", "max", "--out", str(tmp_path / "x")],
            "train": ["train", "--resume", path]}[command]
    expect_one_line_error(argv, fragment)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("extra,fragment", [
    (["--lr_per_256", "nan"], "'lr_per_256' must be a finite number"),
    (["--alpha_min", "2", "--alpha_max", "1"], "alpha_min (2.0) must not exceed alpha_max (1.0)"),
    (["--kd_clip", "0"], "'kd_clip' must be positive"),
    (["--batch_size", "100000"], "exceeds the 1259 training images"),
    (["--num_random_subnets", "-1"], "'num_random_subnets' must be 0 or more"),
    (["--dropout", "1.5"], "'dropout' must be in [0, 1)"),
    (["--epochs", "2.5"], "'epochs' expects int"),
    (["--space", "alphanet"], "ImageNet-sized"),
    (["--epoch", "3"], "unrecognized arguments: --epoch"),
    (["--dataset", "imagefolder", "--data_path", "/nowhere"], "'/nowhere' does not exist"),
])
def test_bad_training_values_are_rejected_before_the_run_folder_exists(tmp_path, extra, fragment):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        cli_main(["train", *extra, "--out", str(out)])
    message = str(stop.value.code) if not isinstance(stop.value.code, int) else ""
    assert stop.value.code != 0
    if isinstance(stop.value.code, int):  # argparse's own errors print one line to stderr and exit 2
        assert stop.value.code == 2
    else:
        assert fragment in message and "\n" not in message
    assert not out.exists()


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["train", "--epoch", "3"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "alphanet train: error: unrecognized arguments: --epoch 3 (see --help)"]


def test_bad_yaml_configs_and_arch_files_are_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: [1,\n")
    expect_one_line_error(["train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "r")],
                          "not valid YAML")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    expect_one_line_error(["train", "--config", str(tmp_path / "list.yaml")], "must hold a mapping")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x81")
    expect_one_line_error(["flops", "--arch", str(tmp_path / "binary.json")], "not a UTF-8 text file")
    expect_one_line_error(["flops", "--arch", str(tmp_path)], "is a folder")
    (tmp_path / "floats.json").write_text(json.dumps({"resolution": 192, "width": [16.0] + [16, 24, 32, 64, 112,
                                                      192, 216, 1792], "depth": [1, 3, 3, 3, 3, 3, 1],
                                                      "kernel_size": [3] * 7, "expand_ratio": [1, 4, 4, 4, 4, 6, 6]}))
    expect_one_line_error(["flops", "--arch", str(tmp_path / "floats.json")], "width[0] = 16.0")
    assert not (tmp_path / "r").exists()


def test_out_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    expect_one_line_error(["train", "--epochs", "1", "--out", str(tmp_path / "file")], "is a file")
    expect_one_line_error(["train", "--epochs", "1", "--out", str(tmp_path / "file" / "run")], "cannot write")


def test_eval_random_zero_is_rejected(tmp_path):
    config = resolve_config("digits", overrides={"epochs": "1", "batch_size": "256", "num_random_subnets": "0",
                                                 "calib_images": "256", "out": str(tmp_path / "run")})
    train.run_training(config)
    expect_one_line_error(["eval", "--checkpoint", config.out, "--arch", "random:0"], "at least 1")
    expect_one_line_error(["eval", "--checkpoint", config.out, "--arch", "a0"], "needs the alphanet space")


def test_non_finite_stop_does_not_name_a_checkpoint_that_does_not_exist(tmp_path, monkeypatch):
    config = resolve_config("digits", overrides={"epochs": "1", "batch_size": "128", "num_random_subnets": "0",
                                                 "calib_images": "256", "max_nonfinite_steps": "2",
                                                 "out": str(tmp_path / "run")})
    original = train.sandwich_backward
    monkeypatch.setattr(train, "sandwich_backward", lambda *a, **k: {
        name: value * float("nan") for name, value in original(*a, **k).items()})
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        train.run_training(config)


# -- --help ---------------------------------------------------------------------------------------

def test_train_help_lists_every_key_with_type_default_and_group(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for item in fields(TrainConfig):
        assert f"--{item.name}" in text, item.name
    for group in ("data keys", "optimisation keys", "execution keys", "outputs keys", "distillation keys",
                  "supernet keys"):
        assert group in text
    assert "--kd_clip FLOAT" in text and "(default 5.0)" in text


# -- packaging ------------------------------------------------------------------------------------

def test_the_op_needs_neither_the_trainer_nor_the_plots():
    script = ("import sys; sys.modules.update(dict.fromkeys(['sklearn', 'matplotlib', 'torchvision', 'yaml', "
              "'tqdm'], None)); import torch, alphadiv_kernels as ak; "
              "s = torch.randn(4, 10, requires_grad=True); ak.fused_adaptive_kd(s, torch.randn(4, 10)).backward(); "
              "assert s.grad is not None; print('ok')")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_alphanet_without_the_extra_names_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    expect_one_line_error(["train"], "scikit-learn", '".[supernet]"')
