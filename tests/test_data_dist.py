"""Loaders under two real processes (`accelerate launch`, gloo on CPU): disjoint, covering, equal batch counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bonedist.data.manifest import load_manifest
from tests.conftest import REPO, pack_phantoms

CPU_CONFIG = REPO / "launch" / "accelerate" / "cpu_2proc.yaml"


def accelerate_launch(*args: str, timeout: float = 300, extra: list[str] | None = None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG), *(extra or []),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def uneven_shards(phantom_root, tmp_path_factory):
    """24 train samples in shards of 5, 5, 5, 5, 4: two ranks x two workers get uneven amounts."""
    return pack_phantoms(phantom_root, tmp_path_factory, "uneven", size=64, samples_per_shard=5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stream", "cache"])
def test_two_ranks_disjoint_covering_equal_batches(uneven_shards, tmp_path, mode):
    result = accelerate_launch(str(REPO / "tests" / "dist" / "loader_ranks.py"), str(uneven_shards), str(tmp_path),
                               mode)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 and r["distributed_type"] == "DistributedType.MULTI_CPU" for r in ranks)
    manifest = load_manifest(uneven_shards)
    train_keys = {s[0] for shard in manifest["splits"]["train"]["shards"] for s in shard["samples"]}
    for epoch in range(2):
        a, b = (r["epochs"][epoch] for r in ranks)
        assert a["batches"] == b["batches"] == a["len"] == b["len"] > 0
        assert not set(a["keys"]) & set(b["keys"]), "ranks saw the same sample"
        assert set(a["keys"]) | set(b["keys"]) == train_keys, "the split was not covered"
    # the order changes between epochs
    assert ranks[0]["epochs"][0]["keys"] != ranks[0]["epochs"][1]["keys"]
    for split in ("validation", "test"):
        count = manifest["splits"][split]["count"]
        positions = ranks[0][split]["positions"] + ranks[1][split]["positions"]
        assert sorted(positions) == list(range(count)), "evaluation lost or duplicated a sample"
        assert sorted(ranks[0][split]["gathered"]) == list(range(count))
        assert len(ranks[1][split]["gathered"]) == count  # no padding
