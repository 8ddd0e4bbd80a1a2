"""The config's typed sections: one field per config key, frozen, built without touching the
ConfigDict; the resolved record says what ran without writing it back."""

from __future__ import annotations

import dataclasses

import pytest

from gpt2_jax.config import base as config_lib
from gpt2_jax.config import plan as plan_lib
from gpt2_jax.config import sections as sections_lib
from gpt2_jax.model import config as gpt2_config

from .helpers import tiny_config


def _fields(obj) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def test_every_config_key_is_a_field_of_its_section():
    cfg = config_lib.base_config()
    s = config_lib.sections(cfg)
    for name in ("data", "optim", "train", "eval", "mesh", "distributed"):
        assert _fields(getattr(s, name)) == set(cfg[name].keys()), name
    assert _fields(s.train.wandb) == set(cfg.train.wandb.keys())


def test_sections_are_frozen_and_typed():
    s = config_lib.sections(tiny_config(**{"train.report_to": "tensorboard,wandb"}))
    assert s.train.report_to == ("tensorboard", "wandb")
    assert isinstance(s.train.wandb, sections_lib.WandbConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.train.steps = 1


def test_the_plan_records_the_resolved_shape_without_writing_it_back(tmp_path):
    cfg = tiny_config(**{"train.fresh": "true"})
    before = config_lib.to_dict(cfg)
    plan = plan_lib.training(cfg, tmp_path / "run", 1)
    assert config_lib.to_dict(cfg) == before  # nothing written back
    assert plan.record["model"]["n_layer"] == plan.model.n_layer == cfg.model.n_layer
    assert plan.record["train"]["fresh"] is False and plan.record["train"]["resume_step"] == -1
    assert plan.train.fresh is True  # this run still moves the old one aside
    assert isinstance(plan.model, gpt2_config.GPT2Config)


def test_a_section_error_names_its_key():
    with pytest.raises(config_lib.ConfigError, match="optim.schedule"):
        config_lib.validate(tiny_config(**{"optim.schedule": "cosin"}), 1)
    with pytest.raises(config_lib.ConfigError, match="train.nonfinite"):
        config_lib.validate(tiny_config(**{"train.nonfinite": "ignore"}), 1)
