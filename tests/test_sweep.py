"""``bonedist sweep``: Optuna over ordinary training runs, workers pulling from one journal, pruning, a dead worker's
trial resumed, the report, and a sweep over a real Slurm array."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bonedist import BonedistError
from tests.conftest import REPO, run_cli

SPACE = """study: {study}
base:
  model: xception
  shards: {shards}
  preset: tiny
  epochs: 3
  steps_per_epoch: 3
  wandb: {wandb}
params:
  lr: {{low: 1.0e-4, high: 1.0e-1, log: true}}
  batch_size: {{choices: [4, 8]}}
pruner: median
"""


def write_space(tmp_path: Path, shards: Path, study: str = "s", wandb: str = "'off'") -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(study=study, shards=shards, wandb=wandb))
    return path


def load(tmp_path: Path, study: str = "s"):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "runs" / study / "sweep" / "journal.log")))
    return optuna.load_study(study_name=study, storage=storage)


def states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        out[trial.state.name] = out.get(trial.state.name, 0) + 1
    return out


def sweep_cmd(space: Path, tmp_path: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "bonedist", "sweep", "--space", str(space), "--trials", str(trials),
            "--runs-dir", str(tmp_path / "runs")]


@pytest.mark.parametrize("text, message", [
    ("base: {model: xception, shards: s}\nparams: {lr: {low: 1, high: 0}}\n", "low <= high"),
    ("base: {model: xception, shards: s}\nparams: {}\n", "at least one setting"),
    ("base: {model: xception, shards: s}\nparams: {lr: {low: 0.1, high: 1}}\nobjective: test_mae\n", "test split"),
    ("base: {model: xception, shards: s, learning_rate: 1}\nparams: {lr: {low: 0.1, high: 1}}\n", "'lr'"),
    ("base: {model: xception, shards: s}\nparams: {lr: {low: 0.1, high: 1}}\nsampler: grid\n", "sampler"),
    ("base: {model: xception, shards: s}\nparamz: {}\n", "unknown key 'paramz'")])
def test_a_bad_space_is_one_line(tmp_path, text, message):
    from bonedist.sweep import load_space

    (tmp_path / "space.yaml").write_text(text)
    with pytest.raises(BonedistError, match=message):
        load_space(tmp_path / "space.yaml")


def test_trial_configurations_carry_the_parameters_and_the_sweep(train_shards, tmp_path):
    from bonedist.sweep import load_space, trial_config

    space = load_space(write_space(tmp_path, train_shards))
    cfg = trial_config(space, {"lr": 0.003, "batch_size": 8, "input.image_size": 48}, "trial-7", "runs", None)
    assert (cfg.lr, cfg.batch_size, cfg.input.image_size, cfg.epochs) == (0.003, 8, 48, 3)
    assert (cfg.experiment, cfg.run, cfg.wandb_tags) == ("s", "trial-7", ["sweep:s"])


@pytest.mark.slow
def test_two_workers_complete_the_study_exactly_and_report_it(train_shards, tmp_path):
    space = write_space(tmp_path, train_shards)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(sweep_cmd(space, tmp_path, 4), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    study = load(tmp_path)
    assert sum(states(study).values()) == 4 and set(states(study)) <= {"COMPLETE", "PRUNED"}, states(study)
    assert {t.user_attrs["worker"]["pid"] for t in study.trials} == {w.pid for w in workers}  # both pulled
    report = tmp_path / "runs" / "s" / "sweep" / "report"
    assert {"trials.csv", "summary.yaml", "best.yaml", "history.png"} <= {p.name for p in report.iterdir()}
    again = run_cli("train", "--config", str(report / "best.yaml"), "--print-config")
    assert again.returncode == 0 and "experiment: s-best" in again.stdout, again.stderr[-2000:]


@pytest.mark.slow
def test_a_killed_workers_trial_is_retried_once_and_resumes_its_checkpoint(train_shards, tmp_path):
    space = write_space(tmp_path, train_shards)
    first = subprocess.Popen(sweep_cmd(space, tmp_path, 2), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "runs" / "s" / "trial-0" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints.is_dir() and any(checkpoints.glob("step-*"))):
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)  # a lost node: nothing saved, nothing said
    first.communicate(timeout=60)
    second = subprocess.run(sweep_cmd(space, tmp_path, 2), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "trial 0 (trial-0) lost its worker; queued again" in out and "resumed from" in out
    study = load(tmp_path)
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state.name == "FAIL" and sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 2
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.user_attrs["run"] == "trial-0" and retry.params == trials[0].params


@pytest.mark.slow
@pytest.mark.slurm
def test_a_sweep_over_a_slurm_array_survives_a_cancelled_worker(train_shards, tmp_path):
    from tests.test_slurm import _slurm_up, wait_state

    if not _slurm_up():
        if os.environ.get("BONEDIST_REQUIRE_SLURM"):
            pytest.fail("BONEDIST_REQUIRE_SLURM is set but no Slurm answers")
        pytest.skip("no local Slurm")
    space = write_space(tmp_path, train_shards, study="slurm", wandb="offline")
    env = {**os.environ, "SPACE": str(space), "TRIALS": "6", "BONEDIST_PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "EXTRA_ARGS": f"--runs-dir {tmp_path / 'runs'}"}
    result = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--chdir", str(REPO), "--output",
                             str(tmp_path / "sweep-%a.out"), "--time", "00:20:00",
                             str(REPO / "launch" / "slurm" / "sweep.sbatch")], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    runs = tmp_path / "runs" / "slurm"
    deadline = time.time() + 400
    victim = None
    while time.time() < deadline and victim is None:  # a trial of task 1 with a checkpoint: cancel that task
        if (runs / "sweep" / "journal.log").exists():
            for trial in load(tmp_path, "slurm").get_trials(deepcopy=False):
                worker = trial.user_attrs.get("worker") or {}
                if (trial.state.name == "RUNNING" and worker.get("array_task") == "1"
                        and any((runs / trial.user_attrs["run"] / "checkpoints").glob("step-*"))):
                    victim = trial
        time.sleep(0.5)
    assert victim is not None, (tmp_path / "sweep-1.out").read_text(errors="replace")[-3000:]
    subprocess.run(["scancel", f"{job}_1"], check=True, timeout=20)
    wait_state(f"{job}_0", ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=900)
    log = (tmp_path / "sweep-0.out").read_text(errors="replace")
    study = load(tmp_path, "slurm")
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 6, (states(study), log[-3000:])
    left = subprocess.run(["squeue", "-h", "-j", f"{job}_1", "-o", "%T"], capture_output=True, text=True, timeout=20)
    assert not left.stdout.strip(), f"the cancelled task came back: {left.stdout}"  # scancel is not a requeue
    assert any(t.user_attrs.get("retry_of") == victim.number for t in done), log[-3000:]
    assert "Traceback" not in log
    for run in {t.user_attrs["run"] for t in done}:  # one W&B run per trial, resumed ones included
        run_id = (runs / run / "wandb-run-id").read_text().strip()
        offline = list((runs / run / "wandb").glob("offline-run-*"))
        assert offline and all(p.name.split("-", 3)[3].startswith(run_id) for p in offline), offline
    assert (runs / "sweep" / "report" / "best.yaml").is_file()
    # the study is resumable after every worker is gone: a new worker finds nothing left to do and reports
    again = run_cli("sweep", "--space", str(space), "--trials", "6", "--runs-dir", str(tmp_path / "runs"),
                    "--wandb", "off")
    assert again.returncode == 0 and "report in" in again.stdout, again.stderr[-2000:]
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in load(tmp_path, "slurm").trials) == 6
