"""A misspelt config key or command-line flag is answered with the one meant, exit 2."""

import pytest

from gpt2_jax.cli import main as cli
from gpt2_jax.config import base as config_lib

from .conftest import ROOT

QUICKSTART = str(ROOT / "configs" / "quickstart.py")


@pytest.mark.parametrize(
    "typo, meant",
    [
        ("train.step", "train.steps"),
        ("optim.learning_rat", "optim.learning_rate"),
        ("model.n_embed", "model.n_embd"),
        ("data.blocksize", "data.block_size"),
        ("trian.steps", "train.steps"),  # the section misspelt
        ("train.learning_rate", "optim.learning_rate"),  # the right key in the wrong section
        ("data.validation_split", "data.validation_split_percentage"),  # cut short
    ],
)
def test_misspelt_config_key_names_the_intended_key(typo, meant):
    cfg = config_lib.load_config_file(QUICKSTART)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.apply_overrides(cfg, {typo: "1"})
    assert str(e.value) == f"unknown config key {typo!r}: did you mean {meant!r}?"


def test_no_close_key_lists_the_section_instead():
    cfg = config_lib.load_config_file(QUICKSTART)
    with pytest.raises(config_lib.ConfigError, match=r"'optim.lr' \(keys under optim: \[.*"):
        config_lib.apply_overrides(cfg, {"optim.lr": "1"})  # 'optim.b2' is no answer
    with pytest.raises(config_lib.ConfigError, match="train.steps is a value, not a group"):
        config_lib.apply_overrides(cfg, {"train.steps.x": "1"})


def test_cli_misspelt_config_key_is_one_line_exit_2(capsys):
    argv = [
        "train",
        f"--config={QUICKSTART}",
        "--workdir=/nonexistent/never",
        "--config.train.step=5",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "gpt2-jax train: error: unknown config key 'train.step': did you mean 'train.steps'?"
    )


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["generate", "--workdir=x", "--promt=hi"], "unknown flag --promt: did you mean --prompt?"),
        (["generate", "--workdir=x", "--top-p", "0.9"], "did you mean --top_p?"),
        (["plot", "run", "--ouy=x.png"], "unknown flag --ouy: did you mean --out?"),
        (["train", "--workdir=x", "--train.steps=5"], "did you mean --config.train.steps?"),
        (["eval", "--workdir=x", "stray"], "unexpected argument 'stray'"),
    ],
)
def test_unknown_flag_names_the_closest_flag(argv, hint, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gpt2-jax {argv[0]}: error: ") and hint in err and "\n" not in err
