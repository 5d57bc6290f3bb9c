"""Learning bone age from real radiographs: BatchNorm statistics, held-out splits, and a short real training run.

The training test reads the 10,811 real RSNA radiographs at 100 px in ``../shared/data/rsna-train-100px`` (or
``$BONEDIST_RSNA_100PX``) and skips without them; the unit tests need nothing.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from bonedist import BonedistError
from bonedist.data.holdout import carve_holdout, parse_holdout
from bonedist.train.batchnorm import recalibrate_batchnorm, training_norm_names
from tests.conftest import REPO, epoch_records, run_cli

RSNA_100PX = os.environ.get("BONEDIST_RSNA_100PX", str(REPO.parent / "shared" / "data" / "rsna-train-100px"))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.frozen = nn.BatchNorm2d(4)
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(4, 1)

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # a frozen layer, as a frozen backbone keeps its statistics
        return self

    def forward(self, x, male):
        x = self.frozen(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))
        return {"pred": self.fc(self.drop(x.mean(dim=(2, 3)))).squeeze(1)}


def test_recalibration_gives_the_population_statistics_of_the_inputs():
    torch.manual_seed(0)
    net = _Net()
    batches = [(torch.randn(8, 1, 12, 12) * 3 + 1, torch.zeros(8)) for _ in range(5)]
    frozen = copy.deepcopy(net.frozen.state_dict())
    names = training_norm_names(net)
    assert names == ["bn1", "bn2"]
    assert recalibrate_batchnorm(net, names, batches) == 5
    pre1 = torch.cat([net.conv1(x) for x, _ in batches]).detach()  # (40, 4, 10, 10): what bn1 saw
    assert torch.allclose(net.bn1.running_mean, pre1.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(net.bn1.running_var, pre1.transpose(0, 1).flatten(1).var(dim=1), rtol=1e-4)
    # bn2 saw bn1's output normalised with each batch's own statistics, as in training
    pre2 = []
    for x, _ in batches:
        h = net.conv1(x)
        h = (h - h.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(h.var(dim=(0, 2, 3), unbiased=False,
                                                                         keepdim=True) + 1e-5)
        pre2.append(net.conv2(torch.relu(h * net.bn1.weight.view(1, -1, 1, 1) + net.bn1.bias.view(1, -1, 1, 1))))
    assert torch.allclose(net.bn2.running_mean, torch.cat(pre2).mean(dim=(0, 2, 3)).detach(), atol=1e-5)
    for key, value in frozen.items():  # a frozen layer keeps its statistics
        assert torch.equal(net.frozen.state_dict()[key], value)
    assert net.training and not net.frozen.training  # modes restored
    assert int(net.bn1.num_batches_tracked) == 0


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": str(i), "split": "train", "boneage_months": float(rng.gamma(9, 14)),
             "male": bool(rng.random() < .55)} for i in range(n)]


def test_holdout_is_stratified_deterministic_and_checked():
    records = _records(2000)
    counts = carve_holdout(records, parse_holdout("validation:200,test:0.1"), seed=3)
    assert counts == {"validation": 200, "test": 200}
    by = {s: [r for r in records if r["split"] == s] for s in ("train", "validation", "test")}
    assert [len(by[s]) for s in by] == [1600, 200, 200]
    for split in ("validation", "test"):  # the training split's sex ratio and age distribution
        assert abs(np.mean([r["male"] for r in by[split]]) - np.mean([r["male"] for r in by["train"]])) < 0.02
        assert np.quantile([r["boneage_months"] for r in by[split]], [.1, .5, .9]) == pytest.approx(
            np.quantile([r["boneage_months"] for r in by["train"]], [.1, .5, .9]), rel=0.05)
    again = _records(2000)
    carve_holdout(again, {"validation": 200, "test": 0.1}, seed=3)
    assert [r["split"] for r in again] == [r["split"] for r in records]
    for bad in ("validation", "valid:10", "test:-1", "test:2.5", "validation:1,validation:2"):
        with pytest.raises(BonedistError, match="--holdout"):
            parse_holdout(bad)
    with pytest.raises(BonedistError, match="already has a validation split"):
        carve_holdout(records, {"validation": 10})
    with pytest.raises(BonedistError, match="must leave some for training"):
        carve_holdout(_records(10), {"test": 10})


@pytest.mark.realdata
@pytest.mark.slow
def test_scratch_cspnext_learns_bone_age_from_real_radiographs(tmp_path):
    """Pack the real 100 px set with a stratified 600/600 holdout, train CSPNeXt-tiny (the fastest learner per
    CPU-minute here; in the scratch preset on hand-masked radiographs, masks computed once) from scratch at 64 px
    for four CPU minutes, and require real learning on the held-out radiographs: well under the natural-mean
    baseline, small bias."""
    if not os.path.isdir(RSNA_100PX):
        pytest.skip(f"real RSNA 100 px set not found at {RSNA_100PX}")
    shards = tmp_path / "shards"
    packed = run_cli("pack", RSNA_100PX, "--out", str(shards), "--image-size", "64", "--holdout",
                     "validation:600,test:600", "--quiet")
    assert packed.returncode == 0, packed.stderr
    runs = tmp_path / "runs"
    result = run_cli("train", "--model", "cspnext_tiny", "--shards", str(shards), "--preset", "scratch",
                     "--image-size", "64", "--time-budget-min", "4", "--runs-dir", str(runs), "--wandb", "off",
                     timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    last = epoch_records(runs / "default" / "cspnext_tiny")[-1]
    baseline = last["val_baseline_mae_months"]
    assert 30 < baseline < 37  # predict the training split's own mean
    assert last["val_mae_months"] < 0.65 * baseline, last
    assert abs(last["val_bias_months"]) < 5, last
    evaluated = run_cli("evaluate", "--runs", str(runs / "default"), "--split", "test", "--wandb", "off")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads((runs / "default" / "report" / "metrics.json").read_text())["metrics"]
    assert abs(metrics["predict_the_mean"]["bias_months"]) < 3  # the natural mean is (nearly) unbiased
    assert metrics["cspnext_tiny"]["mae_months"] < 0.65 * metrics["predict_the_mean"]["mae_months"]
    assert abs(metrics["cspnext_tiny"]["bias_months"]) < 5
