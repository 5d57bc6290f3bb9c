"""A new model is one new file: registered here, it trains, evaluates and predicts with no other edit."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bonedist.models import InputSpec, list_models, register_model, unregister_model


class TinyNet(nn.Module):
    """Three convolutions, BatchNorm, a sex input: the whole interface a model needs."""

    def __init__(self, image_size: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16 + 1, 1)
        self.spec = InputSpec(image_size=image_size, input_size=image_size, channels=1, mean=(0.5,), std=(0.5,))

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(image)  # (B, 16)
        return {"pred": self.head(torch.cat([features, male.view(-1, 1).to(features.dtype)], 1)).squeeze(1)}


@pytest.fixture
def tiny_net():
    @register_model(pretrained=False)
    def tiny_net(image_size: int = 64, pretrained: str | None = None) -> TinyNet:
        return TinyNet(image_size)

    yield "tiny_net"
    unregister_model("tiny_net")


def test_a_model_registered_in_one_place_trains_evaluates_and_predicts(tiny_net, train_shards, tmp_path):
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
    assert (tmp_path / "new" / "report" / "report.md").read_text().count("| tiny_net |") == 2

    image = sorted((RSNA_SAMPLE / "boneage-training-dataset").glob("*.png"))[0] if RSNA_SAMPLE.is_dir() else None
    if image is None:
        pytest.skip("no real radiograph to predict on")
    rows = predict_images([str(image)], "F", str(tmp_path / "new"))
    assert list(rows[0]["models"]) == ["tiny_net"] and 0 < rows[0]["bone_age_months"] < 300
