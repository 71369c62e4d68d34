"""labelrefine.store: checksummed, weights_only torch files, and the caches that use it.

The bad checkpoint.pt / model.pt cases run through the CLI in tests/test_bad_inputs.py
(STORE_CASES); random damage in tests/test_fuzz_files.py. Here: the format itself, a full disk,
and the two caches, which must never stop a run: a hostile or damaged cache is detected, ignored
and rebuilt, and the run's results are those of an intact run.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _store_helpers import code_payload, overwrite, random_bytes_in_tensor
from PIL import Image

from labelrefine import store
from labelrefine.data.cache import STORE_FORMAT
from labelrefine.engine import Context
from labelrefine.engine.checkpoint import rng_state as _rng_state
from labelrefine.engine.checkpoint import set_rng_state as _set_rng_state
from labelrefine.errors import UserError
from labelrefine.methods.simclr import ENCODER_FORMAT
from labelrefine.pipeline import run
from labelrefine.predict import LEGACY_MODEL_FORMAT, MODEL_FORMAT, load_model

KIND = "labelrefine-test-v1"


def _obj() -> dict:
    return {"w": torch.arange(1000, dtype=torch.float32), "n": [1, 2.5, "x", None, True], "t": (3, 4),
            "nested": {"a": {"b": torch.zeros(2, 3, dtype=torch.uint8)}}, 7: b"bytes"}


def test_round_trip(tmp_path: Path):
    path = tmp_path / "f.pt"
    store.save(path, _obj(), kind=KIND)
    header = path.read_bytes().split(b"\n", 1)[0].decode()
    magic, kind, length, digest = header.split(" ")
    assert (magic, kind, len(length), len(digest)) == ("labelrefine-store-v1", KIND, 20, 64)
    assert int(length) == path.stat().st_size - len(header) - 1
    back = store.load(path, kind=KIND, name="test file")
    assert torch.equal(back["w"], _obj()["w"]) and back["n"] == [1, 2.5, "x", None, True] and back["t"] == (3, 4)
    assert torch.equal(back["nested"]["a"]["b"], torch.zeros(2, 3, dtype=torch.uint8)) and back[7] == b"bytes"
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("value", [np.zeros(3), np.float64(1.0), np.int64(1), {1, 2}, object(), Path("x"),
                                   {(1, 2): 3}])
def test_save_refuses_what_weights_only_cannot_load(value, tmp_path: Path):
    with pytest.raises(TypeError, match=r"\['x'\]\[1\]|key"):
        store.save(tmp_path / "f.pt", {"x": [0, value]}, kind=KIND)
    assert not list(tmp_path.iterdir())


def _damaged(path: Path, how: str) -> None:
    data = path.read_bytes()
    start = data.index(b"\n") + 1
    if how == "truncated":
        path.write_bytes(data[:-1])
    elif how == "appended":
        path.write_bytes(data + b"x")
    elif how == "payload-byte":
        overwrite(path, start + (len(data) - start) // 2, bytes([data[start + (len(data) - start) // 2] ^ 1]))
    elif how == "digest-digit":
        i = data.index(b" ", data.index(KIND.encode()) + len(KIND) + 1) + 1
        overwrite(path, i, b"0" if data[i:i + 1] != b"0" else b"1")
    elif how == "header-only":
        path.write_bytes(data[:start])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "other-kind":
        path.write_bytes(store.frame("labelrefine-other-v1", data[start:]))
    elif how == "newer-kind":
        path.write_bytes(store.frame("labelrefine-test-v2", data[start:]))
    elif how == "newer-store":
        path.write_bytes(data.replace(b"labelrefine-store-v1", b"labelrefine-store-v7", 1))
    elif how == "plain-torch":
        torch.save(_obj(), path)
    elif how == "not-torch":
        path.write_bytes(store.frame(KIND, b"this is no zip archive"))
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize(("how", "error", "words"), [
    ("truncated", store.Damaged, "is truncated"),
    ("header-only", store.Damaged, "is truncated (0 of"),
    ("appended", store.Damaged, "1 bytes after the end of its payload"),
    ("payload-byte", store.Damaged, "SHA-256 checksum mismatch"),
    ("digest-digit", store.Damaged, "SHA-256 checksum mismatch"),
    ("empty", store.Damaged, "is empty"),
    ("other-kind", store.OtherFormat, "is a labelrefine-other-v1 file, not a labelrefine-test-v1 file"),
    ("newer-kind", store.OtherFormat, "another labelrefine version (format labelrefine-test-v2"),
    ("newer-store", store.OtherFormat, "another labelrefine version (file format v7"),
    ("plain-torch", store.LegacyFile, "plain torch file without labelrefine's checksum header"),
    ("not-torch", store.Undecodable, "is not a valid torch file"),
    ("directory", store.NotAFile, "is a directory"),
    ("missing", store.NotAFile, "does not exist"),
])
def test_load_refuses(how, error, words, tmp_path: Path):
    path = tmp_path / "f.pt"
    store.save(path, _obj(), kind=KIND)
    _damaged(path, how)
    with pytest.raises(error) as e:
        store.load(path, kind=KIND, name="test file")
    assert str(e.value).startswith(f"test file {path} ") and words in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_code_in_a_valid_frame_is_not_run(tmp_path: Path):
    """A file with a correct header and checksum whose pickle would run code: weights_only refuses it."""
    path, target = tmp_path / "f.pt", tmp_path / "pwned"
    path.write_bytes(store.frame(KIND, code_payload(target)))
    with pytest.raises(store.Undecodable, match="holds objects other than tensors and plain containers"):
        store.load(path, kind=KIND, name="test file")
    path.write_bytes(code_payload(target))
    with pytest.raises(store.Undecodable, match="holds objects other than tensors"):
        store.load_legacy(path, name="test file")
    assert not target.exists()


def test_full_disk_raises_the_write_error_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "f.pt"
    store.save(path, {"old": torch.ones(3)}, kind=KIND)
    before = path.read_bytes()
    real = store._HashingWriter.write

    class Full:  # the file once the disk is full: a short write, then ENOSPC
        def __init__(self, f):
            self.f = f

        def write(self, b):
            self.f.write(bytes(b)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    def write(self, b):
        if self.n > 2000 and not isinstance(self.f, Full):
            self.f = Full(self.f)
        return real(self, b)

    monkeypatch.setattr(store._HashingWriter, "write", write)
    # store.save re-raises the write's OSError; io.atomic_path turns it into one line naming the file
    with pytest.raises(UserError, match=f"^no space left on device writing {re.escape(str(path))}$"):
        store.save(path, {"new": torch.zeros(10_000)}, kind=KIND)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["f.pt"]


def test_rng_state_is_plain_and_restores_exactly(tiny_config):
    cfg = tiny_config("method=ce")
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ctx = Context(cfg, images, torch.zeros(8, dtype=torch.int64), 2, device=torch.device("cpu"), ssl_images=images)
    random.seed(3)
    np.random.seed(4)
    np.random.normal()  # a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in python's
    state = _rng_state(ctx)
    store.check_plain(state)

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.random(), np.random.normal(), torch.rand(1).item(),
                torch.randint(0, 1000, (1,), generator=ctx.generator).item())

    expected = draws()
    draws()
    _set_rng_state(ctx, state)
    assert draws() == expected


def _legacy_model(model: Path, to: Path) -> None:
    """model.pt as labelrefine wrote it before checksums: a plain torch file of format v1."""
    blob = store.load(model, kind=MODEL_FORMAT, name="model file")
    torch.save({**blob, "format": LEGACY_MODEL_FORMAT}, to)


def test_legacy_v1_model_loads_with_a_warning(tiny_config, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    run(tiny_config("method=ce", "epochs=1"), tmp_path / "out")
    model = tmp_path / "out" / "model.pt"
    _legacy_model(model, tmp_path / "v1.pt")
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="labelrefine"):
        old = load_model(tmp_path / "v1.pt")
    assert "carries no checksum" in caplog.text
    assert torch.equal(old.predict_proba(images), load_model(model).predict_proba(images))
    blob = torch.load(tmp_path / "v1.pt", weights_only=True)  # the fields are validated as in v2
    torch.save({**blob, "mean": [float("nan")]}, tmp_path / "v1-nan.pt")
    with pytest.raises(UserError, match="field 'mean' holds a non-finite value"):
        load_model(tmp_path / "v1-nan.pt")


# -- the caches: hostile or damaged files are detected, ignored and rebuilt --------------------

def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for k, cls in enumerate(("cat", "dog", "fox")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                a = np.clip(rng.normal(60 + 70 * k, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / split / cls / f"{i}.png")
    return root


def _results(out: Path) -> tuple[bytes, bytes, dict]:
    summary = json.loads((out / "summary.json").read_text())
    for volatile in ("seconds", "code_version", "finished_at"):
        summary.pop(volatile)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in metrics:
        record.pop("seconds")
    return (out / "labels.csv").read_bytes(), metrics, summary


def _hostile(path: Path, kind: str, how: str, target: Path) -> None:
    if how == "runs-code":  # a plain torch file whose pickle would create ``target``
        path.write_bytes(code_payload(target))
    elif how == "runs-code-framed":  # the same behind a valid header and checksum
        path.write_bytes(store.frame(kind, code_payload(target)))
    elif how == "tensor-bytes":  # 64 random bytes inside the largest tensor
        random_bytes_in_tensor(path)


HOW = ["runs-code", "runs-code-framed", "tensor-bytes"]


@pytest.mark.parametrize("how", HOW)
def test_hostile_image_cache_is_rebuilt(how, tiny_config, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    data = _folder(tmp_path / "imgs")
    cfg = tiny_config("method=ce", "epochs=1", "ssl.epochs=0", f"data.spec=imagefolder:{data}",
                      "data.noise=symmetric")
    run(cfg, tmp_path / "intact")
    (file,) = (tmp_path / "cache").glob("imagefolder-*.pt")
    good = file.read_bytes()
    _hostile(file, STORE_FORMAT, how, tmp_path / "pwned")
    with caplog.at_level(logging.INFO, logger="labelrefine"):
        run(cfg, tmp_path / "again")
    assert ("ignoring unreadable cache file" if how != "runs-code" else "has no checksum header") \
        in caplog.text
    assert not (tmp_path / "pwned").exists()
    assert _results(tmp_path / "again") == _results(tmp_path / "intact")
    assert file.read_bytes() == good  # decoded again and rewritten


@pytest.mark.parametrize("how", HOW)
def test_hostile_ssl_cache_is_pretrained_again(how, tiny_config, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cfg = tiny_config("method=ce_ssl", "epochs=1", "ssl.epochs=1")
    run(cfg, tmp_path / "intact")
    (file,) = (tmp_path / "cache" / "ssl").glob("*.pt")
    good = store.load(file, kind=ENCODER_FORMAT, name="SSL cache")["encoder"]
    _hostile(file, ENCODER_FORMAT, how, tmp_path / "pwned")
    with caplog.at_level(logging.INFO, logger="labelrefine"):
        run(cfg, tmp_path / "again")
    assert ("ignoring unreadable SSL cache" if how != "runs-code" else "has no checksum header") \
        in caplog.text
    assert not (tmp_path / "pwned").exists()
    assert _results(tmp_path / "again") == _results(tmp_path / "intact")
    again = store.load(file, kind=ENCODER_FORMAT, name="SSL cache")["encoder"]  # pretrained again, rewritten
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)
