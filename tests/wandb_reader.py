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
