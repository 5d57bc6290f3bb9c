"""A trainer's state in and out of checkpoints: every component saves and restores itself through its own
``state_dict`` (model, EMA, optimizer, scheduler, scaler, trainer state, RNG streams of every rank), and ``best/``
gets what evaluation and prediction need (``meta.json``)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import MISSING, asdict, fields

import torch

from bonedist import BonedistError, __version__
from bonedist.data.manifest import pack_differences, pack_identity
from bonedist.train import checkpoint as ckpt
from bonedist.train.state import TrainState


def best_meta(trainer, metrics: dict | None = None) -> dict:
    """What ``best/meta.json`` (and each checkpoint's) holds: how to rebuild the model and read its outputs
    (``bonedist.eval.runs``), and what it was trained on (``check`` compares it when resuming)."""
    cfg = trainer.cfg
    return {"pack_identity": pack_identity(trainer.manifest),
            "model": cfg.model, "run": cfg.run, "model_options": trainer.info.without_weights(asdict(cfg.options())),
            "input": cfg.input.to_dict(), "spec": trainer.spec.to_dict(), "mu": trainer.scale.mu,
            "sigma": trainer.scale.sigma, "calibration_z": {k: list(v) for k, v in trainer.calibration.items()},
            "train_mean_months": trainer.train_mean,
            "epoch": trainer.state.epoch, "global_step": trainer.state.global_step, "metrics": metrics,
            "precision": trainer.precision.name, "config": cfg.to_dict(), "bonedist_version": __version__,
            "teacher": {**trainer.teacher.identity, "weight": trainer.distill_weight} if trainer.teacher else None,
            "git": trainer.git, "pack": {"image_size": trainer.manifest["image_size"],
                                         "resize_mode": trainer.manifest["resize_mode"]}}


def save(trainer, best_metrics: dict | None = None) -> None:
    """A step checkpoint (and ``best/`` first when ``best_metrics`` says this epoch improved), on rank 0."""
    acc = trainer.accelerator
    trainer.state.elapsed = trainer.elapsed()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    all_rng = _gather_rng(rng, trainer.world)
    if acc.is_main_process:
        tensors = ckpt.model_state(trainer.unwrapped)
        ema = ckpt.model_state(trainer.ema.module) if trainer.ema is not None else None
        saved = {"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None, "ema": ema,
                 "trainer": asdict(trainer.state), "rng": all_rng, "mu": trainer.scale.mu,
                 "sigma": trainer.scale.sigma, "config": trainer.cfg.to_dict(), "git": trainer.git,
                 "world": trainer.world}
        meta = best_meta(trainer, best_metrics)
        if best_metrics is not None:  # best/ is complete before any checkpoint says it exists
            ckpt.save_best(trainer.run_dir, ema if ema is not None else tensors, meta, trainer.cfg.save_dtype)
        ckpt.save_checkpoint(trainer.run_dir, trainer.state.global_step, saved, tensors, meta, trainer.cfg.keep_last)
    acc.wait_for_everyone()


def check(trainer, folder) -> list[str]:
    """Whether the checkpoint ``folder`` is one this run can continue: the same model (else one line naming both),
    and the same preset and pack (image size, radiographs, shard checksums) unless ``--allow-changed-data``, which
    is then recorded in metrics.jsonl. Returns what changed (allowed)."""
    cfg = trainer.cfg
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BonedistError(f"cannot resume from {folder}: its meta.json cannot be read ({exc})") from exc
    saved_cfg = meta.get("config") or {}
    if meta.get("model") != cfg.model:
        raise BonedistError(f"cannot resume {cfg.model} from {folder}: it is a checkpoint of {meta.get('model')} "
                            f"(preset {saved_cfg.get('preset', '?')}); pass --resume never (or another --experiment) "
                            f"to start {cfg.model} afresh")
    built = model_differences(meta.get("model_options"), cfg.options(), trainer.info)
    if built:
        raise BonedistError(f"cannot resume {cfg.model} from {folder}: its model was built with other options "
                            f"({'; '.join(built)}); give the run's own values (its config.json, e.g. a default that "
                            f"changed since) or start a new run (--resume never, or another --experiment)")
    changes = [f"preset {saved_cfg.get('preset')} → {cfg.preset}"] if saved_cfg.get("preset") != cfg.preset else []
    if meta.get("pack_identity"):  # checkpoints before 0.2 did not record it
        changes += pack_differences(meta["pack_identity"], pack_identity(trainer.manifest))
    changes += teacher_differences(meta.get("teacher"), trainer.teacher)
    if changes and not cfg.allow_changed_data:
        raise BonedistError(f"cannot resume from {folder}: {'; '.join(changes)} since it was written (the "
                            f"normalisation and data position refer to what it trained on). Start a new run (--resume "
                            f"never, or another --experiment), or pass --allow-changed-data to continue on purpose")
    trainer.resume_changes = changes
    return changes


def model_differences(saved: dict | None, options, info) -> list[str]:
    """``name saved → now`` for each model option a checkpoint was built with that differs from this run's (an
    option the checkpoint predates counts at its default): a different head or backbone cannot load its weights."""
    if saved is None:
        return []
    defaults = {f.name: f.default for f in fields(options) if f.default is not MISSING}
    now = info.without_weights(asdict(options))
    return [f"{name} {saved.get(name, defaults.get(name))} → {value}" for name, value in now.items()
            if saved.get(name, defaults.get(name)) != value]


def teacher_differences(saved: dict | None, teacher) -> list[str]:
    """A distilled run resumes on the same teacher table (its SHA-256), an undistilled one on none. ``teacher``:
    the run's loaded ``distill.Teacher`` (checked and hashed before the run folder is claimed), or None."""
    was, now = (saved or {}).get("sha256"), teacher.sha256 if teacher else None
    if was == now:
        return []
    if was and now:
        return [f"the teacher table {teacher.path} (SHA-256 {was[:12]} → {now[:12]})"]
    if was:
        return [f"it was distilled from {saved.get('path')}, now without --teacher"]
    return [f"it trained without a teacher, now --teacher {teacher.path}"]


def restore(trainer, folder) -> str | None:
    """Resume from ``folder`` (``--resume``, found and checked when the trainer claimed the run folder); returns
    the folder resumed from, or None."""
    acc = trainer.accelerator
    if folder is None:
        if acc.is_main_process:  # a fresh start: lines of an earlier attempt that left no checkpoint go
            trainer.log.truncate_after(0, 0, warn=acc.print)
        return None
    from safetensors.torch import load_file

    saved = ckpt.load_state(folder)
    if saved["world"] != trainer.world:
        acc.print(f"warning: checkpoint written by {saved['world']} processes, resuming with {trainer.world}: data "
                  f"order and RNG streams will differ from an unbroken run")
    try:
        trainer.unwrapped.load_state_dict(load_file(str(folder / "model.safetensors")))
    except RuntimeError as exc:  # the same model name with other options (a wider head, other channels)
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)[:200]
        raise BonedistError(f"the checkpoint {folder} does not fit {trainer.cfg.model} with these options "
                            f"({detail}); resume with the options it was trained with, or --resume never") from exc
    fresh = [g.get("initial_lr", g["lr"]) for g in trainer.optimizer.param_groups]  # this command's rates
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.scheduler.load_state_dict(saved["scheduler"])
    _apply_new_rates(trainer, fresh, saved.get("config") or {})
    if saved["scaler"] is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(saved["scaler"])
    if trainer.ema is not None and saved.get("ema") is not None:
        trainer.ema.module.load_state_dict(saved["ema"])
    trainer.state = TrainState(**saved["trainer"])
    if trainer.cfg.swa and trainer.ema is not None:
        trainer.ema.count = trainer.state.averaged
    rng = saved["rng"][trainer.rank] if trainer.rank < len(saved["rng"]) else saved["rng"][0]
    torch.set_rng_state(rng["torch"])
    state = rng["python"]
    random.setstate((state[0], tuple(state[1]), state[2]))
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if acc.is_main_process:
        # lines of the interrupted continuation (and a torn last line) go: each step and epoch is logged once
        trainer.log.truncate_after(trainer.state.global_step, trainer.state.epoch, warn=acc.print)
        changes = trainer.resume_changes
        if changes:  # --allow-changed-data: said in the log and kept in the metrics
            trainer.log.write({"kind": "note", "step": trainer.state.global_step, "resumed_on_changed_data": changes})
            acc.print(f"warning: resuming although {'; '.join(changes)} (--allow-changed-data)")
    if trainer.state.best_epoch >= 0 and not (trainer.run_dir / "best" / "model.safetensors").is_file():
        acc.print(f"warning: {trainer.run_dir / 'best'} is missing; it is written again at the next validation")
        trainer.state.best = math.inf
    return str(folder)


def _apply_new_rates(trainer, fresh: list[float], saved_cfg: dict) -> None:
    """A resume with another ``--lr``/``--backbone-lr`` than the checkpoint trained with (the advice after a
    diverged step) continues with the new rates: each group's base rate becomes this command's and its current
    rate is scaled alike, so the schedule goes on where it was at the new level."""
    cfg = trainer.cfg
    if saved_cfg.get("lr") == cfg.lr and saved_cfg.get("backbone_lr") == cfg.backbone_lr:
        return
    groups = trainer.optimizer.param_groups
    if len(groups) != len(fresh):
        return
    for group, rate in zip(groups, fresh):
        old = group.get("initial_lr", group["lr"])
        group["lr"] = group["lr"] * (rate / old) if old > 0 else rate
        if "initial_lr" in group:
            group["initial_lr"] = rate
    inner = trainer.scheduler.inner
    if inner is not None and hasattr(inner, "base_lrs"):
        inner.base_lrs = list(fresh)
        if hasattr(inner, "_last_lr"):
            inner._last_lr = [g["lr"] for g in groups]
    trainer.accelerator.print(f"note: resuming with --lr {cfg.lr:g} (the checkpoint trained with "
                              f"{saved_cfg.get('lr')}): the learning rates continue at the new level")


def _gather_rng(rng: dict, world: int) -> list[dict]:
    if world == 1:
        return [rng]
    from accelerate.utils import gather_object

    return gather_object([rng])
