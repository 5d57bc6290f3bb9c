"""``bonedist sweep``: a search over training settings on Optuna, each trial an ordinary training run.

    bonedist sweep --space space.yaml --trials 40                    # one worker; run it again to resume
    sbatch --array=0-7 launch/slurm/sweep.sbatch                     # eight workers pulling from one study

The study lives in ``RUNS/STUDY/sweep/journal.log`` (Optuna's file journal: no database server, safe for several
processes on one shared filesystem), its trials in ``RUNS/STUDY/trial-K`` (run folders like any other: resumable,
evaluable, one W&B run each in the study's group). Any number of workers, on one machine or in a Slurm array, pull
trials until ``--trials`` have completed or been pruned. The objective is the trial's validation metric (best/'s
``val_mae_months`` by default), never a test split. After every epoch a trial reports that metric and the pruner
(median, or successive halving) stops the ones that are clearly behind.

A trial whose worker died (a killed or cancelled job, a lost node) is found by the next worker: its run folder's lock
is free although the trial is still running. It is marked failed and retried once, under the same run name and seed,
so the retry resumes from the dead trial's last checkpoint. After the workers, ``RUNS/STUDY/sweep/report/``: the
best trial's configuration as a file for ``bonedist train --config``, the trials table, the optimisation history and
parameter importances (PNG), also logged to W&B as a table.

The search space (YAML)::

    study: lr-warmup                  # default: the file's name
    base: run.yaml                    # a --config file, or the same fields inline (model, shards, preset, ...)
    params:
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      warmup_epochs: {low: 0.0, high: 18.0}
      batch_size: {choices: [32, 64, 128]}
      input.image_size: {low: 64, high: 128, step: 32}      # input.FIELD, model.FIELD, augment (a range factor)
    sampler: tpe                      # tpe | random | grid (every combination of choices, once each)
    pruner: median                    # median | halving | none
    objective: val_mae_months         # minimised

A ``variant`` parameter names sets of settings under ``variants`` (``bench compare``: the baseline and one change
at a time, each a grid point with every seed)::

    params: {variant: {choices: [baseline, lr=4e-3]}, seed: {choices: [0, 1]}}
    variants: {baseline: {}, lr=4e-3: {lr: 0.004}}
    sampler: grid
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from bonedist import BonedistError
from bonedist.choices import WANDB_MODES
from bonedist.files import read_json, read_yaml, write_atomic
from bonedist.options import check_fields, option

SAMPLERS, PRUNERS = ("tpe", "random", "grid"), ("median", "halving", "none")
RETRIES = 1  # a trial whose worker died is run again once
GRACE_S = 120.0  # a running trial's worker has this long to take its run folder's lock


@dataclass
class SweepOptions:
    """``bonedist sweep``'s options (its flags are generated from these fields)."""

    space: str = option("", "the search space: YAML with base, params, sampler, pruner (see bonedist.sweep)",
                        cli=False)
    trials: int | None = option(None, "trials to complete or prune in the whole study, all workers together (default "
                                      "20; with sampler grid: every point of the grid)", minimum=1)
    runs_dir: str | None = option(None, "where the study's folder goes (default: the base configuration's runs_dir)")
    wandb: str | None = option(None, "W&B mode of the trials and the report (default: the base configuration's)",
                               WANDB_MODES)
    report_only: bool = option(False, "write the report of the study as it stands and exit")

    def __post_init__(self):
        check_fields(self)


@dataclass
class Space:
    study: str
    base: dict
    params: dict
    sampler: str = "tpe"
    pruner: str = "median"
    objective: str = "val_mae_months"
    seed: int = 0
    variants: dict = field(default_factory=dict)  # name → settings, for a ``variant`` parameter
    distributions: dict = field(default_factory=dict)

    def grid(self) -> list[dict]:
        """Every combination of the parameters' choices (sampler grid), the first parameter varying slowest."""
        names = list(self.params)
        return [dict(zip(names, values)) for values in itertools.product(*(self.params[n]["choices"] for n in names))]


def load_space(path: str | Path) -> Space:
    """The search space file, checked: a base configuration, at least one parameter with a valid range or choices,
    known sampler, pruner and objective. Each problem is one line naming the key."""

    from bonedist.train.config import config_values, read_config_file

    path = Path(path)
    data = read_yaml(path, "--space")
    if not isinstance(data, dict):
        raise BonedistError(f"--space {path}: expected a mapping with base and params")
    keys = ("study", "base", "params", "sampler", "pruner", "objective", "seed", "variants")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise BonedistError(f"--space {path}: unknown key {unknown[0]!r} (keys: {', '.join(keys)})")
    base = data.get("base")
    if isinstance(base, str):
        base = read_config_file(str(path.parent / base))
    elif isinstance(base, dict):
        base = config_values(base, f"--space {path}: base")
    else:
        raise BonedistError(f"--space {path}: 'base' must name a --config file or hold its fields")
    if not base.get("model") or not base.get("shards"):
        raise BonedistError(f"--space {path}: the base configuration must name model and shards")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise BonedistError(f"--space {path}: 'params' must map at least one setting to its range or choices")
    space = Space(study=str(data.get("study") or path.stem), base=base, params=params,
                  sampler=str(data.get("sampler", "tpe")), pruner=str(data.get("pruner", "median")),
                  objective=str(data.get("objective", "val_mae_months")), seed=int(data.get("seed", 0)))
    for key, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if getattr(space, key) not in allowed:
            raise BonedistError(f"--space {path}: {key} {getattr(space, key)!r}; expected one of {', '.join(allowed)}")
    if not space.objective.startswith("val_"):
        raise BonedistError(f"--space {path}: objective {space.objective!r} is not a validation metric (val_...): "
                            f"a sweep never optimises on a test split")
    space.distributions = {name: _distribution(path, name, spec) for name, spec in params.items()}
    if space.sampler == "grid" and not all("choices" in spec for spec in params.values()):
        raise BonedistError(f"--space {path}: sampler grid takes params with choices only")
    space.variants = data.get("variants") or {}
    if not isinstance(space.variants, dict) or not all(isinstance(v, dict) for v in space.variants.values()):
        raise BonedistError(f"--space {path}: 'variants' must map each name to its settings")
    missing = [v for v in params.get("variant", {}).get("choices", []) if v not in space.variants]
    if missing or ("variant" in params) != bool(space.variants):
        raise BonedistError(f"--space {path}: params.variant names entries of 'variants' "
                            f"({', '.join(map(str, missing)) or 'one goes without the other'})")
    return space


def _distribution(path: Path, name: str, spec):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not isinstance(spec, dict):
        raise BonedistError(f"--space {path}: params.{name} must be {{low, high[, log, step]}} or {{choices}}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise BonedistError(f"--space {path}: params.{name}.choices must be a non-empty list")
        return CategoricalDistribution(choices)
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
        raise BonedistError(f"--space {path}: params.{name} needs numbers low <= high, got {low!r}, {high!r}")
    log, step = bool(spec.get("log", False)), spec.get("step")
    try:
        if isinstance(low, int) and isinstance(high, int) and not isinstance(step, float):
            return IntDistribution(low, high, log=log, step=int(step or 1))
        return FloatDistribution(float(low), float(high), log=log, step=step)
    except ValueError as exc:
        raise BonedistError(f"--space {path}: params.{name}: {exc}") from None


def open_study(space: Space, folder: Path):
    """The study in ``folder/journal.log``, created on first use (every worker opens the same one)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    folder.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(folder / "journal.log")))
    sampler = (optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=5) if space.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=space.seed))
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
              "halving": optuna.pruners.SuccessiveHalvingPruner(),
              "none": optuna.pruners.NopPruner()}[space.pruner]
    return optuna.create_study(study_name=space.study, storage=storage, sampler=sampler, pruner=pruner,
                               direction="minimize", load_if_exists=True)


@contextlib.contextmanager
def _exclusive(path: Path):
    """One worker at a time between counting the study's trials and asking for a new one (no overshoot)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _lock_free(run_dir: Path) -> bool:
    """Whether nobody holds the run folder's lock (its trainer is gone, or never started)."""
    from bonedist.train.lock import LOCK_NAME

    path = run_dir / LOCK_NAME
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def reap_dead_trials(study, root: Path, say=print) -> int:
    """Running trials whose worker is gone (their run folder's lock is free past the grace period, or their worker
    was this host's and its process has ended) are marked failed and, once, queued again under the same run name
    and seed. Returns how many."""
    from optuna.trial import TrialState

    reaped = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        same_host_gone = worker.get("host") == socket.gethostname() and not _alive(worker.get("pid"))
        started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
        run = trial.user_attrs.get("run", f"trial-{trial.number}")
        if not (same_host_gone or (time.time() - started > GRACE_S and _lock_free(root / run))):
            continue
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        tries = int(trial.user_attrs.get("tries", 1))
        if tries <= RETRIES:
            study.enqueue_trial(trial.params, user_attrs={"run": run, "tries": tries + 1,
                                                          "retry_of": trial.number}, skip_if_exists=False)
            say(f"sweep: trial {trial.number} ({run}) lost its worker; queued again to resume from its checkpoint")
        else:
            say(f"sweep: trial {trial.number} ({run}) lost its worker again; left failed")
        reaped += 1
    return reaped


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return True  # unknown: trust the lock
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _counts(study) -> tuple[int, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    busy = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    return done, busy


def trial_config(space: Space, params: dict, run: str, runs_dir: str, wandb: str | None):
    """The trial's training configuration: the base, the trial's parameters, its run folder and W&B tags."""
    from bonedist.bench.compare import apply
    from bonedist.train.config import recipe_values, resolve_config

    base = {k: v for k, v in space.base.items() if k not in ("model", "shards", "preset")}
    preset = space.base.get("preset", "paper")
    recipe_augment = recipe_values(space.base["model"], preset).get("augment", {})
    if "variant" in params:  # a named set of settings (bench compare's one factor at a time)
        params = {**space.variants[params["variant"]], **{k: v for k, v in params.items() if k != "variant"}}
    values = apply(base, params, {**recipe_augment, **base.get("augment", {})})
    values.update(experiment=space.study, run_name=run, runs_dir=runs_dir,
                  wandb_tags=[f"sweep:{space.study}", *values.get("wandb_tags", [])])
    if wandb:
        values["wandb"] = wandb
    return resolve_config(space.base["model"], space.base["shards"], preset, file=values)


def run_sweep(opts: SweepOptions) -> int:
    """One worker: pull trials until the study has ``opts.trials`` completed or pruned ones, then write the report."""
    import optuna
    from optuna.trial import TrialState

    from bonedist.train.engine import EXIT_PREEMPTED, end_processes, train_in_process

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(opts.space)
    runs_dir = opts.runs_dir or space.base.get("runs_dir", "runs")
    root = Path(runs_dir) / space.study
    folder = root / "sweep"
    study = open_study(space, folder)
    if opts.report_only:
        write_report(study, space, root, opts.wandb)
        return 0
    grid = space.grid() if space.sampler == "grid" else []
    trials = min(opts.trials or len(grid), len(grid)) if grid else (opts.trials or 20)
    code = 0
    try:
        while True:
            with _exclusive(folder / "ask.lock"):
                if grid and not study.trials:  # the first worker queues every point; all workers pull them
                    for point in grid:
                        study.enqueue_trial(point, skip_if_exists=False)
                reap_dead_trials(study, root)
                done, busy = _counts(study)
                waiting = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
                if done >= trials or (done + busy >= trials and not waiting) or (grid and not waiting):
                    break  # a grid's failed points stay failed (in the report); nothing is sampled beyond it
                trial = study.ask(space.distributions)
                trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(),
                                               "slurm_job": os.environ.get("SLURM_JOB_ID"),
                                               "array_task": os.environ.get("SLURM_ARRAY_TASK_ID")})
                run = trial.user_attrs.get("run") or f"trial-{trial.number}"
                trial.set_user_attr("run", run)
            cfg = trial_config(space, trial.params, run, runs_dir, opts.wandb)
            print(f"sweep {space.study}: trial {trial.number} ({run}): {trial.params}")
            pruned = []

            def report(metrics: dict, trial=trial, pruned=pruned) -> str | None:
                value = metrics.get(space.objective)
                if value is None:
                    return None
                trial.report(float(value), int(metrics["epoch"]))
                if trial.should_prune():
                    pruned.append(metrics["epoch"])
                    return f"pruned by the sweep's {space.pruner} pruner after epoch {metrics['epoch']}"
                return None

            try:
                code, run_dir, _ = train_in_process(cfg, epoch_callbacks=[report])
            except BonedistError as exc:
                study.tell(trial, state=TrialState.FAIL)
                print(f"sweep {space.study}: trial {trial.number} failed: {exc}")
                continue
            if code == EXIT_PREEMPTED:  # signalled (preemption): the trial stays running for a worker to resume
                print(f"sweep {space.study}: stopped by a signal during trial {trial.number}; it is resumed by the "
                      f"next worker (run the same command again)")
                return code
            if code != 0:
                study.tell(trial, state=TrialState.FAIL)
                continue
            if pruned:
                study.tell(trial, state=TrialState.PRUNED)
                continue
            meta = read_json(run_dir / "best" / "meta.json")
            value = (meta.get("metrics") or {}).get(space.objective) if isinstance(meta, dict) else None
            if value is None:
                study.tell(trial, state=TrialState.FAIL)
                print(f"sweep {space.study}: trial {trial.number} left no {space.objective} in its best/meta.json")
                continue
            study.tell(trial, float(value))
    finally:
        end_processes()
    write_report(study, space, root, opts.wandb)
    return code


def write_report(study, space: Space, root: Path, wandb_mode_: str | None = None) -> Path:
    """``ROOT/sweep/report/``: best.yaml (the best trial's configuration for ``bonedist train --config``),
    trials.csv and trials.md, history.png and importance.png; and a W&B run of the study's group with the table."""
    import yaml
    from optuna.trial import TrialState

    from bonedist.train.config import TrainConfig, config_yaml

    out = root / "sweep" / "report"
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    rows = [{"trial": t.number, "state": t.state.name.lower(), "value": t.value, "run": t.user_attrs.get("run"),
             "epochs": len(t.intermediate_values), "retry_of": t.user_attrs.get("retry_of"),
             "minutes": round((t.datetime_complete - t.datetime_start).total_seconds() / 60, 2)
             if t.datetime_complete and t.datetime_start else None, **{f"param {k}": v for k, v in t.params.items()}}
            for t in trials]
    import pandas as pd

    frame = pd.DataFrame(rows)
    write_atomic(out / "trials.csv", frame.to_csv(index=False))
    write_atomic(out / "trials.md", frame.to_markdown(index=False) if _has_tabulate() else frame.to_string(index=False))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary = {"study": space.study, "objective": space.objective, "trials": len(trials),
               "complete": len(complete), "pruned": sum(t.state == TrialState.PRUNED for t in trials),
               "failed": sum(t.state == TrialState.FAIL for t in trials)}
    if complete:
        best = min(complete, key=lambda t: t.value)
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                       best_run=best.user_attrs.get("run"))
        config = read_json(root / best.user_attrs.get("run", f"trial-{best.number}") / "config.json")
        config = {k: v for k, v in config.items() if k != "resolved"}
        config.update(experiment=f"{space.study}-best", run_name=None)
        write_atomic(out / "best.yaml", config_yaml(TrainConfig.from_dict(config)))
    write_atomic(out / "summary.yaml", yaml.safe_dump(summary, sort_keys=False))
    _plots(study, out, len(complete))
    _log_wandb(space, out, frame, summary, wandb_mode_)
    print(f"sweep {space.study}: {summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} "
          f"failed" + (f"; best trial {summary['best_trial']} ({summary['best_run']}): {space.objective} "
                       f"{summary['best_value']:.4g}, {summary['best_params']}" if complete else "")
          + f"; report in {out}")
    return out


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def _plots(study, out: Path, complete: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        if complete:
            ax = ovm.plot_optimization_history(study)
            ax.figure.savefig(out / "history.png", dpi=110, bbox_inches="tight")
            plt.close(ax.figure)
        if complete >= 2:
            try:
                ax = ovm.plot_param_importances(study)
                ax.figure.savefig(out / "importance.png", dpi=110, bbox_inches="tight")
                plt.close(ax.figure)
            except (RuntimeError, ValueError, ZeroDivisionError):
                pass  # too few distinct settings for importances yet


def _log_wandb(space: Space, out: Path, frame, summary: dict, requested: str | None) -> None:
    from bonedist.tracking import wandb_mode

    mode = wandb_mode(requested or space.base.get("wandb", "auto"))
    if mode == "off":
        return
    import wandb

    run = wandb.init(project=space.base.get("wandb_project", "bonedist"), group=space.study, job_type="sweep",
                     name=f"{space.study}-report", dir=str(out), mode=mode, tags=[f"sweep:{space.study}"],
                     config={"space": {k: v for k, v in space.params.items()}, "sampler": space.sampler,
                             "pruner": space.pruner, "objective": space.objective})
    table = frame.astype(object).where(frame.notna(), None)
    run.log({"trials": wandb.Table(dataframe=table.astype(str))})
    for name in ("history", "importance"):
        if (out / f"{name}.png").is_file():
            run.log({name: wandb.Image(str(out / f"{name}.png"))})
    run.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
    run.finish()
