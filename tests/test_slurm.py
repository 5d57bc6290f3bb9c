"""launch/slurm/train.sbatch against a real local Slurm (started by .ci/run via launch/slurm/local_cluster.sh)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, epoch_records
from tests.wandb_reader import read_history

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    return result.returncode == 0 and bool(result.stdout.strip())


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not _slurm_up():
        if os.environ.get("BONEDIST_REQUIRE_SLURM"):
            pytest.fail("BONEDIST_REQUIRE_SLURM is set but no Slurm answers (launch/slurm/local_cluster.sh start)")
        pytest.skip("no local Slurm (start one with: sudo launch/slurm/local_cluster.sh start)")


def submit(tmp_path: Path, name: str, shards: Path, extra: str) -> str:
    env = {**os.environ, "MODEL": "xception", "SHARDS": str(shards), "PRESET": "tiny", "EXPERIMENT": name,
           "RUNS_DIR": str(tmp_path / "runs"), "BONEDIST_PYTHON": sys.executable, "CPU_PROCS": "2",
           "OMP_NUM_THREADS": "1", "EXTRA_ARGS": f"--wandb off {extra}"}
    result = subprocess.run(["sbatch", "--parsable", "--chdir", str(REPO), "--output", str(tmp_path / f"{name}.out"),
                             "--time", "00:15:00", str(SBATCH)], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=20).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_state(job: str, done: tuple[str, ...], timeout: float, predicate=None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job)
        if info.get("JobState") in done and (predicate is None or predicate(info)):
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} did not reach {done} in {timeout} s: {job_info(job)}")


def test_sbatch_trains_and_fills_the_run_folder(train_shards, tmp_path):
    job = submit(tmp_path, "slurm-basic", train_shards, "--epochs 1 --steps-per-epoch 4")
    info = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=400)
    log = (tmp_path / "slurm-basic.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", log[-3000:]
    run = tmp_path / "runs" / "slurm-basic" / "xception"
    records = epoch_records(run)
    assert len(records) == 1 and records[0]["ranks_in_sync"] is True and records[0]["val_count"] == 60
    assert (run / "best" / "model.safetensors").exists() and "2 CPU processes per node" in log


def test_usr1_preempts_requeues_and_the_job_finishes(train_shards, tmp_path):
    job = submit(tmp_path, "slurm-requeue", train_shards,
                 "--epochs 2 --steps-per-epoch 10 --batch-size 4 --log-every 1 --data-mode cache")
    metrics = tmp_path / "runs" / "slurm-requeue" / "xception" / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"step"') >= 3):
        time.sleep(0.2)
    assert metrics.exists(), (tmp_path / "slurm-requeue.out").read_text(errors="replace")[-3000:]
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=20)
    # Slurm holds a requeued batch job for ~2 minutes (Reason=BeginTime); once the requeue has happened, release it
    # now to keep the test short. The job is still restarted by Slurm and still resumes by itself.
    pending = wait_state(job, ("PENDING",), timeout=300, predicate=lambda i: int(i.get("Restarts", "0")) >= 1)
    if pending.get("Reason") == "BeginTime":
        # slurmd refuses a credential issued in the same second as the revocation of the job's previous one
        # ("Job credential revoked"): let the clock move on before releasing the job.
        time.sleep(3)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=20)
    info = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600,
                      predicate=lambda i: int(i.get("Restarts", "0")) >= 1)
    log = (tmp_path / "slurm-requeue.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "requeueing job" in log or int(info["Restarts"]) >= 1
    assert "resumed from" in log
    records = epoch_records(metrics.parent)
    assert [r["epoch"] for r in records] == [1, 2]


def _release_requeued(job: str) -> None:
    """Slurm holds a requeued batch job for ~2 minutes (Reason=BeginTime): release it to keep the test short."""
    pending = wait_state(job, ("PENDING",), timeout=300, predicate=lambda i: int(i.get("Restarts", "0")) >= 1)
    if pending.get("Reason") == "BeginTime":
        time.sleep(3)  # slurmd refuses a credential issued in the second its predecessor was revoked
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=20)


def test_sigterm_mid_epoch_requeues_and_ends_with_the_weights_of_an_unbroken_run(train_shards, tmp_path):
    """`scancel --signal=TERM` (what preemption sends): the training processes save and stop, the launcher prints
    no traceback, the job requeues itself and the requeued job ends exactly where an unbroken job ends."""
    from safetensors.torch import load_file

    args = "--epochs 2 --steps-per-epoch 10 --batch-size 4 --log-every 1 --data-mode cache --wandb offline"
    unbroken = submit(tmp_path, "slurm-unbroken", train_shards, args)
    info = wait_state(unbroken, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600)
    assert info["JobState"] == "COMPLETED", (tmp_path / "slurm-unbroken.out").read_text(errors="replace")[-3000:]
    job = submit(tmp_path, "slurm-term", train_shards, args)
    metrics = tmp_path / "runs" / "slurm-term" / "xception" / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"step"') >= 3):
        time.sleep(0.2)
    assert metrics.exists(), (tmp_path / "slurm-term.out").read_text(errors="replace")[-3000:]
    subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=20)
    _release_requeued(job)
    info = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600,
                      predicate=lambda i: int(i.get("Restarts", "0")) >= 1)
    log = (tmp_path / "slurm-term.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log[-3000:]
    assert "stopped by a signal" in log and "requeueing job" in log and "resumed from" in log
    assert "Traceback" not in log and "SignalException" not in log, log[-3000:]
    assert [r["epoch"] for r in epoch_records(metrics.parent)] == [1, 2]
    final = {name: load_file(str(tmp_path / "runs" / name / "xception" / "checkpoints" / "step-00000020" /
                                 "model.safetensors")) for name in ("slurm-unbroken", "slurm-term")}
    assert all(torch.equal(final["slurm-unbroken"][k], final["slurm-term"][k]) for k in final["slurm-unbroken"])
    # one W&B run across both attempts, no step twice in its history. The TERM reaches W&B's service process too,
    # which drops what it had not written yet: the first attempt's offline history may miss steps that
    # metrics.jsonl holds, and the training still saves, requeues and finishes (no traceback, above).
    run_id = (metrics.parent / "wandb-run-id").read_text().strip()
    attempts = sorted((metrics.parent / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(f"-{run_id}" in a.name for a in attempts), attempts
    steps = [r["step"] for attempt in attempts for r in read_history(attempt) if "train_loss_step" in r]
    resumed_at = int(re.search(r"resumed from \S*step-(\d+)", log).group(1))
    assert len(steps) == len(set(steps)) and set(range(resumed_at + 1, 21)) <= set(steps), (resumed_at, steps)


def test_train_all_submits_the_models_then_a_dependent_evaluation(train_shards, tmp_path):
    env = {**os.environ, "SHARDS": str(train_shards), "PRESET": "tiny", "EXPERIMENT": "all",
           "RUNS_DIR": str(tmp_path / "runs"), "BONEDIST_PYTHON": sys.executable, "CPU_PROCS": "2",
           "OMP_NUM_THREADS": "1", "MODELS": "xception resnet50_patch", "WANDB_MODE": "disabled",
           "EXTRA_ARGS": "--wandb off --epochs 1 --steps-per-epoch 3",
           "SBATCH_ARGS": f"--output {tmp_path}/%x-%j.out --time 00:15:00",
           "EVAL_ARGS": f"--output {tmp_path}/eval-%j.out --time 00:15:00"}
    result = subprocess.run(["bash", str(REPO / "launch/slurm/train_all.sbatch")], capture_output=True, text=True,
                            env=env, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    ids = re.findall(r"job (\d+)", result.stdout)
    assert len(ids) == 3, result.stdout
    evaluation = ids[-1]
    assert "afterok" in job_info(evaluation).get("Dependency", "") or job_info(evaluation)["JobState"] != "PENDING"
    info = wait_state(evaluation, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.out"))
    assert info["JobState"] == "COMPLETED", logs
    metrics = json.loads((tmp_path / "runs" / "all" / "report" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"xception", "resnet50_patch"} and "ensemble_fitted" in metrics["metrics"]
