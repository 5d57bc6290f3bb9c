"""WebDataset streams that behave the same on 1 process and on N processes x W DataLoader workers.

Training: every epoch the split's shards are shuffled with a seed shared by all ranks and dealt round-robin to the
``world * workers`` slots (our explicit node and worker splitter), so ranks read disjoint shards that together
cover the split. Each slot cycles its shards, shuffles samples in a buffer, and stops after the same number of
batches on every slot (webdataset's ``with_epoch`` idea), so uneven shards never leave a rank short and DDP never
hangs. With fewer shards than slots, each slot draws shards at random with replacement instead (resampled).

Evaluation: every sample exactly once, split by position (sample i goes to slot i mod slots), with its position
carried along so gathered predictions are put back in manifest order: no padding, no duplicates.

Workers decode PNGs with OpenCV into uint8 tensors only; all float work happens on the device. Samples are read
as raw bytes (no pickle decoding). The loader is not passed through ``accelerator.prepare``: it is already split.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bonedist import BonedistError
from bonedist.data.images import decode_png_gray8
from bonedist.data.sampling import AGE_BINS, BINNED_AGE, SplitIndex, balance_weights, mix_seed


@dataclass
class StreamPlan:
    """Which shards each slot (rank, worker) reads in an epoch, and how many batches every slot yields."""

    slots: list[list[int]] | None  # shard indices per slot; None: resampled mode
    batches_per_slot: int


def plan_epoch(counts: list[int], epoch: int, seed: int, world: int, workers: int, batch_size: int,
               balanced: bool) -> StreamPlan:
    n_slots = world * max(workers, 1)
    total = sum(counts)
    if len(counts) < n_slots:
        return StreamPlan(None, max(1, math.ceil(total / (n_slots * batch_size))))
    order = list(range(len(counts)))
    random.Random(mix_seed(seed, epoch)).shuffle(order)  # the same on every rank: a shared shard order
    slots = [order[s::n_slots] for s in range(n_slots)]
    if balanced:  # the number of draws is random: one epoch is about one pass over the split
        per_slot = math.ceil(total / (n_slots * batch_size))
    else:  # every slot covers all of its samples at least once
        per_slot = max(math.ceil(sum(counts[i] for i in slot) / batch_size) for slot in slots)
    return StreamPlan(slots, max(1, per_slot))


def _slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ShardError(BonedistError):
    """A shard that does not hold what manifest.json promises (missing, extra or undecodable members)."""


MEMBERS = ("png", "json")


def read_shard(url: str, expected: list[str], ordered: bool = False, notes: bool = True) -> Iterator[dict]:
    """Raw samples of one shard, checked against the manifest's list of its keys.

    Each sample must be listed (in that order when ``ordered``) and hold a .png and a .json; the shard must end
    with the last listed sample. Other members (e.g. a stray .pickle) are dropped, never decoded, with a note.

    Raises:
        ShardError: naming the shard and the member, for anything else (a cut or corrupted tar included).
    """
    listed = set(expected)
    seen = 0
    try:
        for sample in wds.tarfile_to_samples()([{"url": url}]):
            key = sample["__key__"]
            if key not in listed or (ordered and (seen >= len(expected) or expected[seen] != key)):
                raise ShardError(f"shard {url}: member {key}.* is not where manifest.json lists it (the shard "
                                 f"was changed after packing); re-run `bonedist pack`")
            missing = [m for m in MEMBERS if m not in sample]
            if missing:
                raise ShardError(f"shard {url}: sample {key} has no .{missing[0]} member (cut or changed after "
                                 f"packing); re-run `bonedist pack`")
            extra = sorted(k for k in sample if not k.startswith("__") and k not in MEMBERS)
            if extra and notes:
                print(f"note: shard {url}: ignoring extra member {key}.{extra[0]} (only .png and .json are read)",
                      file=sys.stderr)
            seen += 1
            yield {"__key__": key, "__url__": url, "png": sample["png"], "json": sample["json"]}
    except ShardError:
        raise
    except Exception as exc:  # tarfile and webdataset errors of a cut or corrupted archive
        raise ShardError(f"shard {url}: unreadable after {seen} samples ({exc.__class__.__name__}: {exc}); re-run "
                         f"`bonedist pack`") from exc
    if seen != len(expected):
        raise ShardError(f"shard {url}: {seen} samples, manifest.json lists {len(expected)} (the shard was cut "
                         f"short); re-run `bonedist pack`")


def decode_sample(sample: dict, labels: dict[str, tuple[float, bool]] | None = None) -> dict:
    """Raw webdataset sample → uint8 (1, H, W) tensor and labels; nothing but OpenCV decoding on the CPU.

    ``labels`` (key → bone age, NaN when unknown, and sex, from the manifest): the sample's own label must agree,
    so that a shard edited after packing is never trained or scored on; the manifest's values are returned."""
    try:
        meta = json.loads(sample["json"])
        image = torch.from_numpy(decode_png_gray8(sample["png"])).unsqueeze(0)  # (1, H, W) uint8
        age = meta["boneage_months"]
        age = math.nan if age is None else float(age)
        male = bool(meta["male"])
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:  # ImageError and JSON errors included
        raise ShardError(f"shard {sample.get('__url__', '?')}: sample {sample['__key__']} cannot be decoded "
                         f"({exc.__class__.__name__}: {exc}); re-run `bonedist pack`") from exc
    if labels is not None:
        want_age, want_male = labels[sample["__key__"]]
        same_age = (math.isnan(age) and math.isnan(want_age)) or abs(age - want_age) <= 1e-6
        if not same_age or male != bool(want_male):
            raise ShardError(f"shard {sample.get('__url__', '?')}: sample {sample['__key__']} is labelled "
                             f"{_label(age, male)} in the shard but {_label(want_age, want_male)} in manifest.json "
                             f"(changed after packing); re-run `bonedist pack`")
    return {"image": image, "male": float(male), "age": age, "key": sample["__key__"],
            "index": sample.get("__index__", -1)}


def _label(age: float, male: bool) -> str:
    return f"{'unknown age' if math.isnan(age) else f'{age:g} months'}, {'M' if male else 'F'}"


def manifest_labels(index: SplitIndex) -> dict[str, tuple[float, bool]]:
    return {k: (float(a), bool(m)) for k, a, m in zip(index.keys, index.age, index.male)}


def collate(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 1, H, W) uint8
        "male": torch.tensor([s["male"] for s in samples], dtype=torch.float32),
        "age": torch.tensor([s["age"] for s in samples], dtype=torch.float64),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }


class TrainStream(IterableDataset):
    """The training stream of one rank; call ``set_epoch`` before iterating a new epoch."""

    def __init__(self, shard_dir: str | Path, index: SplitIndex, batch_size: int, rank: int = 0, world: int = 1,
                 workers: int = 0, seed: int = 0, balanced: bool = True, shuffle_buffer: int = 500,
                 n_bins: int = AGE_BINS, max_age: float = BINNED_AGE):
        super().__init__()
        self.urls = [str(Path(shard_dir) / name) for name in index.shard_names]
        self.counts = index.shard_counts
        self.keys = index.shard_keys()
        self.labels = manifest_labels(index)
        self.batch_size, self.rank, self.world, self.workers = batch_size, rank, world, workers
        self.seed, self.balanced, self.shuffle_buffer = seed, balanced, shuffle_buffer
        self.weights = dict(zip(index.keys, balance_weights(index.age, index.male, n_bins, max_age))) \
            if balanced else None
        self.epoch = 0
        self.skip = 0  # batches of this epoch (all workers together) already trained: read, not decoded

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> StreamPlan:
        return plan_epoch(self.counts, self.epoch, self.seed, self.world, self.workers, self.batch_size,
                          self.balanced)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (all its workers together)."""
        return self.plan().batches_per_slot * max(self.workers, 1)

    def __iter__(self) -> Iterator[dict]:
        # ``skip`` is read now, not at the first batch: the caller resets it as soon as the iterator exists
        return self._batches(self.skip)

    def _batches(self, skipped: int) -> Iterator[dict]:
        worker, n_workers = _slot()
        assert n_workers == max(self.workers, 1), "DataLoader num_workers must match the stream's workers"
        slot = self.rank * n_workers + worker
        rng = random.Random(mix_seed(self.seed, self.epoch, slot))
        np_rng = np.random.default_rng(rng.getrandbits(64))
        plan = self.plan()
        # The DataLoader takes batch i from worker i % workers: the first `skip` batches hold this many of ours.
        skip = skipped // n_workers + (1 if worker < skipped % n_workers else 0)
        raw = wds.DataPipeline(lambda: self._passes(plan, slot, rng, np_rng),
                               wds.batched(self.batch_size, collation_fn=list, partial=False))
        with shard_errors_as_records() as records:
            for i, samples in enumerate(raw):
                if i >= plan.batches_per_slot:
                    break
                # skipped batches keep their place (and the shuffle's state) without decoding a PNG
                yield {"skipped": True} if i < skip else collate([decode_sample(s, self.labels) for s in samples])
        yield from records

    def _passes(self, plan: StreamPlan, slot: int, rng: random.Random, np_rng: np.random.Generator):
        """Raw samples, one shuffled pass over the slot's shards after another, until the batch quota is met.

        The shuffle buffer drains at the end of each pass, so a slot sees all of its samples before any twice.
        """
        shuffle = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)
        while True:
            if plan.slots is None:  # fewer shards than slots: resample shards with replacement
                mine = [rng.randrange(len(self.urls))]
            else:
                mine = list(plan.slots[slot])
                rng.shuffle(mine)
            samples = (sample for i in mine for sample in read_shard(self.urls[i], self.keys[i],
                                                                     notes=self.rank == 0))
            if self.balanced:
                samples = self._repeat(samples, np_rng)
            yield from shuffle(samples)

    def _repeat(self, samples, np_rng: np.random.Generator):
        for sample in samples:  # each sample Poisson(w) times: sampling with replacement, in a stream
            for _ in range(np_rng.poisson(self.weights[sample["__key__"]])):
                yield sample


class EvalStream(IterableDataset):
    """Every sample of a split exactly once across ranks and workers, tagged with its manifest position."""

    def __init__(self, shard_dir: str | Path, index: SplitIndex, batch_size: int, rank: int = 0, world: int = 1,
                 workers: int = 0):
        super().__init__()
        self.urls = [str(Path(shard_dir) / name) for name in index.shard_names]
        self.counts = index.shard_counts
        self.keys = index.shard_keys()
        self.labels = manifest_labels(index)
        self.batch_size, self.rank, self.world, self.workers = batch_size, rank, world, workers

    def __iter__(self) -> Iterator[dict]:
        worker, n_workers = _slot()
        slot, n_slots = self.rank * n_workers + worker, self.world * n_workers
        starts = np.cumsum([0] + self.counts[:-1])
        # only the shards holding one of this slot's positions are opened
        wanted = [i for i, (start, count) in enumerate(zip(starts, self.counts))
                  if any((p % n_slots) == slot for p in range(start, min(start + count, start + n_slots)))]

        def positioned():
            for shard in wanted:
                stream = read_shard(self.urls[shard], self.keys[shard], ordered=True, notes=self.rank == 0)
                for offset, sample in enumerate(stream):
                    position = int(starts[shard]) + offset
                    if position % n_slots == slot:
                        sample["__index__"] = position
                        yield decode_sample(sample, self.labels)

        batch = []
        with shard_errors_as_records() as records:
            for sample in positioned():
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield collate(batch)
                    batch = []
            if batch:
                yield collate(batch)
        yield from records


class shard_errors_as_records:
    """Inside a DataLoader worker a ``ShardError`` would reach the main process wrapped in a traceback: it becomes
    an ``{"error": message}`` record instead, which ``raise_shard_errors`` turns back into the exception."""

    def __enter__(self) -> list[dict]:
        self.records: list[dict] = []
        return self.records

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, ShardError):
            self.records.append({"error": str(exc)})
            return True
        return False


def raise_shard_errors(batches: Iterator[dict]) -> Iterator[dict]:
    for batch in batches:
        if "error" in batch:
            raise ShardError(batch["error"])
        yield batch


def make_loader(dataset: IterableDataset, workers: int, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader over a pre-batched, pre-split stream (never pass it through ``accelerator.prepare``)."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
