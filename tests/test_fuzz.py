"""Property tests (hypothesis) of the parsers of user input: configs, data specs, manifests.

The property is the CLI's contract: a parser returns a valid result or raises :class:`UserError`
with a one-line message (``labelrefine: error: ...``), never another exception.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from labelrefine.config import RunConfig, apply_overrides, config_from_dict, config_tree, load_config, top_level_fields
from labelrefine.data.imageset import DataSplits
from labelrefine.data.sources import KNOWN_KINDS, Manifest, load_data, parse_spec, read_manifest
from labelrefine.errors import UserError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _known_keys() -> list[str]:
    """Every dotted key of the config tree, sections included (``data``, ``data.spec``, ...)."""
    keys = list(top_level_fields())
    for name, cls in config_tree().items():
        keys += [name, *(f"{name}.{f.name}" for f in dataclasses.fields(cls))]
    return keys


KNOWN_KEYS = _known_keys()


def _one_line_user_error(e: UserError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)


# --------------------------------------------------------------------------------------------
# strategies


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["sgd", "adam", "cosine", "idn", "symmetric", "column:worse", "digits", "ce", "ours", "auto",
                     "2020-13-01", "2021-02-03", "1e-3", "0x1F", "0o17", "~", "yes", "off", ".inf", ".nan"]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=8)


def _yaml_text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


_keys = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.builds(lambda k, t: f"{k}.{t}", st.sampled_from(KNOWN_KEYS), st.text(max_size=6)),
    st.text(max_size=12),
)
# YAML text that once crashed a parser or is otherwise awkward: impossible dates (PyYAML raises
# ValueError), integers too large for a float, non-finite floats, tags, flow collections.
TRICKY_YAML = ["2020-13-01", "2021-02-30", "2001-12-14 25:61:00", "9" * 400, "-" + "9" * 400, "1e999", ".nan",
               "-.inf", "[1, 2]", "[3, 2]", "[]", "{a: 1}", "{}", "[unclosed", "'x", "- 1", "!!binary x", "!!int x",
               "!!python/tuple [1]", "? a", "&a [*a]", "*nope", "~", "''", "0b102", "1_000", "0x", "1:2:3"]
_override_values = st.one_of(st.sampled_from(TRICKY_YAML), st.builds(_yaml_text, _values), st.builds(str, _scalars),
                             st.text(max_size=30))
_overrides = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", _keys, _override_values),
    st.text(max_size=30),  # often without '='
)


# --------------------------------------------------------------------------------------------
# configs


@FUZZ
@given(st.lists(_overrides, max_size=5))
@example(["method=2020-13-01"])  # found by this test: PyYAML's ValueError escaped _parse_value
@example(["optim.lr=" + "9" * 400])  # found by this test: OverflowError converting to float
def test_fuzz_overrides(overrides: list[str]):
    try:
        cfg = load_config(None, overrides)
    except UserError as e:
        _one_line_user_error(e)
        return
    assert isinstance(cfg, RunConfig)


@FUZZ
@given(st.dictionaries(st.sampled_from(["data", "optim", "refine", "seed", "method"]), _values, max_size=3),
       st.lists(_overrides, max_size=3))
def test_fuzz_apply_overrides_on_a_loaded_mapping(base: dict, overrides: list[str]):
    """``apply_overrides`` on a mapping as YAML gives it (sections may be scalars or lists)."""
    try:
        cfg = config_from_dict(apply_overrides(base, overrides))
    except UserError as e:
        _one_line_user_error(e)
        return
    assert isinstance(cfg, RunConfig)


_config_dicts = st.dictionaries(
    st.one_of(st.sampled_from(KNOWN_KEYS), st.integers(), st.none(), st.booleans(), st.text(max_size=6)),
    _values, max_size=4,
)
_yaml_files = st.one_of(
    st.text(max_size=200),
    st.builds(lambda d: yaml.safe_dump(d, sort_keys=False), _config_dicts),
    st.builds(lambda d: yaml.safe_dump(d, default_flow_style=True), _values),
    st.builds(lambda lines: "\n".join(lines),
              st.lists(st.builds(lambda k, v: f"{k}: {v}", st.sampled_from(KNOWN_KEYS), _override_values),
                       max_size=5)),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(text=_yaml_files, as_bytes=st.booleans())
@example(text="::\n0:", as_bytes=False)  # found by this test: sorting int and str keys raised TypeError
@example(text="seed: 2020-13-01\n", as_bytes=False)  # found by this test: ValueError from PyYAML
@example(text="seed: 3\n", as_bytes=True)  # not UTF-8: UnicodeDecodeError escaped load_config
@example(text="seed: " + "[" * 100_000, as_bytes=False)  # issue 13: a RecursionError in PyYAML's composer
@example(text="optim: {lr: 0.1}\noptim: {lr: 0.2}\n", as_bytes=False)  # issue 13: duplicates were last-wins
def test_fuzz_config_file(scratch: Path, text: str, as_bytes: bool):
    path = scratch / "config.yaml"
    if as_bytes:  # arbitrary encodings: latin-1 bytes are often not UTF-8
        path.write_bytes(text.encode("utf-8", "surrogatepass").replace(b"e", b"\xe9"))
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load_config(path)
    except UserError as e:
        _one_line_user_error(e)
        return
    assert isinstance(cfg, RunConfig)


_suite_values = st.one_of(_values, st.lists(st.text(max_size=8), max_size=3),
                          st.lists(st.builds(lambda k, v: f"{k}={v}", _keys, _override_values), max_size=3))
_settings = st.lists(st.fixed_dictionaries({"name": st.one_of(st.text(max_size=6), _scalars)},
                                           optional={"set": _suite_values}), max_size=3)
_suite_dicts = st.fixed_dictionaries(
    {"name": st.one_of(st.just("s"), _scalars), "settings": st.one_of(_settings, _values)},
    optional={"methods": st.one_of(st.just("all"), st.lists(st.sampled_from(["ce", "ours", "nope"]), max_size=2),
                                   _values),
              "config": st.one_of(_config_dicts, _values), "reference": _scalars, "budget_minutes": _scalars,
              "profile_notes": _suite_values, "title": _scalars, "description": _scalars,
              "method_overrides": st.one_of(st.dictionaries(st.sampled_from(["ce", "ours", "ce_clean", "x"]),
                                                            _suite_values, max_size=2), _values),
              "surprise": _scalars},
)


@FUZZ
@given(text=st.one_of(st.builds(lambda d: yaml.safe_dump(d, sort_keys=False), _suite_dicts),
                      st.text(max_size=200)))
@example(text="name: s\nsettings: [{name: a}]\nconfig: {}\nprofile_notes: 3\n")  # TypeError before issue 13
def test_fuzz_suite_file(scratch: Path, text: str):
    """A suite file loads and plans (every run's config resolved) or is a one-line UserError."""
    from labelrefine.bench import load_suite, plan

    path = scratch / "suite.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        runs = plan(load_suite(str(path)), scratch / "out", seeds=1)
    except UserError as e:
        _one_line_user_error(e)
        return
    assert all(isinstance(r.cfg, RunConfig) for r in runs)


# --------------------------------------------------------------------------------------------
# data specs


_spec_parts = st.sampled_from([*KNOWN_KINDS, "mnist", "CSV", " npz ", "", ":", ",", "=", "size", "size=8",
                               "size=0", "size=3x", "size=x", "channels=2", "channels=3", "download",
                               "download=maybe", "classes=a;b", "classes=;", "label=worse", "test=t.csv", "/tmp/x"])
_specs = st.one_of(
    st.text(max_size=40),
    st.builds(lambda parts, sep: sep.join(parts), st.lists(st.one_of(_spec_parts, st.text(max_size=6)), max_size=6),
              st.sampled_from([",", ":", "", " , "])),
    st.builds(lambda k, p, opts: f"{k}:{p}," + ",".join(opts), st.sampled_from(KNOWN_KINDS), st.text(max_size=10),
              st.lists(_spec_parts, max_size=4)),
)


@FUZZ
@given(_specs)
def test_fuzz_parse_spec(spec: str):
    from labelrefine.data.sources import _parse_channels, _parse_classes, _parse_size

    try:
        kind, path, options = parse_spec(spec)
        size = _parse_size(options.get("size"))
        channels = _parse_channels(options.get("channels"))
        classes = _parse_classes(options.get("classes"))
    except UserError as e:
        _one_line_user_error(e)
        return
    assert kind in KNOWN_KINDS
    assert (path is None) == (kind == "digits")
    assert all(isinstance(k, str) and isinstance(v, (str, bool)) for k, v in options.items())
    assert size is None or (len(size) == 2 and min(size) >= 1)
    assert channels in (None, 1, 3)
    assert classes is None or (classes and len(set(classes)) == len(classes))


# --------------------------------------------------------------------------------------------
# manifests


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """``img/0.png``..``img/2.png`` (8x8 RGB) and a non-image ``img/text.png``, for manifests to name."""
    root = tmp_path_factory.mktemp("manifests")
    (root / "img").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")
    (root / "img" / "text.png").write_text("not an image")
    return root


_PATHS = ["img/0.png", "img/1.png", "img/2.png", "img/text.png", "img/missing.png", "", "img", "../x.png",
          "img/0.png\x00", "/abs/none.png"]
_cells = st.one_of(
    st.sampled_from([*_PATHS, "cat", "dog", "0", "1", "2", "-1", "99", "train", "test", "val", "dev", " ", '"',
                     "a,b", "line\nbreak", "\ufeff"]),
    st.text(max_size=8),
)
_header_names = st.one_of(st.sampled_from(["path", "file", "image", "label", "clean", "worse", "split", "name", ""]),
                          st.text(max_size=6))


@st.composite
def _csv_texts(draw) -> str:
    header = draw(st.lists(_header_names, min_size=0, max_size=4))
    width = max(len(header), 1)
    rows = draw(st.lists(st.lists(_cells, min_size=0, max_size=width + 1), max_size=5))
    buf = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    w = csv.writer(buf, quoting=quoting, lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"])))
    if header or draw(st.booleans()):
        w.writerow(header)
    for row in rows:
        if draw(st.booleans()):
            buf.write(draw(st.sampled_from(["\n", "  \n", ",\n"])))  # empty or blank lines
        w.writerow(row)
    text = buf.getvalue()
    if draw(st.booleans()):
        text = "\ufeff" + text
    if draw(st.integers(0, 9)) == 0:  # raw damage: a stray quote or a cut
        text = text[: draw(st.integers(0, len(text)))] + draw(st.sampled_from(['"', "\x00", "\n\n"]))
    return text


def _check_manifest(m: Manifest) -> None:
    assert "train" in m.splits and m.classes
    for s in m.splits.values():
        assert len(s.ids) == len(s.files) == len(s.labels)
        assert s.labels.dtype == np.int64 and (s.labels >= 0).all() and (s.labels < len(m.classes)).all()


@FUZZ
@given(text=_csv_texts(),
       label=st.one_of(st.none(), st.sampled_from(["label", "worse", "nope"])),
       path=st.one_of(st.none(), st.sampled_from(["path", "image", "nope"])),
       classes=st.one_of(st.none(), st.sampled_from([["cat", "dog"], ["0", "1", "2"], ["cat"]])))
def test_fuzz_read_manifest(image_dir: Path, text: str, label, path, classes):
    file = image_dir / "m.csv"
    file.write_text(text, encoding="utf-8", newline="")
    try:
        m = read_manifest(file, label_column=label, path_column=path, classes=classes)
    except UserError as e:
        _one_line_user_error(e)
        return
    _check_manifest(m)


@FUZZ
@given(text=_csv_texts())
def test_fuzz_csv_through_load_data(image_dir: Path, text: str):
    file = image_dir / "l.csv"
    file.write_text(text, encoding="utf-8", newline="")
    try:
        data = load_data(f"csv:{file}", cache_dir=image_dir / "cache")
    except UserError as e:
        _one_line_user_error(e)
        return
    assert isinstance(data, DataSplits) and len(data.train) > 0


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-5, max_value=5), st.integers(),
                          st.floats(allow_nan=False), st.sampled_from(_PATHS), st.text(max_size=8))
_json_values = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["name", "label", "x"]), inner, max_size=3)),
    max_leaves=10)
_json_entries = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(_PATHS), _json_scalars), "label": st.one_of(st.integers(-1, 3), _json_scalars)},
    optional={"extra": _json_scalars},
)
_good_entries = st.fixed_dictionaries({"name": st.sampled_from(_PATHS), "label": st.integers(0, 1)})
_json_docs = st.one_of(
    st.builds(json.dumps, _json_values),
    st.builds(json.dumps, st.lists(_json_entries, max_size=5)),
    st.builds(json.dumps, st.lists(_good_entries, min_size=1, max_size=4)),  # reaches the file checks
    st.builds(json.dumps, st.lists(st.one_of(_good_entries, _json_entries), min_size=1, max_size=4)),
    st.builds(lambda d, n: d[:n], st.builds(json.dumps, st.lists(_json_entries, max_size=3)), st.integers(0, 80)),
    st.text(max_size=40),
)


@FUZZ
@given(doc=_json_docs, classes=st.sampled_from(["", ",classes=a;b", ",classes=a;b;c;d"]))
@example(doc='[{"name": "img/0.png\\u0000", "label": 0}]', classes="")  # found: os.stat's ValueError on NUL
def test_fuzz_json_manifest(image_dir: Path, doc: str, classes: str):
    file = image_dir / "m.json"
    file.write_text(doc, encoding="utf-8", errors="surrogatepass")
    try:
        data = load_data(f"json:{file}{classes}", cache_dir=image_dir / "cache")
    except UserError as e:
        _one_line_user_error(e)
        return
    assert isinstance(data, DataSplits) and len(data.train) > 0
