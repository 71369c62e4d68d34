"""Typed config: YAML, --set overrides, strict keys and types, presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from labelrefine.config import RunConfig, config_hash, dump_yaml, load_config
from labelrefine.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_and_overrides():
    cfg = load_config(None, ["refine.threshold=0.8", "refine.first_stages=[1, 2]", "data.spec=csv:a.csv,label=worse",
                             "data.noise=column:worse", "ssl.cache=false", "optim.lr=1"])
    assert cfg.refine.threshold == 0.8
    assert cfg.refine.first_stages == [1, 2]
    assert cfg.data.spec == "csv:a.csv,label=worse"
    assert cfg.data.noise == "column:worse"
    assert cfg.ssl.cache is False
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads this as a string


def test_yaml_exponent_without_dot(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 2e-2\n")
    assert load_config(path).optim.lr == 0.02


def test_yaml_booleans_are_only_true_and_false(tmp_path):
    # YAML 1.1 would read `off` as False, making `amp: off` a type error.
    assert load_config(None, ["amp=off"]).amp == "off"
    path = tmp_path / "c.yaml"
    path.write_text("amp: off\nssl:\n  cache: False\nchannels_last: TRUE\n")
    cfg = load_config(path)
    assert (cfg.amp, cfg.ssl.cache, cfg.channels_last) == ("off", False, True)
    assert load_config(tmp_path / "c.yaml", ["ssl.cache=true"]).ssl.cache is True
    with pytest.raises(UserError, match="'ssl.cache'"):  # `no` is a string now, not a silent False
        load_config(None, ["ssl.cache=no"])
    cfg = load_config(path)
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("refine.thresold=0.8", "unknown config key 'refine.thresold'"),
        ("nosuch=1", "unknown config key 'nosuch'"),
        ("refine.threshold=abc", "refine.threshold"),
        ("refine.iterations=2.5", "expected an integer"),
        ("ssl.cache=maybe", "expected true or false"),
        ("refine.loss_target=median", "refine.loss_target"),
        ("data.noise_rate=1.2", "data.noise_rate"),
        ("refine.first_stages=[3, 2]", "strictly increasing"),
        ("refine.first_stages=5", "expected a list"),
        ("refine", "expected KEY=VALUE"),
        ("refine=3", "must be a mapping"),
    ],
)
def test_bad_overrides(override, needle):
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("refine: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml.*not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(listy)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_and_hash(tmp_path):
    cfg = load_config(None, ["seed=3"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["seed=4"])) != config_hash(cfg)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_validate(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig)
