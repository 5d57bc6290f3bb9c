"""The four models: registry, paper parameter counts, gradients, AG-CNN loss isolation, weights offline."""

from __future__ import annotations

import pytest
import timm
import torch

from bonedist import BonedistError
from bonedist.models import create_model, list_models, model_info
from bonedist.models.task import REGRESSION

SMALL = {"inception_v3": dict(image_size=96), "resnet50_patch": dict(image_size=96, patch_size=48)}


def small(name: str) -> dict:
    """Options that make any registered model quick on a CPU (64 px unless it needs more)."""
    return SMALL.get(name, dict(image_size=64))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_registry_lists_the_four_models_and_rejects_unknown():
    assert list_models() == ["inception_v3", "xception", "resnet50_patch", "agcnn"]  # the paper's order
    assert [model_info(m).pretrained for m in list_models()] == [True, True, True, False]
    with pytest.raises(BonedistError, match="known models: inception_v3, xception"):
        create_model("vgg16")
    with pytest.raises(BonedistError, match="unexpected keyword"):
        create_model("xception", colour=True)
    with pytest.raises(BonedistError, match="fusion_grad"):
        create_model("agcnn", fusion_grad="both")


def test_paper_parameter_counts():
    assert _trainable(create_model("inception_v3")) == 3_083_065
    xception = create_model("xception")
    assert _trainable(xception) == 20_885
    params = sum(p.numel() for p in xception.parameters())
    bn_stats = sum(b.numel() for n, b in xception.named_buffers() if not n.endswith("num_batches_tracked"))
    assert params + bn_stats == 20_882_365  # Keras' way of counting
    assert _trainable(create_model("resnet50_patch")) == 28_715
    assert sum(p.numel() for p in create_model("agcnn").fusion.parameters()) == 1_082_113


def _batch(model, batch=2):
    spec = model.spec
    n = batch * (spec.num_patches or 1)
    image = torch.randn(n, spec.channels, spec.input_size, spec.input_size)
    return image, torch.tensor([1.0, 0.0] * (n // 2)), torch.randn(n)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("freeze", [True, False])
def test_forward_shape_and_gradients_reach_exactly_the_trainable_parameters(name, freeze):
    if freeze and not model_info(name).pretrained:
        pytest.skip(f"{name} is trained from scratch: nothing to freeze")
    torch.manual_seed(0)
    model = create_model(name, **small(name), **({"freeze_backbone": freeze} if model_info(name).pretrained else {}))
    model.train()
    image, male, target = _batch(model)
    out = model(image, male)
    assert out["pred"].shape == (image.shape[0],) and torch.isfinite(out["pred"]).all()
    assert all(out[b].shape == out["pred"].shape for b in model.task.branches)
    assert model.spec.input_size <= model.spec.image_size and model.spec.channels == image.shape[1]
    loss, parts = model.task.loss(out, target)
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{pname} got no gradient"
        else:
            assert p.grad is None, f"frozen {pname} got a gradient"
    if freeze:
        assert not model.backbone.training  # frozen BatchNorm statistics stay fixed in train mode
        assert _trainable(model) == sum(p.numel() for p in model.head_parameters())


def test_agcnn_outputs_and_paper_loss_isolates_the_fusion_term():
    torch.manual_seed(0)
    model = create_model("agcnn", image_size=64)
    image, male, target = _batch(model, batch=4)
    out = model(image, male)
    assert {"global", "local", "fusion", "boxes", "masks"} <= set(out)
    assert out["boxes"].shape == (4, 4) and out["masks"].shape == (4, 1, 64, 64)
    loss, parts = model.task.loss(out, target)
    assert torch.allclose(loss, 0.8 * parts["loss_global"] + 0.1 * parts["loss_local"] + 0.1 * parts["loss_fusion"])
    # the Fusion term alone reaches only the Fusion head
    parts_only = torch.nn.functional.mse_loss(out["fusion"], target)
    parts_only.backward()
    assert all(p.grad is None for p in model.global_branch.parameters())
    assert all(p.grad is None for p in model.local_branch.parameters())
    assert all(p.grad is not None for p in model.fusion.parameters())


def test_agcnn_joint_mode_backpropagates_fusion_into_the_branches():
    torch.manual_seed(0)
    model = create_model("agcnn", image_size=64, fusion_grad="joint")
    image, male, target = _batch(model)
    torch.nn.functional.mse_loss(model(image, male)["fusion"], target).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.global_branch.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.local_branch.parameters())


def test_param_groups_give_the_backbone_its_own_learning_rate():
    model = create_model("xception", image_size=64, freeze_backbone=False)
    groups = {g["name"]: g for g in model.param_groups(1e-3, backbone_lr=1e-5)}
    assert groups["head"]["lr"] == 1e-3 and groups["backbone"]["lr"] == 1e-5
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == _trainable(model)
    frozen = create_model("xception", image_size=64)
    assert [g["name"] for g in frozen.param_groups(1e-3)] == ["head"]
    assert [g["name"] for g in create_model("agcnn", image_size=64).param_groups(1e-5)] == ["global", "local",
                                                                                            "fusion"]


def test_regression_loss_kinds():
    out, target = {"pred": torch.tensor([0.0, 2.0])}, torch.tensor([1.0, 1.0])
    assert REGRESSION.loss(out, target)[0].item() == pytest.approx(1.0)
    assert REGRESSION.loss(out, target, "l1")[0].item() == pytest.approx(1.0)
    assert REGRESSION.loss(out, target, "huber", 0.5)[0].item() == pytest.approx(0.375)
    assert REGRESSION.best_metric() == "val_mae_months" and REGRESSION.reported("m") == ["m"]


def test_feature_norm_keeps_the_head_alive_where_the_paper_head_dies():
    """Adam moves all weights of a head unit together when the pooled features are all >= 0 (ReLU backbones);
    on real radiographs the Dense(10, ReLU) of Xception died within 80 steps. Here: a step that pushes every
    unit's output down kills the plain head for every input, not the one on centred features."""
    alive = {}
    for norm in (False, True):
        torch.manual_seed(0)
        model = create_model("xception", image_size=64, pretrained=None, freeze_backbone=False, feature_norm=norm)
        model.train()
        image, male = torch.randn(16, 3, 64, 64), torch.tensor([1.0, 0.0] * 8)
        optimizer = torch.optim.Adam(model.head.parameters(), lr=0.05)
        for target in (-5.0, -5.0, -5.0, 5.0, 5.0, 5.0):  # large Adam steps down, then up (L1 flips like this)
            loss = (model(image, male)["pred"] - target).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        hidden = {}
        model.head[0].register_forward_hook(lambda m, i, o, store=hidden: store.__setitem__("pre", o.detach()))
        with torch.no_grad():
            model(torch.randn(64, 3, 64, 64), torch.tensor([1.0, 0.0] * 32))
        alive[norm] = int(((hidden["pre"] > 0).any(dim=0)).sum())
    assert alive[False] == 0 and alive[True] > 0, alive


def _saved_resnet(tmp_path, fmt):
    torch.manual_seed(3)
    reference = timm.create_model("resnet50.tv_in1k", pretrained=False, num_classes=1000)
    state = reference.state_dict()  # with the classifier, as a real checkpoint has
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "resnet50.tv_in1k.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "resnet50-weights.pth"
        torch.save({"state_dict": state}, path)
    return reference, path


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_weight_file_loads_offline(tmp_path, fmt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference, path = _saved_resnet(tmp_path, fmt)
    source = tmp_path if fmt == "safetensors" else path  # a fetched folder, or the file itself
    model = create_model("resnet50_patch", pretrained=str(source), image_size=96, patch_size=48)
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.layer4[2].bn3.running_var, reference.layer4[2].bn3.running_var)
    # grayscale stem from RGB weights: the three filters summed
    gray = create_model("resnet50_patch", pretrained=str(source), in_chans=1, image_size=96, patch_size=48)
    assert torch.allclose(gray.backbone.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert gray.spec.channels == 1 and len(gray.spec.mean) == 1


def test_weight_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BonedistError, match="bonedist weights fetch"):
        create_model("xception", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(BonedistError, match="no weights for legacy_xception.tf_in1k"):
        create_model("xception", pretrained=str(tmp_path))
    with pytest.raises(BonedistError, match="cannot load pretrained weights 'legacy_xception.tf_in1k'"):
        create_model("xception", pretrained="legacy_xception.tf_in1k")
    _, path = _saved_resnet(tmp_path, "pth")
    with pytest.raises(BonedistError, match="does not fit"):
        create_model("xception", pretrained=str(path), image_size=64)
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "note": object.__new__(_Opaque)}, evil)
    with pytest.raises(BonedistError, match="cannot read weights file"):
        create_model("resnet50_patch", pretrained=str(evil))


class _Opaque:
    """A pickled class instance: torch.load(weights_only=True) must refuse it."""


def test_weights_fetch_without_network_fails_clearly(tmp_path):
    from tests.conftest import run_cli

    result = run_cli("weights", "fetch", str(tmp_path / "w"), "--tags", "resnet50.tv_in1k",
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "cannot download 'resnet50.tv_in1k'" in result.stderr
    assert "Traceback" not in result.stderr


def test_agcnn_fusion_norm_adds_no_parameters():
    model = create_model("agcnn", image_size=64, fusion_norm=True)
    assert sum(p.numel() for p in model.fusion.parameters()) == 1_082_113
    out = model(torch.randn(2, 1, 64, 64), torch.tensor([1.0, 0.0]))
    assert torch.isfinite(out["pred"]).all()
