"""A run folder belongs to one process, survives a full disk, and the same command continues it.

Each test runs `alphanet train` as separate processes, as a user or a cluster scheduler would: two at
once on one folder, one killed with SIGKILL and started again, one whose disk fills up mid-run.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from supernet import checkpoint as ckpt
from supernet import train

SMALL = ["--batch_size", "128", "--num_random_subnets", "1", "--calib_images", "64"]


def alphanet(*args: str) -> list:
    program = shutil.which("alphanet") or os.path.join(os.path.dirname(sys.executable), "alphanet")
    return [program, "train", *args]


def logged_steps(out) -> list:
    with open(os.path.join(out, "steps.jsonl")) as handle:
        return [json.loads(line)["step"] for line in handle]


def logged_epochs(out) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [json.loads(line)["epoch"] for line in handle]


def wait_for(path: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not os.path.exists(path):
        assert process.poll() is None, f"the run ended before {path} appeared: {process.communicate()}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def assert_clean_and_complete(out, epochs: int, steps_per_epoch: int) -> None:
    assert logged_steps(out) == list(range(1, epochs * steps_per_epoch + 1))  # every step once
    assert logged_epochs(out) == list(range(1, epochs + 1))  # every epoch once
    assert not glob.glob(os.path.join(out, "*" + ckpt.TEMPORARY_SUFFIX))
    assert not os.path.exists(os.path.join(out, ckpt.LOCK_FILE))


def steps_per_epoch_of(out) -> int:
    state = ckpt.load(out)
    return state["step"] // len(state["history"])


def test_a_second_run_on_the_same_folder_stops_at_once_and_the_first_logs_every_step_once(tmp_path):
    out = str(tmp_path / "run")
    command = alphanet("--epochs", "3", *SMALL, "--out", out)
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(os.path.join(out, ckpt.LOCK_FILE), first)
    began = time.time()
    second = subprocess.run(command, capture_output=True, text=True, timeout=60)
    seconds = time.time() - began
    assert second.returncode != 0 and seconds < 10
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"process {first.pid}" in lines[0] and out in lines[0], second.stderr
    output, errors = first.communicate(timeout=300)
    assert first.returncode == 0, errors
    assert_clean_and_complete(out, 3, steps_per_epoch_of(out))


def test_a_killed_run_never_blocks_the_same_command_which_continues_it(tmp_path):
    out = str(tmp_path / "run")
    command = alphanet("--epochs", "2", *SMALL, "--checkpoint_every", "3", "--out", out)
    killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(os.path.join(out, "checkpoint.pt"), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert os.path.exists(os.path.join(out, ckpt.LOCK_FILE))  # left by the kill, holding a dead pid
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "continuing it" in again.stdout
    assert_clean_and_complete(out, 2, steps_per_epoch_of(out))
    other = subprocess.run(alphanet("--epochs", "2", *SMALL, "--batch_size", "64", "--out", out), capture_output=True,
                           text=True, timeout=120)
    assert other.returncode != 0 and "other settings (batch_size: 128 there, 64 now)" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


def test_the_lock_names_its_holder_and_cleans_up_after_itself(tmp_path):
    folder = str(tmp_path / "new")
    with ckpt.RunFolderLock(folder):
        with open(os.path.join(folder, ckpt.LOCK_FILE)) as handle:
            assert handle.read() == str(os.getpid())
    assert not os.path.exists(folder)  # created by the lock, nothing written: removed with it
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from supernet.checkpoint import RunFolderLock; "
                               f"lock = RunFolderLock({folder!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"in use by another run \\(process {holder.pid}\\)"):
            ckpt.RunFolderLock(folder).acquire()
    finally:
        holder.kill()
        holder.wait()
    with ckpt.RunFolderLock(folder):  # the dead holder's lock went with it
        pass


def mount_tmpfs(path, megabytes: int) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_the_same_command_resumes(tmp_path):
    """On a real tmpfs too small for a second checkpoint next to the first (an atomic save needs both)."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, 6):
        pytest.skip("cannot mount a tmpfs here (the injected-error test covers the writer)")
    try:
        out = str(disk / "run")
        command = alphanet("--epochs", "2", *SMALL, "--out", out)
        full = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert full.returncode != 0
        last = full.stderr.strip().splitlines()[-1]  # after the progress bar
        assert last.startswith("alphanet train: cannot write") and "checkpoint.pt" in last, full.stderr
        assert "No space left on device" in last
        assert "Traceback" not in full.stderr
        assert not glob.glob(os.path.join(out, "*" + ckpt.TEMPORARY_SUFFIX))
        kept = ckpt.load(out)  # the epoch-1 checkpoint, whole
        assert len(kept["history"]) == 1
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        again = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert_clean_and_complete(out, 2, kept["step"])
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_an_injected_no_space_error_in_torch_save_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """Where no tmpfs can be mounted: ENOSPC raised by the file under torch.save (which turns it into a
    RuntimeError of its own) at the second checkpoint."""
    out = str(tmp_path / "run")
    argv = ["--epochs", "2", *SMALL, "--out", out]
    real_save, saves = ckpt.save, []

    def save_on_a_full_disk(path, state):
        saves.append(path)
        if len(saves) < 2:
            return real_save(path, state)

        return ckpt.atomic_write(path, lambda stream: torch.save(state, FullFile(stream)))

    class FullFile:
        def __init__(self, stream):
            self.stream = stream

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.stream, name)

    monkeypatch.setattr(ckpt, "save", save_on_a_full_disk)
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    message = str(stop.value)
    assert message.startswith("alphanet train: cannot write or read") and "checkpoint.pt" in message
    assert "No space left on device" in message and "\n" not in message
    assert not glob.glob(os.path.join(out, "*" + ckpt.TEMPORARY_SUFFIX))
    kept = ckpt.load(out)
    assert len(kept["history"]) == 1
    monkeypatch.setattr(ckpt, "save", real_save)
    train.main(argv)  # space freed: the same command continues the run
    assert_clean_and_complete(out, 2, kept["step"])


def test_a_failed_log_append_names_the_log_file(tmp_path, monkeypatch):
    from supernet import runlog

    class FullHandle:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: FullHandle())
    with pytest.raises(OSError) as failed:
        runlog.append_steps(str(tmp_path), [{"step": 1}])
    assert failed.value.filename == os.path.join(str(tmp_path), runlog.STEPS)
    assert failed.value.errno == errno.ENOSPC
