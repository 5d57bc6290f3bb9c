"""``bonedist bench train-loop --model M``: the engine's real training loop beside the bare model step, phase by phase.

    bonedist bench train-loop --model xception                        # CPU: tiny sizes
    bonedist bench train-loop --model resnet50_patch --preset improved --image-size 500 --batch-size 32 --steps 60

The loop is the real ``Trainer`` (the preset's input pipeline with hand mask and augmentation, EMA, clipping,
scheduler, rank agreement, logging, device cache) on synthetic phantoms packed at ``--image-size``; the bare step is the
same model's forward, backward and optimizer step on one fixed batch of model inputs, with the engine's precision
and memory format, in the same process. Both skip their first steps (cuDNN autotuning, lazy init, compilation). The
loop's time is split into phases (CUDA events on a GPU, wall clock on a CPU); the last line is loop/bare.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bonedist.train.timing import PHASES, PhaseTimer

WARMUP = 3


def _pack_phantoms(root: Path, size: int, n: int) -> Path:
    from bonedist.data.pack import PackOptions, pack_dataset
    from bonedist.data.synth import synth_dataset

    synth_dataset(root / "raw", n=n, n_val=16, n_test=0, seed=0, size=max(size, 192), progress=False)
    _, code = pack_dataset(root / "raw", root / "shards", PackOptions(size=size, samples_per_shard=256,
                                                                      progress=False))
    if code:
        raise RuntimeError("packing the benchmark phantoms failed")
    return root / "shards"


def _bare_step_seconds(trainer, batch: dict, steps: int) -> float:
    """Forward + backward + optimizer step of the trainer's own model on one fixed batch of prepared inputs."""
    model, optimizer, acc = trainer.model, trainer.optimizer, trainer.accelerator
    inputs = trainer.model_batch(batch, step=0)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    model.train()
    for i in range(WARMUP + steps):
        if i == WARMUP:
            sync()
            start = time.perf_counter()
        with acc.autocast():
            out = model(inputs.image, inputs.male)
        loss, _ = trainer.task.loss(out, inputs.target, trainer.loss_fn, trainer.stage)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - start) / steps


def bench_train_loop(model: str, preset: str = "improved", size: int | None = None, batch: int | None = None,
                     steps: int = 30, device: str | None = None) -> dict:
    from bonedist.models import model_info
    from bonedist.train.config import resolve_config
    from bonedist.train.engine import Trainer

    cuda = torch.cuda.is_available() and device != "cpu"
    size = size or (500 if cuda else 96)
    batch = batch or (32 if cuda else 8)
    with tempfile.TemporaryDirectory(prefix="bonedist-train-loop-") as tmp:
        shards = _pack_phantoms(Path(tmp), size, n=batch * (WARMUP + steps))  # one epoch holds every timed step
        options = {"pretrained": None} if model_info(model).pretrained else {}  # random weights: the same timing
        settings = dict(experiment="bench", runs_dir=str(Path(tmp) / "runs"), input={"image_size": size},
                        model_options=options, batch_size=batch, epochs=1, steps_per_epoch=WARMUP + steps,
                        data_mode="cache", wandb="off", resume="never", warmup_epochs=0.0)
        cfg = resolve_config(model, str(shards), preset, **settings)
        if cfg.stages:  # a staged model is timed in its first stage
            cfg = resolve_config(model, str(shards), preset, stages=[[cfg.stages[0][0], 1]], **settings)
        trainer = Trainer(cfg)
        trainer.timer = PhaseTimer(trainer.device, skip_steps=WARMUP)
        trainer.begin_epoch()
        fixed = next(iter(trainer.train_data.training()))
        bare = _bare_step_seconds(trainer, fixed, steps)
        trainer.begin_epoch()
        stats = trainer.train_epoch()
        if stats is None or trainer.state.batch_in_epoch != WARMUP + steps:
            raise RuntimeError(f"the loop ran {trainer.state.batch_in_epoch} steps, not {WARMUP + steps}")
        phases = trainer.timer.totals()
        loop = stats.steady[0] / steps if stats.steady else stats.seconds / (WARMUP + steps)
        precision = trainer.precision.describe()
        trainer.accelerator.end_training()
    per_step = {name: phases.get(name, 0.0) / steps for name in PHASES}
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"\ntraining loop of {model} ({preset} preset), batch {batch} at {size}x{size}, {steps} timed steps after "
          f"{WARMUP}, device {name}, data in the device cache, {precision}")
    print(f"{'phase':<26}{'ms/step':>10}{'share':>8}")
    for phase, seconds in per_step.items():
        print(f"{phase:<26}{seconds * 1e3:>10.2f}{seconds / loop:>8.1%}")
    other = loop - sum(per_step.values())
    print(f"{'(between phases)':<26}{other * 1e3:>10.2f}{other / loop:>8.1%}")
    print(f"{'loop, images/s':<26}{batch / loop:>10.1f}")
    print(f"{'bare step, images/s':<26}{batch / bare:>10.1f}")
    print(f"loop/bare: {bare / loop:.2f}")
    return {"loop_images_per_s": batch / loop, "bare_images_per_s": batch / bare, "ratio": bare / loop,
            "phases_ms": {k: v * 1e3 for k, v in per_step.items()}}
