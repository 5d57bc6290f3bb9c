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


def _grid_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The 4-D weights of more than one input channel (their memory format is not ambiguous)."""
    return [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2:].numel() > 1]


def test_channels_last_from_a_stage_runs_the_first_layers_nchw_with_the_same_outputs(monkeypatch):
    """CSPNeXt's measured CPU choice: channels_last from a later stage, its stem and first stages NCHW (BatchNorm's
    backward pass is slow over channels_last maps of few channels); the outputs are the model's."""
    import copy

    from bonedist import BonedistError
    from bonedist.models import create_model
    from bonedist.train.config import resolve_config
    from bonedist.train.precision import to_memory_format

    info = model_info("cspnext_tiny")
    start = info.cpu_precision[1]
    assert isinstance(start, str) and start.startswith("backbone.stages.")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("BONEDIST_CPU_BF16", "1")
    p = resolve_precision("auto", None, False, info.cpu_precision)
    assert (p.mixed, p.channels_last, p.channels_last_from, p.input_channels_last) == ("bf16", True, start, False)
    assert f"channels_last from {start}" in p.describe()
    assert resolve_precision("auto", True, False, info.cpu_precision).channels_last_from == ""  # --channels-last
    assert resolve_precision("auto", None, True, info.cpu_precision).channels_last_from == ""  # CUDA: all of it
    assert inference_precision("auto", False, info.cpu_precision).channels_last_from == start

    cfg = resolve_config("cspnext_tiny", "", "scratch", input={"image_size": 64})
    torch.manual_seed(0)
    model = create_model("cspnext_tiny", cfg.input, **cfg.model_options).eval()
    reference = copy.deepcopy(model)
    params = [id(q) for q in model.parameters()]
    p.apply(model)
    p.apply(model)  # again, as evaluation may: one conversion hook
    modules = dict(model.named_modules())
    assert [id(q) for q in model.parameters()] == params  # an optimizer built before still holds them
    assert len(modules[start]._forward_pre_hooks) == 1
    early = [*_grid_weights(model.backbone.stem), *_grid_weights(model.backbone.stages[0])]
    late = _grid_weights(modules[start])
    assert early and late
    assert all(w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last) for w in early)
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in late)
    seen = {}
    model.backbone.stages[0].register_forward_hook(lambda m, a, out: seen.setdefault("stage0", out))
    modules[start].register_forward_hook(lambda m, a, out: seen.setdefault("start", out))
    image, male = torch.randn(4, 1, 64, 64), torch.tensor([0.0, 1.0, 1.0, 0.0])
    with torch.no_grad():
        got, want = model(image, male), reference(image, male)
    assert seen["stage0"].is_contiguous() and seen["stage0"].shape[1] > 1
    assert seen["start"].is_contiguous(memory_format=torch.channels_last) and not seen["start"].is_contiguous()
    torch.testing.assert_close(got["pred"], want["pred"], rtol=1e-4, atol=1e-4)
    with pytest.raises(BonedistError, match="no module of that path"):
        to_memory_format(reference, True, "backbone.stages.9")
