"""The four models: registry, paper parameter counts, gradients, AG-CNN loss isolation, weights offline."""

from __future__ import annotations

import pytest
import timm
import torch

from bonedist import BonedistError
from bonedist.models import create_model, list_models, model_info
from bonedist.models.task import REGRESSION


def small(name: str) -> dict:
    """Input settings that make any registered model quick on a CPU: its tiny recipe's (64 px unless it needs
    more), else 64 px."""
    from bonedist.train.config import recipe_values

    try:
        return recipe_values(name, "tiny").get("input", {})
    except BonedistError:
        return {"image_size": 64}


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_each_preset_has_a_default_model_list_with_budget_shares():
    from bonedist.bench.accuracy import plan_jobs, plan_single
    from bonedist.models import default_models
    from bonedist.train.config import resolve_config
    from tests.conftest import run_cli

    # the paper's four stay the paper preset's; scratch trains what its comparison chose (README): CSPNeXt-tiny
    # alone with the whole budget, on hand-masked radiographs (the former partners train on whole ones)
    assert list(default_models("paper")) == ["inception_v3", "xception", "resnet50_patch", "agcnn"]
    scratch = default_models("scratch")
    assert scratch == {"cspnext_tiny": 1.0}
    masked = {m: resolve_config(m, "x", "scratch").input.hand_mask for m in ("cspnext_tiny", "cspnext_s",
                                                                              "cs3darknet_s")}
    assert masked == {"cspnext_tiny": True, "cspnext_s": False, "cs3darknet_s": False}
    assert set(default_models("tiny")) == set(list_models("tiny"))  # a preset no model names: every model
    jobs = plan_jobs(["scratch", "paper"])
    assert [(j.preset, j.model) for j in jobs if j.replica == 0] == [("scratch", m) for m in scratch] + [
        ("paper", m) for m in default_models("paper")]
    assert [(j.model, j.share, j.run, j.replica) for j in plan_jobs(["scratch"], ["xception", "resnet18"])] == [
        ("xception", 1.0, "xception", 0), ("resnet18", 1.0, "resnet18", 0)]
    twice = plan_jobs(["scratch"], ["resnet18", "timm/resnet34"], replicas=2)  # seed replicas: separate runs
    assert [(j.run, j.replica) for j in twice] == [("resnet18", 0), ("resnet18-2", 1), ("timm/resnet34", 0),
                                                   ("timm-resnet34-2", 1)]
    assert {(j.model, j.share) for j in plan_jobs(["paper"], shares={"xception": 5})} == {
        ("inception_v3", 1.0), ("xception", 5.0), ("resnet50_patch", 1.0), ("agcnn", 1.0)}
    # beside a list of several runs, one model alone with the whole budget (bench accuracy --single)
    assert [(j.experiment, j.model, j.whole) for j in plan_single(plan_jobs(["tiny"], ["xception", "resnet18"]))] \
        == [("tiny-whole", "xception", True)]
    assert plan_single(plan_jobs(["tiny"], ["xception", "resnet18"]), "off") == []
    assert plan_single(plan_jobs(["tiny"], ["xception"])) == []  # one run: it is already alone
    assert [j.model for j in plan_single(plan_jobs(["tiny"], ["xception"]), "resnet18")] == ["resnet18"]
    assert [j.model for j in plan_single(plan_jobs(["scratch", "tiny"], ["xception", "resnet18"]))] == [
        "xception", "xception"]
    with pytest.raises(BonedistError, match="--single 'vgg'"):
        plan_single(plan_jobs(["tiny"], ["xception"]), "vgg")
    with pytest.raises(BonedistError, match="--shares"):
        plan_jobs(["scratch"], shares={"xception": 1})  # not a model of the run
    with pytest.raises(BonedistError, match="--replicas 0"):
        plan_jobs(["scratch"], replicas=0)
    with pytest.raises(BonedistError, match="presets are"):
        plan_jobs(["nope"])
    listed = run_cli("models", "--preset", "scratch", "--shares")
    assert listed.returncode == 0 and {line.split("\t")[0] for line in listed.stdout.split()[::2]} == set(scratch)
    every = run_cli("models", "--preset", "scratch", "--all")
    assert every.stdout.split() == list_models("scratch")


def test_registry_lists_the_papers_models_first_and_rejects_unknown():
    assert list_models()[:4] == ["inception_v3", "xception", "resnet50_patch", "agcnn"]  # the paper's order
    assert [model_info(m).pretrained for m in list_models()[:4]] == [True, True, True, False]
    with pytest.raises(BonedistError, match="known models: inception_v3, xception"):
        create_model("vgg16")
    with pytest.raises(BonedistError, match="model xception has no option 'colour'"):
        create_model("xception", colour=True)
    with pytest.raises(BonedistError, match="agcnn has no option 'pretrained'"):
        create_model("agcnn", pretrained=None)
    with pytest.raises(BonedistError, match="--channels 3: agcnn takes 1"):
        create_model("agcnn", inputs={"channels": 3})
    with pytest.raises(BonedistError, match="--fusion-grad must be one of isolated, joint"):
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
    model = create_model(name, small(name), **({"freeze_backbone": freeze} if model_info(name).pretrained else {}))
    model.train()
    image, male, target = _batch(model)
    out = model(image, male)
    assert out["pred"].shape == (image.shape[0],) and torch.isfinite(out["pred"]).all()
    assert all(out[b].shape == out["pred"].shape for b in model.task.branches)
    assert model.spec.input_size <= model.spec.image_size and model.spec.channels == image.shape[1]
    loss, parts = model.task.loss(out, target, torch.nn.functional.mse_loss)
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
    model = create_model("agcnn", {"image_size": 64})
    image, male, target = _batch(model, batch=4)
    out = model(image, male)
    assert {"global", "local", "fusion", "boxes", "masks"} <= set(out)
    assert out["boxes"].shape == (4, 4) and out["masks"].shape == (4, 1, 64, 64)
    loss, parts = model.task.loss(out, target, torch.nn.functional.mse_loss)
    assert torch.allclose(loss, 0.8 * parts["loss_global"] + 0.1 * parts["loss_local"] + 0.1 * parts["loss_fusion"])
    # the Fusion term alone reaches only the Fusion head
    parts_only = torch.nn.functional.mse_loss(out["fusion"], target)
    parts_only.backward()
    assert all(p.grad is None for p in model.global_branch.parameters())
    assert all(p.grad is None for p in model.local_branch.parameters())
    assert all(p.grad is not None for p in model.fusion.parameters())


def test_agcnn_joint_mode_backpropagates_fusion_into_the_branches():
    torch.manual_seed(0)
    model = create_model("agcnn", {"image_size": 64}, fusion_grad="joint")
    image, male, target = _batch(model)
    torch.nn.functional.mse_loss(model(image, male)["fusion"], target).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.global_branch.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.local_branch.parameters())


def test_param_groups_give_the_backbone_its_own_learning_rate():
    model = create_model("xception", {"image_size": 64}, freeze_backbone=False)
    groups = {g["name"]: g for g in model.param_groups(1e-3, backbone_lr=1e-5)}
    assert groups["head"]["lr"] == 1e-3 and groups["backbone"]["lr"] == 1e-5
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == _trainable(model)
    frozen = create_model("xception", {"image_size": 64})
    assert [g["name"] for g in frozen.param_groups(1e-3)] == ["head"]
    assert [g["name"] for g in create_model("agcnn", {"image_size": 64}).param_groups(1e-5)] == ["global", "local",
                                                                                            "fusion"]


def test_losses_are_components_that_name_their_selection_metric():
    from bonedist.train.config import resolve_config
    from bonedist.train.losses import build_loss

    out, target = {"pred": torch.tensor([0.0, 2.0])}, torch.tensor([1.0, 1.0])
    losses = {kind: build_loss(resolve_config("xception", "x", "paper", loss=kind, huber_delta=0.5))
              for kind in ("mse", "l1", "huber")}
    assert REGRESSION.loss(out, target, losses["mse"])[0].item() == pytest.approx(1.0)
    assert REGRESSION.loss(out, target, losses["l1"])[0].item() == pytest.approx(1.0)
    assert REGRESSION.loss(out, target, losses["huber"])[0].item() == pytest.approx(0.375)
    assert REGRESSION.best_metric(losses["l1"].metric) == "val_mae_months" and REGRESSION.reported("m") == ["m"]
    assert REGRESSION.best_metric(losses["mse"].metric) == "val_loss"
    agcnn = model_info("agcnn").task
    # a branched model is selected by the loss it trains with, on its main branch or its stage's
    assert agcnn.best_metric(losses["l1"].metric) == "val_mae_months_fusion"
    assert agcnn.best_metric(losses["mse"].metric, "global") == "val_loss_global"
    assert agcnn.best_metric(losses["huber"].metric) == "val_huber_fusion"


def test_feature_norm_keeps_the_head_alive_where_the_paper_head_dies():
    """Adam moves all weights of a head unit together when the pooled features are all >= 0 (ReLU backbones);
    on real radiographs the Dense(10, ReLU) of Xception died within 80 steps. Here: a step that pushes every
    unit's output down kills the plain head for every input, not the one on centred features."""
    alive = {}
    for norm in (False, True):
        torch.manual_seed(0)
        model = create_model("xception", {"image_size": 64}, pretrained=None, freeze_backbone=False, feature_norm=norm)
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
    patches = {"image_size": 96, "patch_size": 48, "num_patches": 3}
    model = create_model("resnet50_patch", patches, pretrained=str(source))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.layer4[2].bn3.running_var, reference.layer4[2].bn3.running_var)
    # grayscale stem from RGB weights: the three filters summed
    gray = create_model("resnet50_patch", {**patches, "channels": 1}, pretrained=str(source))
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
        create_model("xception", {"image_size": 64}, pretrained=str(path))
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
    model = create_model("agcnn", {"image_size": 64}, fusion_norm=True)
    assert sum(p.numel() for p in model.fusion.parameters()) == 1_082_113
    out = model(torch.randn(2, 1, 64, 64), torch.tensor([1.0, 0.0]))
    assert torch.isfinite(out["pred"]).all()


def _recipes():
    return [(name, preset) for name in list_models() for preset in model_info(name).presets]


@pytest.mark.parametrize("name, preset", _recipes())
def test_every_model_under_every_preset_it_declares_builds_and_takes_an_optimizer_step(name, preset):
    """The preset's shared values with the model's recipe resolve into a valid config; at a CPU size (its patches
    keep their share of the side) the model builds from it and one optimizer step moves its weights."""
    from bonedist.data.augment import InputPipeline, TargetScale
    from bonedist.train.config import resolve_config
    from bonedist.train.losses import build_loss
    from bonedist.train.optim import build_optimizer

    options = {"pretrained": None} if model_info(name).pretrained else {}  # no downloads in tests
    cfg = resolve_config(name, "x", preset, model_options=options, input={"image_size": 48})
    assert cfg.input.image_size == 48 and cfg.options() is not None
    torch.manual_seed(0)
    model = create_model(name, cfg.input, **cfg.model_options).train()
    stage = cfg.stages[0][0] if cfg.stages else None
    model.task.enter_stage(model, stage)
    images = torch.randint(0, 256, (2, 1, 48, 48), dtype=torch.uint8)
    batch = {"image": images, "male": torch.tensor([1.0, 0.0]), "age": torch.tensor([60.0, 150.0])}
    inputs = InputPipeline(model.spec, cfg.augment_config()).model_batch(batch, step=0, scale=TargetScale(120, 40))
    optimizer = build_optimizer(cfg, model)
    assert optimizer.defaults["fused"] is True
    before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    loss, _ = model.task.loss(model(inputs.image, inputs.male), inputs.target, build_loss(cfg), stage)
    loss.backward()
    optimizer.step()
    after = [p.detach() for g in optimizer.param_groups for p in g["params"]]
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, after))


def test_a_preset_a_model_has_no_recipe_for_is_one_line():
    from bonedist.models import register_model, unregister_model
    from bonedist.train.config import resolve_config

    @register_model(recipes={"tiny": dict})
    def recipe_less(opts, in_chans):
        raise AssertionError("never built")

    try:
        with pytest.raises(BonedistError, match="model recipe_less has no recipe for preset 'paper'; its presets: "
                                                "tiny"):
            resolve_config("recipe_less", "x", "paper")
    finally:
        unregister_model("recipe_less")


def test_any_timm_architecture_is_a_model_by_name():
    from bonedist.train.config import resolve_config

    cfg = resolve_config("timm/regnety_002", "x", "scratch", input={"image_size": 48})
    model = create_model("timm/regnety_002", cfg.input, **cfg.model_options)
    assert model.spec.channels == 1 and not model.freeze_backbone  # the scratch recipe of a modern regressor
    out = model(torch.randn(2, 1, 48, 48), torch.tensor([1.0, 0.0]))
    assert out["pred"].shape == (2,) and "timm/regnety_002" not in list_models()  # made on demand, not listed
    with pytest.raises(BonedistError, match="timm has no architecture 'resnet51'"):
        create_model("timm/resnet51")
    with pytest.raises(BonedistError, match="no recipe for preset 'paper'"):
        resolve_config("timm/regnety_002", "x", "paper")


@pytest.mark.parametrize("arch", ["mobilenetv3_small_050", "lcnet_050", "hgnetv2_b0"])
def test_timm_architectures_with_a_layer_after_the_pooling_get_a_head_of_its_width(arch):
    """MobileNetV3, LCNet and HGNetV2 pool, then widen through a 1x1 conv (timm's head_hidden_size, not
    num_features): the sex-aware head takes that width (it took num_features and failed at the first batch)."""
    model = create_model(f"timm/{arch}", inputs={"image_size": 64})
    assert model.head[0].in_features == model.backbone.head_hidden_size + 32 != model.backbone.num_features + 32
    assert model(torch.randn(2, 1, 64, 64), torch.tensor([1.0, 0.0]))["pred"].shape == (2,)


def test_an_age_distribution_head_predicts_its_mean_and_trains_on_soft_labels(tmp_path):
    """--age-bins N: the prediction is the mean of a distribution over N bins fixed in z; the soft labels centre on
    the target; the loss adds their divergence (zero for a distribution equal to the soft label); the model exports
    to ONNX with the same prediction."""
    import numpy as np
    import onnxruntime as ort

    from bonedist.models.age_bins import SPAN_Z, distribution_loss, soft_labels
    from bonedist.serving.export import export_onnx
    from bonedist.train.config import resolve_config
    from bonedist.train.losses import L1

    cfg = resolve_config("cspnext_tiny", "x", "scratch", input={"image_size": 48}, model_options={"age_bins": 41})
    torch.manual_seed(0)
    model = create_model("cspnext_tiny", cfg.input, **cfg.model_options).eval()
    image, male = torch.randn(3, 1, 48, 48), torch.tensor([0.0, 1.0, 1.0])
    out = model(image, male)
    probs = out["age_logits"].softmax(-1)
    centers = torch.linspace(*SPAN_Z, 41)
    assert out["age_logits"].shape == (3, 41) and torch.allclose(out["pred"], (probs * centers).sum(-1), atol=1e-6)

    target = torch.tensor([-2.6, 0.0, 1.37])
    labels = soft_labels(target, 41)
    assert torch.allclose(labels.sum(-1), torch.ones(3)) and torch.allclose((labels * centers).sum(-1), target,
                                                                            atol=1e-4)
    assert float(distribution_loss(labels.clamp_min(1e-30).log(), target)) == pytest.approx(0.0, abs=1e-6)
    loss, parts = model.task.loss(out, target, L1())
    assert float(parts["loss_age_bins"]) > 0.5
    assert float(loss) == pytest.approx(float(L1()(out["pred"], target) + parts["loss_age_bins"]), rel=1e-6)
    loss.backward()
    assert model.head.layers[-1].weight.grad.abs().sum() > 0

    export_onnx(model, model.spec, tmp_path / "m.onnx")
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(["pred"], {"image": image.numpy(),
                                                                         "male": male.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(image, male)["pred"].numpy()).max() < 1e-4

    with pytest.raises(BonedistError, match="--age-bins 1: an age distribution needs at least 2 bins"):
        create_model("cspnext_tiny", cfg.input, **{**cfg.model_options, "age_bins": 1})

    # --age-sigma: the soft labels' width, which the model's task carries into the loss
    assert model.task.label_sigma_z == 0.2
    wide = create_model("cspnext_tiny", cfg.input, **{**cfg.model_options, "age_sigma": 0.5}).eval()
    assert wide.task.label_sigma_z == 0.5 and create_model("cspnext_s", cfg.input).task.label_sigma_z == 0.2
    spread = lambda p: ((p * centers ** 2).sum(-1) - (p * centers).sum(-1) ** 2).sqrt()  # noqa: E731
    assert torch.allclose(spread(soft_labels(target, 41, 0.5)), torch.full((3,), 0.5), atol=0.02)
    out = wide(image, male)
    _, parts = wide.task.loss(out, target, L1())
    expected = distribution_loss(out["age_logits"], target, 0.5)
    assert float(parts["loss_age_bins"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(expected) != pytest.approx(float(distribution_loss(out["age_logits"], target)), rel=1e-3)
    with pytest.raises(BonedistError, match="age.sigma"):
        create_model("cspnext_tiny", cfg.input, **{**cfg.model_options, "age_sigma": 0.0})
