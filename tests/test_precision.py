"""--precision auto: bf16 and channels_last where this CPU has bf16 matrix units and the model is faster so, fp32
elsewhere; fp32 weights, optimizer state and loss under autocast; evaluation on a CPU within 0.1 months of fp32."""

from __future__ import annotations

import json

import pytest
import torch

from bonedist.models import list_models, model_info
from bonedist.train.precision import cpu_has_bf16_units, inference_precision, resolve_precision
from tests.conftest import run_train

BF16_CL = ("bf16", True)


def test_auto_chooses_by_device_model_and_cpu_units(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("BONEDIST_CPU_BF16", "1")  # a CPU with bf16 matrix units
    p = resolve_precision("auto", None, False, BF16_CL)
    assert (p.mixed, p.channels_last) == ("bf16", True) and "bf16 matrix units" in p.reason
    assert (resolve_precision("auto", None, False, ("fp32", True)).mixed, True) == ("no", True)  # EfficientNet
    assert resolve_precision("auto", False, False, BF16_CL).channels_last is False  # --no-channels-last
    assert resolve_precision("fp32", None, False, BF16_CL).mixed == "no"  # --precision fp32
    assert (resolve_precision("auto", None, True, ("fp32", False)).mixed, True) == ("bf16", True)  # CUDA
    assert inference_precision("auto", False, BF16_CL).mixed == "no"  # evaluation on a CPU: fp32
    monkeypatch.setenv("BONEDIST_CPU_BF16", "0")  # a CPU without them: fp32 as before, whatever the model
    for name in list_models():
        p = resolve_precision("auto", None, False, model_info(name).cpu_precision)
        assert (p.mixed, p.channels_last) == ("no", False), name
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert resolve_precision("auto", None, False, BF16_CL).mixed == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's default asks for nothing
    assert resolve_precision("auto", None, False, ("fp32", False)).mixed == "no"


def test_bf16_units_are_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("BONEDIST_CPU_BF16", raising=False)
    flags = open("/proc/cpuinfo").read()
    assert cpu_has_bf16_units() == ("amx_bf16" in flags or "avx512_bf16" in flags)


def test_bf16_training_keeps_fp32_weights_optimizer_state_and_loss(train_shards, tmp_path, monkeypatch):
    from bonedist.train.config import resolve_config
    from bonedist.train.engine import Trainer

    monkeypatch.setenv("BONEDIST_CPU_BF16", "1")
    cfg = resolve_config("xception", str(train_shards), "tiny", runs_dir=str(tmp_path), epochs=1, steps_per_epoch=2,
                         wandb="off")
    trainer = Trainer(cfg)
    assert trainer.precision.name == "bf16" and trainer.precision.channels_last
    trainer.begin_epoch()
    batch = next(iter(trainer.train_data.training()))
    loss, parts, _, _ = trainer.train_step(batch, torch.zeros((), dtype=torch.bool))
    assert loss.dtype == torch.float32  # computed in fp32 from the bf16 outputs
    assert all(p.dtype == torch.float32 for p in trainer.unwrapped.parameters())
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step")
    resolved = json.loads((trainer.run_dir / "config.json").read_text())["resolved"]
    assert resolved["precision"] == "bf16" and resolved["channels_last"] is True


@pytest.mark.slow
def test_a_cpu_without_bf16_units_trains_in_fp32_as_before(train_shards, tmp_path):
    result = run_train("--model", "xception", "--shards", str(train_shards), "--preset", "tiny", "--epochs", "1",
                       "--steps-per-epoch", "2", runs=tmp_path, env={"BONEDIST_CPU_BF16": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "precision: fp32 (a CPU without bf16 matrix units)" in result.stdout
    resolved = json.loads((tmp_path / "default" / "xception" / "config.json").read_text())["resolved"]
    assert resolved == {**resolved, "precision": "fp32", "channels_last": False}
