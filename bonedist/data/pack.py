"""``bonedist pack``: radiographs in an official layout → validated, resized WebDataset shards + manifest.

    bonedist pack /data/rsna --out shards/rsna --image-size 500 --resize pad

Guarantees:
- deterministic: the same inputs and flags give byte-identical shards (a fixed sample order, fixed tar metadata);
- atomic: a shard is written as ``NAME.tar.tmp`` and renamed when complete; ``manifest.json`` is written last
  (and removed first), so an interrupted pack never looks finished;
- resumable: ``.pack-state.json`` records each completed shard with its checksum; re-running the same command
  keeps verified shards and continues after them, a changed input or flag rebuilds from scratch.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import zipfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import webdataset as wds

from bonedist import BonedistError, __version__, free_gib, storage_full
from bonedist.data.dicom import decode_radiograph
from bonedist.data.holdout import carve_holdout
from bonedist.data.images import (
    MAX_PIXELS,
    PNG_COMPRESSION,
    ImageError,
    encode_png,
    not_a_radiograph,
    resize_square,
)
from bonedist.data.layouts import SPLITS, ZIP_SEP, GenericCSV, read_source, read_table
from bonedist.data.manifest import MANIFEST, age_stats, sha256_file, write_json_atomic
from bonedist.data.options import PackOptions
from bonedist.files import reason
from bonedist.progress import progress

STATE = ".pack-state.json"
FORMAT = "bonedist-shards/1"


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------
# Worker side: decode → grayscale → resize → PNG, one record at a time.

_worker: dict = {}


def _init_worker(root: str, size: int, resize: str, ignore_sigint: bool, max_pixels: int = MAX_PIXELS) -> None:
    if ignore_sigint:  # Ctrl-C is handled once, by the parent, which then terminates the pool
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(root=Path(root), size=size, resize=resize, zips={}, max_pixels=max_pixels)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def prepare_sample(record: dict) -> tuple[dict | None, str | None]:
    """Return ``(sample, None)`` ready for the tar writer, or ``(None, reason)`` for a bad image: whatever goes
    wrong with one file (reading, decoding, windowing, resizing) is that file's reason, never the pack's end."""
    try:
        return _prepare_sample(record)
    except MemoryError:
        return None, "out of memory while decoding (lower --max-pixels or --workers)"
    except Exception as exc:  # noqa: BLE001 - one file's failure, of any kind, is reported with that file
        return None, f"cannot be prepared ({reason(exc)})"


def _prepare_sample(record: dict) -> tuple[dict | None, str | None]:
    try:
        data = read_source(_worker["root"], record["source"], _worker["zips"])
        image, facts = decode_radiograph(data, _worker.get("max_pixels", MAX_PIXELS))
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        return None, f"unreadable file: {exc.__class__.__name__}: {exc}"
    except ImageError as exc:
        return None, str(exc)
    except MemoryError:
        return None, "out of memory while decoding (lower --max-pixels or --workers)"
    height, width = image.shape
    if (why := not_a_radiograph(image)) is not None:
        return None, why
    resized, geometry = resize_square(image, _worker["size"], _worker["resize"])
    meta = {
        "id": record["id"],
        "split": record["split"],
        "boneage_months": record["boneage_months"],
        "male": record["male"],
        "source": record["source"],
        "orig_height": height,
        "orig_width": width,
        "resize_mode": _worker["resize"],
        "size": _worker["size"],
        **geometry,
        **_dicom_meta(facts, record),
    }
    sample = {"__key__": record["key"], "png": encode_png(resized), "json": json.dumps(meta, sort_keys=True).encode(),
              # not written to the shard (keys with a leading _): what finds one radiograph packed twice
              "__digests__": [_digest(data), _digest(resized.tobytes())]}
    return sample, None


def _dicom_meta(facts: dict, record: dict) -> dict:
    """What a DICOM header adds to a sample's metadata: pixel spacing, window, photometric interpretation, bits,
    the chronological age, and a note when its sex contradicts the table's."""
    if not facts:
        return {}
    meta = {"dicom": {k: facts[k] for k in ("pixel_spacing_mm", "window", "photometric", "bits_stored",
                                            "transfer_syntax")},
            "chronological_age_months": facts["age_months"]}
    if facts["male"] is not None and facts["male"] != record["male"]:
        meta["header_conflict"] = (f"DICOM PatientSex {'M' if facts['male'] else 'F'}, table "
                                   f"{'M' if record['male'] else 'F'} (the table's is used)")
    return meta


def _prepare_indexed(item: tuple[int, dict]) -> tuple[int, dict | None, str | None]:
    index, record = item
    sample, reason = prepare_sample(record)
    return index, sample, reason


# ---------------------------------------------------------------------------------------------------------------
# Parent side.


def _natural_key(image_id: str):
    return (0, int(image_id), "") if image_id.isdigit() else (1, 0, image_id)


def _order_key(split: str):
    """Sample order in the shards. Validation and test: by id, as reports list them. Training: a fixed shuffle
    (by a hash of the id), so that every shard is a sample of the whole split: ids cluster by hospital (RSNA ids
    below ~4200 have half the contrast of the rest), and a stream reads a few shards at a time."""
    if split == "train":
        return lambda r: hashlib.sha256(r["key"].encode()).hexdigest()
    return lambda r: _natural_key(r["id"])


def _fingerprint(root: Path, records: list[dict], options: PackOptions) -> str:
    """Changes when any input row, input file (size/mtime) or byte-affecting option changes."""
    digest = hashlib.sha256()
    fixed = {"version": __version__, "format": FORMAT, "size": options.size, "resize": options.resize,
             "samples_per_shard": options.samples_per_shard, "png_compression": PNG_COMPRESSION}
    digest.update(json.dumps(fixed, sort_keys=True).encode())
    stats: dict[str, str] = {}
    for record in records:
        path = record["source"].split(ZIP_SEP, 1)[0]
        if path not in stats:
            try:
                st = (root / path).stat()
                stats[path] = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stats[path] = "missing"
        row = [record["split"], record["key"], record["id"], record["boneage_months"], record["male"],
               record["source"], stats[path]]
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()


class _SplitWriter:
    """Writes one split's samples through ``webdataset.ShardWriter``: temp file per shard, renamed when complete.

    Each completed shard is recorded in the pack state together with the position in the sorted record list
    where the next shard starts, so a resumed pack continues exactly there.
    """

    def __init__(self, out: Path, split: str, samples_per_shard: int, state: dict, save_state):
        self.out, self.split, self.state, self.save_state = out, split, state, save_state
        self.shards: list[dict] = state["splits"].setdefault(split, [])
        self.samples_per_shard = samples_per_shard
        self.writer: wds.ShardWriter | None = None
        self.handle = None
        self.current: list[list] = []  # [key, age, male] of the samples in the open shard
        self.digests: list[list] = []  # [source, file digest, pixel digest] of the same samples
        self.notes: list[dict] = []  # packed samples worth a word (a DICOM header contradicting the table)
        self.pending_skips: list[tuple[int, dict]] = []  # skips not yet attributed to a completed shard
        self.last_index = -1

    def _open(self, fname: str):
        self.handle = open(fname + ".tmp", "wb")
        return self.handle

    def _finish_shard(self, fname: str) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(fname + ".tmp", fname)
        next_index = self.last_index + 1
        skips = [entry for index, entry in self.pending_skips if index < next_index]
        self.pending_skips = [(i, e) for i, e in self.pending_skips if i >= next_index]
        self.shards.append({"name": Path(fname).name, "count": len(self.current), "sha256": sha256_file(Path(fname)),
                            "next_index": next_index, "skipped": skips, "samples": self.current,
                            "notes": self.notes, "digests": self.digests})
        self.current, self.notes, self.digests = [], [], []
        self.save_state()

    def write(self, index: int, sample: dict) -> None:
        if self.writer is None:
            pattern = str(self.out / f"{self.split}-%06d.tar")
            self.writer = wds.ShardWriter(pattern, maxcount=self.samples_per_shard, maxsize=float("inf"),
                                          start_shard=len(self.shards), verbose=0, opener=self._open,
                                          post=self._finish_shard, encoder=False, mtime=0.0, user="bonedist",
                                          group="bonedist")
        meta = json.loads(sample["json"])
        # ShardWriter rolls over to the next shard inside write(), calling post for the finished one; that shard
        # ends at the previous sample, so last_index still points there when _finish_shard runs.
        self.writer.write(sample)
        self.last_index = index
        self.current.append([sample["__key__"], meta["boneage_months"], meta["male"]])
        self.digests.append([meta["source"], *sample.get("__digests__", ["", ""])])
        if "header_conflict" in meta:
            self.notes.append({"source": meta["source"], "note": meta["header_conflict"]})

    def skip(self, index: int, entry: dict) -> None:
        self.pending_skips.append((index, entry))

    def close(self, total: int) -> None:
        if self.writer is not None:
            self.last_index = total - 1  # trailing skips belong to the last shard
            self.writer.close()
            self.writer = None
        elif self.pending_skips:  # nothing valid after the last complete shard: keep the skips in the state
            self.state.setdefault("tail_skips", {})[self.split] = [e for _, e in self.pending_skips]
            self.save_state()

    def abort(self) -> None:
        """Drop the open shard: its temp file is deleted, nothing is flushed into it."""
        if self.writer is not None and self.writer.tarstream is not None:
            tar = self.writer.tarstream.tarstream
            tar.closed = True  # stop tarfile (and its stream's __del__) from writing into a closed file
            if hasattr(tar.fileobj, "closed"):
                tar.fileobj.closed = True
            self.writer.tarstream = None
        if self.handle is not None and not self.handle.closed:
            try:
                self.handle.close()
            except OSError:  # flushing the buffer fails again when the disk is full: the file goes anyway
                pass
            Path(self.handle.name).unlink(missing_ok=True)


def _load_state(out: Path, fingerprint: str) -> dict:
    """Resume from the recorded shards that still verify; otherwise start over, removing stale shards."""
    path = out / STATE
    state = None
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = None
    valid = isinstance(state, dict) and isinstance(state.get("splits"), dict) and all(
        isinstance(shards, list) and all(isinstance(s, dict) and isinstance(s.get("name"), str) and "sha256" in s
                                         and "/" not in s["name"] for s in shards)
        for shards in state["splits"].values())
    if not valid or state.get("fingerprint") != fingerprint:  # damaged or another pack's: start over
        state = {"fingerprint": fingerprint, "splits": {}}
    for split, shards in list(state["splits"].items()):
        for i, shard in enumerate(shards):
            file = out / shard["name"]
            if not file.is_file() or sha256_file(file) != shard["sha256"]:
                state["splits"][split] = shards[:i]
                break
    state.pop("tail_skips", None)
    keep = {shard["name"] for shards in state["splits"].values() for shard in shards}
    for file in list(out.glob("*.tar")) + list(out.glob("*.tar.tmp")):
        if file.name not in keep:
            file.unlink()
    return state


def pack_dataset(root: str | Path, out: str | Path, options: PackOptions | None = None,
                 generic: GenericCSV | None = None) -> tuple[dict, int]:
    """Pack every split found under ``root`` into ``out``. Returns the manifest and the process exit code."""
    options = options or PackOptions()
    root, out = Path(root).absolute(), Path(out)
    table = read_table(root, generic=generic, splits=options.splits)
    records = table.records.to_dict("records")
    for record in records:
        if record["boneage_months"] is not None and np.isnan(record["boneage_months"]):
            record["boneage_months"] = None
    for split, count in carve_holdout(records, options.holdout, options.holdout_seed).items():
        table.layouts.append({"split": split, "layout": "holdout", "file": f"{count} training records, stratified "
                              f"by sex and age (seed {options.holdout_seed})", "used": True})
    by_split = {split: sorted((r for r in records if r["split"] == split), key=_order_key(split)) for split in SPLITS}
    ordered = [r for split in SPLITS for r in by_split[split]]
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder does not look finished
    fingerprint = _fingerprint(root, ordered, options)
    state = _load_state(out, fingerprint)
    state_path = out / STATE

    def save_state():
        write_json_atomic(state_path, state)

    save_state()
    workers = options.workers or default_workers()
    _run_workers(root, by_split, state, save_state, options, workers, out)
    return _finish(root, out, table, state, options, by_split)


def _run_workers(root, by_split, state, save_state, options, workers, out) -> None:
    todo = []
    for split in SPLITS:
        shards = state["splits"].get(split, [])
        start = shards[-1]["next_index"] if shards else 0
        todo.append((split, start, by_split[split]))
    total = sum(len(records) - start for _, start, records in todo)
    done_before = sum(start for _, start, _ in todo)
    init_args = (str(root), options.size, options.resize, workers > 1, options.max_pixels)
    pool = mp.get_context("fork").Pool(workers, _init_worker, init_args) if workers > 1 else None
    if pool is None:
        _init_worker(*init_args)
    bar = progress(total + done_before, "pack", "img", enabled=options.progress, initial=done_before)
    writer = None
    try:
        for split, start, records in todo:
            writer = _SplitWriter(out, split, options.samples_per_shard, state, save_state)
            items = list(enumerate(records))[start:]
            results = pool.imap(_prepare_indexed, items, chunksize=4) if pool else map(_prepare_indexed, items)
            for index, sample, reason in results:
                record = records[index]
                if sample is None:
                    writer.skip(index, {"source": record["source"], "reason": reason})
                else:
                    writer.write(index, sample)
                bar.update(1)
            writer.close(len(records))
            writer = None
    except BaseException as exc:
        shard = writer.handle.name if writer is not None and writer.handle is not None else None
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.terminate()
        if (reason := storage_full(exc)) is not None:
            complete = sum(len(shards) for shards in state["splits"].values())
            raise BonedistError(f"cannot write {shard or out}: {reason} ({free_gib(out):.1f} GiB free there); "
                                f"{complete} complete shard{'' if complete == 1 else 's'} kept; free some space and "
                                f"re-run the same command to resume") from exc
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()


def _finish(root: Path, out: Path, table, state: dict, options: PackOptions, by_split) -> tuple[dict, int]:
    skipped, notes = list(table.skipped), []
    splits = {}
    for split in SPLITS:
        shards = state["splits"].get(split, [])
        for shard in shards:
            skipped.extend(shard["skipped"])
            notes.extend(shard.get("notes", []))
        skipped.extend(state.get("tail_skips", {}).get(split, []))
        if not by_split[split] and not shards:
            continue
        samples = [s for shard in shards for s in shard["samples"]]
        splits[split] = {
            "count": len(samples),
            "labeled": sum(1 for s in samples if s[1] is not None),
            # per-shard [key, age, male] lists let loaders balance ages and plan epochs without opening a tar
            "shards": [{"name": s["name"], "count": s["count"], "sha256": s["sha256"], "samples": s["samples"]}
                       for s in shards],
            "age": {
                "all": age_stats([s[1] for s in samples]),
                "male": age_stats([s[1] for s in samples if s[2]]),
                "female": age_stats([s[1] for s in samples if not s[2]]),
            },
        }
    packed = sum(s["count"] for s in splits.values())
    duplicates = find_duplicates({split: [d for shard in state["splits"].get(split, []) for d in
                                          shard.get("digests", [])] for split in splits})
    manifest = {
        "format": FORMAT,
        "bonedist_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_root": str(root),
        "image_size": options.size,
        "resize_mode": options.resize,
        "png_compression": PNG_COMPRESSION,
        "samples_per_shard": options.samples_per_shard,
        "layouts": table.layouts,
        "splits": splits,
        "skipped": skipped,
        "notes": notes,
        "duplicates": duplicates,
        "totals": {"packed": packed, "skipped": len(skipped)},
        "options": {k: v for k, v in asdict(options).items() if k not in ("workers", "progress")},
    }
    if table.errors:
        return manifest, _report(out, manifest, "; ".join(table.errors) + "; no manifest written", code=1)
    if packed == 0:
        return manifest, _report(out, manifest, "nothing valid to pack; no manifest written", code=1)
    if options.strict and skipped:
        return manifest, _report(out, manifest, "--strict: some inputs were skipped; no manifest written", code=1)
    write_json_atomic(out / MANIFEST, manifest)
    return manifest, _report(out, manifest, None, code=0)


def find_duplicates(digests: dict[str, list[list]]) -> list[dict]:
    """Radiographs packed more than once: the same file bytes (``identical file``) or, failing that, the same
    pixels at the packed size (``identical pixels``: the same image saved again, another format or compression).
    Each entry lists its copies as [split, source]; ``across_splits`` marks leakage between splits."""
    groups: dict[tuple[str, str], list] = {}
    for split, entries in digests.items():
        for source, file_digest, pixel_digest in entries:
            if file_digest:
                groups.setdefault(("identical file", file_digest), []).append([split, source])
            if pixel_digest:
                groups.setdefault(("identical pixels", pixel_digest), []).append([split, source])
    found, seen = [], set()
    for (kind, _), copies in groups.items():
        key = tuple(sorted(tuple(c) for c in copies))
        if len(copies) < 2 or key in seen:  # a file twice is also pixels twice: said once
            continue
        seen.add(key)
        found.append({"kind": kind, "copies": copies, "across_splits": len({c[0] for c in copies}) > 1})
    return sorted(found, key=lambda d: (not d["across_splits"], d["copies"]))


def _report(out: Path, manifest: dict, failure: str | None, code: int) -> int:
    for entry in [d for d in manifest.get("duplicates", []) if d["across_splits"]][:10]:
        copies = ", ".join(f"{source} ({split})" for split, source in entry["copies"])
        print(f"warning: one radiograph in several splits ({entry['kind']}): {copies}; evaluation on those splits "
              f"is not independent of training", file=sys.stderr)
    within = [d for d in manifest.get("duplicates", []) if not d["across_splits"]]
    if within:
        print(f"note: {len(within)} radiograph(s) packed more than once within a split (listed under 'duplicates' "
              f"in {out / MANIFEST})", file=sys.stderr)
    skipped = manifest["skipped"]
    for entry in skipped[:10]:
        print(f"skipped {entry['source']}: {entry['reason']}", file=sys.stderr)
    if len(skipped) > 10:
        print(f"... and {len(skipped) - 10} more skipped (listed in {out / MANIFEST})", file=sys.stderr)
    notes = manifest.get("notes", [])
    for entry in notes[:10]:
        print(f"note: {entry['source']}: {entry['note']}", file=sys.stderr)
    if len(notes) > 10:
        print(f"... and {len(notes) - 10} more notes (listed in {out / MANIFEST})", file=sys.stderr)
    per_split = ", ".join(f"{name} {info['count']}" for name, info in manifest["splits"].items())
    n_shards = sum(len(info["shards"]) for info in manifest["splits"].values())
    line = (f"packed {manifest['totals']['packed']} images into {n_shards} shards ({per_split}); "
            f"skipped {len(skipped)}")
    if failure:
        print(f"{line}. error: {failure}", file=sys.stderr)
    else:
        print(f"{line} -> {out / MANIFEST}")
    return code
