"""The device-resident cache: decode a split once, keep it as uint8 on the training device, draw batches there.

RSNA at 500x500 is ~3.2 GB as uint8, which fits in one GPU many times over; decoding PNGs every epoch would cost
more CPU than the whole augmentation. Every rank holds the whole split and draws disjoint positions of one shared,
seeded draw per step, so nothing waits on DataLoader workers. Sampling matches the stream: balanced re-sampling is
``multinomial`` over the same weights, unbalanced epochs are seeded permutations dealt to the ranks.
"""

from __future__ import annotations

import math
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bonedist.data.images import decode_png_gray8
from bonedist.data.sampling import SplitIndex, balance_weights


def _read_shard(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


class DeviceCache:
    """All images of a split as one (N, 1, H, W) uint8 tensor on ``device``, in manifest order."""

    def __init__(self, shard_dir: str | Path, index: SplitIndex, device: torch.device | str, threads: int = 8,
                 progress: bool = True):
        self.index = index
        self.device = torch.device(device)
        members: dict[str, bytes] = {}
        paths = [str(Path(shard_dir) / name) for name in index.shard_names]
        with ThreadPoolExecutor(max(1, threads)) as pool:  # tar reads and cv2 decodes release the GIL
            for shard in pool.map(_read_shard, paths):
                members.update(shard)
            bar = tqdm(total=len(index), desc="cache", unit="img", disable=not progress, dynamic_ncols=True)
            first = decode_png_gray8(members[f"{index.keys[0]}.png"]) if len(index) else np.zeros((1, 1), np.uint8)
            images = torch.empty((len(index), 1, *first.shape), dtype=torch.uint8,
                                 pin_memory=self.device.type == "cuda")

            def decode(i: int) -> None:
                images[i, 0] = torch.from_numpy(decode_png_gray8(members[f"{index.keys[i]}.png"]))
                bar.update(1)

            list(pool.map(decode, range(len(index))))
            bar.close()
        self.images = images.to(self.device, non_blocking=True)  # (N, 1, H, W) uint8
        self.male = torch.from_numpy(index.male.astype(np.float32)).to(self.device)
        self.age = torch.from_numpy(index.age).to(self.device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, positions: torch.Tensor) -> dict:
        positions = positions.to(self.device)
        return {"image": self.images[positions], "male": self.male[positions], "age": self.age[positions],
                "index": positions, "key": [self.index.keys[i] for i in positions.tolist()]}


def nbytes_of_split(index: SplitIndex, image_size: int) -> int:
    return len(index) * image_size * image_size


class CacheTrainSampler:
    """Per-step positions for one rank: disjoint slices of one draw shared (by seed) across ranks."""

    def __init__(self, index: SplitIndex, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 balanced: bool = True, n_bins: int = 10, max_age: float = 228.0):
        self.n, self.batch_size, self.rank, self.world, self.seed = len(index), batch_size, rank, world, seed
        self.weights = torch.from_numpy(balance_weights(index.age, index.male, n_bins, max_age)) if balanced else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, math.ceil(self.n / (self.world * self.batch_size)))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        per_step = self.world * self.batch_size
        steps = len(self)
        if self.weights is not None:
            draw = torch.multinomial(self.weights, steps * per_step, replacement=True, generator=g)
        else:  # a permutation, wrapped around so every rank gets the same number of full batches
            perm = torch.randperm(self.n, generator=g)
            draw = perm.repeat(math.ceil(steps * per_step / self.n))[: steps * per_step]
        draw = draw.view(steps, self.world, self.batch_size)  # (steps, ranks, B)
        for step in range(steps):
            yield draw[step, self.rank]


def cache_eval_positions(n: int, batch_size: int, rank: int, world: int):
    """Every position exactly once across ranks (position i on rank i mod world), in batches."""
    mine = torch.arange(rank, n, world)
    yield from mine.split(batch_size)
