"""Files written atomically, and checkpoints: a kill at any moment leaves the previous file or the new one
whole, and no temporary file behind once the writer (or the next run) has cleaned up."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import io
import os
import random
import tempfile
import time
from typing import Callable, Dict, Iterator, Optional, Union

import torch

from .errors import brief

TEMPORARY_SUFFIX = ".partial"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: files are created as open() would (mkstemp alone makes them private)


class _RecordingWriter:
    """A binary file that remembers the OSError of a failed write: torch.save turns it into a
    RuntimeError ("unexpected pos ..."), and the user should hear "No space left on device". Everything
    else (seek, tell, flush) is the file's own."""

    def __init__(self, stream: io.BufferedWriter):
        self.stream, self.error = stream, None

    def write(self, data) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def atomic_write(path: str, data: Union[bytes, Callable[[io.BufferedWriter], None]]) -> None:
    """Write `data` (bytes, or a function writing to a binary file) to `path` through a temporary file in
    the same folder, fsync and rename; the temporary file is removed if anything fails (a full disk,
    Ctrl-C), and a failed write is an OSError naming `path` (a full disk, a quota, a read-only folder),
    whatever library did the writing. The folder must exist."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=TEMPORARY_SUFFIX,
                                             dir=folder)
    except OSError as error:
        raise OSError(error.errno, error.strerror, path) from None
    recorder = None
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)
        with os.fdopen(handle, "wb") as stream:
            if isinstance(data, bytes):
                stream.write(data)
            else:
                recorder = _RecordingWriter(stream)
                data(recorder)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        cause = recorder.error if recorder is not None and recorder.error is not None else error
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, cause.strerror, path) from None
        raise


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Around appends to a log file: a failed write (a full disk) is an OSError naming the file."""
    try:
        yield
    except OSError as error:
        if error.errno is None or error.filename:
            raise
        raise OSError(error.errno, error.strerror, path) from None


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


LOCK_FILE = ".lock"


class RunFolderLock:
    """One process per run folder: an exclusive lock on `<folder>/.lock`, held while the run writes there.
    A POSIX record lock (`lockf`), not `flock`: it belongs to the process alone, so DataLoader workers
    forked from it do not inherit it, and the kernel drops it the moment the process dies, however it
    dies: a killed run never blocks its resume. The file holds the holder's pid, for the message, and is
    removed on release, with the folder when the lock created it and nothing else was written there."""

    def __init__(self, folder: str):
        self.folder, self.path, self.handle, self.created = folder, os.path.join(folder, LOCK_FILE), None, []

    def acquire(self) -> "RunFolderLock":
        """Create the folder if needed and take the lock; ValueError naming the holder when another
        process has it."""
        self.created = []  # the folders this lock makes (the run folder and any missing parents), deepest first
        folder = os.path.abspath(self.folder)
        while not os.path.isdir(folder):
            self.created.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(self.folder, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    handle.close()
                    raise
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise ValueError(f"{self.folder!r} is in use by another run (process {holder}); wait for it to "
                                 "finish, or choose another folder") from None
            # the holder before us may have removed the file between our open and our lock: retry on the new one
            if os.path.exists(self.path) and os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path)):
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.handle.close()  # closing drops the lock
            self.handle = None
            for folder in self.created:
                try:
                    os.rmdir(folder)  # fails, as it should, once a folder holds anything
                except OSError:
                    break

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def existing_run(out: str, settings: Dict[str, object]) -> Optional[str]:
    """The run to continue when a new run's folder `out` already holds a checkpoint: `out` itself when
    the checkpoint's settings equal `settings` (the same command run again, e.g. after a crash or a full
    disk), None when there is no checkpoint; a ValueError naming the first differing key otherwise, so a
    different run never writes over (or appends to) another's folder."""
    if not out or not os.path.exists(os.path.join(out, "checkpoint.pt")):
        return None
    saved = load(out)["config"]
    for name, value in settings.items():  # where it runs is not part of what it is
        if name not in ("out", "device") and saved.get(name, value) != value:
            raise ValueError(f"--out {out!r} holds a run with other settings ({name}: {saved.get(name)!r} there, "
                             f"{value!r} now); continue it with --resume {out} (keys given with it override), "
                             "or choose another --out")
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
        reason = brief(error)
        if reason.startswith("Weights only load failed"):
            reason = "it holds Python objects that a weights-only load refuses"
        elif "central directory" in reason or isinstance(error, EOFError):
            reason = "an incomplete file"
        size = os.path.getsize(file)
        raise ValueError(f"{file!r} is not a readable checkpoint ({size} bytes, {reason}): it may be "
                         "truncated or not a checkpoint of `alphanet train`") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        hint = " (a checkpoint of the AlphaNet reference code? convert it: alphanet convert SRC DST)" \
            if isinstance(state, dict) and "state_dict" in state else ""
        raise ValueError(f"{file!r} is not a checkpoint of `alphanet train`{hint}")
    return state


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
