"""Checkpoints written atomically: a kill at any moment leaves the previous one or the new one whole."""
from __future__ import annotations

import os
import random
from typing import Dict, Optional

import torch

from .config import TrainConfig, _apply, validate


def checkpoint_path(path: str) -> str:
    """A checkpoint file, or a run folder holding checkpoint.pt."""
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path


def save(path: str, state: Dict[str, object]) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)  # atomic on POSIX: readers see the old file or the new one


def load(path: str) -> Dict[str, object]:
    file = checkpoint_path(path)
    if not os.path.exists(file):
        raise FileNotFoundError(f"no checkpoint at {file!r}")
    return torch.load(file, map_location="cpu", weights_only=False)


def config_for_resume(path: str, overrides: Optional[Dict[str, object]] = None) -> TrainConfig:
    """The run's saved config, with explicit overrides (e.g. more epochs) on top."""
    config = _apply(TrainConfig(), load(path)["config"], f"checkpoint {path!r}")
    _apply(config, overrides or {}, "the command line")
    validate(config)
    return config


def capture_rng() -> Dict[str, object]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
