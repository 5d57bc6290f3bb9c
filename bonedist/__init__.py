"""bonedist: bone-age models for pediatric hand radiographs, trained and evaluated at cluster scale."""

import errno as _errno
import shutil as _shutil
import sys as _sys

__version__ = "0.2.0"

_STORAGE_FULL = {_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG}
_NOT_WRITABLE = "; choose a folder you can write to (--out, --runs-dir) or fix its permissions"
_PATH_HINTS = {_errno.EACCES: _NOT_WRITABLE, _errno.EPERM: _NOT_WRITABLE,
               _errno.EROFS: "; the file system is read-only: choose another folder (--out, --runs-dir)",
               _errno.ENOTDIR: "; a file stands where a folder is needed", _errno.ENOENT: ""}


class BonedistError(Exception):
    """A user error (bad flag, bad file, bad data) that the CLI reports as one clear line, without a traceback."""


def storage_full(exc: BaseException) -> str | None:
    """A one-line reason when ``exc`` is a write that failed on a full disk, a quota or the file size limit."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_FULL:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return None


_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL", "gloo",
               "ProcessGroup", "collective operation timeout")


def lost_peer(exc: BaseException) -> str | None:
    """A one-line account when a collective failed because another process of a distributed job died."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    text = str(exc)
    if world < 2 or not (type(exc).__name__ in ("DistBackendError", "DistNetworkError")
                         or any(sign in text for sign in _PEER_SIGNS)):
        return None
    detail = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    detail = detail.split("] ", 1)[-1][:140]  # drop the source-file prefix of gloo/NCCL messages
    return (f"rank {os.environ.get('RANK', '?')} of {world} lost contact with another process of the job (it died, "
            f"was killed or stopped answering: {detail}); see that process's own error above")


def free_gib(path) -> float:
    """Free space (GiB) on the filesystem holding ``path``; NaN when it cannot be read."""
    try:
        return _shutil.disk_usage(path).free / 2**30
    except OSError:
        return float("nan")


def run_command(command: str, run, resume: str = "re-run the same command to resume") -> int:
    """Run a CLI command; a user error, Ctrl-C or a full disk ends in one line on stderr (exit 2, 130, 2). Under
    `accelerate launch` the process group is destroyed on the way out, however the command ended."""
    try:
        return _run_command(command, run, resume)
    finally:
        end_distributed()


def end_distributed() -> None:
    """Destroy this process's distributed process group, if it has one. A gloo process that exits with its group
    alive can abort in interpreter teardown ("terminate called without an active exception", SIGABRT), which fails
    the whole `accelerate launch` even though its work was done. Destroying is local: no peer is waited for."""
    dist = _sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a group whose peer died may refuse; the exit status is already decided
        pass


def _run_command(command: str, run, resume: str) -> int:
    for stream in (_sys.stdout, _sys.stderr):  # file names that are not UTF-8 are printed as their bytes
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="surrogateescape")
            except (ValueError, OSError):
                pass
    try:
        return run()
    except BonedistError as exc:
        print(f"bonedist {command}: error: {exc}", file=_sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bonedist {command}: interrupted; finished work is kept, {resume}", file=_sys.stderr)
        return 130
    except BrokenPipeError:  # `bonedist models | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), _sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except RuntimeError as exc:
        if (reason := lost_peer(exc)) is None:
            raise
        print(f"bonedist {command}: error: {reason}; {resume}", file=_sys.stderr)
        return 1
    except OSError as exc:
        if (reason := storage_full(exc)) is not None:
            print(f"bonedist {command}: error: {reason}; finished work is kept, free some space and {resume}",
                  file=_sys.stderr)
            return 2
        if exc.filename is None:
            raise
        # a folder that cannot be created or written (permissions, a read-only file system, a file in the way)
        print(f"bonedist {command}: error: cannot use {exc.filename}: {exc.strerror}"
              f"{_PATH_HINTS.get(exc.errno, '')}", file=_sys.stderr)
        return 2
