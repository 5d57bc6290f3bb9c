"""The shard manifest: writing it atomically, reading it back, verifying shards, and ``bonedist inspect``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from bonedist import BonedistError
from bonedist.data.layouts import MAX_AGE_MONTHS
from bonedist.files import Fields, read_json, sha256_file, write_atomic  # noqa: F401  (sha256_file re-exported)

MANIFEST = "manifest.json"
AGE_BIN_EDGES = list(range(0, int(MAX_AGE_MONTHS) + 1, 12))  # 20 one-year bins over the accepted ages


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def age_stats(ages: list) -> dict:
    """Count, mean, std, range and a one-year histogram of the known ages (None = unlabeled)."""
    known = np.array([a for a in ages if a is not None], dtype=np.float64)
    stats = {"n": int(len(ages)), "labeled": int(known.size)}
    if known.size:
        counts, _ = np.histogram(known, bins=AGE_BIN_EDGES)
        stats.update(mean=round(float(known.mean()), 4), std=round(float(known.std()), 4),
                     min=float(known.min()), max=float(known.max()),
                     hist={"edges": AGE_BIN_EDGES, "counts": counts.tolist()})
    return stats


def load_manifest(shards: str | Path) -> dict:
    """Read ``shards/manifest.json``; a missing or partial pack gives a clear error."""
    path = Path(shards) / MANIFEST
    if not path.is_file():
        hint = " (an interrupted pack: re-run the same `bonedist pack` command to finish it)" if (
            Path(shards) / ".pack-state.json").exists() else ""
        raise BonedistError(f"{path} not found: {shards} is not a finished bonedist pack{hint}")
    return check_manifest(read_json(path, "the pack's manifest"), path)


SHA256 = re.compile(r"[0-9a-f]{64}")


def check_manifest(data, path: Path) -> dict:
    """The manifest's structure and every value a run computes with: sizes, splits, each shard's name (a plain
    file name inside the pack), checksum and count, and each sample's key, bone age (finite, in range, or null) and
    sex. Raises one line naming the file and the field."""
    from bonedist.data.images import RESIZE_MODES

    manifest = Fields(data, path)
    manifest.number("image_size", minimum=1, integer=True)
    manifest.text("resize_mode", RESIZE_MODES)
    splits = manifest.mapping("splits")
    for split in splits.data:
        info = splits.mapping(split)
        count = info.number("count", minimum=0, integer=True)
        shards = info.value("shards")
        if not isinstance(shards, list):
            info.fail("shards", "must be a list")
        total = 0
        for i, raw in enumerate(shards):
            shard = Fields(raw, path, f"splits.{split}.shards[{i}].")
            name = shard.text("name")
            if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
                shard.fail("name", f"is {name!r}: a shard must be a plain file name inside the pack")
            if not isinstance(shard.get("sha256"), str) or not SHA256.fullmatch(shard.get("sha256")):
                shard.fail("sha256", "must be 64 lowercase hex digits")
            n = shard.number("count", minimum=0, integer=True)
            samples = shard.get("samples")
            if samples is not None:
                if not isinstance(samples, list) or len(samples) != n:
                    shard.fail("samples", f"must list the shard's {n} samples")
                for j, sample in enumerate(samples):
                    _check_sample(sample, lambda why, j=j, shard=shard: shard.fail(f"samples[{j}]", why))
            total += n
        if total != count:
            info.fail("count", f"is {count}, but its shards hold {total} samples")
    if not isinstance(manifest.get("skipped", []), list):
        manifest.fail("skipped", "must be a list")
    return manifest.data


def _check_sample(sample, fail) -> None:
    if not isinstance(sample, list) or len(sample) != 3 or not isinstance(sample[0], str) or not sample[0]:
        fail(f"must be [key, bone age or null, male], found {str(sample)[:60]}")
    age, male = sample[1], sample[2]
    if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float)) or not math.isfinite(age)
                            or not 0 <= age <= MAX_AGE_MONTHS):
        fail(f"bone age {age!r} is not a number of months within 0-{MAX_AGE_MONTHS:g} (or null)")
    if not isinstance(male, (bool, int)) or male not in (0, 1, True, False):
        fail(f"sex {male!r} is not true/false")


def shard_paths(shards: str | Path, split: str, manifest: dict | None = None) -> list[str]:
    """The tar files of one split, in order."""
    manifest = manifest or load_manifest(shards)
    if split not in manifest["splits"]:
        raise BonedistError(f"split {split!r} not in {shards} (it has {', '.join(manifest['splits'])})")
    return [str(Path(shards) / s["name"]) for s in manifest["splits"][split]["shards"]]


def verify_shards(shards: str | Path, manifest: dict) -> list[str]:
    """Check every shard's sha256 and sample count against the manifest; returns the problems found."""
    problems = []
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            path = Path(shards) / shard["name"]
            if not path.is_file():
                problems.append(f"{shard['name']}: missing")
                continue
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{shard['name']}: sha256 mismatch (file changed or corrupt)")
                continue
            try:
                with tarfile.open(path) as tar:
                    keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
            except tarfile.TarError as exc:
                problems.append(f"{shard['name']}: unreadable tar ({exc})")
                continue
            if len(keys) != shard["count"]:
                problems.append(f"{shard['name']}: {len(keys)} samples, manifest says {shard['count']}")
    return problems


def _verified_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bonedist" / "verified-shards.json"


def check_split_shards(shards: str | Path, manifest: dict, splits: list[str]) -> None:
    """Every shard of ``splits`` is present and has the checksum the manifest promises, before a run reads it.

    A shard's sha256 is computed once and remembered with its size, modification and change times and inode (in
    ``~/.cache/bonedist/verified-shards.json``), so later runs only stat the files; an edit that restores the
    modification time still changes the change time, and the shard is hashed again.

    Raises:
        BonedistError: naming the first shard that is missing or changed.
    """
    cache_path = _verified_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):  # damaged: every shard is hashed again
        cache = {}
    changed = False
    for split in splits:
        for shard in manifest["splits"].get(split, {}).get("shards", []):
            path = (Path(shards) / shard["name"]).resolve()
            try:
                st = path.stat()
            except OSError:
                raise BonedistError(f"shard {path} listed in {Path(shards) / MANIFEST} is missing; re-run "
                                    f"`bonedist pack` to rebuild it") from None
            # size, mtime, ctime and inode: a tool can restore the mtime after an edit (touch -d, rsync -t), but
            # not the ctime, which every write and every mtime change set to now; a replaced file has a new inode
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, shard["sha256"]]
            if cache.get(str(path)) == stamp:
                continue
            if sha256_file(path) != shard["sha256"]:
                raise BonedistError(f"shard {path} does not match {Path(shards) / MANIFEST} (sha256 differs: the "
                                    f"file was changed, cut or corrupted); re-run `bonedist pack` to rebuild it")
            cache[str(path)], changed = stamp, True
    if changed:
        cache = {k: v for k, v in cache.items() if os.path.exists(k)}  # forget shards that are gone
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache_path, cache)
        except OSError:
            pass  # a read-only home: verify again next time


def summary_lines(shards: str | Path, manifest: dict) -> list[str]:
    lines = [
        f"{shards}: bonedist {manifest['bonedist_version']} pack of {manifest['source_root']} "
        f"({manifest['created']})",
        f"image size {manifest['image_size']}x{manifest['image_size']}, resize {manifest['resize_mode']}, "
        f"{manifest['samples_per_shard']} samples per shard",
        f"{'split':<11}{'count':>7}{'shards':>8}{'labeled':>9}{'age mean':>10}{'age std':>9}{'male':>7}{'female':>8}",
    ]
    for split, info in manifest["splits"].items():
        age = info["age"]["all"]
        mean = f"{age['mean']:.1f}" if "mean" in age else "-"
        std = f"{age['std']:.1f}" if "std" in age else "-"
        lines.append(f"{split:<11}{info['count']:>7}{len(info['shards']):>8}{info['labeled']:>9}{mean:>10}{std:>9}"
                     f"{info['age']['male']['n']:>7}{info['age']['female']['n']:>8}")
    lines.append(f"skipped: {len(manifest['skipped'])}")
    for entry in manifest["skipped"][:20]:
        lines.append(f"  {entry['source']}: {entry['reason']}")
    if len(manifest["skipped"]) > 20:
        lines.append(f"  ... and {len(manifest['skipped']) - 20} more")
    return lines


def write_grid(shards: str | Path, manifest: dict, out_png: str | Path, split: str | None = None, n: int = 24,
               cell: int = 192, hand_mask: bool = False) -> int:
    """A labelled contact sheet of the first ``n`` samples (id, age, sex under each); returns how many drawn.

    With ``hand_mask`` what the hand mask removes is dimmed and the mask's outline drawn, to check it on your data.
    """
    import cv2

    from bonedist.data.images import decode_png_gray8

    splits = [split] if split else list(manifest["splits"])
    tiles = []
    for name in splits:
        for path in shard_paths(shards, name, manifest):
            with tarfile.open(path) as tar:
                members = {m.name: m for m in tar.getmembers()}
                for member_name in members:  # tar order is write order
                    if len(tiles) >= n:
                        break
                    if not member_name.endswith(".json"):
                        continue
                    key = member_name[: -len(".json")]
                    meta = json.loads(tar.extractfile(members[member_name]).read())
                    image = decode_png_gray8(tar.extractfile(members[key + ".png"]).read())
                    tiles.append(_tile(_show_mask(image) if hand_mask else image, meta, cell))
            if len(tiles) >= n:
                break
        if len(tiles) >= n:
            break
    if not tiles:
        raise BonedistError(f"no samples to draw in {shards}")
    cols = min(6, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    sheet = np.full((rows * (cell + 22), cols * cell), 40, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * (cell + 22) : r * (cell + 22) + cell + 22, c * cell : (c + 1) * cell] = tile
    if not cv2.imwrite(str(out_png), sheet):
        raise BonedistError(f"cannot write {out_png}")
    return len(tiles)


def _show_mask(image: np.ndarray) -> np.ndarray:
    import cv2
    import torch

    from bonedist.data.handmask import hand_mask

    mask = hand_mask(torch.from_numpy(image)[None, None])[0, 0].numpy()
    shown = np.where(mask, image, (image * 0.3).astype(np.uint8))
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(shown, contours, -1, 255, max(1, image.shape[0] // 150))
    return shown


def _tile(image: np.ndarray, meta: dict, cell: int) -> np.ndarray:
    import cv2

    tile = np.full((cell + 22, cell), 40, np.uint8)
    tile[:cell] = cv2.resize(image, (cell, cell), interpolation=cv2.INTER_AREA)
    age = meta["boneage_months"]
    age_text = "?" if age is None else f"{age:.0f}m"
    label = f"{meta['id']} {'M' if meta['male'] else 'F'} {age_text} {meta['split'][:5]}"
    cv2.putText(tile, label, (3, cell + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1, cv2.LINE_AA)
    return tile


def pack_identity(manifest: dict, splits: tuple[str, ...] = ("train", "validation")) -> dict:
    """What a run trained on, as a resumed run checks it: image size and resize mode, the radiographs per split and
    one digest over every shard's checksum (a re-pack of the same images at the same size gives the same digest)."""
    digest = hashlib.sha256(f"{manifest['image_size']}:{manifest['resize_mode']}".encode())
    counts = {}
    for split in splits:
        info = manifest["splits"].get(split, {"count": 0, "shards": []})
        counts[split] = info["count"]
        for shard in info["shards"]:
            digest.update(f"{split}/{shard['name']}:{shard['count']}:{shard['sha256']}".encode())
    return {"digest": digest.hexdigest()[:16], "image_size": manifest["image_size"],
            "resize_mode": manifest["resize_mode"], "counts": counts}


def pack_differences(saved: dict, current: dict) -> list[str]:
    """How two ``pack_identity`` records differ, in words (empty: the same pack)."""
    out = []
    for key in ("image_size", "resize_mode"):
        if saved.get(key) != current.get(key):
            out.append(f"{key.replace('_', ' ')} {saved.get(key)} → {current.get(key)}")
    for split, count in current.get("counts", {}).items():
        if saved.get("counts", {}).get(split) != count:
            out.append(f"{split} radiographs {saved.get('counts', {}).get(split)} → {count}")
    if not out and saved.get("digest") != current.get("digest"):
        out.append("the same sizes and counts but other images (shard checksums differ)")
    return out
