"""The device-resident cache: decode a split once, keep it as uint8 on the training device, draw batches there.

RSNA at 500x500 is ~3.2 GB as uint8, which fits in one GPU many times over; decoding PNGs every epoch would cost
more CPU than the whole augmentation. Every rank holds the whole split and draws disjoint positions of one shared,
seeded draw per step, so nothing waits on DataLoader workers. Sampling matches the stream: balanced re-sampling is
``multinomial`` over the same weights, unbalanced epochs are seeded permutations dealt to the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bonedist.data.sampling import AGE_BINS, BINNED_AGE, SplitIndex, balance_weights, mix_seed
from bonedist.data.stream import decode_sample, manifest_labels, read_shard
from bonedist.progress import progress as progress_bar


def _decode_shard(path: str, keys: list[str], wanted: dict[str, int], images: torch.Tensor, bar,
                  labels: dict | None = None) -> None:
    """Decode the members of one shard that are ``wanted`` (key → row of ``images``) into ``images``; the shard is
    checked against its manifest ``keys`` as the stream checks it (``read_shard``)."""
    for sample in read_shard(path, keys):
        row = wanted.get(sample["__key__"])
        if row is not None:
            images[row, 0] = decode_sample(sample, labels)["image"][0]
            bar.update(1)


class DeviceCache:
    """Images of a split (or of ``positions`` in it) as one (N, 1, H, W) uint8 tensor on ``device``.

    Rows follow manifest order (or the order of ``positions``); shards are decoded one per thread, so memory holds
    the decoded images and a few shards' bytes, never the whole split's PNGs.
    """

    def __init__(self, shard_dir: str | Path, index: SplitIndex, device: torch.device | str, image_size: int,
                 threads: int = 8, progress: bool = True, positions: list[int] | None = None):
        self.index = index
        self.device = torch.device(device)
        rows = list(range(len(index))) if positions is None else [int(p) for p in positions]
        starts = np.cumsum([0, *index.shard_counts])
        per_shard: dict[int, dict[str, int]] = {}
        for row, position in enumerate(rows):
            shard = int(np.searchsorted(starts, position, side="right")) - 1
            per_shard.setdefault(shard, {})[index.keys[position]] = row
        images = torch.zeros((len(rows), 1, image_size, image_size), dtype=torch.uint8,
                             pin_memory=self.device.type == "cuda")
        bar = progress_bar(len(rows), "cache", "img", enabled=progress)
        with ThreadPoolExecutor(max(1, threads)) as pool:  # tar reads and cv2 decodes release the GIL
            keys, labels = index.shard_keys(), manifest_labels(index)
            jobs = [pool.submit(_decode_shard, str(Path(shard_dir) / index.shard_names[shard]), keys[shard], wanted,
                                images, bar, labels) for shard, wanted in sorted(per_shard.items())]
            for job in jobs:
                job.result()
        bar.close()
        self.positions = torch.tensor(rows, dtype=torch.long)
        self.images = images.to(self.device, non_blocking=True)  # (N, 1, H, W) uint8
        self.male = torch.from_numpy(index.male[rows].astype(np.float32)).to(self.device)
        self.age = torch.from_numpy(index.age[rows]).to(self.device)
        self.masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def keep_masks(self, compute: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256,
                   progress: bool = True) -> None:
        """Compute each image's hand mask once (``compute``: uint8 images → masks, ``InputPipeline.hand_masks``)
        and hand it out with every batch as ``hand_mask``: a radiograph's mask depends on its pixels alone, and on a
        CPU computing it costs as much as a training step (it halved the steps of a masked 100-px run)."""
        if self.masks is not None or not len(self):
            return
        bar = progress_bar(len(self), "hand masks", "img", enabled=progress)
        parts = []
        for rows in torch.arange(len(self), device=self.device).split(batch_size):
            parts.append(compute(self.images[rows]))
            bar.update(len(rows))
        bar.close()
        self.masks = torch.cat(parts)

    def batch(self, rows: torch.Tensor) -> dict:
        """Rows of the cache (= manifest positions when the whole split is cached)."""
        rows = rows.to(self.device)
        index = self.positions.to(self.device)[rows]
        out = {"image": self.images[rows], "male": self.male[rows], "age": self.age[rows], "index": index,
               "key": [self.index.keys[i] for i in index.tolist()]}
        if self.masks is not None:
            out["hand_mask"] = self.masks[rows]
        return out


def nbytes_of_split(index: SplitIndex, image_size: int) -> int:
    return len(index) * image_size * image_size


class CacheTrainSampler:
    """Per-step positions for one rank: disjoint slices of one draw shared (by seed) across ranks."""

    def __init__(self, index: SplitIndex, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 balanced: bool = True, n_bins: int = AGE_BINS, max_age: float = BINNED_AGE):
        self.n, self.batch_size, self.rank, self.world, self.seed = len(index), batch_size, rank, world, seed
        self.weights = torch.from_numpy(balance_weights(index.age, index.male, n_bins, max_age)) if balanced else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, math.ceil(self.n / (self.world * self.batch_size)))

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start: int = 0):
        """This rank's positions for steps ``start`` onwards of the epoch's draw."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        per_step = self.world * self.batch_size
        steps = len(self)
        if self.weights is not None:
            draw = torch.multinomial(self.weights, steps * per_step, replacement=True, generator=g)
        else:  # a permutation, wrapped around so every rank gets the same number of full batches
            perm = torch.randperm(self.n, generator=g)
            draw = perm.repeat(math.ceil(steps * per_step / self.n))[: steps * per_step]
        draw = draw.view(steps, self.world, self.batch_size)  # (steps, ranks, B)
        for step in range(start, steps):
            yield draw[step, self.rank]


def cache_eval_positions(n: int, batch_size: int, rank: int, world: int):
    """Every position exactly once across ranks (position i on rank i mod world), in batches."""
    mine = torch.arange(rank, n, world)
    yield from mine.split(batch_size)
