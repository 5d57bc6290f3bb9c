"""One interface over the two data modes: a split, opened once, gives batches already on the training device (uint8
images) for training epochs, for evaluation (every sample exactly once across ranks) and for a fixed subset.

``--data-mode auto`` caches a split on the device when it fits within ``cache_share`` of the free device memory
(GPU memory on CUDA, available RAM on CPU) and streams it otherwise; the reason is logged. The mode is chosen once,
when the split is opened (``open_split``): ``CachedSplit`` decodes the split once and draws every batch from device
memory; ``StreamedSplit`` reads the shards through DataLoader workers. Both answer the same four calls.
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


@dataclass(frozen=True)
class DataConfig:
    """How batches are made (the flags that set these are checked where they are parsed: ``TrainConfig``,
    ``EvalOptions``). ``workers``: DataLoader workers per process (stream mode)."""

    shards: str
    batch_size: int = 8
    eval_batch_size: int = 16
    mode: str = "auto"
    workers: int = 2
    cache_share: float = 0.5
    balanced: bool = True
    seed: int = 0
    n_bins: int = AGE_BINS
    max_age: float = BINNED_AGE
    shuffle_buffer: int = 500

    @classmethod
    def of_training(cls, cfg) -> DataConfig:
        """The data settings of a ``TrainConfig``."""
        return cls(shards=cfg.shards, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                   mode=cfg.data_mode, workers=cfg.workers, cache_share=cfg.cache_share, balanced=cfg.balanced,
                   seed=cfg.seed)


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


class SplitData:
    """A split of a pack for one rank, in one data mode.

    ``set_epoch`` then ``training(start)`` (``len``: training batches per epoch); ``evaluation()``: every sample of
    the split exactly once across ranks, each batch tagged with manifest positions (``index``); ``subset``: a fixed
    random sample in fixed batches (see ``SubsetBatches``).
    """

    mode = ""

    def __init__(self, cfg: DataConfig, index: SplitIndex, device: torch.device, rank: int, world: int,
                 reason: str = ""):
        self.cfg, self.index, self.device, self.rank, self.world, self.reason = cfg, index, device, rank, world, reason
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _sampling(self) -> dict:
        cfg = self.cfg
        return dict(batch_size=cfg.batch_size, rank=self.rank, world=self.world, seed=cfg.seed,
                    balanced=cfg.balanced, n_bins=cfg.n_bins, max_age=cfg.max_age)

    def __len__(self) -> int:
        raise NotImplementedError

    def training(self, start: int = 0) -> Iterator[dict]:
        """This epoch's training batches from batch ``start`` on: the same batches an unbroken epoch has there."""
        raise NotImplementedError

    def evaluation(self) -> Iterator[dict]:
        raise NotImplementedError

    def subset(self, count: int, seed: int = 0, equal: bool = False) -> SubsetBatches:
        raise NotImplementedError


class CachedSplit(SplitData):
    """The split decoded once into a ``DeviceCache``; every batch is drawn from it."""

    mode = "cache"

    def __init__(self, cfg, index, device, rank, world, reason="", image_size: int = 0, progress: bool = True):
        super().__init__(cfg, index, device, rank, world, reason)
        self.cache = DeviceCache(cfg.shards, index, device, image_size, threads=max(cfg.workers, 2) * 2,
                                 progress=progress)
        self._sampler: CacheTrainSampler | None = None

    @property
    def sampler(self) -> CacheTrainSampler:
        if self._sampler is None:  # built on first use: an evaluation split needs no sampling weights
            self._sampler = CacheTrainSampler(self.index, **self._sampling())
        self._sampler.set_epoch(self.epoch)
        return self._sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def training(self, start: int = 0) -> Iterator[dict]:
        for positions in self.sampler.iterate(start):  # the draw starts at ``start``: nothing replayed
            yield self.cache.batch(positions)

    def evaluation(self) -> Iterator[dict]:
        for positions in cache_eval_positions(len(self.index), self.cfg.eval_batch_size, self.rank, self.world):
            yield self.cache.batch(positions)

    def subset(self, count: int, seed: int = 0, equal: bool = False) -> SubsetBatches:
        return SubsetBatches(self, count, seed, equal)


class StreamedSplit(SplitData):
    """The split read from its shards by DataLoader workers, decoded batch by batch."""

    mode = "stream"

    def __init__(self, cfg, index, device, rank, world, reason="", image_size: int = 0, progress: bool = True):
        super().__init__(cfg, index, device, rank, world, reason)
        self.image_size = image_size
        self._stream: TrainStream | None = None

    @property
    def stream(self) -> TrainStream:
        if self._stream is None:
            self._stream = TrainStream(self.cfg.shards, self.index, workers=self.cfg.workers,
                                       shuffle_buffer=self.cfg.shuffle_buffer, **self._sampling())
        self._stream.set_epoch(self.epoch)
        return self._stream

    def __len__(self) -> int:
        return len(self.stream)

    def training(self, start: int = 0) -> Iterator[dict]:
        """The stream reads the skipped samples' bytes but decodes none of them."""
        stream = self.stream
        stream.skip = start
        try:  # the workers copy the dataset when the loader's iterator starts them: only then is skip reset
            batches = iter(make_loader(stream, self.cfg.workers))
        finally:
            stream.skip = 0
        for batch in raise_shard_errors(batches):
            if "skipped" not in batch:
                yield to_device(batch, self.device)

    def evaluation(self) -> Iterator[dict]:
        stream = EvalStream(self.cfg.shards, self.index, self.cfg.eval_batch_size, self.rank, self.world,
                            self.cfg.workers)
        for batch in raise_shard_errors(make_loader(stream, self.cfg.workers)):
            yield to_device(batch, self.device)

    def subset(self, count: int, seed: int = 0, equal: bool = False) -> SubsetBatches:
        return SubsetBatches(self, count, seed, equal)


def open_split(cfg: DataConfig, split: str, device: torch.device, rank: int = 0, world: int = 1,
               manifest: dict | None = None, mode: str | None = None, progress: bool = True,
               training: bool = False) -> SplitData:
    """A split of ``cfg.shards`` in ``mode`` (default: ``cfg.mode``, ``auto`` choosing by free memory)."""
    manifest = manifest or load_manifest(cfg.shards)
    index = SplitIndex.from_manifest(manifest, split)
    if training and len(index) == 0:
        raise BonedistError(f"split {split!r} of {cfg.shards} is empty")
    if mode is None:
        mode, reason = choose_mode(cfg, index, manifest["image_size"], device)
    else:
        reason = f"as the {split} split's companion"
    kind = CachedSplit if mode == "cache" else StreamedSplit
    return kind(cfg, index, device, rank, world, reason, image_size=manifest["image_size"], progress=progress)


class SubsetBatches:
    """A fixed, seeded random sample of a split in fixed batches, dealt out to the ranks (e.g. for BatchNorm
    statistics): the same batches, with the same radiographs in each, whatever the number of processes, so that
    statistics computed batch by batch and summed over ranks do not depend on the world size.

    Random rather than the first radiographs: shards follow manifest order, and RSNA ids cluster by hospital. A
    cached split serves the batches from its cache; a streamed one decodes the sample once and keeps it on the
    device. ``equal``: as many batches on every rank (the sample trimmed to a multiple of the world), for models
    whose forward pass has collectives (SyncBatchNorm in training mode).
    """

    def __init__(self, split: SplitData, count: int, seed: int = 0, equal: bool = False):
        world, rank, index = split.world, split.rank, split.index
        total = min(count, len(index))
        self.batch_size = max(1, min(split.cfg.eval_batch_size, total // world if equal else total))
        n_batches = total // self.batch_size
        if equal:
            n_batches = n_batches // world * world
        chosen = np.random.default_rng(seed).choice(len(index), size=total, replace=False)
        batches = chosen[: n_batches * self.batch_size].reshape(n_batches, self.batch_size)[rank::world]
        mine = [int(p) for batch in batches for p in sorted(batch)]
        if isinstance(split, CachedSplit):
            self.cache, self.rows = split.cache, torch.tensor(mine, dtype=torch.long)
        else:
            self.cache = DeviceCache(split.cfg.shards, index, split.device, split.image_size,
                                     threads=max(split.cfg.workers, 2) * 2, progress=False, positions=sorted(mine))
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
