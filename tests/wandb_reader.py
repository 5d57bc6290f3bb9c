"""Read the metrics back out of an offline W&B run (wandb ships no reader for `run-<id>.wandb`).

The file is a 7-byte header followed by LevelDB-log records in 32 KiB blocks; each chunk has a 7-byte header
(CRC32, little-endian length, type 1 full / 2 first / 3 middle / 4 last) and the records are
``wandb_internal_pb2.Record`` protobufs whose history rows hold the logged values as JSON.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024


def _records(data: bytes):
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - (pos % BLOCK)
        if room < 7:  # block trailer padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - (pos % BLOCK) if pos % BLOCK else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def read_history(run_dir: Path) -> list[dict]:
    """History rows (logged dicts) of the offline run in ``run_dir`` (an ``offline-run-*`` folder)."""
    from wandb.proto import wandb_internal_pb2

    path = next(Path(run_dir).glob("run-*.wandb"))
    rows = []
    for raw in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def read_records(run_dir: Path) -> list:
    """Every ``Record`` of the offline run in ``run_dir``."""
    from wandb.proto import wandb_internal_pb2

    path = next(Path(run_dir).glob("run-*.wandb"))
    out = []
    for raw in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


def read_artifacts(run_dir: Path) -> list[dict]:
    """Artifacts the run logged (``used``: logged as used by the run, i.e. its inputs), with their file names."""
    return [{"name": r.artifact.name, "type": r.artifact.type, "used": r.artifact.use_after_commit,
             "aliases": list(r.artifact.aliases), "files": [e.path for e in r.artifact.manifest.contents],
             "refs": [e.ref for e in r.artifact.manifest.contents if e.ref],
             "metadata": json.loads(r.artifact.metadata or "{}")}
            for r in read_records(run_dir) if r.WhichOneof("record_type") == "artifact"]


def read_metric_definitions(run_dir: Path) -> dict[str, dict]:
    """``define_metric`` calls: name → {"step_metric", "summary": [min/max/last/...]}."""
    out = {}
    for r in read_records(run_dir):
        if r.WhichOneof("record_type") == "metric":
            summary = [f.name for f, value in r.metric.summary.ListFields() if value]
            out[r.metric.name] = {"step_metric": r.metric.step_metric, "summary": summary}
    return out


def read_summary(run_dir: Path) -> dict:
    """The run's summary keys as set by the program (later updates win)."""
    out = {}
    for r in read_records(run_dir):
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                key = item.key or "/".join(item.nested_key)
                if key:
                    out[key] = json.loads(item.value_json)
    return out
