"""Command-line flags of ``bonedist train`` / ``python -m bonedist.train`` / ``accelerate launch -m bonedist.train``."""

from __future__ import annotations

import argparse
import dataclasses
import json

from bonedist import BonedistError, run_command
from bonedist.train.config import DATA, OPT

# Options of the model's factory, as flags (any other one: --model-opt KEY=VALUE).
MODEL_FLAGS = {
    "pretrained": dict(help="none, default (ImageNet tag), a timm tag, a weights file or a `bonedist weights fetch` "
                            "folder"),
    "freeze_backbone": dict(flag="--freeze", action=argparse.BooleanOptionalAction, help="freeze the backbone"),
    "image_size": dict(type=int, help="radiograph side the model sees (patches scale with it)"),
    "patch_size": dict(type=int, help="patch models: patch side"),
    "num_patches": dict(type=int, help="patch models: patches per radiograph in training"),
    "eval_grid": dict(type=int, help="patch models: G for the G x G evaluation grid"),
    "hand_mask": dict(action=argparse.BooleanOptionalAction,
                      help="zero everything outside the hand (markers, letters) before the model sees it"),
    "contrast": dict(choices=["none", "stretch"],
                     help="stretch: each radiograph's 1st-99th percentile range to the full range first"),
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """``bonedist train``'s flags: generated from ``TrainConfig``'s fields (help, choices, groups), plus the model's
    options and the few flags that are spelled differently from their field."""
    from bonedist.train.config import TrainConfig, flag_of, list_presets

    p.add_argument("--model", required=True, help="a model of `bonedist models` (inception_v3, xception, ...)")
    p.add_argument("--shards", required=True, help="a folder written by `bonedist pack`")
    p.add_argument("--preset", default="paper",
                   help=f"starting values, one of {', '.join(list_presets())}: paper (the study as written), improved "
                        f"(ImageNet backbones fine-tuned, hand-masked, longer), scratch (no ImageNet weights, any "
                        f"image size), tiny (CPU tests and demo); every flag below overrides the preset")
    groups: dict[str, argparse._ArgumentGroup] = {}
    model = p.add_argument_group("model")
    for key, spec in MODEL_FLAGS.items():
        spec = dict(spec)
        model.add_argument(spec.pop("flag", f"--{key.replace('_', '-')}"), dest=key, default=None, **spec)
    model.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                       help="any other model option, e.g. fusion_grad=joint, reduction=max, threshold=0.7")
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli"):
            continue
        group = groups.setdefault(meta["group"], p.add_argument_group(meta["group"]) if meta["group"] else p)
        kind = str(f.type)
        if kind.startswith("bool"):
            group.add_argument(flag_of(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=meta["help"])
        else:
            convert = int if kind.startswith("int") else float if kind.startswith("float") else str
            group.add_argument(flag_of(f), dest=f.name, type=convert, default=None, choices=meta["choices"],
                               help=meta["help"])
    groups[OPT].add_argument("--stages", default=None, metavar="global:E,local:E,fusion:E",
                             help="staged training of a branched model, epochs per stage; their sum is the run's "
                                  "epochs")
    groups[DATA].add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                              help="training augmentation (the preset's); --no-augment turns it off")


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
    from bonedist.train.config import TrainConfig, resolve_config

    model_cfg = {}
    for item in args.model_opt:
        if "=" not in item:
            raise BonedistError(f"--model-opt {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        model_cfg[key.strip()] = _parse_value(value)
    model_cfg.update({key: getattr(args, key) for key in MODEL_FLAGS if getattr(args, key) is not None})
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli")}
    if args.stages:
        overrides["stages"] = parse_stages(args.stages)
        if overrides["epochs"] is None:
            overrides["epochs"] = sum(e for _, e in overrides["stages"])
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
