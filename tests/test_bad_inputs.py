"""A table of bad inputs, each run through the real CLI (``labelrefine.cli.main``) in-process.

Every case must end as exit code 2 with exactly one stderr line ``labelrefine: error: ...`` that
names the problem (the file, key or option), and must write nothing: the working directory and
the cache are byte-for-byte (and mtime-for-mtime) what they were before the command.

Cases that need a finished run (existing output dir, checkpoints) copy one of the runs made once
by the module fixture ``finished_runs`` (digits and a 3-class npz, ``method=ce``, 1 epoch).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _store_helpers import code_payload, random_bytes_in_tensor
from conftest import TINY
from PIL import Image

from labelrefine import store
from labelrefine.cli import main
from labelrefine.engine.checkpoint import CHECKPOINT_FORMAT
from labelrefine.predict import MODEL_FORMAT

# The config of the fixture runs: a resume with exactly these settings matches their checkpoints.
RUN_SETS = [*TINY, "method=ce", "epochs=1", "ssl.epochs=0"]
NPZ_SETS = [*RUN_SETS, "data.spec=npz:data.npz", "data.train_subset=0", "data.test_subset=0",
            "data.noise=symmetric"]


def _sets(items: list[str]) -> list[str]:
    return [f"--set={s}" for s in items]


NOISE = ["--type", "symmetric", "--rate", "0.1", "--out", "out.csv"]  # noise args after --data SPEC


# --------------------------------------------------------------------------------------------
# builders of bad inputs (all relative to the working directory ``w``)


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def _folder(w: Path, name: str = "imgs", classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    root = w / name
    for split in ("train", "test"):
        for k, cls in enumerate(classes):
            for i in range(2):
                _png(root / split / cls / f"{i}.png", seed=10 * k + i)
    return root


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _csv(w: Path, text: str, name: str = "m.csv", images: int = 4) -> None:
    for i in range(images):
        _png(w / "img" / f"{i}.png", seed=i)
    _write(w / name, text)


def _npz(path: Path, num_classes: int, **replace: np.ndarray | None) -> None:
    """A Keras-style npz with ``num_classes`` classes; ``replace`` swaps or (None) drops arrays."""
    rng = np.random.default_rng(num_classes)
    n, m = 20 * num_classes, 4 * num_classes
    arrays = {"x_train": rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), "y_train": np.arange(n) % num_classes,
              "x_test": rng.integers(0, 256, (m, 8, 8), dtype=np.uint8), "y_test": np.arange(m) % num_classes}
    arrays.update(replace)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def _copy_run(runs: Path, w: Path, which: str = "digits_run") -> Path:
    return Path(shutil.copytree(runs / which, w / "out"))


def _damage_checkpoint(how: str) -> Callable[[Path, Path], None]:
    def setup(w: Path, runs: Path) -> None:
        ckpt = _copy_run(runs, w) / "checkpoint.pt"
        if how == "truncate":
            ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        elif how == "random":
            ckpt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        elif how == "empty":
            ckpt.write_bytes(b"")
        elif how == "foreign":
            torch.save({"format": "someone-elses-checkpoint", "weights": [1, 2, 3]}, ckpt)
        elif how == "foreign-store":
            store.save(ckpt, {"format": "someone-elses-checkpoint", "weights": [1, 2, 3]}, kind="someones-ckpt-v1")
        elif how == "list":
            store.save(ckpt, [1, 2, 3], kind=CHECKPOINT_FORMAT)

    return setup


def _npz_changed_classes(legacy: bool) -> Callable[[Path, Path], None]:
    """The npz run's dir and its data file, the data since rewritten with 4 classes instead of 3."""
    def setup(w: Path, runs: Path) -> None:
        out = _copy_run(runs, w, "npz_run")
        _npz(w / "data.npz", 4)
        if legacy:  # a checkpoint written before checkpoints recorded the data's class count
            ckpt = store.load(out / "checkpoint.pt", kind=CHECKPOINT_FORMAT, name="checkpoint")
            ckpt.pop("data", None)
            store.save(out / "checkpoint.pt", ckpt, kind=CHECKPOINT_FORMAT)

    return setup


def _no_checkpoint(w: Path, runs: Path) -> None:
    """A run that stopped before its first checkpoint: only config.yaml (and metrics) exist."""
    out = _copy_run(runs, w)
    for name in list(p.name for p in out.iterdir()):
        if name != "config.yaml":
            (out / name).unlink()


# --------------------------------------------------------------------------------------------
# the table


@dataclass
class Case:
    id: str
    argv: list[str]
    needles: tuple[str, ...]  # each must occur in the error line
    setup: Callable[..., None] | None = None  # setup(w) or, with needs_runs, setup(w, runs)
    needs_runs: bool = False
    out: str = "out"  # the output path the command was given (must not appear unless set up)


def _case(id: str, argv: list[str], *needles: str, setup=None, needs_runs=False, out="out") -> Case:
    return Case(id, argv, needles, setup, needs_runs, out)


def _noise(spec: str, *needles: str, setup=None) -> Case:
    return _case("", ["noise", "--data", spec, *NOISE], *needles, setup=setup, out="out.csv")


def _run(sets: list[str], *needles: str, setup=None, extra: tuple[str, ...] = ()) -> Case:
    return _case("", ["run", *_sets(sets), *extra, "--out", "out"], *needles, setup=setup)


def _named(id: str, case: Case) -> Case:
    case.id = id
    return case


DATA_CASES = [
    _named("data-unknown-kind", _noise("mnist:somewhere", "unknown kind 'mnist'", "known kinds")),
    _named("data-kind-without-path", _noise("imagefolder", "kind 'imagefolder' needs a path")),
    _named("data-unknown-option", _noise("imagefolder:imgs,sise=8", "unknown option 'sise'",
                                         setup=lambda w: _folder(w))),
    _named("data-bad-size-option", _noise("digits,size=0", "size=0")),
    _named("data-csv-file-missing", _noise("csv:nope.csv", "nope.csv does not exist")),
    _named("data-imagefolder-missing", _noise("imagefolder:no_such_dir", "no_such_dir does not exist")),
    _named("data-imagefolder-is-file", _noise("imagefolder:afile", "afile is not a directory",
                                              setup=lambda w: _write(w / "afile", "x"))),
    _named("data-imagefolder-no-train", _noise("imagefolder:imgs", "has no 'train' folder",
                                               setup=lambda w: (w / "imgs" / "test" / "a").mkdir(parents=True))),
    _named("data-imagefolder-empty-class", _noise(
        "imagefolder:imgs", "train/bird: class folder has no images",
        setup=lambda w: (_folder(w) / "train" / "bird").mkdir())),
    _named("data-imagefolder-only-non-images", _noise(
        "imagefolder:imgs", "train/bird: class folder has no images",
        setup=lambda w: _write(_folder(w) / "train" / "bird" / "notes.txt", "not an image"))),
    _named("data-imagefolder-corrupt-image", _noise(
        "imagefolder:imgs", "cannot read image", "train/dog/1.png",
        setup=lambda w: _write(_folder(w) / "train" / "dog" / "1.png", b"\x89PNG\r\n\x1a\n garbage"))),
    _named("data-imagefolder-text-as-jpg", _noise(
        "imagefolder:imgs", "cannot read image", "test/cat/0.jpg",
        setup=lambda w: _write(_folder(w) / "test" / "cat" / "0.jpg", "just some text\n"))),
    _named("data-imagefolder-unknown-test-class", _noise(
        "imagefolder:imgs", "class folder 'zebra' is not one of the training classes",
        setup=lambda w: _png(_folder(w) / "test" / "zebra" / "0.png"))),
    _named("data-csv-missing-column", _noise(
        "csv:m.csv,label=worse", "m.csv: no column 'worse' (from label=worse)",
        setup=lambda w: _csv(w, "path,label\nimg/0.png,cat\nimg/1.png,dog\n"))),
    _named("data-csv-no-path-column", _noise(
        "csv:m.csv", "m.csv: no path column",
        setup=lambda w: _csv(w, "picture,label\nimg/0.png,cat\n"))),
    _named("data-csv-bad-label", _noise(
        "csv:m.csv,classes=cat;dog", "m.csv: line 3: column 'label' has label 'bird'",
        setup=lambda w: _csv(w, "path,label\nimg/0.png,cat\nimg/1.png,bird\n"))),
    _named("data-csv-label-out-of-range", _noise(
        "csv:m.csv,classes=cat;dog", "m.csv: line 2: column 'label' has label 5 outside [0, 1]",
        setup=lambda w: _csv(w, "path,label\nimg/0.png,5\nimg/1.png,0\n"))),
    _named("data-csv-duplicate-header", _noise(
        "csv:m.csv", "m.csv: column 'label' appears twice",
        setup=lambda w: _csv(w, "path,label,label\nimg/0.png,cat,dog\n"))),
    _named("data-csv-missing-image", _noise(
        "csv:m.csv", "m.csv: line 3: image 'img/missing.png' not found",
        setup=lambda w: _csv(w, "path,label\nimg/0.png,cat\nimg/missing.png,dog\n"))),
    _named("data-csv-ragged-row", _noise(
        "csv:m.csv", "m.csv: line 2: 3 fields, the header has 2",
        setup=lambda w: _csv(w, "path,label\nimg/0.png,cat,extra\n"))),
    _named("data-csv-bad-split", _noise(
        "csv:m.csv", "m.csv: line 2: column 'split' has 'dev'",
        setup=lambda w: _csv(w, "path,label,split\nimg/0.png,cat,dev\n"))),
    _named("data-csv-not-utf8", _noise(
        "csv:m.csv", "m.csv: not UTF-8 text",
        setup=lambda w: _csv(w, b"path,label\nimg/0.png,\xff\xfe\n"))),
    _named("data-json-not-a-list", _noise(
        "json:m.json", "m.json: expected a JSON list",
        setup=lambda w: _write(w / "m.json", json.dumps({"name": "img/0.png", "label": 0})))),
    _named("data-json-entry-missing-label", _noise(
        "json:m.json", "m.json: entry 1 has no 'label'",
        setup=lambda w: _write(w / "m.json", json.dumps([{"name": "a.png", "label": 0}, {"name": "b.png"}])))),
    _named("data-json-label-not-int", _noise(
        "json:m.json", "m.json: entry 0: 'label' must be an integer",
        setup=lambda w: _write(w / "m.json", json.dumps([{"name": "a.png", "label": "cat"}])))),
    _named("data-json-invalid", _noise(
        "json:m.json", "m.json: not valid JSON",
        setup=lambda w: _write(w / "m.json", '[{"name": "a.png", "label": 0},'))),
    _named("data-npz-missing-key", _noise(
        "npz:d.npz", "d.npz: missing array 'y_test'", setup=lambda w: _npz(w / "d.npz", 3, y_test=None))),
    _named("data-npz-wrong-shape", _noise(
        "npz:d.npz", "d.npz: x_train has shape (60, 64)",
        setup=lambda w: _npz(w / "d.npz", 3, x_train=np.zeros((60, 64), dtype=np.uint8)))),
    _named("data-npz-length-mismatch", _noise(
        "npz:d.npz", "d.npz: x_test has 12 rows but y_test has 5",
        setup=lambda w: _npz(w / "d.npz", 3, y_test=np.zeros(5, dtype=np.int64)))),
    _named("data-npz-not-npz", _noise(
        "npz:d.npz", "d.npz: not a readable .npz file", setup=lambda w: _write(w / "d.npz", "hello"))),
    _named("data-json-nul-in-name", _noise(
        "json:m.json", "m.json: entry 0: image", "not found",
        setup=lambda w: _write(w / "m.json", json.dumps([{"name": "a.png\x00", "label": 0}])))),
    _named("data-via-run-missing-manifest", _run(["data.spec=csv:nope.csv"], "nope.csv does not exist")),
    _named("data-via-run-unknown-noise-column", _run(
        ["data.spec=npz:d.npz", "data.noise=column:worse"], "no label column 'worse'",
        setup=lambda w: _npz(w / "d.npz", 3))),
]

CONFIG_CASES = [
    _named("config-unknown-key", _run(["refine.thresold=0.8"], "unknown config key 'refine.thresold'")),
    _named("config-unknown-section", _run(["nosuch.key=1"], "unknown config key 'nosuch'")),
    _named("config-wrong-type-int", _run(["refine.iterations=2.5"], "'refine.iterations'", "expected an integer")),
    _named("config-wrong-type-bool", _run(["ssl.cache=maybe"], "'ssl.cache'", "expected true or false")),
    _named("config-wrong-type-list", _run(["refine.first_stages=5"], "'refine.first_stages'", "expected a list")),
    _named("config-bad-choice", _run(["optim.optimizer=rmsprop"], "'optim.optimizer'", "'sgd' | 'adam'")),
    _named("config-noise-rate-1.5", _run(["data.noise_rate=1.5"], "'data.noise_rate'", "1.5 is outside [0, 1)")),
    _named("config-val-fraction-0.7", _run(["data.val_fraction=0.7"], "'data.val_fraction'", "outside [0, 0.5)")),
    _named("config-negative-epochs", _run(["epochs=-1"], "'epochs'", "-1 is outside [0, 2147483647]")),
    _named("config-zero-batch", _run(["optim.batch_size=0"], "'optim.batch_size'", "0 is outside [1, 2147483647]")),
    _named("config-stages-not-increasing", _run(["refine.first_stages=[3, 2]"], "'refine.first_stages'",
                                                "strictly increasing")),
    _named("config-impossible-date", _run(["seed=2020-13-01"], "'seed'", "expected an integer")),
    _named("config-number-too-large", _run(["optim.lr=" + "9" * 400], "'optim.lr'", "too large")),
    _named("config-section-not-mapping", _run(["refine=3"], "'refine'", "must be a mapping")),
    _named("config-bad-set-syntax", _run(["refine.threshold"], "--set 'refine.threshold'", "expected KEY=VALUE")),
    _named("config-unknown-method", _run(["method=nosuch"], "unknown method 'nosuch'")),
    _named("config-file-missing", _case("config-file-missing", ["run", "--config", "nope.yaml", "--out", "out"],
                                        "config file 'nope.yaml' does not exist")),
    _named("config-file-invalid-yaml", _case(
        "", ["run", "--config", "bad.yaml", "--out", "out"], "config file 'bad.yaml' is not valid YAML at line",
        setup=lambda w: _write(w / "bad.yaml", "refine:\n  first_stages: [1, 2\nseed: 3\n"))),
    _named("config-file-is-a-list", _case(
        "", ["run", "--config", "list.yaml", "--out", "out"], "config file 'list.yaml' must hold a mapping",
        setup=lambda w: _write(w / "list.yaml", "- seed: 1\n- seed: 2\n"))),
    _named("config-file-unknown-key", _case(
        "", ["run", "--config", "c.yaml", "--out", "out"], "unknown config key 'optim.lrr'",
        setup=lambda w: _write(w / "c.yaml", "optim:\n  lrr: 0.1\n"))),
    _named("config-file-not-utf8", _case(
        "", ["run", "--config", "c.yaml", "--out", "out"], "config file 'c.yaml': not UTF-8 text",
        setup=lambda w: _write(w / "c.yaml", b"seed: \xff\xfe\n"))),
    _named("config-file-impossible-date", _case(
        "", ["run", "--config", "c.yaml", "--out", "out"], "config file 'c.yaml' is not valid YAML",
        setup=lambda w: _write(w / "c.yaml", "seed: 2020-13-01\n"))),
    _named("config-file-int-key", _case(
        "", ["run", "--config", "c.yaml", "--out", "out"], "unknown config key '1'",
        setup=lambda w: _write(w / "c.yaml", "1: 2\nseed: 3\n"))),
    _named("config-set-into-scalar", _case(
        "", ["run", "--config", "c.yaml", "--set", "seed.x=1", "--out", "out"], "'seed' is not a section",
        setup=lambda w: _write(w / "c.yaml", "seed: 3\n"))),
]

CLI_CASES = [
    _named("cli-resume-and-overwrite", _case("", ["run", "--resume", "--overwrite", "--out", "out"],
                                             "--resume and --overwrite exclude each other")),
    _named("cli-resume-dir-without-run", _case("", ["run", *_sets(RUN_SETS), "--resume", "--out", "out"],
                                               "--resume: out holds no run to resume",
                                               setup=lambda w: _write(w / "out" / "notes.txt", "mine"))),
    _named("cli-resume-missing-dir", _case("", ["run", *_sets(RUN_SETS), "--resume", "--out", "out"],
                                           "--resume: out holds no run to resume")),
    _named("cli-out-holds-a-run", _case(
        "", ["run", *_sets(RUN_SETS), "--out", "out"], "output directory out already holds a run",
        "--resume", "--overwrite", setup=lambda w, runs: _copy_run(runs, w), needs_runs=True)),
    _named("cli-out-is-a-file", _case("", ["run", *_sets(RUN_SETS), "--out", "out"],
                                      "output path out exists and is not a directory",
                                      setup=lambda w: _write(w / "out", "precious"))),
    _named("cli-noise-rate-1.5", _case("", ["noise", "--data", "digits", "--type", "idn", "--rate", "1.5",
                                            "--out", "out.csv"], "--rate 1.5 is outside [0, 1)", out="out.csv")),
    _named("cli-noise-rate-missing", _case("", ["noise", "--data", "digits", "--type", "pairflip",
                                                "--out", "out.csv"], "--rate is required", out="out.csv")),
    _named("cli-noise-rate-with-fixed-type", _case(
        "", ["noise", "--data", "digits", "--type", "none", "--rate", "0.2", "--out", "out.csv"],
        "--rate does not apply to noise type 'none'", out="out.csv")),
    _named("cli-noise-unknown-type", _case("", ["noise", "--data", "digits", "--type", "gaussian", "--rate", "0.2",
                                                "--out", "out.csv"], "unknown noise type 'gaussian'", out="out.csv")),
    _named("cli-bench-unknown-suite", _case("", ["bench", "nosuch-suite", "--out", "out"],
                                            "unknown suite 'nosuch-suite'")),
    _named("cli-bench-seeds-0", _case("", ["bench", "cpu-cifar10", "--seeds", "0", "--out", "out"],
                                      "--seeds 0: need at least 1")),
    _named("cli-bench-seeds-negative", _case("", ["bench", "cpu-cifar10", "--seeds", "-2", "--out", "out"],
                                             "--seeds -2: need at least 1")),
    _named("cli-bench-no-suite", _case("", ["bench", "--out", "out"], "bench: give a SUITE")),
    _named("cli-bench-no-out", _case("", ["bench", "cpu-cifar10"], "bench: --out DIR is required")),
    _named("cli-bench-unknown-method", _case("", ["bench", "cpu-cifar10", "--methods", "nosuch", "--out", "out"],
                                             "--methods: 'nosuch' is not in suite cpu-cifar10")),
    _named("cli-bench-bad-set", _case("", ["bench", "cpu-cifar10", "--set", "optim.lrr=1", "--out", "out"],
                                      "unknown config key 'optim.lrr'")),
    _named("cli-bench-suite-invalid-yaml", _case(
        "", ["bench", "s.yaml", "--out", "out"], "suite file 's.yaml' is not valid YAML",
        setup=lambda w: _write(w / "s.yaml", "name: [x\n"))),
    _named("cli-bench-suite-not-utf8", _case(
        "", ["bench", "s.yaml", "--out", "out"], "suite file 's.yaml': not UTF-8 text",
        setup=lambda w: _write(w / "s.yaml", b"name: \xff\n"))),
]

RESUME = ["run", *_sets(RUN_SETS), "--resume", "--out", "out"]
RESUME_NPZ = ["run", *_sets(NPZ_SETS), "--resume", "--out", "out"]

CHECKPOINT_CASES = [
    _named("ckpt-truncated", _case("", RESUME, "checkpoint out/checkpoint.pt is truncated", "--overwrite",
                                   setup=_damage_checkpoint("truncate"), needs_runs=True)),
    _named("ckpt-random-bytes", _case("", RESUME, "checkpoint out/checkpoint.pt is not a labelrefine file",
                                      setup=_damage_checkpoint("random"), needs_runs=True)),
    _named("ckpt-empty-file", _case("", RESUME, "checkpoint out/checkpoint.pt is empty",
                                    setup=_damage_checkpoint("empty"), needs_runs=True)),
    _named("ckpt-foreign-format", _case(
        "", RESUME, "checkpoint out/checkpoint.pt is a plain torch file without labelrefine's checksum header",
        setup=_damage_checkpoint("foreign"), needs_runs=True)),
    _named("ckpt-foreign-store-kind", _case(
        "", RESUME, "checkpoint out/checkpoint.pt is a someones-ckpt-v1 file, not a labelrefine-checkpoint-v2 file",
        setup=_damage_checkpoint("foreign-store"), needs_runs=True)),
    _named("ckpt-not-a-dict", _case("", RESUME, "checkpoint out/checkpoint.pt is not a labelrefine checkpoint",
                                    setup=_damage_checkpoint("list"), needs_runs=True)),
    _named("ckpt-other-config", _case(
        "", ["run", *_sets(RUN_SETS), "--set", "optim.lr=0.07", "--resume", "--out", "out"],
        "checkpoint out/checkpoint.pt was written with another config",
        setup=lambda w, runs: _copy_run(runs, w), needs_runs=True)),
    _named("ckpt-no-checkpoint-other-config", _case(
        "", ["run", *_sets(RUN_SETS), "--set", "seed=5", "--resume", "--out", "out"],
        "--resume: out/config.yaml differs from this config", setup=_no_checkpoint, needs_runs=True)),
    _named("ckpt-data-class-count-changed", _case(
        "", RESUME_NPZ, "checkpoint out/checkpoint.pt was written for 3 classes",
        "data 'npz:data.npz' now has 4 classes", setup=_npz_changed_classes(legacy=False), needs_runs=True)),
    _named("ckpt-legacy-data-class-count-changed", _case(
        "", RESUME_NPZ, "checkpoint out/checkpoint.pt does not fit this run",
        setup=_npz_changed_classes(legacy=True), needs_runs=True)),
    _named("ckpt-data-class-names-changed", _case(
        "", RESUME_NPZ, "checkpoint out/checkpoint.pt was written for class 0 named '0'", "now names it 'cat'",
        setup=lambda w, runs: (_copy_run(runs, w, "npz_run"),
                               _npz(w / "data.npz", 3, class_names=np.array(["cat", "dog", "fox"]))),
        needs_runs=True)),
    _named("ckpt-data-sample-count-changed", _case(
        "", RESUME_NPZ, "checkpoint out/checkpoint.pt was written for", "training samples",
        setup=lambda w, runs: (_copy_run(runs, w, "npz_run"),
                               _npz(w / "data.npz", 3, x_train=np.zeros((90, 8, 8), np.uint8),
                                    y_train=np.arange(90) % 3)), needs_runs=True)),
]

def _store_file(name: str, how: str, **fields) -> Callable[[Path, Path], None]:
    """The digits run's ``name`` (checkpoint.pt or model.pt), damaged or rewritten as ``how`` says."""
    kind = CHECKPOINT_FORMAT if name == "checkpoint.pt" else MODEL_FORMAT

    def setup(w: Path, runs: Path) -> None:
        out = _copy_run(runs, w)
        path = out / name
        if how == "runs-code":  # issue 13 item 1: a plain torch file whose pickle runs `touch w/pwned`
            path.write_bytes(code_payload(w / "pwned"))
        elif how == "runs-code-framed":  # the same pickle behind a valid header and checksum
            path.write_bytes(store.frame(kind, code_payload(w / "pwned")))
        elif how == "tensor-bytes":  # issue 13 item 2: 64 random bytes inside a tensor
            random_bytes_in_tensor(path)
        elif how == "directory":
            path.unlink()
            path.mkdir()
        elif how == "appended":
            path.write_bytes(path.read_bytes() + b"\x00" * 10)
        elif how == "bad-header":
            data = path.read_bytes()
            path.write_bytes(data.replace(b" ", b"  ", 1))
        elif how == "swap":  # the other file of the run in its place
            shutil.copy(out / ("model.pt" if name == "checkpoint.pt" else "checkpoint.pt"), path)
        elif how == "newer":
            store.save(path, store.load(path, kind=kind, name=name), kind=kind[:-1] + "9")
        elif how == "edit":
            blob = store.load(path, kind=kind, name=name)
            for key, value in fields.items():
                if value is None:
                    blob.pop(key)
                else:
                    blob[key] = value(blob) if callable(value) else value
            store.save(path, blob, kind=kind)

    return setup


def _json_manifest(w: Path, entries: list[tuple[str, int]], name: str = "m.json") -> None:
    for i in range(4):
        _png(w / "img" / f"{i}.png", seed=i)
    _write(w / name, json.dumps([{"name": n, "label": label} for n, label in entries]))


def _symlink_loop(w: Path) -> None:
    (_folder(w) / "train" / "cat" / "loop").symlink_to(".", target_is_directory=True)


def _id_collision(w: Path) -> None:
    """``\\xff.png`` (undecodable byte 0xff) beside a file literally named ``\\xff.png``."""
    cat = _folder(w) / "train" / "cat"
    _png(cat / "\\xff.png", seed=5)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.fsencode(cat) + b"/\xff.png", format="PNG")


def _float_tiff(values: np.ndarray) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        Image.fromarray(values.astype(np.float32)).save(_folder(w) / "train" / "dog" / "f.tif")

    return setup


def _inf_weight(blob: dict) -> dict:
    nets = blob["networks"]
    state = next(iter(nets.values()))
    key = next(k for k, t in state.items() if t.is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("inf")
    return nets


PREDICT = ["predict", "--model", "out/model.pt", "imgs", "--out", "preds.csv"]
MODEL = "model file out/model.pt"


def _predict(id: str, how: str, *needles: str, **fields) -> Case:
    return _case(id, PREDICT, *needles, setup=_store_file("model.pt", how, **fields), needs_runs=True,
                 out="preds.csv")


def _resume(id: str, how: str, *needles: str) -> Case:
    return _case(id, RESUME, "checkpoint out/checkpoint.pt", *needles, setup=_store_file("checkpoint.pt", how),
                 needs_runs=True)


STORE_CASES = [
    _resume("store-ckpt-pickle-runs-code", "runs-code", "plain torch file without labelrefine's checksum header"),
    _resume("store-ckpt-pickle-runs-code-framed", "runs-code-framed",
            "holds objects other than tensors and plain containers"),
    _resume("store-ckpt-random-bytes-in-tensor", "tensor-bytes", "is damaged (SHA-256 checksum mismatch)"),
    _resume("store-ckpt-is-a-directory", "directory", "is a directory", "--overwrite"),
    _resume("store-ckpt-appended-bytes", "appended", "is damaged (10 bytes after the end of its payload)"),
    _resume("store-ckpt-bad-header", "bad-header", "is damaged (unreadable header)"),
    _resume("store-ckpt-is-a-model", "swap", "is a labelrefine-model-v2 file, not a labelrefine-checkpoint-v2 file"),
    _resume("store-ckpt-newer-format", "newer", "written by another labelrefine version",
            "format labelrefine-checkpoint-v9"),
    _predict("store-model-pickle-runs-code", "runs-code", MODEL,  # a v1 model.pt is loaded with weights_only
             "holds objects other than tensors and plain containers (it asks for", "system)"),
    _predict("store-model-pickle-runs-code-framed", "runs-code-framed", MODEL,
             "holds objects other than tensors and plain containers"),
    _predict("store-model-random-bytes-in-tensor", "tensor-bytes", MODEL, "is damaged (SHA-256 checksum mismatch)"),
    _predict("store-model-truncated", "appended", MODEL, "is damaged (10 bytes after the end of its payload)"),
    _predict("store-model-is-a-checkpoint", "swap", MODEL,
             "is a labelrefine-checkpoint-v2 file, not a labelrefine-model-v2 file"),
    _predict("store-model-newer-format", "newer", MODEL, "written by another labelrefine version"),
    _predict("store-model-no-networks", "edit", MODEL, "field 'networks' holds no network", networks={}),
    _predict("store-model-nan-mean", "edit", MODEL, "field 'mean' holds a non-finite value",
             mean=lambda b: [float("nan")] * len(b["mean"])),
    _predict("store-model-zero-std", "edit", MODEL, "field 'std' must be positive",
             std=lambda b: [0.0] * len(b["std"])),
    _predict("store-model-huge-image-size", "edit", MODEL, "field 'image_size' [100000, 100000] is outside 1..4096",
             image_size=[100000, 100000]),
    _predict("store-model-image-size-not-ints", "edit", MODEL, "field 'image_size' must be [height, width]",
             image_size=[8.0, 8]),
    _predict("store-model-bad-channels", "edit", MODEL, "field 'in_channels' must be 1 or 3", in_channels=2),
    _predict("store-model-duplicate-classes", "edit", MODEL, "field 'classes' names '0' twice",
             classes=lambda b: ["0", *b["classes"][:-1]]),
    _predict("store-model-class-count", "edit", MODEL, "field 'classes' has 9 names but num_classes is 10",
             classes=lambda b: b["classes"][:-1]),
    _predict("store-model-classes-not-strings", "edit", MODEL, "field 'classes' must be a list of class names",
             classes=lambda b: list(range(len(b["classes"])))),
    _predict("store-model-missing-field", "edit", MODEL, "field 'backbone' is missing", backbone=None),
    _predict("store-model-infinite-weight", "edit", MODEL, "has non-finite weights", networks=_inf_weight),
    _predict("store-model-backbone-option", "edit", MODEL, "is damaged or from another version",
             backbone_kwargs={"width": 10**12}),
]

def laughs(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs" YAML value of issue 13 (item 3): ``levels`` nested anchors, each
    aliasing the previous one ``width`` times; 9 x 9 expands ~430 bytes to 387 M strings."""
    rows = ["&a0 [" + ", ".join(['"lol"'] * width) + "]"]
    rows += [f"&a{k} [" + ", ".join([f"*a{k - 1}"] * width) + "]" for k in range(1, levels)]
    return "[" + ",\n  ".join(rows) + "]"


# A config that names a missing manifest: a value checked only after the data load would fail
# with "nope.csv does not exist" instead of naming its key, so every range case below also
# shows that the ranges are checked before any data is read (and the code before this fix,
# which accepted the values, fails fast on these cases instead of training).
NO_DATA = "data:\n  spec: csv:nope.csv\n"
SUITE = ("name: s\nsettings:\n  - name: a\n    set: [data.noise=idn]\nmethods: [ce]\n"
         "config:\n  data:\n    spec: csv:nope.csv\n")


def _range(kv: str, *needles: str, key: str = "") -> Case:
    """``run --config c.yaml --set KEY=VALUE``: an out-of-range value, refused before the data load;
    the error names ``key`` (default: KEY)."""
    return _named(f"config13-{kv}", _case("", ["run", "--config", "c.yaml", "--set", kv, "--out", "out"],
                                          f"config key '{key or kv.split('=')[0]}'", *needles,
                                          setup=lambda w: _write(w / "c.yaml", NO_DATA)))


def _config_file(id: str, text: str, *needles: str) -> Case:
    return _named(id, _case("", ["run", "--config", "c.yaml", "--out", "out"], "config file 'c.yaml'", *needles,
                            setup=lambda w: _write(w / "c.yaml", text)))


def _suite_file(id: str, text: str, *needles: str) -> Case:
    return _named(id, _case("", ["bench", "s.yaml", "--out", "out"], "suite file 's.yaml'", *needles,
                            setup=lambda w: _write(w / "s.yaml", text)))


NO_ANCHORS = "YAML anchors and aliases are not allowed"

CONFIG13_CASES = [
    # item 6: every value the issue lists, then the other ends of the ranges
    _range("seed=-1", "-1 is outside [0, 4294967294]"),
    _range("data.noise_seed=-5", "-5 is outside [0, 4294967294]"),
    _range("threads=-1", "-1 is outside [0, 1024]"),
    _range("optim.weight_decay=-1", "-1.0 is outside [0, inf)"),
    _range("optim.eval_batch_size=0", "0 is outside [1, 2147483647]"),
    _range("optim.label_smoothing=2", "2.0 is outside [0, 1)"),
    _range("finetune.lr_scale=-1", "-1.0 is outside (0, inf)"),
    _range("optim.lr=inf", "inf is outside (0, inf)"),
    _range("ssl.lr=nan", "nan is outside (0, inf)"),
    _range("seed=4294967295", "outside [0, 4294967294]"),  # np.random.seed(seed + 1) would overflow
    _range("threads=100000", "outside [0, 1024]"),  # torch segfaults
    _range("optim.lr=-.inf", "-inf is outside (0, inf)"),
    _range("optim.momentum=1", "1.0 is outside [0, 1)"),
    _range("optim.warmup_lr_epochs=nan", "nan is outside [0, inf)"),
    _range("ssl.momentum=-0.5", "outside [0, 1)"),
    _range("ssl.weight_decay=-1e-4", "outside [0, inf)"),
    _range("ssl.proj_dim=0", "outside [1, 2147483647]"),
    _range("ssl.crop_scale_min=0", "0.0 is outside (0, 1]"),
    _range("ssl.temperature=.inf", "inf is outside (0, inf)"),
    _range("data.pixel_scale=0", "outside (0, inf)"),
    _range("refine.threshold=.inf", "inf is outside (0, inf)"),
    _range("refine.iteration_epochs=-1", "outside [0, 2147483647]"),
    _range("refine.later_stages=[0, 3]", "0 is outside [1, 2147483647]", key="refine.later_stages[0]"),
    _range("checkpoint_every=-2", "outside [0, 2147483647]"),
    _range("coteaching.forget_rate=1", "1.0 is neither -1 (the noise rate) nor in [0, 1)"),
    _range("jocor.forget_rate=-0.5", "is neither -1 (the noise rate) nor in [0, 1)"),
    _range("jocor.lam=1.5", "1.5 is outside [0, 1]"),
    _range("jocor.lr=0", "0.0 is outside (0, inf)"),
    _range("coteaching.num_gradual=-1", "outside [0, 2147483647]"),
    _range("mentornet.burn_in=2", "outside [0, 1]"),
    _range("mentornet.momentum=1", "outside [0, 1)"),
    _range("dividemix.lambda_u=-2", "-2.0 is neither -1 (from the noise rate) nor in [0, inf)"),
    _range("dividemix.alpha=-1", "outside [0, inf)"),
    _range("dividemix.temperature=0", "outside (0, inf)"),
    _range("dividemix.rampup_epochs=-1", "outside [0, 2147483647]"),
    _range("dividemix.gmm_max_iter=0", "outside [1, 2147483647]"),
    _range("dividemix.gmm_tol=-1", "outside [0, inf)"),
    _range("dividemix.gmm_reg_covar=nan", "outside [0, inf)"),
    _named("config13-noise-seed-negative", _case(
        "", ["noise", "--data", "digits", "--type", "idn", "--rate", "0.2", "--seed", "-1", "--out", "out.csv"],
        "--seed -1 is outside [0, 4294967294]", out="out.csv")),
    _named("config13-bench-negative-seed", _case(
        "", ["bench", "s.yaml", "--set", "seed=-3", "--out", "out"], "suite s", "config key 'seed'",
        "-3 is outside [0, 4294967294]", setup=lambda w: _write(w / "s.yaml", SUITE))),
    _named("config13-bench-negative-noise-seed", _case(
        "", ["bench", "s.yaml", "--set", "data.noise_seed=-1", "--out", "out"], "config key 'data.noise_seed'",
        "-1 is outside [0, 4294967294]", setup=lambda w: _write(w / "s.yaml", SUITE))),
    _named("config13-suite-method-override-out-of-range", _case(
        "", ["bench", "s.yaml", "--out", "out"], "suite s", "config key 'optim.label_smoothing'", "outside [0, 1)",
        setup=lambda w: _write(w / "s.yaml", SUITE + "method_overrides:\n  ce: [optim.label_smoothing=1]\n"))),
    _named("config13-suite-budget-negative", _case(
        "", ["bench", "s.yaml", "--out", "out"], "suite s.yaml: 'budget_minutes' must be a number of minutes in "
        "(0, inf), got -5", setup=lambda w: _write(w / "s.yaml", SUITE + "budget_minutes: -5\n"))),
    # item 3: the YAML bomb, in a config file, a --set value and a suite file
    _config_file("config13-file-yaml-bomb", "method: ce\nseed: " + laughs() + "\n", "anchor &a0 at line 2",
                 NO_ANCHORS),
    _named("config13-set-yaml-bomb", _case(
        "", ["run", "--set", "seed=" + laughs(), "--out", "out"], "--set 'seed=[&a0", "anchor &a0 at line 1",
        NO_ANCHORS)),
    _suite_file("config13-suite-yaml-bomb", SUITE + "  seed: " + laughs() + "\n", "anchor &a0 at line 9",
                NO_ANCHORS),
    _config_file("config13-file-alias-only", "optim:\n  lr: *undefined\n", "alias *undefined at line 2", NO_ANCHORS),
    _config_file("config13-file-merge-key", NO_DATA + "optim:\n  <<: {lr: 0.1}\n  lr: 0.2\n",
                 "merge key '<<' at line 4"),
    _config_file("config13-file-deep-nesting", "seed: " + "[" * 100_000 + "\n",  # was a RecursionError
                 "nesting deeper than 32 levels at line 1"),
    _named("config13-file-huge-value-is-shortened", _case(
        "", ["run", "--config", "c.yaml", "--out", "out"],
        "config key 'seed': expected an integer, got [12345, 12345, 12345, 12345, 12345, 12345, ...]",
        setup=lambda w: _write(w / "c.yaml", "seed: [" + ", ".join(["12345"] * 100_000) + "]\n"))),
    # item 7: duplicate keys, a repeated top-level section and a repeated nested key
    _config_file("config13-file-duplicate-section", NO_DATA + "optim:\n  lr: 0.05\nseed: 1\noptim:\n  momentum: 0.8\n",
                 "duplicate key 'optim' at line 6 (first at line 3)"),
    _config_file("config13-file-duplicate-nested-key", NO_DATA + "optim:\n  lr: 0.05\n  batch_size: 32\n  lr: 0.1\n",
                 "duplicate key 'lr' at line 6 (first at line 4)"),
    _named("config13-set-duplicate-key", _case(
        "", ["run", "--set", "refine={iterations: 1, iterations: 2}", "--out", "out"],
        "--set 'refine={iterations: 1, iterations: 2}'", "duplicate key 'iterations' at line 1")),
    _suite_file("config13-suite-duplicate-section", SUITE + "settings:\n  - name: b\n",
                "duplicate key 'settings' at line 9 (first at line 2)"),
    _suite_file("config13-suite-duplicate-nested-key", SUITE + "    spec: csv:other.csv\n",
                "duplicate key 'spec' at line 9 (first at line 8)"),
]

# data lane of issue 13: huge/sparse integer labels, JSON overflow and nesting, CSV cross-checks and
# duplicate paths, symlink loops, undecodable file names, float TIFFs, images too small for `clean`.
DATA13_CASES = [
    _named("data13-json-label-1e30", _noise(
        "json:m.json", "m.json: entry 1: 'label' 1000000000000000000000000000000 is too large",
        setup=lambda w: _json_manifest(w, [("img/0.png", 0), ("img/1.png", 10**30)]))),
    _named("data13-json-label-5000-digits", _noise(
        "json:m.json", "m.json: not valid JSON for a manifest", "4300 digits",
        setup=lambda w: _write(w / "m.json", '[{"name": "img/0.png", "label": ' + "7" * 5000 + "}]"))),
    _named("data13-json-100k-nested-brackets", _noise(
        "json:m.json", "m.json: not valid JSON for a manifest (lists or objects nested too deeply)",
        setup=lambda w: _write(w / "m.json", "[" * 100_000))),
    _named("data13-json-duplicate-name", _noise(
        "json:m.json", "m.json: entry 2: image 'img/0.png' is listed again (first at entry 0)",
        setup=lambda w: _json_manifest(w, [("img/0.png", 0), ("img/1.png", 1), ("img/0.png", 0)]))),
    _named("data13-json-duplicate-other-label", _noise(
        "json:m.json", "m.json: entry 1: image 'img/0.png' is listed again with another label ('1' here, '0' there)",
        setup=lambda w: _json_manifest(w, [("img/0.png", 0), ("img/0.png", 1)]))),
    _named("data13-json-train-image-in-test", _noise(
        "json:m.json,test=t.json", "t.json: entry 0: image 'img/1.png' is listed again (first at entry 1 of",
        setup=lambda w: (_json_manifest(w, [("img/0.png", 0), ("img/1.png", 1)]),
                         _write(w / "t.json", json.dumps([{"name": "img/1.png", "label": 1}]))))),
    _named("data13-csv-train-ints-test-names", _noise(
        "csv:m.csv,test=t.csv",
        "t.csv: line 2: column 'label' has label 'cat', not one of the training classes (0, 1: m.csv has integer",
        setup=lambda w: (_csv(w, "path,label\nimg/0.png,0\nimg/1.png,1\n"),
                         _write(w / "t.csv", "path,label\nimg/2.png,cat\nimg/3.png,dog\n")))),
    _named("data13-csv-train-names-test-ints", _noise(
        "csv:m.csv,test=t.csv",
        "t.csv: line 2: column 'label' has label '0', not one of the training classes (cat, dog: m.csv has class "
        "names)",
        setup=lambda w: (_csv(w, "path,label\nimg/0.png,cat\nimg/1.png,dog\n"),
                         _write(w / "t.csv", "path,label\nimg/2.png,0\nimg/3.png,1\n")))),
    _named("data13-csv-duplicate-path", _noise(
        "csv:m.csv", "m.csv: line 4: image 'img/0.png' is listed again (first at line 2)",
        setup=lambda w: _csv(w, "path,label\nimg/0.png,cat\nimg/1.png,dog\nimg/0.png,cat\n"))),
    _named("data13-csv-duplicate-path-other-label", _noise(
        "csv:m.csv", "m.csv: line 3: image 'img/0.png' is listed again with another label ('dog' here, 'cat' there) "
        "(first at line 2)", setup=lambda w: _csv(w, "path,label\nimg/0.png,cat\nimg/0.png,dog\n"))),
    _named("data13-csv-duplicate-spelled-differently", _noise(
        "csv:m.csv", "m.csv: line 3: image './img/../img/1.png' is listed again (first at line 2)",
        setup=lambda w: _csv(w, "path,label\nimg/1.png,cat\n./img/../img/1.png,cat\nimg/2.png,dog\n"))),
    _named("data13-csv-duplicate-across-splits", _noise(
        "csv:m.csv", "m.csv: line 4: image 'img/0.png' is listed again (first at line 2)",
        setup=lambda w: _csv(w, "path,label,split\nimg/0.png,cat,train\nimg/1.png,dog,train\nimg/0.png,cat,test\n"))),
    _named("data13-csv-train-image-in-test-csv", _noise(
        "csv:m.csv,test=t.csv", "t.csv: line 3: image 'img/1.png' is listed again (first at line 3 of",
        setup=lambda w: (_csv(w, "path,label\nimg/0.png,cat\nimg/1.png,dog\n"),
                         _write(w / "t.csv", "path,label\nimg/2.png,cat\nimg/1.png,dog\n")))),
    _named("data13-csv-train-image-in-test-folder", _noise(
        "csv:m.csv,test=imgs/test", "image 'test/dog/1.png' is listed again (first at line 3 of",
        setup=lambda w: (_folder(w), _write(w / "m.csv", "path,label\nimgs/train/cat/0.png,cat\n"
                                                          "imgs/test/dog/1.png,dog\n")))),
    _named("data13-imagefolder-symlink-loop", _noise(
        "imagefolder:imgs", "imgs/train/cat/loop: symbolic link loop", "remove the link", setup=_symlink_loop)),
    _named("data13-imagefolder-printable-id-collision", _noise(
        "imagefolder:imgs", "its file name is not UTF-8", "is also the name of", setup=_id_collision)),
    _named("data13-imagefolder-float-tiff-out-of-range", _noise(
        "imagefolder:imgs", "cannot read image", "train/dog/f.tif", "float image with values in [300, 363]",
        setup=_float_tiff(np.arange(300, 364).reshape(8, 8)))),
    _named("data13-imagefolder-float-tiff-nan", _noise(
        "imagefolder:imgs", "cannot read image", "train/dog/f.tif", "NaN",
        setup=_float_tiff(np.where(np.eye(8) > 0, np.nan, 0.5)))),
    _named("data13-npz-class-names-repeated", _noise(
        "npz:d.npz", "d.npz: class_names: class 'a' listed twice",
        setup=lambda w: _npz(w / "d.npz", 2, class_names=np.array(["a", "a"])))),
    _named("data13-clean-1x1-images", _case(
        "", ["clean", "--data", "digits,size=1", "--out", "out"],
        "data 'digits,size=1': the training images are 1x1 pixels", "at least 2x2", "size=HxW")),
    _named("data13-clean-1x8-images", _case(
        "", ["clean", "--data", "digits,size=1x8", "--out", "out"], "the training images are 1x8 pixels")),
]

_HELD_LOCKS: list[int] = []  # file descriptors of the "other run" of the rundir-locked case


def _locked_by_another_run(w: Path) -> None:
    """``out`` claimed by another run: its lock file locked through another open file description."""
    import fcntl

    (w / "out").mkdir()
    fd = os.open(w / "out" / ".labelrefine.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    _HELD_LOCKS.append(fd)


def _resume_dir(config: bytes | None = None, metrics: bytes | None = None, checkpoint: bool = True,
                dirs: tuple[str, ...] = ()) -> Callable[[Path, Path], None]:
    """The finished digits run (its checkpoint records 1 epoch of metrics), with files damaged."""
    def setup(w: Path, runs: Path) -> None:
        out = _copy_run(runs, w)
        if not checkpoint:
            (out / "checkpoint.pt").unlink()
        for name, data in (("config.yaml", config), ("metrics.jsonl", metrics)):
            if data is not None:
                (out / name).write_bytes(data)
        for name in dirs:
            (out / name).unlink()
            (out / name).mkdir()
    return setup


def _out_file(cmd: str, out: str) -> list[str]:
    """noise/predict with --out; the input (data, model) is missing, so only a check made before
    the work can give the expected error."""
    if cmd == "noise":
        return ["noise", "--data", "csv:nope.csv", "--type", "none", "--out", out]
    return ["predict", "--model", "nope.pt", "nope.png", "--out", out]


RUN_NOPE = ["run", *_sets([*RUN_SETS, "data.spec=csv:nope.csv"])]  # the data would fail to load
CLEAN_NOPE = ["clean", "--data", "csv:nope.csv", *_sets(["model.backbone=tiny"])]

RUNDIR_CASES = [
    # unwritable output paths: refused before the data load (the data spec names no file at all)
    _named("rundir-run-out-under-proc", _case("", [*RUN_NOPE, "--out", "/proc/lr-test/out"],
                                              "output directory /proc/lr-test/out cannot be created",
                                              out="/proc/lr-test/out")),
    _named("rundir-run-out-below-a-file", _case("", [*RUN_NOPE, "--out", "afile/out"],
                                                "output directory afile/out cannot be created",
                                                "afile is not a directory", out="afile/out",
                                                setup=lambda w: _write(w / "afile", "precious"))),
    _named("rundir-clean-out-under-proc", _case("", [*CLEAN_NOPE, "--out", "/proc/lr-test/out"],
                                                "output directory /proc/lr-test/out cannot be created",
                                                out="/proc/lr-test/out")),
    _named("rundir-clean-out-below-a-file", _case("", [*CLEAN_NOPE, "--out", "afile/out"],
                                                  "afile is not a directory", out="afile/out",
                                                  setup=lambda w: _write(w / "afile", "precious"))),
    _named("rundir-noise-out-under-proc", _case("", _out_file("noise", "/proc/lr-test.csv"),
                                                "--out /proc/lr-test.csv cannot be written", out="/proc/lr-test.csv")),
    _named("rundir-noise-out-below-a-file", _case("", _out_file("noise", "afile/n.csv"),
                                                  "--out afile/n.csv", "afile is not a directory", out="afile/n.csv",
                                                  setup=lambda w: _write(w / "afile", "precious"))),
    _named("rundir-predict-out-under-proc", _case("", _out_file("predict", "/proc/lr-test.csv"),
                                                  "--out /proc/lr-test.csv cannot be written",
                                                  out="/proc/lr-test.csv")),
    _named("rundir-predict-out-below-a-file", _case("", _out_file("predict", "afile/p.csv"),
                                                    "--out afile/p.csv", "afile is not a directory", out="afile/p.csv",
                                                    setup=lambda w: _write(w / "afile", "precious"))),
    # an existing --out file is never replaced without --overwrite (a run's model.pt included)
    _named("rundir-noise-out-exists", _case("", _out_file("noise", "out.csv"), "--out out.csv already exists",
                                            "--overwrite", out="out.csv",
                                            setup=lambda w: _write(w / "out.csv", "precious"))),
    _named("rundir-predict-out-exists", _case("", _out_file("predict", "out/model.pt"),
                                              "--out out/model.pt already exists", "--overwrite",
                                              out="out/model.pt", setup=lambda w, runs: _copy_run(runs, w),
                                              needs_runs=True)),
    # a directory another run holds
    _named("rundir-locked-by-another-run", _case("", ["run", *_sets(RUN_SETS), "--out", "out"],
                                                 "output directory out is in use by another labelrefine run",
                                                 "(PID 4242)", setup=_locked_by_another_run)),
    _named("rundir-clean-locked-by-another-run", _case("", [*CLEAN_NOPE, "--out", "out"],
                                                       "out is in use by another labelrefine run (PID 4242)",
                                                       setup=_locked_by_another_run)),
    # --resume: a damaged config.yaml or metrics.jsonl is refused before any training
    _named("rundir-resume-config-not-utf8", _case("", RESUME, "--resume: out/config.yaml: line 2 is not UTF-8",
                                                  setup=_resume_dir(config=b"seed: 0\nmethod: \xff\n"),
                                                  needs_runs=True)),
    _named("rundir-resume-no-ckpt-config-not-utf8", _case(
        "", RESUME, "--resume: out/config.yaml: line 1 is not UTF-8",
        setup=_resume_dir(config=b"\xfe\xff", checkpoint=False), needs_runs=True)),
    _named("rundir-resume-no-ckpt-config-edited", _case(
        "", RESUME, "--resume: out/config.yaml differs from this config (at <root>)",
        setup=_resume_dir(config=b"# edited\n", checkpoint=False), needs_runs=True)),
    _named("rundir-resume-config-is-a-directory", _case(
        "", RESUME, "--resume: out/config.yaml is not a regular file", setup=_resume_dir(dirs=("config.yaml",)),
        needs_runs=True)),
    _named("rundir-resume-metrics-bad-json", _case(
        "", RESUME, "--resume: out/metrics.jsonl: line 1 is not valid JSON",
        setup=_resume_dir(metrics=b'{"phase": "train", "global_epoch": 1\n'), needs_runs=True)),
    _named("rundir-resume-metrics-not-utf8", _case(
        "", RESUME, "--resume: out/metrics.jsonl: line 1 is not UTF-8",
        setup=_resume_dir(metrics=b'{"phase": "\xff"}\n'), needs_runs=True)),
    _named("rundir-resume-metrics-wrong-record", _case(
        "", RESUME, "--resume: out/metrics.jsonl: line 1 is not the record of epoch 1",
        setup=_resume_dir(metrics=b'{"global_epoch": 7, "phase": "train"}\n'), needs_runs=True)),
    _named("rundir-resume-metrics-too-short", _case(
        "", RESUME, "--resume: out/metrics.jsonl has 0 complete line(s)", "records 1",
        setup=_resume_dir(metrics=b'{"global_epoch": 1, "pha'), needs_runs=True)),
    _named("rundir-resume-metrics-is-a-directory", _case(
        "", RESUME, "--resume: out/metrics.jsonl is not a regular file", setup=_resume_dir(dirs=("metrics.jsonl",)),
        needs_runs=True)),
]

CASES = (DATA_CASES + CONFIG_CASES + CLI_CASES + CHECKPOINT_CASES + STORE_CASES + CONFIG13_CASES + DATA13_CASES
         + RUNDIR_CASES)


def test_corpus_is_large_and_ids_unique():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(c.id for c in CASES)
    assert len(DATA_CASES) >= 8 and len(CONFIG_CASES) >= 8 and len(CLI_CASES) >= 5 and len(CHECKPOINT_CASES) >= 4
    assert len(RUNDIR_CASES) >= 15


# --------------------------------------------------------------------------------------------
# the runner


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> Path:
    """Two finished 1-epoch CE runs: ``digits_run`` (TINY digits) and ``npz_run`` (3-class npz)."""
    base = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LABELREFINE_CACHE", str(base / "cache"))
        mp.chdir(base)
        assert main(["-q", "run", *_sets(RUN_SETS), "--out", "digits_run"]) == 0
        _npz(base / "data.npz", 3)
        assert main(["-q", "run", *_sets(NPZ_SETS), "--out", "npz_run"]) == 0
    assert (base / "npz_run" / "checkpoint.pt").is_file() and (base / "digits_run" / "checkpoint.pt").is_file()
    return base


def _snapshot(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every path under ``root``: a file's bytes and mtime, ``None`` for a directory."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.fixture(autouse=True)
def _release_held_locks():
    yield
    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.pop())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, request):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(work)
    if case.setup is not None:
        if case.needs_runs:
            case.setup(work, request.getfixturevalue("finished_runs"))
        else:
            case.setup(work)
    existed = (work / case.out).exists()
    before = _snapshot(tmp_path)
    capsys.readouterr()

    code = main(case.argv)

    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured
    assert len(lines) == 1, lines
    assert lines[0].startswith("labelrefine: error: "), lines
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    assert (work / case.out).exists() == existed
    assert _snapshot(tmp_path) == before, "the failed command wrote or changed files"


def test_resume_with_unchanged_data_passes_the_data_check(finished_runs: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys):
    """The control of the ckpt-data-* cases: the same npz data resumes (the finished run is re-finished)."""
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    _copy_run(finished_runs, tmp_path, "npz_run")
    shutil.copy(finished_runs / "data.npz", tmp_path / "data.npz")
    ckpt = store.load(tmp_path / "out" / "checkpoint.pt", kind=CHECKPOINT_FORMAT, name="checkpoint")
    assert ckpt["data"]["num_classes"] == 3
    assert main(["-q", *RESUME_NPZ]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n_train"] == 54


# --------------------------------------------------------------------------------------------
# output failures that need more than a table row: a full disk, a read-only file system


@pytest.mark.parametrize("name", ["config.yaml", "checkpoint.pt", "labels.csv", "model.pt", "accuracy.png",
                                  "report.html", "summary.json"])
def test_disk_full_is_one_line_naming_the_file(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """The temporary file of ``name`` is /dev/full: every write to it fails with ENOSPC, as on a
    full disk. One line naming the file, exit 2, no temporary file or lock left behind."""
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, path = real(*args, **kwargs)
        if os.path.basename(path).startswith(f".{name}."):
            os.close(fd)
            os.unlink(path)
            os.symlink("/dev/full", path)
            fd = os.open(path, os.O_WRONLY)
        return fd, path

    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code = main(["-q", "run", *_sets(RUN_SETS), "--out", "out"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    # every artifact (torch files through labelrefine.store) reports the write's own ENOSPC
    assert re.fullmatch(rf"labelrefine: error: no space left on device writing out/{re.escape(name)}",
                        lines[0]), lines[0]
    out = tmp_path / "out"  # removed again when the failed run had written nothing into it
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert out.exists() == (name != "config.yaml")
    assert not [n for n in left if n.endswith(".tmp") or n == ".labelrefine.lock"], left
    assert "summary.json" not in left  # never marked finished: --resume (or bench) redoes the end


def _read_only_mount_works(d: Path) -> bool:
    try:
        res = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro,size=64k tmpfs {d}"],
                             capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


@pytest.mark.parametrize("cmd", ["run-new-dir", "run-existing-dir", "clean", "noise", "predict"])
def test_read_only_file_system(cmd: str, tmp_path: Path):
    """A read-only mount (a private tmpfs in a mount namespace): one line, exit 2, before any data
    is loaded (the data and model named here do not exist)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _read_only_mount_works(ro):
        pytest.skip("cannot mount a read-only tmpfs here (needs unshare -m and CAP_SYS_ADMIN)")
    argv = {"run-new-dir": [*RUN_NOPE, "--out", f"{ro}/out"], "run-existing-dir": [*RUN_NOPE, "--out", f"{ro}/out"],
            "clean": [*CLEAN_NOPE, "--out", f"{ro}/out"], "noise": _out_file("noise", f"{ro}/n.csv"),
            "predict": _out_file("predict", f"{ro}/p.csv")}[cmd]
    mount = (f"mount -t tmpfs -o size=64k tmpfs {ro} && mkdir {ro}/out && mount -o remount,ro {ro}"
             if cmd == "run-existing-dir" else f"mount -t tmpfs -o ro,size=64k tmpfs {ro}")
    script = f"{mount} && exec {shlex.quote(sys.executable)} -m labelrefine {shlex.join(argv)}"
    env = {**os.environ, "LABELREFINE_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=env)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("labelrefine: error: ") and "read-only file system" in lines[0], lines[0]
    assert str(ro) in lines[0]
    assert not (tmp_path / "cache").exists()
