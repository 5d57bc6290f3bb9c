"""One interface over the two data modes: batches already on the training device, uint8 images.

``--data-mode auto`` caches a split on the device when it fits within ``cache_share`` of the free device memory
(GPU memory on CUDA, available RAM on CPU) and streams it otherwise; the reason is logged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from bonedist import BonedistError
from bonedist.data.cache import CacheTrainSampler, DeviceCache, cache_eval_positions, nbytes_of_split
from bonedist.data.manifest import check_split_shards, load_manifest
from bonedist.data.sampling import AGE_BINS, BINNED_AGE, SplitIndex
from bonedist.data.stream import EvalStream, TrainStream, make_loader, raise_shard_errors

DATA_MODES = ("auto", "stream", "cache")


@dataclass
class DataConfig:
    """How batches are made. ``workers`` are DataLoader workers per process (stream mode)."""

    shards: str
    batch_size: int = 8
    mode: str = "auto"
    workers: int = 2
    cache_share: float = 0.5
    balanced: bool = True
    n_bins: int = AGE_BINS
    max_age: float = BINNED_AGE
    shuffle_buffer: int = 500
    seed: int = 0

    def __post_init__(self):
        if self.mode not in DATA_MODES:
            raise BonedistError(f"--data-mode must be one of {', '.join(DATA_MODES)}, got {self.mode!r}")
        if self.batch_size < 1:
            raise BonedistError(f"--batch-size must be positive, got {self.batch_size}")
        if not 0.0 < self.cache_share <= 1.0:
            raise BonedistError(f"--cache-share must be in (0, 1], got {self.cache_share}")
        if self.workers < 0:
            raise BonedistError(f"--workers must be >= 0, got {self.workers}")


def free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def choose_mode(cfg: DataConfig, index: SplitIndex, image_size: int, device: torch.device) -> tuple[str, str]:
    need = nbytes_of_split(index, image_size)
    if cfg.mode != "auto":
        return cfg.mode, f"--data-mode {cfg.mode} requested ({need / 2**30:.2f} GiB of images)"
    free = free_device_bytes(device)
    budget = cfg.cache_share * free
    where = "GPU memory" if device.type == "cuda" else "RAM"
    if need <= budget:
        return "cache", (f"the split ({need / 2**30:.2f} GiB as uint8) fits in {cfg.cache_share:.0%} of free {where} "
                         f"({free / 2**30:.1f} GiB)")
    return "stream", (f"the split ({need / 2**30:.2f} GiB) exceeds {cfg.cache_share:.0%} of free {where} "
                      f"({free / 2**30:.1f} GiB)")


class TrainBatches:
    """Training batches for one rank, in either mode; ``set_epoch`` then iterate; ``len`` = batches per epoch."""

    def __init__(self, cfg: DataConfig, split: str, device: torch.device, rank: int = 0, world: int = 1,
                 progress: bool = True, manifest: dict | None = None):
        self.cfg, self.device = cfg, device
        manifest = manifest or load_manifest(cfg.shards)
        self.index = SplitIndex.from_manifest(manifest, split)
        if len(self.index) == 0:
            raise BonedistError(f"split {split!r} of {cfg.shards} is empty")
        self.mode, self.reason = choose_mode(cfg, self.index, manifest["image_size"], device)
        common = dict(batch_size=cfg.batch_size, rank=rank, world=world, seed=cfg.seed, balanced=cfg.balanced,
                      n_bins=cfg.n_bins, max_age=cfg.max_age)
        if self.mode == "cache":
            self.cache = DeviceCache(cfg.shards, self.index, device, manifest["image_size"],
                                     threads=max(cfg.workers, 2) * 2, progress=progress)
            self.sampler = CacheTrainSampler(self.index, **common)
        else:
            self.stream = TrainStream(cfg.shards, self.index, workers=cfg.workers,
                                      shuffle_buffer=cfg.shuffle_buffer, **common)

    def set_epoch(self, epoch: int) -> None:
        (self.sampler if self.mode == "cache" else self.stream).set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) if self.mode == "cache" else len(self.stream)

    def __iter__(self) -> Iterator[dict]:
        return self.iterate(0)

    def iterate(self, start: int = 0) -> Iterator[dict]:
        """This epoch's batches from batch ``start`` on: the same batches an unbroken epoch has there. The cache
        starts its draw there; the stream reads the skipped samples' bytes but decodes none of them."""
        if self.mode == "cache":
            for positions in self.sampler.iterate(start):
                yield self.cache.batch(positions)
            return
        self.stream.skip = start
        try:
            loader = make_loader(self.stream, self.cfg.workers)
        finally:
            self.stream.skip = 0  # workers took their copy
        for batch in raise_shard_errors(loader):
            if "skipped" not in batch:
                yield to_device(batch, self.device)


class EvalBatches:
    """Every sample of a split exactly once across ranks, each batch tagged with manifest positions (``index``)."""

    def __init__(self, cfg: DataConfig, split: str, device: torch.device, rank: int = 0, world: int = 1,
                 mode: str | None = None, progress: bool = False, manifest: dict | None = None,
                 cache: DeviceCache | None = None):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        manifest = manifest or load_manifest(cfg.shards)
        self.index = SplitIndex.from_manifest(manifest, split)
        self.mode = mode or choose_mode(cfg, self.index, manifest["image_size"], device)[0]
        self.cache = cache
        if self.mode == "cache" and self.cache is None:
            self.cache = DeviceCache(cfg.shards, self.index, device, manifest["image_size"],
                                     threads=max(cfg.workers, 2) * 2, progress=progress)

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[dict]:
        if self.mode == "cache":
            for positions in cache_eval_positions(len(self.index), self.cfg.batch_size, self.rank, self.world):
                yield self.cache.batch(positions)
            return
        stream = EvalStream(self.cfg.shards, self.index, self.cfg.batch_size, self.rank, self.world,
                            self.cfg.workers)
        for batch in raise_shard_errors(make_loader(stream, self.cfg.workers)):
            yield to_device(batch, self.device)


class SubsetBatches:
    """A fixed, seeded random sample of a split in fixed batches, dealt out to the ranks (e.g. for BatchNorm
    statistics): the same batches, with the same radiographs in each, whatever the number of processes, so that
    statistics computed batch by batch and summed over ranks do not depend on the world size.

    Random rather than the first radiographs: shards follow manifest order, and RSNA ids cluster by hospital. In
    cache mode the batches come from the split's cache; otherwise the sample is decoded once and kept on the device.
    ``equal``: as many batches on every rank (the sample trimmed to a multiple of the world), for models whose
    forward pass has collectives (SyncBatchNorm in training mode).
    """

    def __init__(self, cfg: DataConfig, split: str, device: torch.device, count: int, rank: int = 0, world: int = 1,
                 manifest: dict | None = None, cache: DeviceCache | None = None, seed: int = 0, equal: bool = False):
        manifest = manifest or load_manifest(cfg.shards)
        index = SplitIndex.from_manifest(manifest, split)
        total = min(count, len(index))
        self.batch_size = max(1, min(cfg.batch_size, total // world if equal else total))
        n_batches = total // self.batch_size
        if equal:
            n_batches = n_batches // world * world
        chosen = np.random.default_rng(seed).choice(len(index), size=total, replace=False)
        batches = chosen[: n_batches * self.batch_size].reshape(n_batches, self.batch_size)[rank::world]
        mine = [int(p) for batch in batches for p in sorted(batch)]
        if cache is not None:
            self.cache, self.rows = cache, torch.tensor(mine, dtype=torch.long)
        else:
            self.cache = DeviceCache(cfg.shards, index, device, manifest["image_size"],
                                     threads=max(cfg.workers, 2) * 2, progress=False, positions=sorted(mine))
            local = {p: i for i, p in enumerate(sorted(mine))}
            self.rows = torch.tensor([local[p] for p in mine], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows) // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        for rows in self.rows.split(self.batch_size)[: len(self)]:
            yield self.cache.batch(rows)


def verify_pack(shards: str, manifest: dict, splits: list[str], rank: int = 0, world: int = 1) -> None:
    """``check_split_shards`` on rank 0, its verdict shared with every rank (all stop with the same line)."""
    problem = None
    if rank == 0:
        try:
            check_split_shards(shards, manifest, splits)
        except BonedistError as exc:
            problem = str(exc)
    if world > 1:
        shared = [problem]
        torch.distributed.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise BonedistError(problem)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


