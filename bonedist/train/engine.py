"""The training engine: one model-agnostic loop under Accelerate, from one CPU process to many GPU nodes.

    trainer = Trainer(resolve_config("xception", "shards/rsna", "scratch"))
    trainer.fit()                      # train, validate, checkpoint, resume, track

Each model brings its task (outputs, stages); the run's config brings the loss, optimizer, schedule and input
pipeline. The engine adds mixed precision and memory format (``bonedist.train.precision``), optional
torch.compile, gradient accumulation and clipping, exact distributed validation with BatchNorm recalibration,
atomic checkpoints (``bonedist.train.resume``), preemption, time budgets and tracking. Benchmarks drive the same
loop through ``begin_epoch``, ``train_epoch`` and ``model_batch``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from bonedist import BonedistError
from bonedist.data.augment import InputPipeline, ModelBatch, TargetScale
from bonedist.data.manifest import load_manifest
from bonedist.data.sampling import SplitIndex, balance_weights, target_stats
from bonedist.data.source import CachedSplit, DataConfig, open_split, verify_pack
from bonedist.files import write_atomic
from bonedist.models import create_model
from bonedist.progress import progress
from bonedist.spec import tta_views
from bonedist.tracking import MetricsLog, wandb_mode
from bonedist.train import checkpoint as ckpt
from bonedist.train import resume
from bonedist.train.clock import RunClock, max_over_ranks, sum_over_ranks
from bonedist.train.config import TrainConfig
from bonedist.train.distill import distill_loss, load_teacher
from bonedist.train.lock import RunLock
from bonedist.train.losses import build_loss
from bonedist.train.mixup import c_mixup
from bonedist.train.optim import build_optimizer
from bonedist.train.precision import resolve_precision
from bonedist.train.schedule import build_scheduler
from bonedist.train.state import EpochStats, EpochSums, TrainState
from bonedist.train.timing import NullTimer
from bonedist.train.track import TrainTracking
from bonedist.train.validation import Validation

THROUGHPUT_WARMUP = 3  # steps of an epoch left out of its images/s (autotuning, lazy init, compilation)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and stopped on a signal; run again (or requeue) to continue
REQUEUE_MARKER = "REQUEUE"


class NonFiniteLoss(BonedistError):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg, self.info = cfg, cfg.info()
        self.run_dir = Path(cfg.runs_dir) / cfg.experiment / cfg.run
        cuda = torch.cuda.is_available()
        self.precision = resolve_precision(cfg.precision, cfg.channels_last, cuda, self.info.cpu_precision)
        # only rank 0 logs: the others need not probe the W&B server (a 3-second timeout on offline nodes)
        main = os.environ.get("RANK", "0") == "0"
        self.tracking = wandb_mode(cfg.wandb) if main or cfg.wandb == "off" else "offline"
        self.git = ckpt.git_revision()
        # staged training leaves the fixed branches without gradients: DDP must look for unused parameters
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.stages else []
        _allow_precision(self.precision.mixed)
        self.accelerator = Accelerator(cpu=not cuda, mixed_precision=self.precision.mixed,
                                       gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=handlers,
                                       log_with="wandb" if self.tracking != "off" else None,
                                       project_dir=str(self.run_dir))
        acc = self.accelerator
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        self.stop_requested = self.stop_requested_everywhere = False
        set_seed(cfg.seed)
        self.manifest = load_manifest(cfg.shards)
        if "validation" not in self.manifest["splits"]:
            raise BonedistError(f"{cfg.shards} has no validation split: training selects checkpoints on it")
        # a distillation's teacher table is checked before anything is written
        self.teacher = load_teacher(cfg.teacher, cfg.teacher_column,
                                    SplitIndex.from_manifest(self.manifest, "train").keys) if cfg.teacher else None
        self.distill_weight = (0.5 if cfg.distill is None else cfg.distill) if self.teacher else 0.0
        self.lock, self.resume_changes = RunLock(self.run_dir), []
        self.resume_from = self._claim_run_folder()  # nothing is written before the folder is ours and fits
        if acc.is_main_process:
            write_atomic(self.run_dir / "config.json", json.dumps({**cfg.to_dict(), "resolved": self.resolved()},
                                                                  indent=1, sort_keys=True) + "\n")
            (self.run_dir / REQUEUE_MARKER).unlink(missing_ok=True)
        acc.wait_for_everyone()
        acc.print(f"precision: {self.precision.describe()}")
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=acc.is_main_process)
        verify_pack(cfg.shards, self.manifest, ["train", "validation"], self.rank, self.world)
        self._build_model()
        self._build_data()
        self._build_optimisation()
        self.state = TrainState()
        self.out_of_time = False
        self.clock = RunClock(cfg)
        self.timer = NullTimer()  # bench train-loop puts a PhaseTimer here
        self.tracker = TrainTracking(self)
        self.validation = Validation(self)
        self._validation_sample: dict | None = None
        # called with each epoch's metrics after its checkpoint; one returning a reason stops the run there (a
        # sweep's pruner): single-process runs only, as every rank would have to agree
        self.epoch_callbacks: list[Callable[[dict], str | None]] = []
        self.stop_reason: str | None = None

    def _claim_run_folder(self) -> Path | None:
        """Rank 0 takes the run folder's lock, repairs what a kill left and checks the checkpoint it would resume
        from against this run (model, preset, pack); every rank learns the verdict, so all stop with one line."""
        acc, problem, note, folder = self.accelerator, None, None, None
        if acc.is_main_process:
            try:
                note = self.lock.acquire()
                ckpt.recover_run_folder(self.run_dir)
                folder = ckpt.find_resume(self.run_dir, self.cfg.resume, warn=acc.print)
                if folder is not None:
                    resume.check(self, folder)
            except BonedistError as exc:
                problem = str(exc)
                self.lock.release()
        if self.world > 1:
            shared = [problem, str(folder) if folder else None]
            torch.distributed.broadcast_object_list(shared, src=0)
            problem, folder = shared[0], Path(shared[1]) if shared[1] else None
        if problem:
            raise BonedistError(problem)
        if note:
            acc.print(f"note: {note}")
        return folder

    def resolved(self) -> dict:
        """What ``auto`` settings became on this machine (saved in config.json and the W&B config)."""
        return {"precision": self.precision.name, "channels_last": self.precision.channels_last,
                "channels_last_from": self.precision.channels_last_from,
                "precision_reason": self.precision.reason, "world": self.world}

    # -- setup ---------------------------------------------------------------------------------------------------
    def _build_model(self) -> None:
        cfg = self.cfg
        model = create_model(cfg.model, cfg.input, **cfg.model_options)
        self.task, self.spec = model.task, model.spec
        # the loss's parts logged per epoch as train_loss_<term>: each branch's, the label's and the teacher's
        # terms of a distilled run, the age-distribution term of an age-bins head
        self.loss_terms = (*self.task.branches, *(("label", "teacher") if self.teacher else ()),
                           *(("age_bins",) if cfg.model_options.get("age_bins") else ()))
        if cfg.low_res and self.spec.is_patch:
            raise BonedistError(f"--low-res is for whole-image models; {cfg.model}'s patches keep their size")
        if cfg.mixup and self.spec.is_patch:
            raise BonedistError(f"--mixup mixes whole radiographs; {cfg.model} trains on patches of them")
        self._train_side = 0  # the side of the last training batch, to say when progressive resizing switches
        self.synced = bool(cfg.sync_bn and self.world > 1 and torch.cuda.is_available())
        if self.synced:  # its forward in training mode (recalibration included) has collectives
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self._model = self.precision.apply(model)

    def _build_data(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        data = DataConfig.of_training(cfg)
        self.train_data = open_split(data, "train", self.device, self.rank, self.world, self.manifest,
                                     progress=acc.is_local_main_process, training=True)
        acc.print(f"data mode: {self.train_data.mode} ({self.train_data.reason})")
        self.val_data = open_split(data, "validation", self.device, self.rank, self.world, self.manifest,
                                   mode=self.train_data.mode, progress=False)
        index = self.train_data.index
        weights = balance_weights(index.age, index.male, data.n_bins, data.max_age) if cfg.balanced else None
        self.scale = TargetScale(*target_stats(index.age, weights))
        self.train_mean = float(np.mean(index.age))  # the natural mean: what predict-the-mean predicts
        if cfg.low_res:
            acc.print(f"progressive resizing: training at {cfg.low_res} px until {cfg.low_res_until:.0%} of the "
                      f"cosine cycle, then at {self.spec.image_size} px (validation at {self.spec.image_size} px)")
        if cfg.mixup:
            acc.print(f"C-Mixup: each training radiograph blended with one of the same sex and similar age "
                      f"(Beta({cfg.mixup:g}, {cfg.mixup:g}) weights, kernel width {cfg.mixup_bandwidth:g} SD)")
        if self.teacher:
            acc.print(f"distilling: {self.teacher.path} column {self.teacher.column} ({len(self.teacher.months)} "
                      f"training radiographs), weight {self.distill_weight:g} beside the labels")
        self.recal_data = self.train_data.subset(cfg.recalibrate, seed=cfg.seed, equal=self.synced) \
            if cfg.recalibrate else None
        self.pipe = InputPipeline(self.spec, cfg.augment_config(), seed=cfg.seed, rank=self.rank,
                                  channels_last=self.precision.input_channels_last)
        if self.spec.hand_mask:  # cached splits keep each radiograph's hand mask instead of computing it per step
            for split in (self.train_data, self.val_data):
                if isinstance(split, CachedSplit):
                    split.cache.keep_masks(self.pipe.hand_masks, cfg.eval_batch_size,
                                           progress=acc.is_local_main_process)
        self.steps_per_epoch = min(len(self.train_data), cfg.steps_per_epoch or len(self.train_data))
        self.optim_steps_per_epoch = max(1, self.steps_per_epoch // cfg.grad_accum)

    def _build_optimisation(self) -> None:
        cfg = self.cfg
        self.loss_fn = build_loss(cfg)
        optimizer = build_optimizer(cfg, self._model)
        self.scheduler = build_scheduler(cfg, optimizer, self.optim_steps_per_epoch)
        self.model, self.optimizer = self.accelerator.prepare(self._model, optimizer)
        del self._model
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.ema = None
        if cfg.ema:  # an exponential moving average of the weights, validated and kept as best/ instead
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.unwrapped, decay=cfg.ema, use_warmup=True)  # short runs: decay ramps up
        elif cfg.swa:  # the mean over the cosine's tail, in the EMA's place
            from bonedist.train.averaging import TailAverage

            self.ema = TailAverage(self.unwrapped, cfg.swa, lambda: self.scheduler.progress(self.state.global_step))

    @property
    def mu(self) -> float:
        return self.scale.mu

    @property
    def sigma(self) -> float:
        return self.scale.sigma

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """What validation, ``best/`` and evaluation use: the EMA (or SWA) weights when it is on."""
        return self.ema.module if self.ema is not None else self.unwrapped

    @property
    def stage(self) -> str | None:
        """The stage (of a staged model) training now, None without stages."""
        return self.cfg.stage_at(self.state.epoch)

    def best_name(self, epoch: int | None = None) -> str:
        """The validation metric that selects ``best/``: the loss's, of the stage's branch for a staged model."""
        return self.task.best_metric(self.loss_fn.metric, self.cfg.stage_at(self.state.epoch if epoch is None
                                                                            else epoch))

    # -- the loop ------------------------------------------------------------------------------------------------
    def fit(self, end: bool = True) -> int:
        """Train to the end (or to a preemption); returns the process exit code. ``end=False`` keeps the process
        group for another run in this process (studies, the demo, benchmarks): call ``end_processes`` after the
        last."""
        acc, cfg = self.accelerator, self.cfg
        self.tracker.start()
        resumed = resume.restore(self, self.resume_from)
        if resumed:
            acc.print(f"resumed from {resumed} (epoch {self.state.epoch + 1}, batch {self.state.batch_in_epoch}, "
                      f"step {self.state.global_step})")
        self.clock.start(self.state.elapsed)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGUSR1, signal.SIGTERM)}
        try:
            while self.state.epoch < cfg.epochs:
                self.begin_epoch()
                stats = self.train_epoch()
                if stats is None:
                    return self._preempted()
                if self.end_epoch(stats):
                    acc.print(self.stop_reason or f"early stopping: no improvement for {cfg.early_stopping} epochs")
                    break
            acc.print(f"done: best validation {self.best_name(self.state.epoch - 1)} {self.state.best:.4f} "
                      f"(epoch {self.state.best_epoch + 1}); model in {self.run_dir / 'best'}")
            viewed = self.validation.calibrate_views()
            if viewed is not None:
                shown = ", ".join(f"{d:+g} deg x{z:g}" for d, z in tta_views(cfg.tta_rotate, cfg.tta_scale))
                acc.print(f"test-time views {shown}{' (each mirrored)' if cfg.tta_flip else ''}: best/ recalibrated "
                          f"with them; validation MAE {viewed['val_mae_months']:.2f} months, bias "
                          f"{viewed['val_bias_months']:+.2f}")
            self.tracker.safely(self.tracker.finish, "log best/ as an artifact")
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.lock.release()
            for tracker in acc.trackers:  # W&B never fails a training: its run folder and offline files are kept
                self.tracker.safely(tracker.finish, "finish")
            self.tracker.close_broken()
            if end:
                acc.state.destroy_process_group()  # what end_training does after finishing the trackers

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def begin_epoch(self) -> None:
        """Set up the epoch ``state.epoch``: its stage (a stage's first epoch starts checkpoint selection and its
        share of a time budget afresh), training mode and the data's epoch."""
        stage, first, epochs = self.cfg.span_at(self.state.epoch)
        starting = self.state.epoch == first and self.state.batch_in_epoch == 0
        if starting:
            self.state.stage_began = self.elapsed()
        if stage is not None:
            for model in (self.unwrapped, self.ema.module if self.ema is not None else None):
                if model is not None:
                    self.task.enter_stage(model, stage)
            if starting:
                self.state.best, self.state.best_epoch, self.state.bad_epochs = math.inf, -1, 0
                self.accelerator.print(f"stage {stage}: epochs {first + 1}-{first + epochs}")
        self.model.train()
        self.train_data.set_epoch(self.state.epoch)

    def train_epoch(self) -> EpochStats | None:
        """The epoch from its saved position; None when stopped by a signal (after saving)."""
        acc, cfg, state, timer = self.accelerator, self.cfg, self.state, self.timer
        start_batch = state.batch_in_epoch
        batches = iter(self.train_data.training(start_batch))  # a resumed epoch continues at its batch, unreplayed
        sums = EpochSums.zeros(self.loss_terms, self.device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        samples, wait, began, warm = 0, 0.0, time.perf_counter(), None
        bar = progress(self.steps_per_epoch, f"epoch {state.epoch + 1}/{cfg.epochs}", "step",
                       enabled=acc.is_main_process, initial=start_batch, leave=False)
        while state.batch_in_epoch < self.steps_per_epoch:
            tick = time.perf_counter()
            with timer.phase("data"):
                batch = next(batches)
            wait += time.perf_counter() - tick
            loss, parts, abs_err, n = self.train_step(batch, nonfinite)
            state.batch_in_epoch += 1
            state.micro_step += 1
            samples += n
            with timer.phase("logging"):
                sums.add(loss, parts, abs_err * self.scale.sigma, n)
            if acc.sync_gradients and self._after_optimizer_step(loss, bar, nonfinite):
                bar.close()
                self.save_checkpoint()
                return None
            if self.out_of_time:
                break
            if state.batch_in_epoch - start_batch == THROUGHPUT_WARMUP:
                warm = (time.perf_counter(), samples)
            if timer.enabled:
                timer.next_step()
        bar.close()
        self._agree(nonfinite)  # the epoch's last steps are checked before anything is saved
        if self.stop_requested_everywhere:  # signalled since the last agreement: stop before validating
            self.save_checkpoint()
            return None
        elapsed = time.perf_counter() - began
        return EpochStats(acc.reduce(sums.stacked(), reduction="sum").tolist(),
                          sum_over_ranks(samples, self.world, self.device),
                          state.batch_in_epoch - start_batch, wait, elapsed,
                          (time.perf_counter() - warm[0], samples - warm[1]) if warm else None)

    def _after_optimizer_step(self, loss: torch.Tensor, bar, nonfinite: torch.Tensor) -> bool:
        """Count, log, agree and checkpoint after an optimizer step; True when every rank must stop (signal)."""
        cfg, state, timer = self.cfg, self.state, self.timer
        state.global_step += 1
        with timer.phase("logging"):
            self._log_step(loss, bar)
        save = bool(cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0)
        if save or state.global_step % cfg.sync_every == 0:
            with timer.phase("sync"):
                self._agree(nonfinite)
        if save:
            self.save_checkpoint()
        return self.stop_requested_everywhere

    def model_batch(self, batch: dict, step: int | None = None) -> ModelBatch:
        """The model's inputs and z targets for a loader batch, augmented for ``step`` (None: as evaluation), at
        ``--low-res`` while the cosine cycle is short of ``--low-res-until``."""
        return self.pipe.model_batch(batch, step=step, scale=self.scale,
                                     size=self.train_size() if step is not None else None)

    def train_size(self) -> int:
        """The side of training inputs now: ``--low-res`` in the first ``--low-res-until`` of the cosine cycle (by
        steps, or by the clock under a time budget, as the learning rate), else the image size."""
        cfg = self.cfg
        if cfg.low_res and self.scheduler.progress(self.state.global_step) < cfg.low_res_until:
            return cfg.low_res
        return self.spec.image_size

    def train_step(self, batch: dict, nonfinite: torch.Tensor):
        """One micro-step; a non-finite loss only sets ``nonfinite`` (on the device), which ``_agree`` checks.
        Returns the loss, its parts, the summed |error| (z) and the number of model inputs."""
        acc, cfg, timer = self.accelerator, self.cfg, self.timer
        with timer.phase("input"):
            inputs = self.model_batch(batch, step=self.state.micro_step)
            if cfg.low_res and inputs.image.shape[-1] != self._train_side:
                if self._train_side:
                    acc.print(f"progressive resizing: training at {inputs.image.shape[-1]} px from step "
                              f"{self.state.global_step}")
                self._train_side = inputs.image.shape[-1]
            taught = self.teacher.z_targets(batch["key"], self.scale, inputs.repeats, inputs.target.device) \
                if self.teacher else None
            if cfg.mixup:
                inputs, taught = c_mixup(inputs, cfg.mixup, cfg.mixup_bandwidth, cfg.seed, self.rank,
                                         self.state.micro_step, taught)
        with acc.accumulate(self.model):
            with timer.phase("forward"):
                with acc.autocast():
                    out = self.model(inputs.image, inputs.male)
                if taught is None:
                    loss, parts = self.task.loss(out, inputs.target, self.loss_fn, self.stage)
                else:
                    loss, parts = distill_loss(self.task, out, inputs.target, taught, self.loss_fn, self.stage,
                                               self.distill_weight)
                nonfinite |= ~torch.isfinite(loss.detach())
            with timer.phase("backward"):
                acc.backward(loss)
            with timer.phase("optimizer"):
                if acc.sync_gradients and cfg.clip_grad:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.optimizer.step()
                if acc.sync_gradients and self.scheduler.per_step:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients and self.ema is not None:
                with timer.phase("ema"):
                    self.ema.update(self.unwrapped, step=self.state.global_step)
                    if cfg.swa:
                        self.state.averaged = self.ema.count
        abs_err = (out["pred"].detach().double() - inputs.target.double()).abs().sum()
        return loss, parts, abs_err, inputs.target.numel()

    def _log_step(self, loss: torch.Tensor, bar) -> None:
        step = self.state.global_step
        bar.update(self.cfg.grad_accum)
        if step % self.cfg.log_every == 0:
            record = {"kind": "step", "epoch": self.state.epoch + 1, "step": step,
                      "train_loss_step": float(loss.detach()), "lr": self.optimizer.param_groups[0]["lr"]}
            bar.set_postfix(loss=f"{record['train_loss_step']:.4f}")
            self.log.write(record)
            self.tracker.log({k: v for k, v in record.items() if k != "kind"}, step=step)

    # -- agreement between ranks, time budget ----------------------------------------------------------------------
    def _agree(self, nonfinite: torch.Tensor) -> None:
        """All ranks learn whether any rank was signalled, saw a non-finite loss or ran out of its time budget: one
        tiny all-reduce and one host sync, every ``sync_every`` optimizer steps (never per step: it would drain the
        GPU's queue), before any checkpoint and at the end of each epoch."""
        flags = torch.stack([torch.tensor(float(self.stop_requested), device=self.device), nonfinite.float(),
                             torch.tensor(self.clock.budget_fraction(self.state), device=self.device)]).float()
        if self.world > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop, bad, fraction = flags.tolist()
        self.scheduler.follow_clock(fraction)
        self.out_of_time = fraction >= 1.0
        self.stop_requested_everywhere = bool(stop)
        if bad:
            good = ckpt.last_good_checkpoint(self.run_dir, warn=lambda _: None, set_aside=False) \
                if self.accelerator.is_main_process else None
            lower = f"{self.cfg.lr / 2:.3g}"
            advice = (f"The last good checkpoint is {good}: the same command with --lr {lower} (or --clip-grad 1.0) "
                      f"resumes from it with the new setting" if good else
                      f"No good checkpoint yet: the same command with --lr {lower} (or --clip-grad 1.0) starts again")
            raise NonFiniteLoss(f"non-finite training loss at epoch {self.state.epoch + 1}, by step "
                                f"{self.state.global_step}; stopped without saving. {advice}")

    def elapsed(self) -> float:
        """Seconds of training so far, across resumptions."""
        return self.clock.elapsed()

    # -- epoch end: validate, select, schedule, checkpoint, log ------------------------------------------------------
    def end_epoch(self, stats: EpochStats) -> bool:
        """Validate, schedule, checkpoint, log; True when early stopping says stop."""
        cfg, state = self.cfg, self.state
        metrics = {"kind": "epoch", "epoch": state.epoch + 1, "step": state.global_step,
                   **stats.metrics(cfg.batch_size, self.pipe.train_repeats, self.loss_terms),
                   "lr": self.optimizer.param_groups[0]["lr"], "peak_memory_gb": _peak_memory_gb()}
        if cfg.stages:
            metrics["stage"] = self.stage
        metrics.update(self.validate())
        metrics.update(self._weights_in_sync())
        key = self.best_name()
        improved = metrics[key] < state.best
        if improved:
            state.best, state.best_epoch, state.bad_epochs = metrics[key], state.epoch, 0
        else:
            state.bad_epochs += 1
        if self.scheduler.per_epoch:
            self.scheduler.step(metrics[key])
        metrics["elapsed_min"] = self.elapsed() / 60.0
        spent = cfg.time_budget_min and max_over_ranks(self.clock.budget_fraction(state), self.world,
                                                        self.device) >= 1.0
        if self.out_of_time or spent:
            stage, first, epochs = cfg.span_at(state.epoch)
            self.accelerator.print(f"time budget used up at epoch {state.epoch + 1}, step {state.global_step}"
                                   + (f"; stage {stage} ends" if cfg.stages else "; training ends"))
            state.epoch = first + epochs - 1
            self.out_of_time = False
        state.epoch += 1
        state.batch_in_epoch = 0
        # the epoch's line first: a checkpoint never records an epoch whose line is missing (a kill in between
        # repeats the epoch, and resuming drops lines logged after the checkpoint it resumes from)
        self.log.write(metrics)
        self.tracker.log({k: v for k, v in metrics.items() if k != "kind"}, step=state.global_step)
        self.save_checkpoint(best_metrics=metrics if improved else None)
        self.tracker.safely(self.tracker.log_images, "log images")
        self.accelerator.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in metrics.items() if k != "kind"))
        for callback in self.epoch_callbacks:
            self.stop_reason = self.stop_reason or callback(metrics)
        return bool(cfg.early_stopping and state.bad_epochs >= cfg.early_stopping) or self.stop_reason is not None

    def _weights_in_sync(self) -> dict:
        """DDP keeps replicas identical; a checksum of every rank's weights proves it (or says which drifted)."""
        params = [p.detach().double() for p in self.unwrapped.parameters()]
        local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)]).to(self.device)
        every = self.accelerator.gather(local.view(1, 2)).view(-1, 2)
        return {"weight_checksum": float(every[0, 0]), "ranks_in_sync": bool((every == every[0]).all())}

    def validate(self) -> dict:
        """Recalibrate, then exact metrics over the whole validation split (``bonedist.train.validation``)."""
        return self.validation.run()

    @property
    def calibration(self) -> dict[str, tuple[float, float]]:
        return self.validation.calibration

    def sample_validation_batch(self, n: int = 8) -> dict:
        """The first ``n`` validation radiographs (read once, for the images logged each epoch)."""
        if self._validation_sample is None:
            batch = next(iter(self.val_data.evaluation()))
            self._validation_sample = {k: v[:n] for k, v in batch.items()}
        return self._validation_sample

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, best_metrics: dict | None = None) -> None:
        resume.save(self, best_metrics)

    def _preempted(self) -> int:
        acc = self.accelerator
        found = ckpt.list_checkpoints(self.run_dir)
        last = str(found[-1]) if found else "none yet"
        if acc.is_main_process:
            (self.run_dir / REQUEUE_MARKER).write_text(f"{last}\n")
        acc.print(f"stopped by a signal at step {self.state.global_step}; checkpoint saved in {last}; run the same "
                  f"command again (--resume auto) to continue")
        under_launcher = "TORCHELASTIC_RUN_ID" in os.environ  # torchrun reports a non-zero child as a crash
        return 0 if under_launcher else EXIT_PREEMPTED


def _allow_precision(mixed: str) -> None:
    """Accelerate keeps one mixed precision per process; runs in one process (the demo, studies, benchmarks) may each
    resolve their own, so a different one resets Accelerate's state (the process group is kept)."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision", mixed) != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)


def train_in_process(cfg: TrainConfig, announce: str = "",
                     epoch_callbacks: list[Callable[[dict], str | None]] = ()) -> tuple[int, Path, bool]:
    """One training run inside this process (studies and benchmarks run several in a row): exit code, run folder,
    and whether this is the main process. The trainer is released afterwards, device memory included."""
    import gc

    trainer = Trainer(cfg)
    trainer.epoch_callbacks.extend(epoch_callbacks)
    if announce:
        trainer.accelerator.print(announce)
    code, run_dir, main = trainer.fit(end=False), trainer.run_dir, trainer.accelerator.is_main_process
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return code, run_dir, main


def end_processes() -> None:
    """After the last ``train_in_process``: the distributed process group (if any) is destroyed."""
    from accelerate import PartialState

    PartialState().destroy_process_group()


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
