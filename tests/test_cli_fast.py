"""A CLI that answers at once: ``--help`` of every command, ``bonedist models`` and ``train --print-config`` of every
model x preset import none of the heavy libraries (torch, timm, kornia, ...), which take seconds to load on 2 cores.
Checked in one fresh interpreter per case, by what it imported, not by a clock; and timed as a user sees it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bonedist.cli import build_parser
from bonedist.models import list_models, model_info

HEAVY = ("torch", "timm", "kornia", "wandb", "webdataset", "pandas", "cv2", "accelerate", "scipy", "optuna",
         "pydicom", "matplotlib")

PROBE = """
import contextlib, io, json, sys
from bonedist.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(json.loads(sys.argv[1]))
    except SystemExit as exc:
        code = exc.code
heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy, "chars": len(out.getvalue())}))
"""


def probe(*argv: str) -> dict:
    import json

    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def commands() -> list[tuple[str, ...]]:
    """Every command and subcommand, as argv prefixes."""
    import argparse

    found = []
    for name, parser in build_parser()._subparsers._group_actions[0].choices.items():
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        found += [(name, child) for child in subs[0].choices] if subs else [(name,)]
    return found


@pytest.mark.parametrize("argv", [(), *commands()], ids=lambda argv: " ".join(argv) or "bonedist")
def test_help_imports_nothing_heavy(argv):
    answer = probe(*argv, "--help")
    assert answer["code"] == 0 and answer["chars"] > 100 and answer["heavy"] == [], answer


RECIPES = [(name, preset) for name in list_models() for preset in model_info(name).presets]


@pytest.mark.parametrize("name, preset", RECIPES)
def test_print_config_imports_nothing_heavy(name, preset, tmp_path):
    answer = probe("train", "--model", name, "--preset", preset, "--shards", str(tmp_path / "none"), "--print-config")
    assert answer["code"] == 0 and answer["heavy"] == [], answer


@pytest.mark.parametrize("argv", [("models",), ("models", "--details"), ("models", "--preset", "paper", "--shares"),
                                  ("models", "--runs", "--preset", "scratch", "--replicas", "2")])
def test_listing_models_imports_nothing_heavy(argv):
    answer = probe(*argv)
    assert answer["code"] == 0 and answer["chars"] > 20 and answer["heavy"] == [], answer


def test_the_cli_answers_within_a_second_and_a_half():
    for argv in (["--help"], ["train", "--help"], ["models"]):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "bonedist", *argv], capture_output=True, text=True, timeout=60)
        took = time.perf_counter() - started
        assert result.returncode == 0 and took < 1.5, (argv, took, result.stderr[-500:])


def _visible_flags() -> dict[str, set[str]]:
    """Every command's flags as its --help shows them (deprecated aliases are hidden)."""
    import argparse

    flags: dict[str, set[str]] = {}

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child, sub in action.choices.items():
                    walk(sub, f"{name} {child}".strip())
            elif action.help != argparse.SUPPRESS:
                flags.setdefault(name, set()).update(s for s in action.option_strings if s.startswith("--"))

    walk(build_parser(), "")
    return flags


def test_one_spelling_per_idea_and_the_old_ones_still_work(capsys):
    flags = _visible_flags()
    for command, names in flags.items():
        assert not names & {"--batch", "--size"}, (command, sorted(names & {"--batch", "--size"}))
    assert {"--batch-size", "--image-size"} <= flags["bench train-step"] and "--image-size" in flags["pack"]
    args = build_parser().parse_args(["bench", "train-step", "--model", "resnet18", "--batch", "4", "--size", "64"])
    assert (args.batch_size, args.image_size) == (4, 64)
    err = capsys.readouterr().err
    assert "--batch is deprecated; use --batch-size" in err and "--size is deprecated; use --image-size" in err
    args = build_parser().parse_args(["pack", "data", "--size", "64"])
    assert args.size == 64 and "use --image-size" in capsys.readouterr().err


def test_help_states_each_default_from_its_field():
    from bonedist.commands import PredictOptions
    from bonedist.data.options import PackOptions

    parser = build_parser()
    text = {name: parser._subparsers._group_actions[0].choices[name].format_help().replace("\n", " ")
            for name in ("pack", "predict")}
    assert f"(default {PackOptions().size})" in " ".join(text["pack"].split())
    assert f"(default {PredictOptions().runs})" in " ".join(text["predict"].split())


def test_each_models_options_are_read_with_its_own_types():
    import argparse

    from bonedist import BonedistError
    from bonedist.train.cli import add_train_arguments, model_options_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    parse = lambda *argv: model_options_from_args(parser.parse_args(["--model", "agcnn", *argv]))  # noqa: E731
    assert parse("--threshold", "0.7") == {"threshold": 0.7} and parse("--threshold", "otsu") == {"threshold": "otsu"}
    assert parse("--drop-rate", "0.25") == {"drop_rate": 0.25}
    with pytest.raises(BonedistError, match="--drop-rate: expected a float, got 'abc'"):
        parse("--drop-rate", "abc")
    with pytest.raises(BonedistError, match="--head-width: agcnn has no such option"):
        parse("--head-width", "8")
    assert model_options_from_args(parser.parse_args(["--model", "cspnext_tiny", "--head-width", "8"])) == \
        {"head_width": 8}


def test_options_of_one_name_agree_on_being_a_switch():
    """One flag serves every model's option of that name: a switch in one model and a value in another could not
    share it."""
    import dataclasses

    kinds: dict[str, set[bool]] = {}
    for name in list_models():
        for f in dataclasses.fields(model_info(name).options):
            kinds.setdefault(f.name, set()).add(str(f.type).startswith("bool"))
    assert all(len(k) == 1 for k in kinds.values()), {n: k for n, k in kinds.items() if len(k) > 1}


def test_a_closed_pipe_ends_the_listing_quietly():
    result = subprocess.run(f"{sys.executable} -m bonedist models --preset tiny | head -1", shell=True,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == list_models("tiny")[0] and result.stderr == "", result.stderr[-1000:]


def test_a_presets_default_list_lives_in_the_preset():
    from bonedist.models import default_roster
    from bonedist.train.presets import DEFAULT_MODELS

    assert default_roster("scratch") == {m: (1.0, 1) for m in DEFAULT_MODELS["scratch"]}
    assert list(default_roster("tiny")) == list_models("tiny")  # no list of its own: every model with a recipe
    assert not hasattr(model_info("cspnext_tiny"), "roster")
