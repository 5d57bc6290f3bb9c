"""Which precision and memory format a run uses: ``--precision auto`` chooses per device and model.

- CUDA: bf16 autocast and channels_last (or what ``accelerate launch --mixed_precision`` asked for).
- A CPU with bf16 matrix units (AMX or AVX-512 BF16, read from the CPU's flags, not assumed): the model's measured
  choice, ``ModelInfo.cpu_precision`` (bf16 autocast and channels_last for the paper's CNNs; fp32 with
  channels_last for depthwise-heavy EfficientNets, where bf16 is slower; for CSPNeXt-tiny channels_last from its third
  stage on: on a CPU, BatchNorm's backward pass over channels_last maps of few channels and many pixels, the first
  stages' maps, is several times slower than over NCHW ones). A measured table, not a start-up
  autotune: the choice is the same on every run of a machine, so runs (and exact resume) reproduce, and no run pays
  seconds of timing before it starts. The measurements are in ``docs/results.md`` (``bonedist bench train-step``).
- Any other CPU: fp32, as before (``BONEDIST_CPU_BF16=0`` simulates one).

Under autocast the weights and optimizer state stay fp32 and the loss is computed in fp32 (``Task.loss``).

Evaluation and ``predict`` (``inference_precision``): bf16 on CUDA; on a CPU fp32, in the model's memory format. bf16
inference moved predictions of trained models by more than a test allows on real radiographs
(``docs/results.md``), and fp32 keeps the AG-CNN's discrete attention crop exactly where fp32 puts it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bonedist import BonedistError

if TYPE_CHECKING:  # torch is imported where a model is put in a memory format, not at start-up
    from torch import nn

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 matrix units (AMX tiles or AVX-512 BF16); ``BONEDIST_CPU_BF16=0`` says no."""
    forced = os.environ.get("BONEDIST_CPU_BF16", "").strip().lower()
    if forced in ("0", "off", "false", "no"):
        return False
    if forced in ("1", "on", "true", "yes"):
        return True
    return any(flag in _cpu_flags() for flag in BF16_FLAGS)


@dataclass(frozen=True)
class Precision:
    """``mixed``: Accelerate's ``mixed_precision`` ("no", "bf16", "fp16"); ``channels_last``: the memory format;
    ``channels_last_from``: where channels_last starts, a module's path (``""``: the whole model)."""

    mixed: str
    channels_last: bool
    reason: str
    channels_last_from: str = ""

    @property
    def name(self) -> str:
        return "fp32" if self.mixed == "no" else self.mixed

    @property
    def input_channels_last(self) -> bool:
        """Whether the model's input batch is channels_last (not when its first layers run NCHW)."""
        return self.channels_last and not self.channels_last_from

    def describe(self) -> str:
        fmt = ""
        if self.channels_last:
            fmt = f" + channels_last from {self.channels_last_from}" if self.channels_last_from else " + channels_last"
        return f"{self.name}{fmt} ({self.reason})"

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` in this memory format (in place, as ``Module.to``)."""
        return to_memory_format(model, self.channels_last, self.channels_last_from)


def _precision(mixed: str, fmt: bool | str, reason: str) -> Precision:
    """A ``Precision`` from a memory format as models declare it: True, False or the path channels_last starts at."""
    return Precision(mixed, bool(fmt), reason, fmt if isinstance(fmt, str) else "")


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    import torch

    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def to_memory_format(model: nn.Module, channels_last: bool, start: str = "") -> nn.Module:
    """``model`` in channels_last (``channels_last``), from the module at path ``start`` on when one is given: only
    the 4-D weights of that module and of those registered after it are converted, so that the layers before it run
    NCHW on NCHW input, and that module converts its input. In place, as ``Module.to``; parameters keep their
    identity."""
    import torch

    if not channels_last:
        return model
    if not start:
        return model.to(memory_format=torch.channels_last)
    modules = dict(model.named_modules())
    if start not in modules:
        raise BonedistError(f"channels_last from {start!r}: {type(model).__name__} has no module of that path")
    names = list(modules)
    for name in names[names.index(start):]:  # registration order: a backbone's stem and stages in turn
        for tensor in (*modules[name].parameters(recurse=False), *modules[name].buffers(recurse=False)):
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    if not getattr(modules[start], "converts_to_channels_last", False):  # once, however often it is called
        modules[start].register_forward_pre_hook(_channels_last_input)
        modules[start].converts_to_channels_last = True
    return model


def launcher_precision() -> str | None:
    """``accelerate launch --mixed_precision bf16|fp16`` (or its config file's); its default ``no`` asks for nothing
    (the launcher always sets it), so ``--precision auto`` then chooses (``--precision fp32`` for fp32)."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    return value if value in ("bf16", "fp16") else None


def resolve_precision(requested: str, channels_last: bool | None, cuda: bool,
                      cpu_choice: tuple[str, bool | str] = ("fp32", False)) -> Precision:
    """The precision of a run: ``--precision`` when given; with ``auto`` the launcher's bf16 or fp16 when asked
    for (``accelerate launch --mixed_precision`` or its config file), else by device (above). ``channels_last``
    (``--channels-last``) overrides the memory format that goes with it."""
    launcher = launcher_precision()
    if requested != "auto":
        mixed, fmt, reason = requested.replace("fp32", "no"), cuda, "--precision"
    elif launcher:
        mixed, fmt, reason = launcher, cuda, "accelerate launch --mixed_precision"
    elif cuda:
        mixed, fmt, reason = "bf16", True, "CUDA"
    elif cpu_has_bf16_units():
        mixed, fmt = cpu_choice[0].replace("fp32", "no"), cpu_choice[1]
        reason = "this CPU has bf16 matrix units; the model's measured choice"
    else:
        mixed, fmt, reason = "no", False, "a CPU without bf16 matrix units"
    if mixed == "fp16" and not cuda:
        mixed, reason = "no", "fp16 autocast needs CUDA; fp32 on the CPU"
    return _precision(mixed, fmt if channels_last is None else channels_last, reason)


def inference_precision(requested: str, cuda: bool, cpu_choice: tuple[str, bool | str] = ("fp32", False),
                        discrete: bool = False) -> Precision:
    """The precision of evaluation and prediction: as training with ``--precision`` given or on CUDA; with ``auto``
    on a CPU fp32 (bf16 moves predictions by more than a test allows), channels_last where the model trains with it,
    except for a model that takes discrete decisions on float results (``discrete``: the AG-CNN's attention crop),
    which runs in plain fp32 so that it crops exactly where fp32 does (channels_last moved a crop)."""
    if requested != "auto" or cuda or launcher_precision():
        return resolve_precision(requested, None, cuda, cpu_choice)
    fmt = cpu_choice[1] if cpu_has_bf16_units() and not discrete else False  # measured on machines with those units
    return _precision("no", fmt, "evaluation on a CPU: fp32 (bf16 moves predictions by more than 0.1 months)")


def autocast_for(precision: Precision, device: str | object):
    """A context-manager factory running a forward pass in ``precision`` on ``device`` (None for fp32)."""
    import torch

    if precision.mixed == "no":
        return None
    dtype = torch.bfloat16 if precision.mixed == "bf16" else torch.float16
    kind = getattr(device, "type", str(device))
    return lambda: torch.autocast(kind, dtype=dtype)
