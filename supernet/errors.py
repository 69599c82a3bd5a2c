"""What a user sees when a command cannot go on: one line and a non-zero exit, never a traceback.

Every `alphanet` command runs its work under `run_command`: our own ValueErrors as written, the
system's OSErrors as `'path': reason` (with what to do when the disk is full or read-only), a stopped
run (Ctrl-C, SIGTERM) with exit code 130 and the command that continues it. Torch-free, so that
`alphanet --help` starts fast.
"""
from __future__ import annotations

import errno
import sys
from typing import Callable, NoReturn


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM: the run stopped at a step boundary, its checkpoint saved."""


class CommandError(Exception):
    """A failure a command reports in one line (besides ValueError and OSError)."""


class NonFiniteLossError(CommandError):
    """Too many steps in a row had a non-finite loss or gradient; the last good checkpoint is kept."""


STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def error_line(error: Exception) -> str:
    """One line for a user: our own errors as written, the system's as `'path': reason` (with what to do
    when the disk is full or read-only)."""
    if isinstance(error, OSError) and error.strerror:
        where = error.filename or "a file"
        hint = (" (free space, or make the folder writable, then run the same command again: what was saved is "
                "kept)") if error.errno in STORAGE_ERRORS else ""
        return f"cannot write or read {where!r}: {error.strerror}{hint}"
    return first_line(error)


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or the exception's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def brief(error: BaseException, limit: int = 120) -> str:
    """The first sentence of a library's error message (PyTorch's run to several, and to internals), or
    the exception's name when it has none."""
    text = first_line(error).split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def read_text(path: str, what: str, hint: str = "") -> str:
    """The contents of a UTF-8 text file; ValueError in one line naming `what`, the path and the problem
    (missing, a folder, not UTF-8, unreadable), followed by `hint`."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r}: no such file{hint}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path!r} is a folder, not a file{hint}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path!r} is not a UTF-8 text file{hint}") from None
    except OSError as error:
        raise ValueError(f"{what} {path!r} cannot be read: {error.strerror}") from None


def fail(prog: str, message: str) -> NoReturn:
    raise SystemExit(f"{prog}: {message}")


def _process_group():
    """torch.distributed when a process group is up (torchrun), else None; torch is not imported for it."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed
    return None


def run_command(prog: str, work: Callable[[], object], kept: str = "the last checkpoint is kept") -> object:
    """A command's main: `work()`, with one line and a non-zero exit (130 when interrupted, saying what is
    `kept`) for what can go wrong, and the process group (under torchrun) closed."""
    try:
        result = work()
        group = _process_group()
        if group:
            # Every process leaves together: one that tears its process group down while another still writes
            # the run's files can abort in gloo's threads at exit.
            group.barrier()
        return result
    except Interrupted as stop:
        print(f"{prog}: {stop}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {kept}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (ValueError, OSError, CommandError) as error:
        fail(prog, error_line(error))
    finally:
        group = _process_group()
        if group:
            group.destroy_process_group()
