"""Command-line flags of ``bonedist train`` / ``python -m bonedist.train`` / ``accelerate launch -m bonedist.train``.

Every flag is generated from a dataclass field (help, choices, bounds): ``TrainConfig``'s, ``InputConfig``'s and
each registered model's options (a flag a model lacks is refused for it in one line).
"""

from __future__ import annotations

import argparse
import dataclasses

from bonedist import BonedistError, run_command
from bonedist.options import add_arguments, convert, flag_of, given, parse_value
from bonedist.spec import INPUT, InputConfig
from bonedist.train.config import DATA, OPT, TrainConfig


def _model_option_classes() -> list[type]:
    from bonedist.models import list_models, model_info

    classes = []
    for name in list_models():
        cls = model_info(name).options
        if cls not in classes:
            classes.append(cls)
    return classes


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """``bonedist train``'s flags: the run's, the input's and the models' options, plus the few flags that are
    spelled differently from their field."""
    from bonedist.train.presets import preset_help

    p.add_argument("--model", default=None, help="a model of `bonedist models` (inception_v3, xception, ...); "
                                                  "required unless --config names it")
    p.add_argument("--shards", default=None, help="a folder written by `bonedist pack`; required unless --config "
                                                  "names it")
    p.add_argument("--preset", default=None,
                   help=f"starting values: {preset_help()} (default paper); every flag below overrides the preset")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a run written down: YAML or JSON with the fields --print-config prints (a run's config.json "
                        "too); the preset and the model's recipe first, then the file, then the flags given")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved configuration as YAML and exit (no data read, no folder made)")
    model = p.add_argument_group("model (the options of the chosen model; `bonedist models --details`)")
    seen: set[str] = set()
    for cls in _model_option_classes():  # one flag per name; its text is read by the chosen model's own type
        add_arguments(model, cls, seen, raw=True)
    model.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                       help="a model option by name, e.g. fusion_grad=joint, reduction=max, threshold=0.7")
    add_arguments(p.add_argument_group(INPUT), InputConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli"):
            groups.setdefault(f.metadata["group"], p.add_argument_group(f.metadata["group"]) if f.metadata["group"]
                              else p)
    for name, group in groups.items():
        add_arguments(group, TrainConfig, where=lambda f, name=name: f.metadata["group"] == name)
    groups[OPT].add_argument("--stages", default=None, metavar="global:E,local:E,fusion:E",
                             help="staged training of a branched model, epochs per stage; their sum is the run's "
                                  "epochs")
    groups[DATA].add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                              help="training augmentation (the preset's); --no-augment turns it off")


def parse_stages(text: str) -> list[list]:
    """'global:15,local:10,fusion:5' → [['global', 15], ['local', 10], ['fusion', 5]]."""
    stages = []
    for item in text.split(","):
        name, _, epochs = item.partition(":")
        if not epochs.strip().isdigit():
            raise BonedistError(f"--stages {text!r}: expected NAME:EPOCHS pairs such as global:15,local:10,fusion:5")
        stages.append([name.strip(), int(epochs)])
    return stages


def model_options_from_args(args: argparse.Namespace, model: str | None = None) -> dict:
    """The model options given as flags or ``--model-opt``; a flag the chosen model lacks is one line."""
    from bonedist.models import model_info

    model = model or args.model
    info = model_info(model)
    options = {}
    for item in args.model_opt:
        if "=" not in item:
            raise BonedistError(f"--model-opt {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        options[key.strip()] = parse_value(value)
    own = {f.name: f for f in dataclasses.fields(info.options)}
    for cls in _model_option_classes():
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name, None)
            if value is None or f.name in options:
                continue
            if f.name not in own:
                raise BonedistError(f"{flag_of(f)}: {model} has no such option (its options: "
                                    f"{', '.join(info.option_names) or 'none'})")
            options[f.name] = convert(own[f.name], value)
    return options


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset's values, the model's recipe, the ``--config`` file's values, then the flags given."""
    from bonedist.train.config import read_config_file, resolve_config

    file = read_config_file(args.config) if args.config else {}
    model, shards = args.model or file.pop("model", None), args.shards or file.pop("shards", None)
    preset = args.preset or file.pop("preset", None) or "paper"
    for key in ("model", "shards", "preset"):
        file.pop(key, None)
    if not model or not shards:
        raise BonedistError("give --model and --shards (or a --config file that names them)")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli")}
    if args.stages:
        overrides["stages"] = parse_stages(args.stages)
        if overrides["epochs"] is None:
            overrides["epochs"] = sum(e for _, e in overrides["stages"])
    elif overrides["epochs"] is not None and "stages" in file:  # --epochs rescales the file's stages
        from bonedist.train.config import scale_stages

        overrides["stages"] = scale_stages(file["stages"], overrides["epochs"]) if file["stages"] else []
    if args.augment is False:
        overrides["augment"] = {"enabled": False}
    return resolve_config(model, shards, preset, file=file, model_options=model_options_from_args(args, model),
                          input=given(args, InputConfig), **overrides)


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        from bonedist.train.config import config_yaml

        print(config_yaml(cfg), end="")
        return 0
    from bonedist.train.engine import Trainer

    return Trainer(cfg).fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bonedist.train", description=__doc__)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("train", lambda: run_train(args),
                       resume="run again with --resume auto to continue from the last checkpoint")
