"""The command line: --help/--version, the noise command, and one-line exit-2 errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelrefine import __version__
from labelrefine.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("labelrefine") and ": error: " in err[0]
    return err[0]


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("noise", "run", "methods"):
        assert cmd in out


def test_console_script_runs():
    exe = Path(sys.executable).with_name("labelrefine")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "labelrefine"]
    res = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and __version__ in res.stdout


def test_noise_digits_writes_csv(tmp_path, capsys):
    out = tmp_path / "sub" / "noisy.csv"
    assert main(["noise", "--data", "digits", "--type", "symmetric", "--rate", "0.3", "--seed", "1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"achieved rate: {round(0.3 * 1347) / 1347:.4f}" in text
    assert "transition matrix" in text
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["id", "clean_label", "noisy_label", "is_noisy"]
    flipped = sum(r["clean_label"] != r["noisy_label"] for r in rows)
    assert flipped == round(0.3 * len(rows))
    assert all(int(r["is_noisy"]) == (r["clean_label"] != r["noisy_label"]) for r in rows)


def test_noise_same_seed_same_csv(tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for out in (a, b):
        assert main(["noise", "--data", "digits", "--type", "idn", "--rate", "0.2", "--seed", "3",
                     "--out", str(out)]) == 0
    assert a.read_bytes() == b.read_bytes()


def _tiny_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--type", "idn", "--rate", "1.5"], "--rate 1.5 is outside [0, 1)"),
        (["--type", "idn", "--rate", "-0.1"], "outside [0, 1)"),
        (["--type", "gaussian", "--rate", "0.2"], "unknown noise type 'gaussian'"),
        (["--type", "idn"], "--rate is required"),
        (["--type", "column:worse"], "no label column 'worse'"),
    ],
)
def test_noise_bad_arguments(args, needle, capsys, tmp_path):
    out = tmp_path / "n.csv"
    code = main(["noise", "--data", "digits", *args, "--out", str(out)])
    assert code == 2
    assert needle in _err_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("unknownkind:/x", "unknown"),
        ("imagefolder:/definitely/not/here", "/definitely/not/here"),
        ("csv:/definitely/not/here.csv", "/definitely/not/here.csv"),
    ],
)
def test_noise_bad_data_spec(spec, needle, capsys, tmp_path):
    out = tmp_path / "n.csv"
    assert main(["noise", "--data", spec, "--type", "symmetric", "--rate", "0.1", "--out", str(out)]) == 2
    assert needle in _err_line(capsys)
    assert not out.exists()


def test_noise_corrupt_image_names_file(tmp_path, capsys):
    root = _tiny_folder(tmp_path / "data")
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "n.csv"
    assert main(["noise", "--data", f"imagefolder:{root}", "--type", "symmetric", "--rate", "0.1",
                 "--out", str(out)]) == 2
    assert "1.png" in _err_line(capsys)
    assert not out.exists()


def test_usage_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["noise", "--data", "digits", "--type", "idn", "--rate", "abc"])
    assert e.value.code == 2
    assert "--rate" in _err_line(capsys)
