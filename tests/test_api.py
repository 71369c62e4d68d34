"""The user's path: `labelrefine clean`, `find_label_issues`, `fit`, and the README's API example."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import labelrefine
from labelrefine.api import LABEL_COLUMNS, as_image_tensor, auto_settings, make_data
from labelrefine.cli import main
from labelrefine.errors import UserError

# Fast settings for tests (the automatic ones are sized for real data).
FAST = ["model.backbone=tiny", "ssl.epochs=1", "refine.warmup_epochs=1", "refine.iterations=1",
        "refine.first_stages=[1]", "finetune.epochs=1", "optim.batch_size=64"]


def _digits(n: int = 240):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:n] * (255 / 16)).round().astype(np.uint8)  # (n, 8, 8)
    return x, d.target[:n].copy()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))


def test_find_label_issues_returns_the_labels_csv_table(tmp_path):
    x, y = _digits()
    rng = np.random.default_rng(0)
    noisy = y.copy()
    flip = rng.choice(len(y), 24, replace=False)
    noisy[flip] = (noisy[flip] + 1) % 10
    out = tmp_path / "run"
    table = labelrefine.find_label_issues(x, noisy, overrides=FAST, out=out)
    assert list(table.columns[:len(LABEL_COLUMNS)]) == LABEL_COLUMNS
    assert {"self_confidence", "aum", "knn_ssl", "knn_model"} <= set(table.columns)  # why a sample is flagged
    assert len(table) == int(round(len(y) * 0.9))  # 10% held out as the noisy validation split
    assert table["label_quality"].is_monotonic_increasing  # suspected errors first
    assert table["is_label_issue"].dtype == bool
    # the same table as labels.csv
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert table["id"].tolist() == [r["id"] for r in rows]
    assert table["refined_label"].tolist() == [r["refined_label"] for r in rows]
    assert list(table.columns) == list(rows[0])
    # ids are positions in the input arrays; given labels are the noisy ones passed in
    for _, r in table.head(20).iterrows():
        assert r["given_label"] == str(noisy[int(r["id"])])
    assert (out / "report.html").is_file() and (out / "model.pt").is_file()
    with pytest.raises(UserError, match="already holds a run"):  # never overwritten
        labelrefine.find_label_issues(x, noisy, overrides=FAST, out=out)


def test_fit_returns_a_model_and_cleans_up(tmp_path):
    x, y = _digits()
    names = [f"digit {d}" for d in range(10)]
    import tempfile

    scratch = Path(tempfile.gettempdir())
    before = {p for p in scratch.iterdir() if p.name.startswith("labelrefine-")}
    model = labelrefine.fit(x[..., None], np.array(names)[y], classes=names, overrides=FAST)  # NHWC, class names
    assert model.classes == names and model.in_channels == 1 and model.image_size == (8, 8)
    probs = model.predict_proba(as_image_tensor(x[:16]))
    assert probs.shape == (16, 10)
    assert torch.allclose(probs.sum(1), torch.ones(16), atol=1e-5)
    assert {p for p in scratch.iterdir() if p.name.startswith("labelrefine-")} == before  # no run dir left


def test_array_conversions_and_errors():
    x = np.zeros((4, 3, 5, 6), np.uint8)
    assert as_image_tensor(x).shape == (4, 3, 5, 6)
    assert as_image_tensor(np.zeros((4, 5, 6, 3), np.uint8)).shape == (4, 3, 5, 6)
    assert as_image_tensor(np.full((2, 5, 6), 1.0, np.float32)).max() == 255
    data = make_data(np.zeros((3, 4, 4), np.uint8), ["b", "a", "b"])
    assert data.train.classes == ["a", "b"] and data.train.labels.tolist() == [1, 0, 1]
    for bad, msg in [((np.zeros((4, 5)), [0] * 4), "shape"), ((np.zeros((4, 2, 5, 5)), [0] * 4), "channels"),
                     ((np.full((2, 4, 4), 300.0), [0, 1]), r"\[0, 255\]"),
                     ((np.full((2, 4, 4), np.nan), [0, 1]), "NaN"),
                     ((np.zeros((3, 4, 4), np.uint8), [0, 1]), "expected 3 labels"),
                     ((np.zeros((2, 4, 4), np.uint8), [0, -1]), "negative")]:
        with pytest.raises(UserError, match=msg):
            make_data(*bad)
    with pytest.raises(UserError, match="not one of the classes"):
        make_data(np.zeros((2, 4, 4), np.uint8), ["a", "c"], classes=["a", "b"])


def test_auto_settings_depend_on_device_and_channels():
    cpu = dict(auto_settings(5000, (28, 28), 1, "cpu"))
    gpu = dict(auto_settings(50000, (32, 32), 3, "cuda"))
    assert "model.width=8" in cpu and "flip=false" in cpu and "data.val_fraction=0.1" in cpu
    assert "model.width=64" in gpu and "ssl.epochs=30" in gpu and "flip=true" in gpu
    assert "data.val_fraction=0.05" in gpu


def test_auto_settings_choose_the_cpu_profile_by_data_size():
    """The fast recipe from FAST_PROFILE_MIN_IMAGES images on; each profile resolves to a valid config
    whose suite twin (detect-cifar10n) it matches."""
    from labelrefine.api import FAST_PROFILE_MIN_IMAGES
    from labelrefine.bench.suites import load_suite
    from labelrefine.config import config_to_dict, load_config

    small = dict(auto_settings(FAST_PROFILE_MIN_IMAGES - 1, (32, 32), 3, "cpu"))
    large = dict(auto_settings(FAST_PROFILE_MIN_IMAGES, (32, 32), 3, "cpu"))
    assert "model.width=8" in small and "model.backbone=airbench" not in small
    assert "model.backbone=airbench" in large and "model.width=32" in large and "model.width=8" not in large
    assert "the fast recipe" in large["optim.batch_size=1024"]
    cfg = config_to_dict(load_config(None, list(large)))
    suite = load_suite("detect-cifar10n").config
    for section in ("model", "optim", "ssl", "refine", "finetune"):
        for key, value in suite.get(section, {}).items():
            assert cfg[section][key] == value, f"{section}.{key}"
    assert cfg["epochs"] == suite["epochs"]


def _folder(root: Path, n_per_class: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_per_class), ("test", 5)):
        for c, name in enumerate(["cat", "dog"]):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 80, (12, 12, 3), dtype=np.uint8) + np.uint8(120 * c)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_clean_cli_on_an_imagefolder(tmp_path, capsys):
    data = _folder(tmp_path / "pets")
    out = tmp_path / "out"
    args = ["clean", "--data", f"imagefolder:{data}", "--out", str(out), *sum((["--set", s] for s in FAST), [])]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "40 training images, 12x12, 3 channel(s), 2 classes" in printed
    assert "settings chosen for this data" in printed and "model.width=8" in printed
    assert "ranked table:" in printed and "suspected label errors (flagged):" in printed
    assert "estimated wrong labels:" in printed
    rows = list(csv.DictReader((out / "labels.csv").open()))
    quality = [float(r["label_quality"]) for r in rows]
    assert quality == sorted(quality) and len(rows) == 36
    assert all(r["id"].startswith("train/") for r in rows)
    for name in ("report.html", "model.pt", "summary.json"):
        assert (out / name).is_file()
    # the directory now holds a run: refused without --resume/--overwrite, nothing changed
    stamp = (out / "labels.csv").stat().st_mtime_ns
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "labels.csv").stat().st_mtime_ns == stamp


def test_clean_resizes_a_folder_of_mixed_size_photos_and_says_why(tmp_path, capsys):
    """Larger photos of mixed sizes (500x375, 375x500, 480x360 JPEGs) work out of the box: clean
    picks a size, prints what and why, and logs an ETA at the start of each long phase."""
    rng = np.random.default_rng(1)
    sizes = [(375, 500), (500, 375), (360, 480)]
    for split, n in (("train", 12), ("test", 3)):
        for c, name in enumerate(["cat", "dog", "fox"]):
            d = tmp_path / "photos" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                h, w = sizes[i % 3]
                arr = rng.integers(0, 90, (h, w, 3), dtype=np.uint8) + np.uint8(80 * c)
                Image.fromarray(arr).save(d / f"{i}.jpg", quality=85)
    out = tmp_path / "out"
    small_batches = ["optim.batch_size=4", "ssl.batch_size=6"]  # several steps an epoch: the ETA is timed on them
    args = ["clean", "--data", f"imagefolder:{tmp_path / 'photos'}", "--out", str(out),
            *sum((["--set", s] for s in [*FAST, *small_batches]), [])]
    assert main(args) == 0
    printed, logged = capsys.readouterr()
    assert "resizing: the images are mixed sizes, 360-500 x 375-500 (HxW)" in printed
    assert "training at 64x64 (at most 64 px on cpu)" in printed
    assert "36 training images, 64x64, 3 channel(s), 3 classes" in printed
    assert ",size=64x64" in (out / "config.yaml").read_text()
    etas = [line for line in logged.splitlines() if "the phase's" in line]
    assert any("ssl: about" in m for m in etas) and any("warmup: about" in m for m in etas), etas
    assert len(etas) == len({m.split(":")[0] for m in etas}), etas  # once per phase, not every epoch
    assert len(list(csv.DictReader((out / "labels.csv").open()))) == 32  # 36 less the 10% validation split


@pytest.mark.parametrize("args,message", [
    (["--data", "imagefolder:nowhere"], "nowhere"),
    (["--data", "digits", "--set", "optim.lr=-1"], "optim.lr"),
    (["--data", "digits", "--set", "bogus=1"], "unknown config key 'bogus'"),
])
def test_clean_cli_errors(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["clean", *args, "--out", "o"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("call", ["find_label_issues", "fit"])
def test_failed_training_removes_the_temporary_run_directory(call, tmp_path, monkeypatch):
    import tempfile

    from labelrefine.errors import TrainingDiverged

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    x, y = _digits(120)
    with pytest.raises(TrainingDiverged):
        getattr(labelrefine, call)(x, y, overrides=[*FAST, "ssl.epochs=0", "optim.lr=1e30", "optim.nesterov=false"])
    assert list((tmp_path / "tmp").iterdir()) == []


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """The README's Python API block, run as written (in a scratch directory)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    issues = namespace["issues"]
    assert list(issues.columns[:len(LABEL_COLUMNS)]) == LABEL_COLUMNS and len(issues) > 0
    assert namespace["model"].classes


def test_integer_labels_name_their_classes_by_value():
    """Labels 0 and 10**6 are 2 classes (they once made 1,000,001 and an 8 TB transition matrix)."""
    x = np.zeros((4, 4, 4), np.uint8)
    data = make_data(x, np.array([0, 10**6, 0, 10**6]), test_images=x[:2], test_labels=np.array([10**6, 0]))
    assert data.train.classes == ["0", "1000000"] and data.train.labels.tolist() == [0, 1, 0, 1]
    assert data.test.labels.tolist() == [1, 0]  # test labels by value too
    assert make_data(x, np.array([3, 1, 2, 1])).train.classes == ["1", "2", "3"]
    assert make_data(x, [0, 1, 2, 1]).train.labels.tolist() == [0, 1, 2, 1]  # 0..C-1 keep their indices
    with pytest.raises(UserError, match=r"test_labels: label 7 is not one of the training classes \(0, 1000000\)"):
        make_data(x, np.array([0, 10**6, 0, 10**6]), test_images=x[:1], test_labels=np.array([7]))
    with pytest.raises(UserError, match=r"labels: label -3 is negative"):
        make_data(x, np.array([0, -3, 1, 1]))
    with pytest.raises(UserError, match=r"label 5 is outside \[0, 2\)"):  # with classes: indices into them
        make_data(x, np.array([0, 5, 1, 1]), classes=["a", "b"])


def test_find_label_issues_with_a_label_of_a_million(tmp_path):
    x, y = _digits()
    labels = y * 10**5  # 0, 100000, ..., 900000
    table = labelrefine.find_label_issues(x, labels, overrides=FAST, out=tmp_path / "run")
    assert set(table["given_label"]) == {str(v) for v in set(labels.tolist())}
    for _, r in table.head(10).iterrows():
        assert r["given_label"] == str(labels[int(r["id"])])


def test_api_input_errors_are_user_errors():
    x = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(UserError, match=r"^test_images: each image is 1x16x16 \(CxHxW\) but the training images "
                                        r"are 1x8x8; give test images of the training shape$"):
        make_data(x, [0, 1, 0, 1], test_images=np.zeros((2, 16, 16), np.uint8), test_labels=[0, 1])
    with pytest.raises(UserError, match=r"test_images: each image is 3x8x8 \(CxHxW\) but the training images "
                                        r"are 1x8x8"):
        make_data(x, [0, 1, 0, 1], test_images=np.zeros((2, 8, 8, 3), np.uint8), test_labels=[0, 1])
    with pytest.raises(UserError, match=r"^classes: class 'a' listed twice$"):
        make_data(x, [0, 1, 0, 1], classes=["a", "a"])
    with pytest.raises(UserError, match=r"^classes: empty class name$"):
        labelrefine.find_label_issues(x, ["a", "", "a", ""], classes=["a", ""], overrides=FAST)
    with pytest.raises(UserError, match=r"^images: the training images are 1x1 pixels; the method needs at least 2x2"):
        labelrefine.find_label_issues(np.zeros((20, 1, 1), np.uint8), np.arange(20) % 2, overrides=FAST)
