"""The training engine: one model-agnostic loop under Accelerate, from one CPU process to many GPU nodes.

Each model brings its task (loss); the engine adds mixed precision, channels_last, optional torch.compile,
gradient accumulation and clipping, exact distributed validation, atomic checkpoints, preemption and tracking.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from bonedist import BonedistError, __version__
from bonedist.data.augment import InputPipeline
from bonedist.data.manifest import load_manifest
from bonedist.data.sampling import balance_weights, target_stats
from bonedist.data.source import DataConfig, EvalBatches, SubsetBatches, TrainBatches, verify_pack
from bonedist.inference import gather_predictions, predict_batches
from bonedist.models import create_model
from bonedist.progress import progress
from bonedist.tracking import MetricsLog, dataset_artifact, image_grid, model_artifact, use_artifact, wandb_mode
from bonedist.train import checkpoint as ckpt
from bonedist.train.batchnorm import recalibrate_batchnorm, training_norm_names
from bonedist.train.config import TrainConfig
from bonedist.train.schedule import build_scheduler
from bonedist.train.timing import NullTimer

THROUGHPUT_WARMUP = 3  # steps of an epoch left out of its images/s (autotuning, lazy init, compilation)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and stopped on a signal; run again (or requeue) to continue
REQUEUE_MARKER = "REQUEUE"


class NonFiniteLoss(BonedistError):
    pass


@dataclass
class TrainState:
    """Where a run stands: saved in every step checkpoint, restored by ``--resume``."""

    epoch: int = 0  # epochs completed (the one in progress, 0-based)
    batch_in_epoch: int = 0  # micro-steps done in the epoch in progress: a resumed epoch continues there
    global_step: int = 0  # optimizer steps
    micro_step: int = 0  # micro-steps since the start (each one seeds its augmentation)
    best: float = math.inf  # the best value of the checkpoint-selection metric (in the current stage)
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the last improvement (early stopping)
    elapsed: float = 0.0  # seconds of training so far (time budget)
    stage_began: float = 0.0  # ``elapsed`` when the current stage began


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.runs_dir) / cfg.experiment / cfg.model
        cuda = torch.cuda.is_available()
        precision = resolve_precision(cfg.precision, cuda)
        # only rank 0 logs: the others need not probe the W&B server (a 3-second timeout on offline nodes)
        main = os.environ.get("RANK", "0") == "0"
        self.tracking = wandb_mode(cfg.wandb) if main or cfg.wandb == "off" else "offline"
        self.git = ckpt.git_revision()
        # staged training leaves the fixed branches without gradients: DDP must look for unused parameters
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.stages else []
        self.accelerator = Accelerator(cpu=not cuda, mixed_precision=precision,
                                       gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=handlers,
                                       log_with="wandb" if self.tracking != "off" else None,
                                       project_dir=str(self.run_dir))
        acc = self.accelerator
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        self.stop_requested = self.stop_requested_everywhere = False
        set_seed(cfg.seed)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(cfg.to_json() + "\n")
            (self.run_dir / REQUEUE_MARKER).unlink(missing_ok=True)
        acc.wait_for_everyone()
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=acc.is_main_process)
        self._build()

    # -- setup ---------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.manifest = load_manifest(cfg.shards)
        if "validation" not in self.manifest["splits"]:
            raise BonedistError(f"{cfg.shards} has no validation split: training selects checkpoints on it")
        verify_pack(cfg.shards, self.manifest, ["train", "validation"], self.rank, self.world)
        model = create_model(cfg.model, **cfg.model_cfg)
        self.task = model.task
        synced = bool(cfg.sync_bn and self.world > 1 and torch.cuda.is_available())
        if synced:  # its forward in training mode (recalibration included) has collectives
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.channels_last = torch.cuda.is_available() if cfg.channels_last is None else cfg.channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.spec = model.spec
        data_cfg = DataConfig(shards=cfg.shards, batch_size=cfg.batch_size, mode=cfg.data_mode, workers=cfg.workers,
                              cache_share=cfg.cache_share, balanced=cfg.balanced, seed=cfg.seed)
        self.train_data = TrainBatches(data_cfg, "train", self.device, self.rank, self.world,
                                       progress=acc.is_local_main_process, manifest=self.manifest)
        acc.print(f"data mode: {self.train_data.mode} ({self.train_data.reason})")
        eval_cfg = DataConfig(**{**data_cfg.__dict__, "batch_size": cfg.eval_batch_size})
        self.val_data = EvalBatches(eval_cfg, "validation", self.device, self.rank, self.world,
                                    mode=self.train_data.mode, manifest=self.manifest)
        index = self.train_data.index
        weights = balance_weights(index.age, index.male, data_cfg.n_bins, data_cfg.max_age) if cfg.balanced else None
        self.mu, self.sigma = target_stats(index.age, weights)
        self.train_mean = float(np.mean(index.age))  # the natural mean: what predict-the-mean predicts
        self.recal_data = SubsetBatches(eval_cfg, "train", self.device, cfg.recalibrate, self.rank, self.world,
                                        self.manifest, getattr(self.train_data, "cache", None), seed=cfg.seed,
                                        equal=synced) if cfg.recalibrate else None
        self.offsets: dict[str, float] = {}  # z offset of each output, refit by recalibrate()
        self.pipe = InputPipeline(self.spec, cfg.augment_config(), seed=cfg.seed, rank=self.rank)
        self.steps_per_epoch = min(len(self.train_data), cfg.steps_per_epoch or len(self.train_data))
        self.optim_steps_per_epoch = max(1, self.steps_per_epoch // cfg.grad_accum)
        if hasattr(model, "param_groups"):  # e.g. a backbone at its own learning rate, or one group per branch
            groups = model.param_groups(cfg.lr, cfg.backbone_lr, cfg.weight_decay)
        else:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr,
                       "weight_decay": cfg.weight_decay, "name": "all"}]
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        optimizer = opt_cls(groups, lr=cfg.lr)
        self.scheduler = build_scheduler(cfg, optimizer, self.optim_steps_per_epoch)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.ema = None
        if cfg.ema:  # an exponential moving average of the weights, validated and kept as best/ instead
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.unwrapped, decay=cfg.ema, use_warmup=True)  # short runs: decay ramps up
        self.state = TrainState()
        self.out_of_time = False
        self.clock_start, self.elapsed_before = time.perf_counter(), 0.0
        self.timer = NullTimer()  # bench train-loop puts a PhaseTimer here

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """What validation, ``best/`` and evaluation use: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.unwrapped

    # -- the loop ------------------------------------------------------------------------------------------------
    def fit(self, end: bool = True) -> int:
        """Train to the end (or to a preemption); returns the process exit code. ``end=False`` keeps the process
        group for another run in this process (studies, the demo, benchmarks): call ``end_processes`` after the
        last."""
        acc, cfg = self.accelerator, self.cfg
        self._start_tracking()
        self._maybe_resume()
        self.clock_start, self.elapsed_before = time.perf_counter(), self.state.elapsed  # resumed
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGUSR1, signal.SIGTERM)}
        try:
            while self.state.epoch < cfg.epochs:
                if not self._train_epoch():
                    return self._preempted()
                stop = self._end_epoch()
                if stop:
                    acc.print(f"early stopping: no improvement for {cfg.early_stopping} epochs")
                    break
            acc.print(f"done: best validation {self._best_name(self.state.epoch - 1)} {self.state.best:.4f} "
                      f"(epoch {self.state.best_epoch + 1}); model in {self.run_dir / 'best'}")
            self._finish_tracking()
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if end:
                acc.end_training()  # W&B finished, process group destroyed
            else:
                for tracker in acc.trackers:
                    tracker.finish()

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def _agree(self, nonfinite: torch.Tensor) -> None:
        """All ranks learn whether any rank was signalled, saw a non-finite loss or ran out of its time budget: one
        tiny all-reduce and one host sync, every ``sync_every`` optimizer steps (never per step: it would drain the
        GPU's queue), before any checkpoint and at the end of each epoch."""
        flags = torch.stack([torch.tensor(float(self.stop_requested), device=self.device), nonfinite.float(),
                             torch.tensor(self._budget_fraction(), device=self.device)]).float()
        if self.world > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop, bad, fraction = flags.tolist()
        self.scheduler.clock["fraction"] = fraction
        self.out_of_time = fraction >= 1.0
        self.stop_requested_everywhere = bool(stop)
        if bad:
            raise NonFiniteLoss(f"non-finite training loss at epoch {self.state.epoch + 1}, by step "
                                f"{self.state.global_step}; stopped without saving. The last good checkpoint is "
                                f"{self._last_checkpoint()}; try a lower --lr or --clip-grad 1.0")

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.clock_start

    def _budget_fraction(self) -> float:
        """Share of the current stage's time budget used (0 without a budget). A staged run gives each stage the
        budget's share of its epochs, counted from the stage's first step."""
        if not self.cfg.time_budget_min:
            return 0.0
        _, _, epochs = self._span()
        share = self.cfg.time_budget_min * 60.0 * epochs / self.cfg.epochs
        return (self._elapsed() - self.state.stage_began) / share

    def _sum_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return float(value)
        total = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return float(total[0])

    def _max_over_ranks(self, values: list[float]) -> torch.Tensor:
        """Each value's maximum over all ranks, so that every rank takes the same decision."""
        values = torch.tensor(values, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        return values

    def _span(self) -> tuple[str | None, int, int]:
        return self.cfg.span_at(self.state.epoch)

    def _train_epoch(self) -> bool:
        """One epoch from the saved position; False when stopped by a signal (after saving)."""
        acc, cfg, state, timer = self.accelerator, self.cfg, self.state, self.timer
        self._enter_stage()
        self.model.train()
        self.train_data.set_epoch(state.epoch)
        start_batch = state.batch_in_epoch
        batches = iter(self.train_data.iterate(start_batch))  # a resumed epoch continues at its batch, unreplayed
        branches = self.task.branches
        sums = torch.zeros(2 + len(branches), dtype=torch.float64, device=self.device)  # summed on the device
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        samples = 0
        bar = progress(self.steps_per_epoch, f"epoch {state.epoch + 1}/{cfg.epochs}", "step",
                       enabled=acc.is_main_process, initial=start_batch, leave=False)
        wait, began, warm = 0.0, time.perf_counter(), None
        while state.batch_in_epoch < self.steps_per_epoch:
            tick = time.perf_counter()
            with timer.phase("data"):
                batch = next(batches)
            wait += time.perf_counter() - tick
            loss, parts, n = self._step(batch, nonfinite)
            state.batch_in_epoch += 1
            state.micro_step += 1
            samples += n
            with timer.phase("logging"):
                sums += torch.stack([loss.detach().double() * n, parts["abs_err"] * self.sigma,
                                     *[parts.get(f"loss_{k}", loss).detach().double() * n for k in branches]])
            if acc.sync_gradients:
                state.global_step += 1
                with timer.phase("logging"):
                    self._log_step(loss, bar)
                save = bool(cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0)
                if save or state.global_step % cfg.sync_every == 0:
                    with timer.phase("sync"):
                        self._agree(nonfinite)
                if save:
                    self.save_checkpoint()
                if self.stop_requested_everywhere:
                    bar.close()
                    self.save_checkpoint()
                    return False
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
            return False
        elapsed = time.perf_counter() - began
        self._epoch_batches = state.batch_in_epoch - start_batch
        self._epoch_train_stats = (acc.reduce(sums, reduction="sum"), self._sum_over_ranks(samples), wait, elapsed,
                                   (time.perf_counter() - warm[0], samples - warm[1]) if warm else None)
        return True

    def _enter_stage(self) -> None:
        """A staged model: set this epoch's stage; a stage's first epoch starts checkpoint selection (and its share of
        a time budget) afresh."""
        stage, first, _ = self._span()
        starting = self.state.epoch == first and self.state.batch_in_epoch == 0
        if starting:
            self.state.stage_began = self._elapsed()
        if stage is None:
            return
        for model in (self.unwrapped, self.ema.module if self.ema is not None else None):
            if model is not None:
                model.set_stage(stage)
        if starting:
            self.state.best, self.state.best_epoch, self.state.bad_epochs = math.inf, -1, 0
            self.accelerator.print(f"stage {stage}: epochs {first + 1}-{first + dict(self.cfg.stages)[stage]}")

    def _step(self, batch: dict, nonfinite: torch.Tensor):
        """One micro-step; a non-finite loss only sets ``nonfinite`` (on the device), which ``_agree`` checks."""
        acc, cfg, timer = self.accelerator, self.cfg, self.timer
        with timer.phase("input"):
            x = self.pipe.train(batch["image"], step=self.state.micro_step)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            reps = self.pipe.train_repeats
            male = batch["male"].repeat_interleave(reps)
            target = ((batch["age"] - self.mu) / self.sigma).float().repeat_interleave(reps)
        with acc.accumulate(self.model):
            with timer.phase("forward"):
                with acc.autocast():
                    out = self.model(x, male)
                stage = cfg.stage_at(self.state.epoch)
                loss, parts = self.task.loss(out, target, cfg.loss, cfg.huber_delta, stage)
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
        parts["abs_err"] = (out["pred"].detach().double() - target.double()).abs().sum()
        return loss, parts, target.numel()

    def _log_step(self, loss: torch.Tensor, bar) -> None:
        step = self.state.global_step
        bar.update(self.cfg.grad_accum)
        if step % self.cfg.log_every == 0:
            record = {"kind": "step", "epoch": self.state.epoch + 1, "step": step,
                      "train_loss_step": float(loss.detach()), "lr": self.optimizer.param_groups[0]["lr"]}
            bar.set_postfix(loss=f"{record['train_loss_step']:.4f}")
            self.log.write(record)
            self.accelerator.log({k: v for k, v in record.items() if k != "kind"}, step=step)

    def _end_epoch(self) -> bool:
        """Validate, schedule, checkpoint, log; True when early stopping says stop."""
        cfg, state = self.cfg, self.state
        sums, count, wait, elapsed, steady = self._epoch_train_stats
        sums, n = sums.tolist(), max(count, 1.0)
        radiographs = self._epoch_batches * cfg.batch_size
        metrics = {"kind": "epoch", "epoch": state.epoch + 1, "step": state.global_step,
                   "train_loss": sums[0] / n, "train_mae_months": sums[1] / n,
                   "lr": self.optimizer.param_groups[0]["lr"],
                   # radiographs/s per device after the epoch's first steps (cuDNN autotuning, lazy init,
                   # compilation); _with_warmup over the whole epoch
                   "images_per_s_per_device": (steady[1] / self.pipe.train_repeats / max(steady[0], 1e-9)
                                               if steady else radiographs / max(elapsed, 1e-9)),
                   "images_per_s_per_device_with_warmup": radiographs / max(elapsed, 1e-9),
                   "data_wait_share": wait / max(elapsed, 1e-9), "peak_memory_gb": _peak_memory_gb()}
        metrics.update({f"train_loss_{k}": sums[2 + i] / n for i, k in enumerate(self.task.branches)})
        if cfg.stages:
            metrics["stage"] = cfg.stage_at(state.epoch)
        metrics.update(self.validate())
        metrics.update(self._weights_in_sync())
        key = self._best_name()
        improved = metrics[key] < state.best
        if improved:
            state.best, state.best_epoch, state.bad_epochs = metrics[key], state.epoch, 0
        else:
            state.bad_epochs += 1
        if self.scheduler.per_epoch:
            self.scheduler.step(metrics[key])
        metrics["elapsed_min"] = self._elapsed() / 60.0
        spent = cfg.time_budget_min and float(self._max_over_ranks([self._budget_fraction()])[0]) >= 1.0
        if self.out_of_time or spent:
            _, first, epochs = self._span()
            self.accelerator.print(f"time budget used up at epoch {state.epoch + 1}, step {state.global_step}"
                                   + (f"; stage {self._span()[0]} ends" if cfg.stages else "; training ends"))
            state.epoch = first + epochs - 1
            self.out_of_time = False
        state.epoch += 1
        state.batch_in_epoch = 0
        # the epoch's line first: a checkpoint never records an epoch whose line is missing (a kill in between
        # repeats the epoch, and resuming drops lines logged after the checkpoint it resumes from)
        self.log.write(metrics)
        self.accelerator.log({k: v for k, v in metrics.items() if k != "kind"}, step=state.global_step)
        self.save_checkpoint(best_metrics=metrics if improved else None)
        self._log_images()
        self.accelerator.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in metrics.items() if k != "kind"))
        return bool(cfg.early_stopping and state.bad_epochs >= cfg.early_stopping)

    def _weights_in_sync(self) -> dict:
        """DDP keeps replicas identical; a checksum of every rank's weights proves it (or says which drifted)."""
        params = [p.detach().double() for p in self.unwrapped.parameters()]
        local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)]).to(self.device)
        every = self.accelerator.gather(local.view(1, 2)).view(-1, 2)
        return {"weight_checksum": float(every[0, 0]), "ranks_in_sync": bool((every == every[0]).all())}

    def _best_name(self, epoch: int | None = None) -> str:
        """The validation metric that selects ``best/``, as the model's task says (in a stage: its branch's)."""
        return self.task.best_metric(self.cfg.stage_at(self.state.epoch if epoch is None else epoch))

    def recalibrate(self) -> None:
        """Before a validation, on ``recalibrate`` clean training radiographs (the same batches every time, whatever
        the number of ranks), seen as evaluation sees them: the evaluated model's BatchNorm statistics are
        recomputed, then each output's offset is refit so that its mean error on them is zero.

        Training never fixes that offset for the evaluation-mode function: batch statistics in training, population
        statistics after; a median under L1. Measured on real radiographs, which statistics are used moved the
        mean error of the same weights by 4 months either way, on the training radiographs themselves. The refit
        uses training radiographs only; ``best/`` keeps the offsets (``offsets_z``) for ``evaluate`` and
        ``predict``.
        """
        if not self.cfg.recalibrate:
            return
        names = training_norm_names(self.unwrapped)
        recalibrate_batchnorm(self.evaluated_model, names, self._recal_inputs(), self.world, self.accelerator.autocast)
        local = predict_batches(self.evaluated_model, self.pipe, self.recal_data, self.accelerator.autocast,
                                flip=self.cfg.tta_flip, aggregate=self.cfg.patch_aggregate,
                                channels_last=self.channels_last)
        keys = ["pred", *self.task.branches]
        z_true = (local["age"] - self.mu) / self.sigma if local else np.zeros(0)
        sums = torch.tensor([*(float(np.sum(local[k] - z_true)) if local else 0.0 for k in keys), float(len(z_true))],
                            dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        self.offsets = {k: float(sums[i] / sums[-1]) for i, k in enumerate(keys)}

    def _recal_inputs(self):
        for batch in self.recal_data:
            x = self.pipe.eval(batch["image"])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, batch["male"].repeat_interleave(self.pipe.eval_repeats)

    def validate(self) -> dict:
        """Exact metrics over the whole validation split (every sample once, across all ranks)."""
        self.recalibrate()
        local = predict_batches(self.evaluated_model, self.pipe, self.val_data, self.accelerator.autocast,
                                flip=self.cfg.tta_flip, aggregate=self.cfg.patch_aggregate,
                                channels_last=self.channels_last)
        preds = gather_predictions(local, len(self.val_data))
        z_true = (preds["age"] - self.mu) / self.sigma
        out = {"val_count": int(len(preds["index"]))}
        for name in ("pred", *self.task.branches):
            if name not in preds:
                continue
            preds[name] = preds[name] - self.offsets.get(name, 0.0)
            suffix = "" if name == "pred" else f"_{name}"
            out[f"val_loss{suffix}"] = float(np.mean((preds[name] - z_true) ** 2))
            out[f"val_mae_months{suffix}"] = float(np.mean(np.abs(preds[name] - z_true)) * self.sigma)
        out["val_bias_months"] = float(np.mean(preds["pred"] - z_true) * self.sigma)
        out["val_baseline_mae_months"] = float(np.mean(np.abs(preds["age"] - self.train_mean)))  # predict-the-mean
        return out

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _meta(self, metrics: dict | None = None) -> dict:
        model_cfg = {k: v for k, v in self.cfg.model_cfg.items() if k != "pretrained"}  # weights are in the file
        return {"model": self.cfg.model, "model_cfg": model_cfg, "spec": self.spec.to_dict(), "mu": self.mu,
                "sigma": self.sigma, "offsets_z": dict(self.offsets), "train_mean_months": self.train_mean,
                "epoch": self.state.epoch,
                "global_step": self.state.global_step,
                "metrics": metrics, "config": self.cfg.to_dict(), "bonedist_version": __version__,
                "git": self.git, "pack": {"image_size": self.manifest["image_size"],
                                                     "resize_mode": self.manifest["resize_mode"]}}

    def save_checkpoint(self, best_metrics: dict | None = None) -> None:
        acc = self.accelerator
        self.state.elapsed = self._elapsed()
        rng = {"torch": torch.get_rng_state(), "python": _python_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        all_rng = _gather_rng(rng, self.world)
        if acc.is_main_process:
            tensors = ckpt.model_state(self.unwrapped)
            ema = ckpt.model_state(self.ema.module) if self.ema is not None else None
            saved = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None, "ema": ema,
                     "trainer": asdict(self.state), "rng": all_rng, "mu": self.mu, "sigma": self.sigma,
                     "config": self.cfg.to_dict(), "git": self.git, "world": self.world}
            meta = self._meta(best_metrics)
            if best_metrics is not None:  # best/ is complete before any checkpoint says it exists
                ckpt.save_best(self.run_dir, ema if ema is not None else tensors, meta, self.cfg.save_dtype)
            ckpt.save_checkpoint(self.run_dir, self.state.global_step, saved, tensors, meta, self.cfg.keep_last)
        acc.wait_for_everyone()

    def _maybe_resume(self) -> None:
        if self.accelerator.is_main_process:
            ckpt.recover_run_folder(self.run_dir)
        self.accelerator.wait_for_everyone()
        folder = ckpt.find_resume(self.run_dir, self.cfg.resume)
        if folder is None:
            return
        from safetensors.torch import load_file

        saved = ckpt.load_state(folder)
        if saved["world"] != self.world:
            self.accelerator.print(f"warning: checkpoint written by {saved['world']} processes, resuming with "
                                   f"{self.world}: data order and RNG streams will differ from an unbroken run")
        self.unwrapped.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None and saved.get("ema") is not None:
            self.ema.module.load_state_dict(saved["ema"])
        self.state = TrainState(**saved["trainer"])
        rng = saved["rng"][self.rank] if self.rank < len(saved["rng"]) else saved["rng"][0]
        torch.set_rng_state(rng["torch"])
        _set_python_rng_state(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        if self.accelerator.is_main_process:
            self.log.truncate_after(self.state.global_step)  # lines of the interrupted continuation
        if self.state.best_epoch >= 0 and not (self.run_dir / "best" / "model.safetensors").is_file():
            self.accelerator.print(f"warning: {self.run_dir / 'best'} is missing; it is written again at the next "
                                   f"validation")
            self.state.best = math.inf
        self.accelerator.print(f"resumed from {folder} (epoch {self.state.epoch + 1}, batch "
                               f"{self.state.batch_in_epoch}, step {self.state.global_step})")

    def _last_checkpoint(self) -> str:
        found = ckpt.list_checkpoints(self.run_dir)
        return str(found[-1]) if found else "none yet"

    def _preempted(self) -> int:
        acc = self.accelerator
        if acc.is_main_process:
            (self.run_dir / REQUEUE_MARKER).write_text(f"{self._last_checkpoint()}\n")
        acc.print(f"stopped by a signal at step {self.state.global_step}; checkpoint saved in "
                  f"{self._last_checkpoint()}; run the same command again (--resume auto) to continue")
        under_launcher = "TORCHELASTIC_RUN_ID" in os.environ  # torchrun reports a non-zero child as a crash
        return 0 if under_launcher else EXIT_PREEMPTED

    # -- tracking ------------------------------------------------------------------------------------------------
    def _start_tracking(self) -> None:
        if self.tracking == "off":
            return
        job = os.environ.get("SLURM_JOB_ID")
        name = f"{self.cfg.model}-{job}-{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else self.cfg.model
        self.accelerator.init_trackers(self.cfg.wandb_project, config=self.cfg.to_dict(), init_kwargs={"wandb": {
            "group": self.cfg.experiment, "name": name, "dir": str(self.run_dir), "mode": self.tracking,
            "job_type": "train", "tags": [self.cfg.model, self.cfg.preset]}})
        run = self._wandb_run()
        if run is None:
            return
        # summaries that mean what they say: the best validation numbers, not the last ones
        run.define_metric("epoch")
        for name in ("val_mae_months", "val_loss", *(f"val_loss_{b}" for b in self.task.branches)):
            run.define_metric(name, summary="min", step_metric="epoch")
        run.define_metric("val_bias_months", summary="last", step_metric="epoch")
        use_artifact(run, dataset_artifact(self.cfg.shards, self.manifest))

    def _wandb_run(self):
        if self.tracking == "off" or not self.accelerator.is_main_process:
            return None
        return self.accelerator.get_tracker("wandb", unwrap=True)

    def _finish_tracking(self) -> None:
        """The model in best/ as an artifact of this run, and the epoch it was chosen at in the summary."""
        run = self._wandb_run()
        if run is None or not (self.run_dir / "best" / "meta.json").is_file():
            return
        meta = json.loads((self.run_dir / "best" / "meta.json").read_text())
        run.summary.update({"best_epoch": meta["epoch"], f"best_{self._best_name(meta['epoch'] - 1)}":
                            (meta.get("metrics") or {}).get(self._best_name(meta["epoch"] - 1))})
        run.log_artifact(model_artifact(self.run_dir, meta), aliases=["best", "latest"])

    def _log_images(self) -> None:
        if self.tracking == "off" or not self.accelerator.is_main_process:
            return
        import wandb

        batch = next(iter(EvalBatches(self.val_data.cfg, "validation", self.device, 0, 1, mode=self.val_data.mode,
                                      manifest=self.manifest, cache=self.val_data.cache)))
        x = self.pipe.train(batch["image"][:8], step=0)
        images = {"augmented_inputs": wandb.Image(image_grid(x), caption="training inputs after augmentation")}
        if self.task.attention:
            model = self.unwrapped.eval()
            with torch.no_grad():
                out = model(self.pipe.eval(batch["image"][:8]), batch["male"][:8])
            images["attention_boxes"] = wandb.Image(image_grid(self.pipe.eval(batch["image"][:8]), out["boxes"]),
                                                    caption=f"{self.cfg.model} attention crops (green)")
        self.accelerator.log(images, step=self.state.global_step)


def resolve_precision(requested: str, cuda: bool) -> str:
    """Accelerate's ``mixed_precision``: ``--precision`` when given; with ``auto`` the launcher's own choice
    (``accelerate launch --mixed_precision``, or the config file's ``mixed_precision``) when there is one, else bf16
    on CUDA and fp32 on a CPU."""
    if requested != "auto":
        return requested.replace("fp32", "no")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher:
        return launcher
    return "bf16" if cuda else "no"


def train_in_process(cfg: TrainConfig, announce: str = "") -> tuple[int, Path, bool]:
    """One training run inside this process (studies and benchmarks run several in a row): exit code, run folder,
    and whether this is the main process. The trainer is released afterwards, device memory included."""
    import gc

    trainer = Trainer(cfg)
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


def _python_rng_state():
    import random

    return random.getstate()


def _set_python_rng_state(state) -> None:
    import random

    random.setstate((state[0], tuple(state[1]), state[2]))


def _gather_rng(rng: dict, world: int) -> list[dict]:
    if world == 1:
        return [rng]
    from accelerate.utils import gather_object

    return gather_object([rng])
