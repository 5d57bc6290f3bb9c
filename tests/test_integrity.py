"""Training and evaluation read only what the manifest promises: a damaged shard stops them with one line."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import pytest

from bonedist.data.manifest import load_manifest
from bonedist.data.stream import ShardError, read_shard
from tests.conftest import pack_phantoms, run_cli, run_train


@pytest.fixture(scope="module")
def small_shards(phantom_root, tmp_path_factory):
    return pack_phantoms(phantom_root, tmp_path_factory, "integrity", size=64, samples_per_shard=8)


def _members(path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _damage(path, how: str) -> None:
    members = _members(path)
    if how == "cut at a member boundary":
        _write(path, members[:-2])  # the last sample's .json and .png gone
    elif how == "cut mid-member":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "bytes flipped":
        info, png = next((m, d) for m, d in members if m.name.endswith(".png"))
        broken = bytearray(png)
        for i in range(40, len(broken) - 20, 7):
            broken[i] ^= 0x5A
        _write(path, [(m, bytes(broken) if m.name == info.name else d) for m, d in members])
    elif how == "extra member":
        info = tarfile.TarInfo(members[0][0].name.split(".")[0] + ".pickle")  # beside its sample's png
        _write(path, members[:2] + [(info, b"\x80\x04K\x01.")] + members[2:])
    elif how == "missing json":
        first_json = next(m for m, _ in members if m.name.endswith(".json"))
        _write(path, [(m, d) for m, d in members if m is not first_json])


@pytest.mark.parametrize("how, message", [("cut at a member boundary", "7 samples, manifest.json lists 8"),
                                          ("cut mid-member", "unreadable after"),
                                          ("bytes flipped", "cannot be decoded"),
                                          ("missing json", "has no .json member")])
def test_read_shard_names_the_shard_and_the_member(small_shards, tmp_path, how, message):
    manifest = load_manifest(small_shards)
    shard = manifest["splits"]["train"]["shards"][0]
    path = tmp_path / shard["name"]
    shutil.copy(small_shards / shard["name"], path)
    _damage(path, how)
    keys = [s[0] for s in shard["samples"]]
    with pytest.raises(ShardError, match=message) as info:
        for sample in read_shard(str(path), keys, ordered=True):
            if how == "bytes flipped":
                from bonedist.data.stream import decode_sample

                decode_sample(sample)
    assert str(path) in str(info.value)


def test_an_extra_member_is_ignored_with_a_note(small_shards, tmp_path, capsys):
    shard = load_manifest(small_shards)["splits"]["train"]["shards"][0]
    path = tmp_path / shard["name"]
    shutil.copy(small_shards / shard["name"], path)
    _damage(path, "extra member")
    samples = list(read_shard(str(path), [s[0] for s in shard["samples"]]))
    assert len(samples) == 8 and all(set(s) == {"__key__", "__url__", "png", "json"} for s in samples)
    assert "ignoring extra member" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("how", ["cut at a member boundary", "cut mid-member", "bytes flipped"])
def test_a_damaged_shard_stops_train_and_evaluate_with_one_line(small_shards, tmp_path, how):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    runs = tmp_path / "runs"
    base = ["--model", "xception", "--shards", str(shards), "--preset", "tiny", "--epochs", "1",
            "--steps-per-epoch", "1", "--image-size", "64"]
    ok = run_train(*base, "--data-mode", "cache", runs=runs)
    assert ok.returncode == 0, ok.stderr[-2000:]
    victim = shards / "validation-000000.tar"
    _damage(victim, how)
    for mode in ("stream", "cache"):
        result = run_train(*base, "--data-mode", mode, "--resume", "never", runs=runs)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "validation-000000.tar" in result.stderr and "Traceback" not in result.stderr
    evaluated = run_cli("evaluate", "--runs", str(runs / "default"), "--split", "validation", "--wandb", "off")
    assert evaluated.returncode == 2 and "validation-000000.tar" in evaluated.stderr
    assert "Traceback" not in evaluated.stderr


@pytest.mark.slow
def test_damage_after_verification_is_caught_while_reading(small_shards, tmp_path):
    """A shard damaged in place, its size and modification time put back: the remembered checksum no longer
    applies (the change time moved), so it is hashed again and refused; and where damage lands after the check
    (the cache says verified), reading the sample catches it, in stream and in cache mode."""
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    runs = tmp_path / "runs"
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    base = ["--model", "xception", "--shards", str(shards), "--preset", "tiny", "--epochs", "1",
            "--steps-per-epoch", "1", "--image-size", "64", "--resume", "never"]
    assert run_train(*base, runs=runs, env=env).returncode == 0  # verifies and remembers every shard
    victim = shards / "validation-000000.tar"
    stat = victim.stat()
    data = bytearray(victim.read_bytes())
    png = next(d for m, d in _members(victim) if m.name.endswith(".png"))
    offset = data.find(png[60:80])  # inside the first PNG's compressed data
    data[offset: offset + 16] = bytes(16)
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = run_train(*base, runs=runs, env=env)
    assert result.returncode == 2 and "validation-000000.tar" in result.stderr and "sha256 differs" in result.stderr
    cache = tmp_path / "cache" / "bonedist" / "verified-shards.json"
    remembered = json.loads(cache.read_text())
    now = victim.stat()
    remembered[str(victim.resolve())] = [now.st_size, now.st_mtime_ns, now.st_ctime_ns, now.st_ino,
                                         remembered[str(victim.resolve())][-1]]
    cache.write_text(json.dumps(remembered))  # as if the damage had come after the check
    for mode in ("stream", "cache"):
        result = run_train(*base, "--data-mode", mode, runs=runs, env=env)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "validation-000000.tar" in result.stderr and "cannot be decoded" in result.stderr
        assert "Traceback" not in result.stderr
