"""A run as a file: ``bonedist train --print-config`` prints the resolved configuration, ``--config`` reads it (or a
run's config.json) back to the same configuration, flags override the file, and a misspelled key is one line."""

from __future__ import annotations

import json
import time

import pytest

from bonedist import BonedistError
from bonedist.models import list_models, model_info
from bonedist.train.cli import add_train_arguments, config_from_args
from bonedist.train.config import config_yaml, resolve_config
from tests.conftest import run_cli

RECIPES = [(name, preset) for name in list_models() for preset in model_info(name).presets]


def plain(cfg) -> dict:
    """A configuration's values as its config.json holds them (tuples as lists)."""
    return json.loads(json.dumps(cfg.to_dict()))


def _parse(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("name, preset", RECIPES)
def test_the_printed_configuration_reads_back_to_itself(tmp_path, name, preset):
    cfg = resolve_config(name, "shards/rsna", preset)
    (tmp_path / "run.yaml").write_text(config_yaml(cfg))
    assert plain(config_from_args(_parse("--config", str(tmp_path / "run.yaml")))) == plain(cfg)
    # a run's config.json (the resolved settings beside it) reads back the same way
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "resolved": {"precision": "fp32"}}))
    assert plain(config_from_args(_parse("--config", str(tmp_path / "config.json")))) == plain(cfg)


def test_flags_override_the_file_and_the_file_overrides_the_recipe(tmp_path):
    (tmp_path / "run.yaml").write_text("model: cspnext_tiny\nshards: shards/rsna\npreset: scratch\nlr: 0.005\n"
                                       "epochs: 9\ninput: {image_size: 100}\n")
    cfg = config_from_args(_parse("--config", str(tmp_path / "run.yaml"), "--epochs", "4", "--seed", "7"))
    recipe = resolve_config("cspnext_tiny", "shards/rsna", "scratch")
    assert (cfg.lr, cfg.epochs, cfg.seed, cfg.input.image_size) == (0.005, 4, 7, 100)
    assert cfg.input.hand_mask == recipe.input.hand_mask and cfg.batch_size == recipe.batch_size
    (tmp_path / "flat.yaml").write_text("model: cspnext_tiny\nshards: s\npreset: scratch\nimage-size: 80\n")
    assert config_from_args(_parse("--config", str(tmp_path / "flat.yaml"))).input.image_size == 80  # flag names
    staged = resolve_config("agcnn", "shards/rsna", "improved")
    (tmp_path / "agcnn.yaml").write_text(config_yaml(staged))
    rescaled = config_from_args(_parse("--config", str(tmp_path / "agcnn.yaml"), "--epochs", "6"))
    assert rescaled.epochs == 6 and sum(e for _, e in rescaled.stages) == 6


@pytest.mark.parametrize("text, message", [("model: xception\nshards: s\nlearning_rate: 0.1\n", "did you mean 'lr'"),
                                           ("model: xception\nshards: s\nbatch-sise: 8\n", "'batch_size'"),
                                           ("[1, 2]\n", "mapping"), ("model: xception\nshards: s\ninput: 3\n",
                                                                     "'input' must be a mapping"),
                                           ("model: xception\nshards: s\nlr: -1\n", "--lr")])
def test_a_bad_config_file_is_one_line(tmp_path, text, message):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(BonedistError, match=message):
        config_from_args(_parse("--config", str(tmp_path / "run.yaml")))


def test_print_config_reads_no_data_and_makes_no_folder(tmp_path):
    started = time.perf_counter()
    result = run_cli("train", "--model", "cspnext_tiny", "--preset", "scratch", "--shards", str(tmp_path / "none"),
                     "--print-config", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model: cspnext_tiny" in result.stdout and "preset: scratch" in result.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "none").exists()
    (tmp_path / "run.yaml").write_text(result.stdout)
    again = run_cli("train", "--config", str(tmp_path / "run.yaml"), "--print-config", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == result.stdout
    bad = run_cli("train", "--config", str(tmp_path / "run.yaml"), "--lrr", "1", cwd=tmp_path)
    assert bad.returncode == 2 and "--lrr" in bad.stderr
    (tmp_path / "typo.yaml").write_text(result.stdout.replace("warmup_epochs:", "warmup_epoch:"))
    typo = run_cli("train", "--config", str(tmp_path / "typo.yaml"), "--print-config", cwd=tmp_path)
    assert typo.returncode == 2 and "unknown option 'warmup_epoch'; did you mean 'warmup_epochs'" in typo.stderr
    assert "Traceback" not in typo.stderr and time.perf_counter() - started < 120
