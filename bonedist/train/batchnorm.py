"""BatchNorm statistics recomputed for the weights being evaluated ("precise BN", Wu & Johnson 2021).

During training a BatchNorm layer normalises with the statistics of its augmented batch, and keeps a running
average of them for evaluation. That average lags the weights (it mixes batches seen under earlier weights, most
of all at a high learning rate or for an EMA of the weights, whose buffers are averages of another model's), and it
describes augmented inputs (zoomed, shifted, zero-padded) while evaluation sees clean ones. Both shift every
prediction the same way: on real radiographs this was a bias of over a year at the end of a short run, and near
none after recomputing the statistics (``docs/results.md``, "What was wrong on real radiographs").

``recalibrate_batchnorm`` recomputes them in one pass (fvcore's ``update_bn_stats``, torch's ``swa_utils.update_bn``):
each BatchNorm layer that trains (a frozen backbone's or a fixed AG-CNN branch's keep theirs) normalises with its
batch statistics as in training, while the population mean and variance of its inputs over a fixed set of clean
training radiographs are accumulated; everything else runs as in evaluation (dropout off). The sums are added over
ranks, so every replica ends with the same statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def training_norm_names(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers that update their statistics when ``model`` is in training mode."""
    was_training = model.training
    model.train()
    names = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training
             and m.track_running_stats]
    model.train(was_training)
    return names


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, names: list[str], inputs: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          world: int = 1, autocast=None) -> int:
    """Recompute the running statistics of ``model``'s BatchNorm layers ``names`` over ``inputs``.

    Args:
        model: the model to recalibrate, in place (e.g. the EMA copy that validation uses).
        names: which BatchNorm layers (``training_norm_names`` of the model that trains).
        inputs: ``(x, male)`` model inputs; ranks may see different numbers of batches (the sums are
            all-reduced after the pass), except under SyncBatchNorm, whose forward has collectives.
        world: number of ranks; with more than one the statistics are averaged with an all-reduce.
        autocast: a context manager factory the forward passes run under (the training precision).

    Returns:
        The number of batches seen on this rank (0: nothing was changed).
    """
    modules = dict(model.named_modules())
    norms = [modules[name] for name in names if name in modules]
    if not norms:
        return 0
    was_training = model.training
    model.eval()  # dropout off, every other layer as evaluation runs it
    for m in norms:
        m.train()  # batch statistics downstream, as in training; the running ones are overwritten below
    tracked = [m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None for m in norms]
    means = [torch.zeros_like(m.running_mean, dtype=torch.float64) for m in norms]
    squares = [torch.zeros_like(m.running_var, dtype=torch.float64) for m in norms]
    counts = [0] * len(norms)

    def hook(i: int):
        def record(module, args):
            x = args[0].detach().double()  # (B, C, H, W) or (B, C)
            dims = [d for d in range(x.dim()) if d != 1]
            n = x.numel() // x.shape[1]
            means[i].add_(x.mean(dim=dims) * n)
            squares[i].add_((x * x).mean(dim=dims) * n)
            counts[i] += n
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(norms)]
    batches = 0
    try:
        for x, male in inputs:
            with autocast() if autocast else nullcontext():
                model(x, male)
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for m, count in zip(norms, tracked):
            if count is not None:
                m.num_batches_tracked.copy_(count)
        model.train(was_training)
    total = torch.tensor([float(c) for c in counts], dtype=torch.float64, device=means[0].device)
    if world > 1:  # sums over every rank's inputs: one population, the same statistics on every replica
        flat = torch.cat([total, *means, *squares])
        torch.distributed.all_reduce(flat)
        sizes = [len(total)] + [m.numel() for m in means] + [s.numel() for s in squares]
        parts = list(flat.split(sizes))
        total, means, squares = parts[0], parts[1:1 + len(norms)], parts[1 + len(norms):]
    for i, m in enumerate(norms):
        n = float(total[i])
        if n < 2:
            continue
        mean = means[i] / n
        var = (squares[i] / n - mean * mean).clamp_min(0) * (n / (n - 1))  # unbiased, as BatchNorm keeps it
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return batches
