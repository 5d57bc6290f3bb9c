"""Command-line flags of ``bonedist train`` / ``python -m bonedist.train`` / ``accelerate launch -m bonedist.train``."""

from __future__ import annotations

import argparse
import json

from bonedist import BonedistError, run_command


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="inception_v3, xception, resnet50_patch or agcnn")
    p.add_argument("--shards", required=True, help="a folder written by `bonedist pack`")
    p.add_argument("--preset", default="paper",
                   help="paper (the study as written), improved (ImageNet backbones fine-tuned, hand-masked, longer; "
                        "see README), scratch (no ImageNet weights, any image size), tiny (CPU tests and demo)")
    p.add_argument("--experiment", default="default", help="runs/EXPERIMENT/MODEL; also the W&B group")
    p.add_argument("--runs-dir", default="runs")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained", default=None,
                   help="none, default (ImageNet tag), a timm tag, a weights file or a `bonedist weights fetch` folder")
    g.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=None, help="freeze the backbone")
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--patch-size", type=int, default=None)
    g.add_argument("--num-patches", type=int, default=None)
    g.add_argument("--eval-grid", type=int, default=None, help="patch models: G for the G x G evaluation grid")
    g.add_argument("--hand-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="zero everything outside the hand (markers, letters) before the model sees it")
    g.add_argument("--contrast", default=None, choices=["none", "stretch"],
                   help="stretch: each radiograph's 1st-99th percentile range to the full range first")
    g.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other model option, e.g. fusion_grad=joint, reduction=max, threshold=0.7")
    g = p.add_argument_group("optimisation")
    for flag, kind in (("--epochs", int), ("--batch-size", int), ("--grad-accum", int), ("--lr", float),
                       ("--backbone-lr", float), ("--weight-decay", float), ("--warmup-epochs", float),
                       ("--early-stopping", int), ("--clip-grad", float), ("--ema", float),
                       ("--huber-delta", float), ("--recalibrate-bn", int)):
        g.add_argument(flag, type=kind, default=None)
    g.add_argument("--optimizer", default=None, choices=["adam", "adamw"])
    g.add_argument("--scheduler", default=None, choices=["plateau", "cosine", "constant"])
    g.add_argument("--loss", default=None, choices=["mse", "l1", "huber"])
    g.add_argument("--stages", default=None, metavar="global:E,local:E,fusion:E",
                   help="agcnn: staged training (Guan et al.), epochs per stage; their sum is the run's epochs")
    g = p.add_argument_group("validation")
    g.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average each image with its mirror (also the default of evaluate/predict for this run)")
    g.add_argument("--patch-aggregate", default=None, choices=["mean", "median"],
                   help="patch models: how the evaluation grid's predictions become one")
    g = p.add_argument_group("data")
    g.add_argument("--data-mode", default=None, choices=["auto", "stream", "cache"])
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (stream mode)")
    g.add_argument("--cache-share", type=float, default=None, help="share of free device memory auto may cache in")
    g.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                   help="re-sample to uniform age bins x sex (the paper; default on)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--steps-per-epoch", type=int, default=None, help="cap on batches per epoch")
    g.add_argument("--time-budget-min", type=float, default=None,
                   help="wall-clock minutes for the run: training stops (and the cosine anneals) on time; staged "
                        "agcnn gives each stage its share")
    g.add_argument("--eval-batch-size", type=int, default=None)
    g = p.add_argument_group("engine")
    g.add_argument("--precision", default=None, choices=["auto", "bf16", "fp32"])
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--checkpoint-every", type=int, default=None, help="optimizer steps between checkpoints")
    g.add_argument("--keep-last", type=int, default=None)
    g.add_argument("--resume", default=None, help="auto (default), never, or a checkpoint folder")
    g.add_argument("--wandb", default=None, choices=["auto", "online", "offline", "off"])
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--log-every", type=int, default=None, help="optimizer steps between step-level log records")
    g.add_argument("--sync-every", type=int, default=None,
                   help="optimizer steps between the ranks' agreement on signals, time budget and a non-finite loss")


def _parse_value(text: str):
    """A literal option value: JSON numbers/booleans/null, else the string itself (never evaluated as code)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_stages(text: str) -> list[list]:
    """'global:15,local:10,fusion:5' → [['global', 15], ['local', 10], ['fusion', 5]]."""
    stages = []
    for item in text.split(","):
        name, _, epochs = item.partition(":")
        if not epochs.strip().isdigit():
            raise BonedistError(f"--stages {text!r}: expected NAME:EPOCHS pairs such as global:15,local:10,fusion:5")
        stages.append([name.strip(), int(epochs)])
    return stages


def config_from_args(args: argparse.Namespace):
    from bonedist.train.config import resolve_config

    model_cfg = {}
    for item in args.model_opt:
        if "=" not in item:
            raise BonedistError(f"--model-opt {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        model_cfg[key.strip()] = _parse_value(value)
    for flag, key in (("pretrained", "pretrained"), ("freeze", "freeze_backbone"), ("image_size", "image_size"),
                      ("patch_size", "patch_size"), ("num_patches", "num_patches"), ("eval_grid", "eval_grid"),
                      ("hand_mask", "hand_mask"), ("contrast", "contrast")):
        if getattr(args, flag) is not None:
            model_cfg[key] = getattr(args, flag)
    overrides = {k: getattr(args, k) for k in (
        "experiment", "runs_dir", "epochs", "batch_size", "grad_accum", "lr", "backbone_lr", "weight_decay",
        "warmup_epochs", "early_stopping", "clip_grad", "ema", "optimizer", "scheduler", "loss", "data_mode",
        "workers", "cache_share", "steps_per_epoch", "eval_batch_size", "precision", "channels_last", "compile",
        "sync_bn", "seed", "checkpoint_every", "keep_last", "resume", "wandb", "wandb_project", "log_every",
        "huber_delta", "tta_flip", "patch_aggregate", "time_budget_min", "recalibrate_bn", "sync_every")}
    if args.stages:
        overrides["stages"] = parse_stages(args.stages)
        overrides.setdefault("epochs", None)
        if overrides["epochs"] is None:
            overrides["epochs"] = sum(e for _, e in overrides["stages"])
    if args.balance is not None:
        overrides["balanced"] = args.balance
    if args.augment is False:
        overrides["augment"] = {"enabled": False}
    return resolve_config(args.model, args.shards, args.preset, model_cfg=model_cfg, **overrides)


def run_train(args: argparse.Namespace) -> int:
    from bonedist.train.engine import Trainer

    cfg = config_from_args(args)
    return Trainer(cfg).fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bonedist.train", description=__doc__)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("train", lambda: run_train(args),
                       resume="run again with --resume auto to continue from the last checkpoint")
