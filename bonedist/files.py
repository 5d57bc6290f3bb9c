"""Files bonedist writes and reads back: atomic writes, and reads that validate.

Every file another process may read while it is written (report JSONs, manifests, run configs, prediction tables)
goes through ``write_atomic``: a temporary file in the same folder, flushed and fsynced, then renamed over the
target, so a reader sees the old file or the new one, never a torn one (SQLite's and every serious writer's rule).

Every file bonedist reads back goes through ``read_json`` and a typed check of its own: a missing, cut or
hand-edited file becomes one ``BonedistError`` line naming the file, the field and what is wrong, never a traceback
and never a number computed from a damaged value.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bonedist import BonedistError


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator:
    """A file object whose contents replace ``path`` only when the block ends without an error (readable by
    everyone the umask allows, as a plain ``open`` would create it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see ``atomic_open``)."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes)
                                                                       else {"encoding": "utf-8"})) as f:
        f.write(data)


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, obj, indent: int | None = 1, default=None) -> None:
    write_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


def read_json(path: str | Path, what: str = "") -> object:
    """The JSON value in ``path``; a missing, unreadable, empty or cut file is one ``BonedistError`` line."""
    path = Path(path)
    label = f"{path}{f' ({what})' if what else ''}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BonedistError(f"{label}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BonedistError(f"{label}: cannot be read ({exc.__class__.__name__}: {exc})") from None
    if not text.strip():
        raise BonedistError(f"{label}: empty (a write that was cut off); write it again") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BonedistError(f"{label}: damaged JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); the "
                            f"file was cut or edited by hand") from None


def read_yaml(path: str | Path, flag: str) -> object:
    """The YAML value in ``path`` (safe loader: nothing in it is evaluated); a missing or unreadable file is one
    ``BonedistError`` line starting with ``flag PATH``."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BonedistError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BonedistError(f"{flag} {path}: not readable YAML ({str(exc).splitlines()[0]})") from None


class Fields:
    """Typed access to one JSON object read from ``path``: each getter checks one field and says which is wrong.

        meta = Fields(read_json(path), path)
        sigma = meta.number("sigma", minimum=0, inclusive=False)
    """

    def __init__(self, data: object, path: str | Path, prefix: str = ""):
        self.path, self.prefix = Path(path), prefix
        if not isinstance(data, dict):
            self.fail("", f"expected a JSON object, found {type(data).__name__}")
        self.data: dict = data

    def fail(self, key: str, why: str):
        field = f"{self.prefix}{key}"
        raise BonedistError(f"{self.path}: {'field ' + repr(field) + ' ' if field else ''}{why}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def value(self, key: str):
        if key not in self.data:
            self.fail(key, "is missing")
        return self.data[key]

    def number(self, key: str, minimum: float | None = None, maximum: float | None = None,
               inclusive: bool = True, integer: bool = False) -> float:
        return check_number(self.value(key), lambda why: self.fail(key, why), minimum, maximum, inclusive, integer)

    def text(self, key: str, choices: tuple[str, ...] | None = None) -> str:
        value = self.value(key)
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, found {value!r}")
        if choices is not None and value not in choices:
            self.fail(key, f"is {value!r}, expected one of {', '.join(choices)}")
        return value

    def mapping(self, key: str) -> Fields:
        value = self.value(key)
        if not isinstance(value, dict):
            self.fail(key, f"must be an object, found {type(value).__name__}")
        return Fields(value, self.path, f"{self.prefix}{key}.")

    def numbers(self, key: str, length: int | None = None, minimum: float | None = None) -> list[float]:
        value = self.value(key)
        if not isinstance(value, list) or (length is not None and len(value) != length):
            self.fail(key, f"must be a list of {length or 'some'} numbers, found {_short(value)}")
        return [check_number(v, lambda why, i=i: self.fail(f"{key}[{i}]", why), minimum) for i, v in
                enumerate(value)]


def check_number(value, fail, minimum: float | None = None, maximum: float | None = None, inclusive: bool = True,
                 integer: bool = False) -> float:
    """``value`` as a finite number within the bounds, else ``fail(why)`` (which raises)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(f"must be a number, found {_short(value)}")
    if not math.isfinite(value):
        fail(f"must be finite, found {value}")
    if integer and value != int(value):
        fail(f"must be a whole number, found {value}")
    if minimum is not None and (value < minimum or (not inclusive and value == minimum)):
        fail(f"is {value}, must be {'at least' if inclusive else 'above'} {minimum}")
    if maximum is not None and value > maximum:
        fail(f"is {value}, must be at most {maximum}")
    return int(value) if integer else float(value)


def reason(exc: BaseException, limit: int = 120) -> str:
    """An exception as one short line: its class and the first line of its message."""
    text = str(exc).strip().splitlines()[0][:limit] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_jsonl(path: str | Path, warn=None) -> list[dict]:
    """The records of a JSON-lines log. A torn last line (what a kill during a write leaves) is dropped, with a line
    through ``warn``; a damaged line before the last is an error naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BonedistError(f"{path}: cannot be read ({exc})") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            last = all(not rest.strip() for rest in lines[number:])
            if last:
                if warn is not None:
                    warn(f"{path}: line {number} is torn (a write cut off by a kill); dropped")
                break
            raise BonedistError(f"{path}: line {number} is not a JSON object ({exc}); the log was edited or "
                                f"damaged") from None
        records.append(record)
    return records
