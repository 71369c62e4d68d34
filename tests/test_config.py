"""Typed config: YAML, --set overrides, strict keys and types, presets."""

from __future__ import annotations

import dataclasses
import math
import re
import time
import tracemalloc
from pathlib import Path

import pytest
from test_bad_inputs import laughs

from labelrefine.bench import builtin_suites, load_suite, plan
from labelrefine.config import (
    RunConfig,
    YAMLRefused,
    all_ranges,
    config_from_dict,
    config_hash,
    dump_yaml,
    load_config,
    numeric_fields,
    validate,
    yaml_load,
)
from labelrefine.errors import UserError, short_repr

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


# --------------------------------------------------------------------------------------------
# Issue 13: numeric ranges (item 6), YAML bombs (item 3), duplicate keys (item 7)


def _numeric_leaves(obj, prefix: str = ""):
    """(dotted key, value) of every int/float field (and list of ints) of a config instance."""
    names = [f.name for f in dataclasses.fields(obj) if f.name != "sections"]
    names += list(getattr(obj, "sections", {}))  # RunConfig: the methods' sections too
    for name in names:
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            yield from _numeric_leaves(value, f"{prefix}{name}.")
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool)
                 for v in (value if isinstance(value, list) else [value])):
            yield prefix + name, value


def test_every_numeric_field_has_a_range():
    """A new int/float field without a range (config.RANGES or its section's RANGES) fails here,
    as does a stale entry."""
    RANGES = all_ranges()
    leaves = dict(_numeric_leaves(RunConfig()))
    assert len(leaves) >= 50
    missing = sorted(set(leaves) - set(RANGES))
    assert not missing, f"numeric config fields without a range in config.RANGES: {missing}"
    assert sorted(set(RANGES) - set(leaves)) == []
    for key, value in leaves.items():  # every default lies inside its own range
        for v in value if isinstance(value, list) else [value]:
            assert RANGES[key].contains(v), (key, v, RANGES[key].describe())
        assert RANGES[key].lo > -math.inf, f"{key}: no lower bound"


def test_non_finite_numbers_are_refused_everywhere():
    for key, tp in numeric_fields().items():
        if tp is not float:
            continue
        for text in ("nan", "inf", "-inf", ".nan", "1e999"):
            with pytest.raises(UserError, match=re.escape(f"config key {key!r}: ") + ".* is (outside|neither)"):
                load_config(None, [f"{key}={text}"])


@pytest.mark.parametrize("item", [
    "seed=0", "seed=4294967294", "data.noise_seed=0", "threads=0", "threads=1024", "optim.weight_decay=0",
    "optim.eval_batch_size=1", "optim.label_smoothing=0", "optim.label_smoothing=0.999", "finetune.lr_scale=1e-6",
    "optim.momentum=0", "coteaching.forget_rate=-1", "coteaching.forget_rate=0", "jocor.forget_rate=0.99",
    "dividemix.lambda_u=-1", "dividemix.lambda_u=0", "dividemix.alpha=0", "refine.quantile=1",
    "ssl.crop_scale_min=1", "mentornet.percentile=100", "mentornet.burn_in=1", "jocor.lam=0",
    "dividemix.gmm_tol=0", "epochs=0", "checkpoint_every=0", "data.val_fraction=0", "data.noise_rate=0",
])
def test_range_ends_that_are_allowed(item):
    key, text = item.split("=")
    cfg = load_config(None, [item])
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == float(text)


def test_defaults_builtin_suites_and_presets_validate(tmp_path):
    validate(RunConfig())
    assert config_from_dict({}) == RunConfig()
    from labelrefine.bench.detect import DetectSuite, fold_config, plan_units

    for name in sorted(builtin_suites()):
        suite = load_suite(name)
        if isinstance(suite, DetectSuite):  # every unit's config and its fold models', validated
            units = plan_units(suite, tmp_path, seeds=2)
            assert units and all(fold_config(u.cfg, "ce_ssl").method == "ce_ssl" for u in units)
            continue
        runs = plan(suite, tmp_path, seeds=2)  # every run's config, validated
        assert runs
    presets = sorted(CONFIGS.glob("*.yaml"))
    assert presets
    for path in presets:
        load_config(path)


def _quick_failure(fn, needle: str) -> None:
    """``fn()`` raises a one-line UserError containing ``needle`` within seconds and a few MB."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(UserError) as info:
            fn()
        took = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert len(str(info.value)) < 300, str(info.value)
    # The code before the fix took ~80 s and > 8 GB on this input.
    assert took < 5.0 and peak < 50e6, (took, peak)


def test_yaml_bomb_fails_fast(tmp_path):
    bomb = laughs()
    assert len(bomb) < 500
    config = tmp_path / "c.yaml"
    config.write_text(f"method: ce\nseed: {bomb}\n")
    _quick_failure(lambda: load_config(config), "config file")
    _quick_failure(lambda: load_config(None, [f"seed={bomb}"]), "anchor &a0 at line 1")
    _quick_failure(lambda: load_config(None, [f"refine.first_stages={bomb}"]), "YAML anchors and aliases")
    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: s\nsettings: [{{name: a}}]\nconfig:\n  seed: {bomb}\n")
    _quick_failure(lambda: load_suite(str(suite)), "suite file")
    with pytest.raises(YAMLRefused, match="anchor &a0 at line 1"):
        yaml_load(bomb)


def test_short_repr_is_bounded():
    level = ["lol"] * 9
    for _ in range(9):  # 9**9 leaves by reference: repr() would build gigabytes
        level = [level] * 9
    started = time.perf_counter()
    text = short_repr(level)
    assert time.perf_counter() - started < 1.0 and len(text) <= 60 and text.startswith("[[[")
    assert "..." in short_repr("x" * 10_000) and len(short_repr("x" * 10_000)) <= 60
    assert short_repr(int("9" * 4000) ** 2) == "<int>"  # repr() raises: too many digits
    assert short_repr("a\nb") == "'a\\nb'" and short_repr(1.5) == "1.5"


@pytest.mark.parametrize(("text", "needle"), [
    ("optim:\n  lr: 0.05\noptim:\n  lr: 0.1\n", "duplicate key 'optim' at line 3 (first at line 1)"),
    ("optim: {lr: 0.05, lr: 0.1}\n", "duplicate key 'lr' at line 1 (first at line 1)"),
    ("refine:\n  first_stages: [1]\n  threshold: 0.5\n  first_stages: [2]\n",
     "duplicate key 'first_stages' at line 4 (first at line 2)"),
    ("seed: 1\nepochs: 2\nseed: 1\n", "duplicate key 'seed' at line 3"),  # even with the same value
    ("a:\n  - {x: 1, x: 2}\n", "duplicate key 'x' at line 2"),  # inside a list
    ("1: a\n1.0: b\n", "duplicate key 1.0 at line 2"),  # equal keys of different spellings
    ("optim: &o {lr: 1}\n", "anchor &o at line 1"),
    ("optim:\n  <<: {lr: 0.1}\n", "merge key '<<' at line 2"),
    ("seed: " + "[" * 40 + "]" * 40 + "\n", "nesting deeper than 32 levels at line 1"),
])
def test_refused_yaml(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(f"config file {str(path)!r}: {needle}")):
        load_config(path)


def test_similar_but_distinct_keys_are_fine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.05\nssl:\n  lr: 0.1\nrefine:\n  first_stages: [1, 2]\n  later_stages: [1, 2]\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.ssl.lr) == (0.05, 0.1)
