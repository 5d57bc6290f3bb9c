"""Shared fixtures: small synthetic phantom datasets and packs, built once per session in temporary folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RSNA_SAMPLE = Path(os.environ.get("BONEDIST_RSNA_SAMPLE", REPO.parent / "shared" / "data" / "rsna-sample"))


def pytest_collection_modifyitems(config, items):
    import torch

    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (run launch/gpu_check.sh on a GPU machine)"))
        if "realdata" in item.keywords and not RSNA_SAMPLE.is_dir():
            item.add_marker(pytest.mark.skip(reason=f"real RSNA sample not found at {RSNA_SAMPLE}"))


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """24 train + 8 validation + 8 test phantoms at 160 px in the official layouts (read-only for tests)."""
    from bonedist.data.synth import synth_dataset

    root = tmp_path_factory.mktemp("phantoms")
    synth_dataset(root, n=24, n_val=8, n_test=8, seed=1, size=160, workers=1, progress=False)
    return root


@pytest.fixture
def phantom_copy(phantom_root, tmp_path) -> Path:
    """A private copy of the phantom set that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(phantom_root, dst)
    return dst


def pack_phantoms(phantom_root: Path, tmp_path_factory, name: str, size: int, samples_per_shard: int) -> Path:
    """The phantom set packed once per module or session, in shards of ``samples_per_shard``."""
    from bonedist.data.pack import PackOptions, pack_dataset

    out = tmp_path_factory.mktemp(name) / "shards"
    options = PackOptions(size=size, samples_per_shard=samples_per_shard, workers=1, progress=False)
    _, code = pack_dataset(phantom_root, out, options)
    assert code == 0
    return out


@pytest.fixture(scope="session")
def phantom_shards(phantom_root, tmp_path_factory) -> Path:
    return pack_phantoms(phantom_root, tmp_path_factory, "shards", size=96, samples_per_shard=8)


def _file_size_limit(max_file_bytes: int | None):
    """A ``preexec_fn`` capping every file the child writes at ``max_file_bytes`` (RLIMIT_FSIZE, SIGXFSZ ignored):
    a write beyond it fails with EFBIG, the way a write fails on a full disk."""
    if not max_file_bytes:
        return None

    def limit():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return limit


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
            max_file_bytes: int | None = None):
    """Run the installed ``bonedist`` console script for real; returns the CompletedProcess."""
    exe = Path(sys.executable).parent / "bonedist"  # the venv running pytest, whatever PATH says
    assert exe.exists(), f"bonedist is not installed next to {sys.executable} (pip install -e .)"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          preexec_fn=_file_size_limit(max_file_bytes))


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    """300 train / 60 validation / 60 test phantoms packed at 64 px: big enough to learn on in a CPU minute."""
    from bonedist.data.pack import PackOptions, pack_dataset
    from bonedist.data.synth import synth_dataset

    root = tmp_path_factory.mktemp("train-data")
    synth_dataset(root / "raw", n=300, n_val=60, n_test=60, seed=0, size=192, workers=2, progress=False)
    _, code = pack_dataset(root / "raw", root / "shards", PackOptions(size=64, samples_per_shard=50, workers=2,
                                                                      progress=False))
    assert code == 0
    return root / "shards"


def run_train(*args: str, runs: Path, timeout: float = 600, env: dict | None = None,
              max_file_bytes: int | None = None):
    """`python -m bonedist.train` in a fresh process (W&B off unless the caller asks)."""
    cmd = [sys.executable, "-m", "bonedist.train", "--runs-dir", str(runs), *args]
    if "--wandb" not in args:
        cmd += ["--wandb", "off"]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO,
                          preexec_fn=_file_size_limit(max_file_bytes))


def epoch_records(run_dir: Path) -> list[dict]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


@pytest.fixture(scope="session")
def evaluated_pair(train_shards, tmp_path_factory) -> Path:
    """xception and resnet50_patch trained briefly (tiny, one epoch of 4 steps) and evaluated: ``RUNS/exp`` with
    report/ (ensemble.json, intervals.json). Shared by the modules that read it; a test that changes it copies it."""
    runs = tmp_path_factory.mktemp("pair-runs")
    for model in ("xception", "resnet50_patch"):
        result = run_train("--model", model, "--shards", str(train_shards), "--preset", "tiny", "--epochs", "1",
                           "--steps-per-epoch", "4", "--experiment", "exp", runs=runs)
        assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli("evaluate", "--runs", str(runs / "exp"), "--wandb", "off")
    assert result.returncode == 0, result.stderr[-3000:]
    return runs / "exp"
