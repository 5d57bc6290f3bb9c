"""``bonedist bench train-step --model NAME``: training images/s of plain fp32 eager vs the engine's defaults
(bf16 autocast, channels_last and torch.compile on CUDA), same model, same inputs, same run; MFU on CUDA."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bonedist.data.augment import InputPipeline
from bonedist.models import create_model, model_info

# Dense bf16 peak (TFLOP/s) by device name, for the MFU estimate.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _setup(model_name: str, size: int, device: torch.device, fast: bool, compile_model: bool):
    torch.manual_seed(0)
    kwargs = {"image_size": size, "pretrained": None}
    if model_info(model_name).pretrained:
        kwargs.update(freeze_backbone=False)
    if model_name == "resnet50_patch":
        kwargs.update(patch_size=min(224, size))
    model = create_model(model_name, **kwargs).to(device).train()
    if fast and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if compile_model else model
    return model, step_model, optimizer


def _train_step(step_model, optimizer, pipe, loss_fn, images, male, age, step, fast, device):
    x = pipe.train(images, step)
    if fast and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    reps = pipe.train_repeats
    target = ((age - 127.0) / 41.0).float().repeat_interleave(reps)
    dtype = torch.bfloat16 if fast and device.type == "cuda" else torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=dtype == torch.bfloat16):
        out = step_model(x, male.repeat_interleave(reps))
    loss, _ = loss_fn(out, target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(model_name: str, batch: int, size: int, steps: int, device: torch.device, fast: bool) -> dict:
    compile_model = fast and device.type == "cuda" and model_info(model_name).task.compilable
    model, step_model, optimizer = _setup(model_name, size, device, fast, compile_model)
    pipe = InputPipeline(model.spec, seed=0)
    loss_fn = model.task.loss
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=g).to(device)
    male = (torch.rand(batch, generator=g) > 0.5).float().to(device)
    age = (torch.rand(batch, generator=g) * 228).double().to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(3):  # warm-up (and compilation)
        _train_step(step_model, optimizer, pipe, loss_fn, images, male, age, step, fast, device)
    sync()
    start = time.perf_counter()
    for step in range(steps):
        _train_step(step_model, optimizer, pipe, loss_fn, images, male, age, step, fast, device)
    sync()
    seconds = (time.perf_counter() - start) / steps
    result = {"images_per_s": batch / seconds, "compiled": compile_model}
    peak = _peak_tflops(device)
    if peak:
        with FlopCounterMode(display=False) as counter:
            _train_step(model, optimizer, pipe, loss_fn, images, male, age, 0, False, device)
        result["mfu"] = counter.get_total_flops() / seconds / (peak * 1e12)
    return result


def bench_train_step(model_name: str, batch: int | None = None, size: int | None = None, steps: int = 10,
                     device: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = size or (500 if device.type == "cuda" else 128)
    batch = batch or (32 if device.type == "cuda" else 8)
    rows = {"baseline: fp32 eager": measure(model_name, batch, size, steps, device, fast=False),
            "bonedist defaults": measure(model_name, batch, size, steps, device, fast=True)}
    base = rows["baseline: fp32 eager"]["images_per_s"]
    what = "bf16 + channels_last" + (" + compile" if rows["bonedist defaults"]["compiled"] else "") \
        if device.type == "cuda" else "fp32 (the engine's CPU default)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\ntrain step of {model_name}, batch {batch} at {size}x{size}, device {name}; defaults = {what}")
    print(f"{'method':<28}{'images/s':>10}{'ratio':>8}{'MFU':>8}")
    for label, row in rows.items():
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        print(f"{label:<28}{row['images_per_s']:>10.1f}{row['images_per_s'] / base:>7.2f}x{mfu:>8}")
    return rows
