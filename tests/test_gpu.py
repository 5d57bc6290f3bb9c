"""CUDA-only checks (run by launch/gpu_check.sh on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from bonedist.data.augment import AugmentConfig, InputPipeline
from bonedist.data.source import DataConfig, open_split
from bonedist.models import create_model
from bonedist.models.attention import attention_boxes
from tests.conftest import epoch_records, run_train

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def test_attention_boxes_on_cuda_equal_cpu():
    torch.manual_seed(0)
    features = torch.nn.functional.avg_pool2d(torch.randn(16, 256, 18, 18).relu(), 3, 1)
    cpu_boxes, cpu_masks = attention_boxes(features, (500, 500))
    gpu_boxes, gpu_masks = attention_boxes(features.to(CUDA), (500, 500))
    assert torch.equal(cpu_boxes, gpu_boxes.cpu())
    assert (cpu_masks != gpu_masks.cpu()).float().mean() < 1e-3  # interpolation rounding at the edges only


def test_augmentation_on_cuda_is_reproducible_and_in_range():
    spec = create_model("resnet50_patch", {"image_size": 500, "patch_share": 224 / 500, "num_patches": 3}).spec
    pipe = InputPipeline(spec, AugmentConfig(), seed=1)
    images = torch.randint(0, 256, (8, 1, 500, 500), dtype=torch.uint8, device=CUDA)
    x = pipe.train(images, step=3)
    assert x.is_cuda and x.shape == (24, 3, 224, 224) and torch.isfinite(x).all()
    assert torch.equal(x, pipe.train(images, step=3))
    assert pipe.eval(images).shape == (8 * 9, 3, 224, 224)


def test_device_cache_lives_on_the_gpu_and_matches_the_stream(train_shards):
    cfg = DataConfig(shards=str(train_shards), batch_size=16, mode="cache", workers=2)
    train = open_split(cfg, "train", CUDA, progress=False, training=True)
    assert train.mode == "cache" and train.cache.images.is_cuda
    batch = next(iter(train.training()))
    assert batch["image"].is_cuda and batch["image"].dtype == torch.uint8
    sums = {}
    for mode in ("cache", "stream"):
        for b in open_split(DataConfig(shards=str(train_shards), eval_batch_size=16, mode=mode, workers=2),
                            "validation", CUDA).evaluation():
            for i, image in zip(b["index"].tolist(), b["image"]):
                sums.setdefault(mode, {})[i] = int(image.long().sum())
    assert sums["cache"] == sums["stream"]


@pytest.mark.parametrize("model", ["inception_v3", "xception", "resnet50_patch", "agcnn"])
def test_engine_trains_every_model_on_cuda_in_bf16(train_shards, tmp_path, model):
    result = run_train("--model", model, "--shards", str(train_shards), "--preset", "tiny", "--epochs", "1",
                       "--steps-per-epoch", "6", runs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = epoch_records(tmp_path / "default" / model)[0]
    assert record["val_count"] == 60 and record["peak_memory_gb"] > 0
    assert record["train_loss"] == record["train_loss"]  # finite, not NaN


def test_hand_mask_on_cuda_equals_cpu():
    from bonedist.data.handmask import hand_mask
    from bonedist.data.images import resize_square
    from bonedist.data.synth import render_phantom

    images = torch.stack([torch.from_numpy(resize_square(render_phantom(40.0 + 20 * i, bool(i % 2), 512, seed=i),
                                                         500, "pad")[0]) for i in range(8)]).unsqueeze(1)
    cpu = hand_mask(images)
    gpu = hand_mask(images.to(CUDA))
    assert gpu.is_cuda and (cpu != gpu.cpu()).float().mean() < 1e-3


@pytest.mark.parametrize("args", [
    ("--model", "agcnn", "--stages", "global:1,local:1,fusion:1"),
    ("--model", "resnet50_patch", "--pretrained", "none", "--patch-size", "32", "--epochs", "1"),
])
def test_improved_preset_trains_on_cuda_in_bf16(train_shards, tmp_path, args):
    result = run_train(*args, "--shards", str(train_shards), "--preset", "improved", "--image-size", "64",
                       "--steps-per-epoch", "4", "--batch-size", "8", runs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = epoch_records(tmp_path / "default" / args[1])
    assert all(r["val_count"] == 60 and r["train_loss"] == r["train_loss"] for r in records)
