"""bonedist: bone-age models for pediatric hand radiographs, trained and evaluated at cluster scale."""

import errno as _errno
import shutil as _shutil
import sys as _sys

__version__ = "0.1.0"

_STORAGE_FULL = {_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG}


class BonedistError(Exception):
    """A user error (bad flag, bad file, bad data) that the CLI reports as one clear line, without a traceback."""


def storage_full(exc: BaseException) -> str | None:
    """A one-line reason when ``exc`` is a write that failed on a full disk, a quota or the file size limit."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_FULL:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return None


def free_gib(path) -> float:
    """Free space (GiB) on the filesystem holding ``path``; NaN when it cannot be read."""
    try:
        return _shutil.disk_usage(path).free / 2**30
    except OSError:
        return float("nan")


def run_command(command: str, run, resume: str = "re-run the same command to resume") -> int:
    """Run a CLI command; a user error, Ctrl-C or a full disk ends in one line on stderr (exit 2, 130, 2)."""
    try:
        return run()
    except BonedistError as exc:
        print(f"bonedist {command}: error: {exc}", file=_sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bonedist {command}: interrupted; finished work is kept, {resume}", file=_sys.stderr)
        return 130
    except OSError as exc:
        if (reason := storage_full(exc)) is None:
            raise
        print(f"bonedist {command}: error: {reason}; finished work is kept, free some space and {resume}",
              file=_sys.stderr)
        return 2
