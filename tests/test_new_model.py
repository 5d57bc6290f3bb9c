"""A new model is one new file: registered here with only its own architecture options and its recipes, it trains
under every preset it declares, evaluates and predicts with no other edit."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from bonedist.models import list_models, model_info, register_model, unregister_model
from bonedist.options import option


@dataclass
class TinyNetOptions:
    width: int = option(8, "channels of the first convolution", group="model", minimum=1)


class TinyNet(nn.Module):
    """Three convolutions, BatchNorm, a sex input: the whole interface a model needs."""

    def __init__(self, opts: TinyNetOptions, in_chans: int):
        super().__init__()
        w = opts.width
        self.features = nn.Sequential(nn.Conv2d(in_chans, w, 3, stride=2), nn.BatchNorm2d(w), nn.ReLU(),
                                      nn.Conv2d(w, 2 * w, 3, stride=2), nn.BatchNorm2d(2 * w), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * w + 1, 1)

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(image)  # (B, 2w)
        return {"pred": self.head(torch.cat([features, male.view(-1, 1).to(features.dtype)], 1)).squeeze(1)}


# what this model changes in each preset it supports (here: a wider net in improved, nothing else)
RECIPES = {"paper": dict, "improved": lambda: {"model": {"width": 12}}, "scratch": dict, "tiny": dict}


@pytest.fixture
def tiny_net():
    @register_model(options=TinyNetOptions, recipes=RECIPES)
    def tiny_net(opts: TinyNetOptions, in_chans: int) -> TinyNet:
        return TinyNet(opts, in_chans)

    yield "tiny_net"
    unregister_model("tiny_net")


@pytest.mark.parametrize("preset", list(RECIPES))
def test_a_model_registered_in_one_place_trains_under_every_preset_it_declares(tiny_net, train_shards, tmp_path,
                                                                                preset):
    """Each preset's input settings (hand mask in improved, contrast stretch in scratch) are the input pipeline's:
    the model's factory never sees them."""
    from bonedist.train.config import resolve_config
    from bonedist.train.engine import train_in_process

    assert preset in model_info("tiny_net").presets
    cfg = resolve_config("tiny_net", str(train_shards), preset, runs_dir=str(tmp_path), experiment=preset,
                         epochs=1, steps_per_epoch=3, batch_size=8, eval_batch_size=32, recalibrate=64,
                         input={"image_size": 64}, wandb="off")
    code, run_dir, _ = train_in_process(cfg)
    assert code == 0 and (run_dir / "best" / "model.safetensors").is_file()
    meta = json.loads((run_dir / "best" / "meta.json").read_text())
    assert meta["model_options"] == {"width": 12 if preset == "improved" else 8}
    assert meta["spec"]["hand_mask"] == (preset == "improved")
    assert meta["spec"]["contrast"] == ("stretch" if preset == "scratch" else "none")
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert len(epochs) == 1 and epochs[0]["val_count"] == 60 and epochs[0]["val_mae_months"] > 0


def test_a_model_registered_in_one_place_evaluates_and_predicts(tiny_net, train_shards, tmp_path):
    from bonedist.eval.evaluate import EvalOptions, evaluate
    from bonedist.eval.predict import predict_images
    from bonedist.train.config import resolve_config
    from bonedist.train.engine import train_in_process
    from tests.conftest import RSNA_SAMPLE

    assert list_models()[-1] == "tiny_net"
    cfg = resolve_config("tiny_net", str(train_shards), "tiny", runs_dir=str(tmp_path), experiment="new",
                         epochs=2, steps_per_epoch=5, wandb="off")
    code, run_dir, _ = train_in_process(cfg)
    assert code == 0 and (run_dir / "best" / "model.safetensors").is_file()
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["val_count"] == 60 for r in epochs)

    result = evaluate(EvalOptions(runs=str(tmp_path / "new"), split="test", wandb="off", workers=0))
    assert result["models"] == ["tiny_net"] and {"predict_the_mean", "tiny_net"} <= set(result["metrics"])
    report = (tmp_path / "new" / "report" / "report.md").read_text()
    assert report.count("| tiny_net |") == 4  # metrics, by age band, calibration check, intervals

    image = sorted((RSNA_SAMPLE / "boneage-training-dataset").glob("*.png"))[0] if RSNA_SAMPLE.is_dir() else None
    if image is None:
        pytest.skip("no real radiograph to predict on")
    rows = predict_images([str(image)], "F", str(tmp_path / "new"))
    assert list(rows[0]["models"]) == ["tiny_net"] and 0 < rows[0]["bone_age_months"] < 300
