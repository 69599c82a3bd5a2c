"""Files written atomically, and checkpoints: a kill at any moment leaves the previous file or the new one
whole, and no temporary file behind once the writer (or the next run) has cleaned up."""
from __future__ import annotations

import contextlib
import glob
import io
import os
import random
import tempfile
import time
from typing import Callable, Dict, Optional, Union

import torch

from .config import TrainConfig, apply, from_saved, validate

TEMPORARY_SUFFIX = ".partial"


def atomic_write(path: str, data: Union[bytes, Callable[[io.BufferedWriter], None]]) -> None:
    """Write `data` (bytes, or a function writing to a binary file) to `path` through a temporary file in
    the same folder, fsync and rename; the temporary file is removed if anything fails (a full disk,
    Ctrl-C). The folder must exist."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=TEMPORARY_SUFFIX, dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            if isinstance(data, bytes):
                stream.write(data)
            else:
                data(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def remove_stale_temporaries(folder: str) -> None:
    """Temporary files a killed writer (SIGKILL: no cleanup ran) left in `folder`."""
    for path in glob.glob(os.path.join(glob.escape(folder), "*" + TEMPORARY_SUFFIX)):
        with contextlib.suppress(OSError):
            os.unlink(path)


def checkpoint_path(path: str) -> str:
    """A checkpoint file, or a run folder holding checkpoint.pt."""
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path


def run_folder(out: str, resume: Optional[str], default_name: str) -> str:
    """The run's folder: the resumed checkpoint's, else `out`, else runs/<default_name>-<time>; a file
    in its place is a ValueError."""
    if resume:
        out = os.path.dirname(os.path.abspath(checkpoint_path(resume)))
    out = out or os.path.join("runs", f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a folder")
    return out


def save(path: str, state: Dict[str, object]) -> None:
    atomic_write(path, lambda stream: torch.save(state, stream))


def load(path: str) -> Dict[str, object]:
    """A checkpoint of this project's trainer; ValueError / FileNotFoundError naming what is wrong."""
    file = checkpoint_path(path)
    if not os.path.exists(file):
        raise FileNotFoundError(f"no checkpoint at {file!r}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to parse: truncated, empty, random bytes, not a torch file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if reason.startswith("Weights only load failed"):
            reason = "it holds Python objects that a weights-only load refuses"
        size = os.path.getsize(file)
        raise ValueError(f"{file!r} is not a readable checkpoint ({size} bytes; {reason[:160]}); it may be "
                         "truncated or not a checkpoint of `alphanet train`") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        hint = " (a checkpoint of the AlphaNet reference code? convert it: alphanet convert SRC DST)" \
            if isinstance(state, dict) and "state_dict" in state else ""
        raise ValueError(f"{file!r} is not a checkpoint of `alphanet train`{hint}")
    return state


def config_for_resume(path: str, overrides: Optional[Dict[str, object]] = None) -> TrainConfig:
    """The run's saved config, with explicit overrides (e.g. more epochs) on top."""
    config = from_saved(load(path)["config"], f"checkpoint {path!r}")
    apply(config, overrides or {}, "the command line")
    validate(config)
    return config


def capture_rng() -> Dict[str, object]:
    state = {"torch": torch.get_rng_state(), "python": _python_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_state():
    """random.getstate() in types a weights-only checkpoint can hold (lists instead of tuples)."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
