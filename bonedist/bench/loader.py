"""``bonedist bench loader`` and ``bonedist bench augment``: device-ready augmented batches per second.

loader: bonedist's stream mode and cache mode (Kornia augmentation on the device) vs the usual peer approach in the
same run: a folder of PNGs read by a torch ``Dataset`` with PIL and torchvision.transforms.v2 doing the same
augmentation on the CPU in DataLoader workers (same worker count). Also reports host CPU time per image, the work
that must keep a GPU fed.

augment: Kornia batch augmentation vs torchvision v2 applied image by image, same device, same inputs.
"""

from __future__ import annotations

import resource
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from bonedist.data.augment import AugmentConfig, InputPipeline
from bonedist.data.manifest import load_manifest
from bonedist.data.pack import PackOptions, default_workers, pack_dataset
from bonedist.data.source import DataConfig, SplitData, open_split
from bonedist.spec import InputSpec

SPEC = InputSpec(image_size=500, input_size=500, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)


def torchvision_transform(spec: InputSpec, cfg: AugmentConfig):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize((spec.image_size, spec.image_size), antialias=True),
        v2.RandomAffine(degrees=cfg.rotation, translate=cfg.translate, scale=cfg.scale, shear=cfg.shear),
        v2.RandomHorizontalFlip(cfg.hflip),
        v2.ToDtype(torch.float32, scale=True),
        v2.Lambda(lambda x: x.expand(spec.channels, -1, -1)),
        v2.Normalize(spec.mean, spec.std),
    ])


class PngFolder(Dataset):
    """The peer approach: one PNG file per sample, decoded with PIL and augmented on the CPU."""

    def __init__(self, folder: Path, transform):
        self.files = sorted(folder.glob("*.png"))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = Image.open(self.files[i]).convert("L")
        return self.transform(image), torch.tensor(0.0)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _measure(batches, to_device, n_batches: int, sync) -> tuple[float, float, int]:
    """(seconds, host CPU seconds, images) for ``n_batches`` device-ready batches after one warm-up batch."""
    it = iter(batches)
    to_device(next(it))
    sync()
    cpu0, t0, images = _cpu_seconds(), time.perf_counter(), 0
    for _ in range(n_batches):
        images += to_device(next(it)).shape[0]
    sync()
    elapsed = time.perf_counter() - t0
    del it  # reaps DataLoader workers, so their CPU time is counted
    return elapsed, _cpu_seconds() - cpu0, images


def _prepare(tmp: Path, n: int, workers: int) -> tuple[Path, Path]:
    from bonedist.data.synth import synth_dataset

    synth_dataset(tmp / "raw", n=n, n_val=1, n_test=1, seed=0, size=640, workers=workers, progress=False)
    pack_dataset(tmp / "raw", tmp / "shards", PackOptions(size=500, samples_per_shard=32, workers=workers,
                                                          progress=False))
    folder = tmp / "pngs"
    folder.mkdir()
    manifest = load_manifest(tmp / "shards")
    for shard in manifest["splits"]["train"]["shards"]:  # the very same 500x500 PNGs, one file each
        with tarfile.open(tmp / "shards" / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    (folder / member.name).write_bytes(tar.extractfile(member).read())
    return tmp / "shards", folder


def bench_loader(n: int = 256, batch_size: int = 32, batches: int = 12, workers: int = 0,
                 device: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    workers = workers or default_workers()
    cfg_aug = AugmentConfig()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bonedist-bench-") as tmp:
        print(f"preparing {n} phantoms at 500x500 ...")
        shards, folder = _prepare(Path(tmp), n, workers)
        baseline = DataLoader(PngFolder(folder, torchvision_transform(SPEC, cfg_aug)), batch_size=batch_size,
                              shuffle=True, num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                              persistent_workers=False)
        cycle = _cycle(baseline)
        results["baseline: PIL + torchvision v2 in workers"] = _measure(
            cycle, lambda b: b[0].to(device, non_blocking=True), batches, sync)
        pipe = InputPipeline(SPEC, cfg_aug, seed=0)
        for mode in ("stream", "cache"):
            cfg = DataConfig(shards=str(shards), batch_size=batch_size, mode=mode, workers=workers, balanced=True)
            start = time.perf_counter()
            source = open_split(cfg, "train", device, progress=False, training=True)
            setup = time.perf_counter() - start
            steps = iter(range(10**9))
            results[f"bonedist {mode} + Kornia on {device.type}"] = _measure(
                _epochs(source), lambda b, steps=steps: pipe.train(b["image"], next(steps)), batches, sync)
            if mode == "cache":
                print(f"(cache: {len(source.cache)} images decoded onto {device.type} once, in {setup:.2f} s)")
    base_rate = batches * batch_size / results["baseline: PIL + torchvision v2 in workers"][0]
    print(f"\naugmented device-ready 500x500 batches of {batch_size}, {workers} workers, device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    print(f"{'method':<44}{'batches/s':>10}{'images/s':>10}{'ratio':>8}{'host CPU ms/img':>17}")
    out = {}
    for name, (seconds, cpu, images) in results.items():
        rate = images / seconds
        out[name] = {"images_per_s": rate, "cpu_ms_per_image": 1000 * cpu / images}
        print(f"{name:<44}{rate / batch_size:>10.2f}{rate:>10.1f}{rate / base_rate:>7.2f}x{1000 * cpu / images:>17.2f}")
    return out


def _cycle(loader):
    while True:
        yield from loader


def _epochs(source: SplitData):
    epoch = 0
    while True:
        source.set_epoch(epoch)
        yield from source.training()
        epoch += 1


def bench_augment(batch_size: int = 32, size: int = 500, repeats: int = 5, device: str | None = None) -> dict:
    from torchvision.transforms import v2

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = AugmentConfig()
    images = torch.randint(0, 256, (batch_size, 1, size, size), dtype=torch.uint8, device=device)
    spec = InputSpec(image_size=size, input_size=size, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    pipe = InputPipeline(spec, cfg, seed=0)
    per_image = v2.Compose([
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomAffine(degrees=cfg.rotation, translate=cfg.translate, scale=cfg.scale, shear=cfg.shear),
        v2.RandomHorizontalFlip(cfg.hflip),
        v2.Lambda(lambda x: x.expand(3, -1, -1)),
        v2.Normalize(spec.mean, spec.std),
    ])

    def kornia_batch():
        return pipe.train(images, step=0)

    def torchvision_loop():
        return torch.stack([per_image(image) for image in images])

    rates = {}
    for name, fn in (("baseline: torchvision v2, image by image", torchvision_loop),
                     ("bonedist: Kornia, whole batch", kornia_batch)):
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        rates[name] = batch_size * repeats / (time.perf_counter() - start)
    base = rates["baseline: torchvision v2, image by image"]
    print(f"\naugmentation (Table 2 affine + flip, to 3-channel [-1, 1]) of {batch_size} x {size}x{size}, device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    print(f"{'method':<44}{'images/s':>10}{'ratio':>8}")
    for name, rate in rates.items():
        print(f"{name:<44}{rate:>10.1f}{rate / base:>7.2f}x")
    return rates
