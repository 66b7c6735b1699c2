"""Runs described by files: `--config FILE`, OUTPUT/config.yaml, `--print-config`, `--recipe
NAME|FILE`, and `--help` as a reference (fastseed/configfile.py, fastseed/cli.py)."""
from __future__ import annotations

import argparse
import re

import pytest
import torch
import yaml

from fastseed.checkpoint import read_checkpoint
from fastseed.cli import TRAIN_GROUPS, config_from_args, train_main, train_parser
from fastseed.config import Config
from fastseed.configfile import RECIPES_DIR, demo, read_settings, recipe_names, to_yaml
from fastseed.methods import METHODS, official, recipe
from fastseed.optim import peak_lr
from helpers import refusal


def test_help_is_grouped_and_every_flag_says_what_it_does_and_its_default():
    p = train_parser()
    titles = [g.title for g in p._action_groups]
    assert titles[2:] == [t for t, _ in TRAIN_GROUPS]  # after argparse's positional/options groups
    assert not [a for a in p._action_groups[1]._group_actions if a.dest != "help"]  # nothing ungrouped
    for act in p._actions:
        assert act.help and act.help != argparse.SUPPRESS, act.option_strings
        if act.dest not in ("help", "config", "print_config"):
            assert "(default" in act.help, act.option_strings
    text = p.format_help()
    assert "--queue-size" in text and "(default: auto)" in text and "(default: resnet18)" in text


def test_print_config_prints_what_a_file_reads_back(capsys):
    assert train_main(["--data", "x.beton", "--local-weight", "0.5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    settings = yaml.safe_load(printed)
    assert settings["local_weight"] == 0.5 and settings["method"] == "simreg" and settings["queue_size"] == "auto"
    assert set(settings) == set(Config.__dataclass_fields__)


def test_flags_win_over_the_file_which_wins_over_the_recipe(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("method: simreg\nbatch_size: 32\ncrop_scale: [0.3, 1]\nlr: 0.5\n")
    cfg = config_from_args(["--data", "x.beton", "--config", str(f), "--lr", "0.25"])
    assert (cfg.method, cfg.batch_size, cfg.crop_scale, cfg.lr) == ("simreg", 32, (0.3, 1.0), 0.25)
    assert cfg.optimizer == "lars"  # simreg's recipe under the file: the file names the method
    assert config_from_args(["--config", str(f)]).data == demo().data  # no data anywhere: the demo's


@pytest.mark.parametrize("text,needles", [
    ("bach_size: 32\n", ("unknown key 'bach_size'",)),
    ("batch_size: lots\n", ("batch_size: 'lots' is not an int",)),
    ("batch_size: 0\n", ("batch_size: 0 is out of range", ">= 1")),
    ("warmup_cap: 2\n", ("warmup_cap: 2.0 is out of range", "<= 1")),
    ("crop_scale: [0.2]\n", ("crop_scale",)),
    ("optimizer: adam\n", ("optimizer: 'adam' is not one of sgd, lars, adamw",)),
    ("queue_size: -4\n", ("queue_size",)),
    ("- a list\n", ("a config file is a mapping",)),
    ("a: [unclosed\n", ("not valid YAML",)),
])
def test_a_bad_file_is_one_line_naming_the_file_and_key_and_nothing_is_written(tmp_path, capsys, text, needles):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    out = tmp_path / "out"
    code = train_main(["--data", "x.beton", "--config", str(f), "--output", str(out)])
    refusal(code, capsys.readouterr().err, str(f), *needles)
    assert not out.exists()


def test_shipped_recipes_load_and_equal_the_methods_recipes():
    assert {"demo", "seed", "seed-official", "simreg", "simreg-official", "moco", "moco-official",
            "dense"} <= set(recipe_names())
    for name in recipe_names():
        read_settings(RECIPES_DIR / f"{name}.yaml")  # every shipped file passes the checks
    for method, cls in METHODS.items():
        plain = config_from_args(["--data", "x.beton", "--method", method])
        assert config_from_args(["--data", "x.beton", "--recipe", method]) == plain == recipe(method, data="x.beton")
        if cls.official is not None:
            text = (RECIPES_DIR / f"{method}-official.yaml").read_text()
            assert re.search(r"\b[\w-]+/[\w.-]+:$", text.splitlines()[0]), text  # names its repository
            via_name = config_from_args(["--data", "x.beton", "--recipe", "official", "--method", method])
            assert config_from_args(["--data", "x.beton", "--recipe", f"{method}-official"]) == via_name
            assert via_name == official(method, data="x.beton")
    # no --data: the demo's settings under the default method's recipe (SimReg's LARS at 11.2 x sqrt(128/256))
    assert demo().method == Config.method == "simreg"
    assert config_from_args([]) == recipe("simreg", demo())
    assert config_from_args([]).optimizer == "lars" and peak_lr(config_from_args([])) == pytest.approx(11.2 / 2 ** 0.5)
    # --method seed on the demo: SEED's base lr 0.4 at batch 128
    assert peak_lr(config_from_args(["--method", "seed"])) == pytest.approx(0.2)


def test_a_recipe_file_of_ones_own(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("method: seed\nqueue_size: 1024\nlocal_weight: 1\n")
    cfg = config_from_args(["--data", "x.beton", "--recipe", str(f)])
    assert (cfg.queue_size, cfg.local_weight) == (1024, 1.0)
    with pytest.raises(Exception, match="neither a recipe"):
        config_from_args(["--data", "x.beton", "--recipe", str(tmp_path / "missing.yaml")])


@pytest.mark.slow
def test_a_runs_config_yaml_reruns_it_bit_for_bit(fmnist, teacher_ckpt, tmp_path):
    """A run writes OUTPUT/config.yaml at its start; `--config` of it with another --output trains
    the same encoder, bit for bit, on the CPU."""
    data = fmnist("train", 256)
    first = tmp_path / "first"
    argv = ["--data", str(data), "-a", "resnet10t", "-k", "resnet10t", "--distill", str(teacher_ckpt), "--res", "32",
            "--teacher-res", "64", "-b", "32", "--epochs", "1", "--max-steps", "3", "--local-weight", "0.5", "--lr",
            "0.05", "--device", "cpu", "--compile", "off", "--workers", "2", "--no-progress", "--knn-every", "0",
            "--output", str(first)]
    assert train_main(argv) == 0
    written = read_settings(first / "config.yaml")
    assert written["local_weight"] == 0.5 and written["output"] == str(first)
    second = tmp_path / "second"
    assert train_main(["--config", str(first / "config.yaml"), "--output", str(second)]) == 0
    a, b = (read_checkpoint(p / "checkpoint_last.pt")["student"] for p in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert to_yaml(config_from_args(["--config", str(second / "config.yaml")])) == \
        (second / "config.yaml").read_text().split("\n", 1)[1]
