"""A training run in Weights & Biases (through Accelerate's tracker, rank 0 only): config, metric definitions with
summaries that mean what they say, the dataset artifact it used, images of its inputs and attention crops, and the
model it left in ``best/`` as an artifact."""

from __future__ import annotations

import os

import torch

from bonedist.files import read_json, reason, write_atomic
from bonedist.tracking import dataset_artifact, image_grid, model_artifact, use_artifact

RUN_ID_FILE = "wandb-run-id"


class TrainTracking:
    def __init__(self, trainer):
        self.trainer = trainer
        self.mode = trainer.tracking

    def run(self):
        t = self.trainer
        if self.mode == "off" or not t.accelerator.is_main_process:
            return None
        return t.accelerator.get_tracker("wandb", unwrap=True)

    def start(self) -> None:
        t = self.trainer
        if self.mode == "off":
            return
        cfg = t.cfg
        run_id = self.run_id() if t.accelerator.is_main_process else None
        t.accelerator.init_trackers(cfg.wandb_project, config={**cfg.to_dict(), "resolved": t.resolved()},
                                    init_kwargs={"wandb": {
                                        "id": run_id, "resume": "allow", "group": cfg.experiment, "name": cfg.run,
                                        "dir": str(t.run_dir), "mode": self.mode, "job_type": "train",
                                        "tags": [cfg.model, cfg.preset, *cfg.wandb_tags]}})
        run = self.run()
        if run is None:
            return
        job = os.environ.get("SLURM_JOB_ID")
        if job:  # which job and restart wrote the latest part of the run
            run.summary.update({"slurm_job": job, "slurm_restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0))})
        run.define_metric("epoch")
        minimised = {"val_mae_months", "val_loss", t.best_name(), *(f"val_loss_{b}" for b in t.task.branches)}
        for name in sorted(minimised):
            run.define_metric(name, summary="min", step_metric="epoch")
        run.define_metric("val_bias_months", summary="last", step_metric="epoch")
        use_artifact(run, dataset_artifact(cfg.shards, t.manifest))

    def log(self, values: dict, step: int) -> None:
        """``accelerator.log``, whose failure (W&B's service stopped by the signal that preempts the job, a full
        disk under its folder) costs the W&B history a line, never the training (metrics.jsonl has it)."""
        self.safely(lambda: self.trainer.accelerator.log(values, step=step), "log")

    def safely(self, call, what: str):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - tracking is never a reason to lose a training
            if not getattr(self, "_warned", False):
                self._warned = True
                self.trainer.accelerator.print(f"warning: W&B could not {what} ({reason(exc)}); training goes on, "
                                               f"metrics.jsonl keeps every step")
            return None

    def close_broken(self) -> None:
        """After a W&B failure (its service gone), tear the W&B client down now, quietly: left to exit time, its
        own teardown prints a traceback of the lost connection under a training that ended well."""
        if not getattr(self, "_warned", False):
            return
        import wandb

        try:
            wandb.teardown()
        except Exception:  # noqa: BLE001 - the connection is already lost
            pass

    def run_id(self) -> str:
        """One W&B run per training, however often it is resumed or requeued: the id is kept in the run folder
        (``wandb-run-id``) and a resumed training continues that run; a fresh start (no checkpoint to resume from)
        begins a new one."""
        import re
        import secrets
        import string

        path = self.trainer.run_dir / RUN_ID_FILE
        if self.trainer.resume_from is not None and path.is_file():
            saved = path.read_text(errors="replace").strip()
            if re.fullmatch(r"[a-z0-9]{8,64}", saved):
                return saved
            print(f"warning: {path} does not hold a W&B run id ({saved[:40]!r}); this training starts a new W&B run")
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's
        write_atomic(path, run_id + "\n")
        return run_id

    def finish(self) -> None:
        """The model in best/ as an artifact of this run, and the epoch it was chosen at in the summary."""
        t = self.trainer
        run = self.run()
        if run is None or not (t.run_dir / "best" / "meta.json").is_file():
            return
        meta = read_json(t.run_dir / "best" / "meta.json")
        metric = t.best_name(meta["epoch"] - 1)
        run.summary.update({"best_epoch": meta["epoch"], f"best_{metric}": (meta.get("metrics") or {}).get(metric)})
        run.log_artifact(model_artifact(t.run_dir, meta), aliases=["best", "latest"])

    def log_images(self) -> None:
        t = self.trainer
        if self.mode == "off" or not t.accelerator.is_main_process:
            return
        import wandb

        batch = t.sample_validation_batch()
        x = t.pipe.train(batch["image"], step=0)
        images = {"augmented_inputs": wandb.Image(image_grid(x), caption="training inputs after augmentation")}
        if t.task.attention:
            model = t.unwrapped.eval()
            inputs = t.pipe.model_batch(batch)
            with torch.no_grad():
                out = model(inputs.image, inputs.male)
            images["attention_boxes"] = wandb.Image(image_grid(inputs.image, out["boxes"]),
                                                    caption=f"{t.cfg.model} attention crops (green)")
        t.accelerator.log(images, step=t.state.global_step)
