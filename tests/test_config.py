"""Config files, overrides and validation: bad input names the key, before compiling."""

import pytest

from gpt2_jax.config import base as config_lib

from .helpers import ROOT, run_cli

CONFIGS = [
    ("quickstart.py", None),
    ("quickstart.py", "tiny"),
    ("gpt2_wikitext2.py", None),
    ("gpt2_wikitext2.py", "local"),
    ("gpt2_124m.py", None),
    ("gpt2_124m.py", "owt"),
    ("gpt2_124m.py", "local"),
]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_each_config_loads_and_validates(name, arg, tmp_path):
    spec = str(ROOT / "configs" / name) + (f":{arg}" if arg else "")
    cfg = config_lib.load_config_file(spec)
    if cfg.data.train_files:  # variants that name local files the user supplies
        (tmp_path / "t.txt").write_text("some text\n")
        config_lib.apply_overrides(
            cfg,
            {
                "data.train_files": str(tmp_path / "t.txt"),
                "data.validation_files": str(tmp_path / "t.txt"),
            },
        )
    mcfg = config_lib.validate(cfg, num_devices=1)
    assert mcfg.n_layer > 0 and cfg.data.block_size <= mcfg.n_positions


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown variant"):
        config_lib.load_config_file(str(ROOT / "configs" / "quickstart.py:nope"))


def _quick():
    return config_lib.load_config_file(str(ROOT / "configs" / "quickstart.py"))


def test_overrides_parse_to_the_existing_type():
    cfg = _quick()
    config_lib.apply_overrides(
        cfg,
        {
            "train.steps": "7",
            "optim.learning_rate": "1e-4",
            "model.scan_layers": "false",
            "data.dataset": "x",
            "eval.splits": "validation,train",
        },
    )
    assert cfg.train.steps == 7 and cfg.optim.learning_rate == 1e-4
    assert cfg.model.scan_layers is False and cfg.data.dataset == "x"
    assert tuple(cfg.eval.splits) == ("validation", "train")


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"train.stepz": "3"}, "unknown config key 'train.stepz'"),
        ({"nope.x": "3"}, "unknown config key 'nope.x'"),
        ({"train.steps": "many"}, "train.steps='many': expected an integer"),
        ({"model.scan_layers": "maybe"}, "expected true or false"),
        ({"train": "3"}, "is a group"),
    ],
)
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.apply_overrides(_quick(), overrides)


@pytest.mark.parametrize(
    "overrides,devices,match",
    [
        ({"data.block_size": "512"}, 1, "data.block_size: 512 must be in"),
        ({"model.n_head": "3"}, 1, "n_embd=128 is not divisible by model.n_head=3"),
        ({"train.batch_size": "6"}, 4, "not divisible by the 4 devices"),
        ({"optim.accumulation_steps": "3"}, 1, "optim.accumulation_steps"),
        ({"optim.schedule": "exp"}, 1, "optim.schedule"),
        ({"init_from": "gpt2"}, 1, "init_from"),
        ({"mesh.fsdp": "3"}, 4, "mesh.data=-1 x mesh.fsdp=3"),
        ({"model.dtype": "float8"}, 1, "model.dtype"),
    ],
)
def test_validation_names_the_key(overrides, devices, match):
    cfg = _quick()
    config_lib.apply_overrides(cfg, overrides)
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(cfg, num_devices=devices)


def test_split_override_args():
    rest, ov = config_lib.split_override_args(
        ["--workdir=x", "--config.train.steps=3", "--config.data.dataset", "wikitext"]
    )
    assert rest == ["--workdir=x"] and ov == {"train.steps": "3", "data.dataset": "wikitext"}


def test_cli_bad_config_exits_nonzero_naming_the_key(tmp_path):
    out = run_cli(
        [
            "train",
            "--config=configs/quickstart.py:tiny",
            f"--workdir={tmp_path}/run",
            "--config.data.block_size=64",
        ],
        timeout=120,
    )
    assert out.returncode == 2
    assert "data.block_size: 64 must be in [2, model.n_positions=32]" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()  # failed before creating anything


def test_cli_batch_not_divisible_by_devices(tmp_path):
    out = run_cli(
        [
            "train",
            "--config=configs/quickstart.py:tiny",
            f"--workdir={tmp_path}/run",
            "--config.train.batch_size=3",
        ],
        devices=2,
        timeout=120,
    )
    assert out.returncode == 2 and "not divisible by the 2 devices" in out.stderr
