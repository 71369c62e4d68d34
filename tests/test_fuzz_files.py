"""Property tests (hypothesis): random damage to the files labelrefine reads back (issue 13).

A finished tiny run's ``checkpoint.pt`` and ``model.pt``, and the two caches, get random byte
ranges overwritten (random offset, length and content), are truncated, or get bytes appended:

* ``run --resume`` and ``predict`` exit 2 with exactly one stderr line and write nothing, for
  every change (never exit 0 with different results);
* a damaged cache never stops a run and is never used: the image cache's loader returns the
  images an intact cache holds (it decodes again), the SSL cache's loader refuses the file and
  leaves the model untouched (it is pretrained again, deterministically; the end-to-end run of
  both cases is in tests/test_store.py). The file is rewritten intact by the next save.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from labelrefine.cli import main
from labelrefine.config import load_config
from labelrefine.data.sources import load_data
from labelrefine.engine import Context
from labelrefine.methods.simclr import encoder_cache_path, load_cached_encoder, save_cached_encoder
from labelrefine.models import create_backbone

SETS = [f"--set={s}" for s in [*TINY, "method=ce", "epochs=1", "ssl.epochs=0"]]
FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# A change: ("overwrite", offset fraction, bytes) | ("truncate", length fraction) | ("append", bytes).
CHANGES = st.one_of(
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("overwrite-head"), st.integers(0, 140), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)


def _apply(data: bytes, change: tuple) -> bytes:
    what = change[0]
    if what in ("overwrite", "overwrite-head"):
        at = int(change[1] * (len(data) - 1)) if what == "overwrite" else min(change[1], len(data) - 1)
        return data[:at] + change[2] + data[at + len(change[2]):]
    if what == "truncate":
        return data[: int(change[1] * len(data))]
    return data + change[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-epoch CE run on TINY digits in ``base/out``, and 3 PNGs in ``base/imgs``."""
    base = tmp_path_factory.mktemp("fuzzrun")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LABELREFINE_CACHE", str(base / "cache"))
        mp.chdir(base)
        assert main(["-q", "run", *SETS, "--out", "out"]) == 0
    (base / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)).save(
            base / "imgs" / f"{i}.png")
    return base


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("labelrefine: error: "), lines
    return lines[0]


@FUZZ
@given(change=CHANGES)
def test_damaged_checkpoint_never_resumes(finished: Path, change, capsys, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LABELREFINE_CACHE", str(finished / "cache"))
    monkeypatch.chdir(finished)
    ckpt = finished / "out" / "checkpoint.pt"
    good = ckpt.read_bytes()
    damaged = _apply(good, change)
    assume(damaged != good)
    try:
        ckpt.write_bytes(damaged)
        before = _snapshot(finished)
        line = _one_line_exit_2(capsys, ["run", *SETS, "--resume", "--out", "out"])
        assert "checkpoint out/checkpoint.pt" in line
        assert _snapshot(finished) == before
    finally:
        ckpt.write_bytes(good)


@FUZZ
@given(change=CHANGES)
def test_damaged_model_never_predicts(finished: Path, change, capsys, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(finished)
    model = finished / "out" / "model.pt"
    good = model.read_bytes()
    damaged = _apply(good, change)
    assume(damaged != good)
    (finished / "bad.pt").write_bytes(damaged)
    line = _one_line_exit_2(capsys, ["predict", "--model", "bad.pt", "imgs", "--out", "preds.csv"])
    assert "model file bad.pt" in line
    assert not (finished / "preds.csv").exists()


def test_intact_files_pass(finished: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    """The control: the undamaged model predicts (and the fixture's run resumed nothing yet)."""
    monkeypatch.chdir(finished)
    assert main(["-q", "predict", "--model", "out/model.pt", "imgs", "--out", "preds.csv"]) == 0
    assert len((finished / "preds.csv").read_text().splitlines()) == 4
    (finished / "preds.csv").unlink()


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory) -> tuple[str, Path, Path, dict]:
    """An imagefolder, its filled cache file and the intact decoded splits."""
    base = tmp_path_factory.mktemp("fuzzcache")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (base / "imgs" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(
                    base / "imgs" / split / cls / f"{i}.png")
    spec, cache = f"imagefolder:{base / 'imgs'}", base / "cache"
    d = load_data(spec, cache_dir=cache)
    (file,) = cache.glob("*.pt")
    return spec, cache, file, {"train": d.train.images.clone(), "test": d.test.images.clone()}


@FUZZ
@given(change=CHANGES)
def test_damaged_image_cache_is_never_used(image_cache, change):
    spec, cache, file, intact = image_cache
    good = file.read_bytes()
    damaged = _apply(good, change)
    assume(damaged != good)
    file.write_bytes(damaged)
    d = load_data(spec, cache_dir=cache)  # decodes again
    assert torch.equal(d.train.images, intact["train"]) and torch.equal(d.test.images, intact["test"])
    assert file.read_bytes() == good  # rewritten


@pytest.fixture(scope="module")
def ssl_cache(tmp_path_factory):
    """A Context with an SSL cache holding a known encoder; a fresh model; the intact file's bytes."""
    base = tmp_path_factory.mktemp("fuzzssl")
    cfg = load_config(None, [*TINY, "method=ce_ssl"])
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ctx = Context(cfg, images, torch.zeros(16, dtype=torch.int64), 2, device=torch.device("cpu"),
                  ssl_images=images, cache_dir=str(base))
    torch.manual_seed(1)
    trained = create_backbone("tiny", in_channels=1, num_classes=2)
    save_cached_encoder(ctx, trained, {"epochs": 1})
    torch.manual_seed(2)
    fresh = create_backbone("tiny", in_channels=1, num_classes=2)
    assert load_cached_encoder(ctx, fresh) is not None  # the intact file loads ...
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.state_dict().items() if
               not k.startswith("fc."))
    torch.manual_seed(2)
    return ctx, encoder_cache_path(ctx), encoder_cache_path(ctx).read_bytes(), trained


@FUZZ
@given(change=CHANGES)
def test_damaged_ssl_cache_is_never_used(ssl_cache, change):
    ctx, file, good, trained = ssl_cache
    damaged = _apply(good, change)
    assume(damaged != good)
    file.write_bytes(damaged)
    torch.manual_seed(2)
    model = create_backbone("tiny", in_channels=1, num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        assert load_cached_encoder(ctx, model) is None  # ... a damaged one never does, and changes nothing
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        save_cached_encoder(ctx, trained, {"epochs": 1})
        assert file.read_bytes() == good
    finally:
        file.write_bytes(good)
