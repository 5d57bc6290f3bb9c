"""``bonedist bench train-step --model NAME``: training images/s of plain fp32 eager vs the engine's defaults, and
the defaults under ``torch.compile`` (``--compile``: on CUDA unless ``off``, on a CPU when ``on``), same model (its
recipe for ``--preset``), same inputs, same run; MFU on CUDA.

The engine's defaults are what ``--precision auto`` resolves to (``bonedist.train.precision``): bf16 autocast and
channels_last on CUDA; on a CPU with bf16 matrix units the model's measured choice (bf16 and channels_last for most
CNNs), fp32 on other CPUs. Where that choice keeps a model's first layers NCHW, the defaults with channels_last
throughout are timed beside them. Compilation time is left out of the timing (it runs in the warm-up steps). A step is
forward, backward and AdamW step on one fixed batch of prepared inputs (the input pipeline is timed by ``bench
augment`` and ``bench train-loop``).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from bonedist.models import create_model, model_info
from bonedist.train.precision import Precision, autocast_for, resolve_precision

# Dense bf16 peak (TFLOP/s) by device name, for the MFU estimate.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}
FP32_EAGER = Precision("no", False, "the baseline")


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _setup(model_name: str, preset: str, size: int, device: torch.device, precision: Precision):
    from bonedist.train.config import resolve_config
    from bonedist.train.losses import build_loss

    options = {"pretrained": None} if model_info(model_name).pretrained else {}
    cfg = resolve_config(model_name, "", preset, input={"image_size": size}, model_options=options)
    torch.manual_seed(0)
    model = create_model(model_name, cfg.input, **cfg.model_options).to(device).train()
    model = precision.apply(model)
    stage = cfg.stages[0][0] if cfg.stages else None  # a staged model is timed in its first stage
    model.task.enter_stage(model, stage)
    return model, cfg, build_loss(cfg), stage


def _inputs(model, cfg, batch: int, size: int, device: torch.device, channels_last: bool):
    from bonedist.data.augment import InputPipeline, TargetScale
    from bonedist.data.sampling import target_stats

    g = torch.Generator().manual_seed(0)
    loader_batch = {"image": torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=g),
                    "male": (torch.rand(batch, generator=g) > 0.5).float(),
                    "age": (torch.rand(batch, generator=g) * 228).double()}
    loader_batch = {k: v.to(device) for k, v in loader_batch.items()}
    pipe = InputPipeline(model.spec, cfg.augment_config(), seed=0, channels_last=channels_last)
    scale = TargetScale(*target_stats(loader_batch["age"].cpu().numpy()))
    return pipe.model_batch(loader_batch, step=0, scale=scale)


def measure(model_name: str, batch: int, size: int, steps: int, device: torch.device, precision: Precision,
            preset: str = "scratch", compile_model: bool = False) -> dict:
    model, cfg, loss_fn, stage = _setup(model_name, preset, size, device, precision)
    inputs = _inputs(model, cfg, batch, size, device, precision.input_channels_last)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step_model = torch.compile(model) if compile_model else model
    autocast = autocast_for(precision, device) or nullcontext

    def train_step():
        with autocast():
            out = step_model(inputs.image, inputs.male)
        loss, _ = model.task.loss(out, inputs.target, loss_fn, stage)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up (and compilation)
        train_step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    result = {"images_per_s": batch / seconds, "compiled": compile_model, "precision": precision.describe()}
    peak = _peak_tflops(device)
    if peak:
        with FlopCounterMode(display=False) as counter:
            train_step()
        result["mfu"] = counter.get_total_flops() / seconds / (peak * 1e12)
    return result


def bench_train_step(model_name: str, batch: int | None = None, size: int | None = None, steps: int = 10,
                     device: str | None = None, preset: str = "scratch", compile_model: str = "auto") -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    size = size or (500 if cuda else 100)
    batch = batch or (32 if cuda else 64)
    info = model_info(model_name)
    defaults = resolve_precision("auto", None, cuda, info.cpu_precision)
    compiled = info.task.compilable and (cuda if compile_model == "auto" else compile_model == "on")
    rows = {"baseline: fp32 eager": measure(model_name, batch, size, steps, device, FP32_EAGER, preset),
            "bonedist defaults": measure(model_name, batch, size, steps, device, defaults, preset)}
    if defaults.channels_last_from:  # the alternative the partial memory format was chosen over
        whole = dataclasses.replace(defaults, channels_last_from="")
        rows["defaults, all channels_last"] = measure(model_name, batch, size, steps, device, whole, preset)
    if compiled:
        rows["defaults + torch.compile"] = measure(model_name, batch, size, steps, device, defaults, preset, True)
    base = rows["baseline: fp32 eager"]["images_per_s"]
    what = defaults.describe()
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"\ntrain step of {model_name} ({preset} recipe), batch {batch} at {size}x{size}, device {name}; "
          f"defaults = {what}")
    print(f"{'method':<28}{'images/s':>10}{'ratio':>8}{'MFU':>8}")
    for label, row in rows.items():
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        print(f"{label:<28}{row['images_per_s']:>10.1f}{row['images_per_s'] / base:>7.2f}x{mfu:>8}")
    return rows
