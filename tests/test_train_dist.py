"""Training under real multi-process launches: DDP replicas in sync, 1-vs-2-process parity, two "nodes" on one
machine, and SIGUSR1 preemption with an exact resume."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, epoch_records, run_train

CPU_CONFIG = REPO / "launch" / "accelerate" / "cpu_2proc.yaml"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(runs: Path, *args: str, launch_args: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
            "--main_process_port", str(_free_port()), *launch_args, "-m", "bonedist.train", "--runs-dir", str(runs),
            "--wandb", "off", *args]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(str(last / "model.safetensors"))


def test_two_processes_stay_in_sync_and_validate_exactly(train_shards, tmp_path):
    result = run(launch_cmd(tmp_path, "--model", "resnet50_patch", "--shards", str(train_shards), "--preset", "tiny",
                            "--epochs", "2", "--steps-per-epoch", "5", "--data-mode", "stream", "--workers", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = epoch_records(tmp_path / "default" / "resnet50_patch")
    assert len(records) == 2
    for record in records:
        assert record["ranks_in_sync"] is True  # identical weights on both ranks after the steps
        assert record["val_count"] == 60  # each validation radiograph once across the two ranks


PARITY = ["--model", "xception", "--preset", "tiny", "--freeze", "--no-augment", "--scheduler", "constant",
          "--epochs", "1", "--steps-per-epoch", "6", "--data-mode", "cache", "--lr", "1e-2"]


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("auto", 3e-3)])
def test_one_and_two_processes_agree_at_the_same_global_batch(train_shards, tmp_path, precision, tolerance):
    """In fp32 only the order of floating-point sums differs: 1e-4 relative. In what --precision auto chooses here
    (bf16 autocast on a CPU with bf16 units) the matrix products of a batch of 8 and two of 4 round differently
    too: a few parts in a thousand."""
    args = (*PARITY, "--shards", str(train_shards), "--precision", precision)
    one = run_train(*args, "--batch-size", "8", runs=tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(launch_cmd(tmp_path / "two", *args, "--batch-size", "4"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (epoch_records(tmp_path / d / "default" / "xception")[0] for d in ("one", "two"))
    # same samples per global step, same initial weights, gradients averaged over the same 8 samples
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=tolerance)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=tolerance)
    assert a["val_loss"] != pytest.approx(epoch_records(tmp_path / "one" / "default" / "xception")[0]["train_loss"])


def test_two_nodes_on_one_machine_rendezvous_and_train(train_shards, tmp_path):
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        # the multi-node config of launch/slurm/train.sbatch: c10d rendezvous at main_process_ip:port
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch" / "accelerate" / "multi_node.yaml"), "--num_machines", "2",
               "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip",
               "127.0.0.1", "--main_process_port", port, "-m", "bonedist.train", "--runs-dir", str(tmp_path),
               "--wandb", "off", "--model", "xception", "--shards", str(train_shards), "--preset", "tiny",
               "--epochs", "1", "--steps-per-epoch", "4"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    records = epoch_records(tmp_path / "default" / "xception")
    assert len(records) == 1 and records[0]["ranks_in_sync"] is True and records[0]["val_count"] == 60


INTERRUPTIBLE = ["--model", "inception_v3", "--preset", "tiny", "--image-size", "80", "--epochs", "2",
                 "--steps-per-epoch", "8", "--batch-size", "4", "--data-mode", "cache", "--log-every", "1",
                 "--sync-every", "1"]  # the ranks agree on a signal at every step: the stop lands mid-epoch


def test_sigusr1_mid_epoch_then_resume_gives_the_uninterrupted_weights(train_shards, tmp_path):
    args = [*INTERRUPTIBLE, "--shards", str(train_shards)]
    reference = run(launch_cmd(tmp_path / "reference", *args))
    assert reference.returncode == 0, reference.stderr[-3000:]

    runs = tmp_path / "interrupted"
    # Like launch/slurm/train.sbatch: the launcher ignores USR1, the training processes handle it.
    shell = "trap '' USR1; exec " + " ".join(map(repr, launch_cmd(runs, *args)))
    proc = subprocess.Popen(["bash", "-c", shell], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = runs / "default" / "inception_v3" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for the third optimizer step of the first epoch
        if metrics.exists() and metrics.read_text().count('"kind": "step"') >= 3:
            break
        time.sleep(0.05)
    # Slurm signals every process of the job step; here: the launcher and the training processes it started
    # (torchrun puts each in its own session, so a process-group kill would miss them).
    launcher = psutil.Process(proc.pid)
    for process in [launcher, *launcher.children(recursive=True)]:
        process.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    run_dir = runs / "default" / "inception_v3"
    assert (run_dir / "REQUEUE").exists(), "a preempted run leaves the requeue marker"
    assert not epoch_records(run_dir), "it stopped inside the first epoch"
    stopped_at = sorted((run_dir / "checkpoints").glob("step-*"))[-1].name
    assert stopped_at not in ("step-00000008", "step-00000016")  # mid-epoch

    resumed = run(launch_cmd(runs, *args))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    expected, got = _weights(tmp_path / "reference" / "default" / "inception_v3"), _weights(run_dir)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


def test_staged_agcnn_trains_one_branch_per_stage_under_ddp(train_shards, tmp_path):
    """Guan et al.'s stages under two real processes: each stage changes its own branch only (weights and
    BatchNorm statistics), the other branches stay bit-identical, and the replicas stay in sync."""
    result = run(launch_cmd(tmp_path, "--model", "agcnn", "--shards", str(train_shards), "--preset", "improved",
                            "--image-size", "64", "--stages", "global:1,local:1,fusion:1", "--steps-per-epoch", "3",
                            "--batch-size", "4", "--eval-batch-size", "32", "--keep-last", "5", "--ema", "0",
                            "--data-mode", "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "default" / "agcnn"
    records = epoch_records(run_dir)
    assert [r["stage"] for r in records] == ["global", "local", "fusion"]
    assert all(r["ranks_in_sync"] for r in records)
    steps = [load_file(str(p / "model.safetensors")) for p in sorted((run_dir / "checkpoints").glob("step-*"))]
    assert len(steps) == 3

    def changed(a, b, prefix):
        keys = [k for k in a if k.startswith(prefix) and a[k].is_floating_point()]
        return any(not torch.equal(a[k], b[k]) for k in keys)

    g1, l2, f3 = steps  # weights after each stage's epoch
    assert changed(g1, l2, "local_branch.") and not changed(g1, l2, "global_branch.")
    assert not changed(g1, l2, "fusion.")
    assert changed(l2, f3, "fusion.") and not changed(l2, f3, "global_branch.") and not changed(l2, f3, "local_branch.")
    meta = (run_dir / "best" / "meta.json").read_text()
    assert '"stages"' in meta


def test_a_rank_that_loses_its_peer_says_so_in_one_line(train_shards, tmp_path):
    """SIGKILL one of two training processes: the other stops within seconds with one line naming its rank."""
    cmd = launch_cmd(tmp_path, *INTERRUPTIBLE, "--epochs", "3", "--shards", str(train_shards))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "default" / "inception_v3" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 2):
        time.sleep(0.05)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "bonedist.train" in " ".join(
        p.cmdline())]
    victim = next(p for p in workers if p.environ().get("RANK") == "1")
    victim.kill()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "bonedist train: error: rank 0 of 2 lost contact with another process of the job" in stderr, stderr[-3000:]
    assert "--resume auto" in stderr
