"""labelrefine predict: a trained model.pt on image files and folders, CSV out, one-line errors."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from labelrefine.cli import main
from labelrefine.config import load_config
from labelrefine.pipeline import run
from labelrefine.predict import MODEL_FORMAT, load_model
from labelrefine.store import load as store_load
from labelrefine.store import save as store_save

CLASSES = ['green & <"blue">', "red", "white"]  # sorted, as imagefolder orders its classes
COLOURS = [(30, 160, 200), (200, 30, 30), (230, 230, 230)]


def _image(rng: np.random.Generator, colour, size=16) -> Image.Image:
    a = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a, mode="RGB")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CE run on a 60-image, 3-class imagefolder of 16×16 RGB PNGs; returns (root, model.pt)."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for name, colour in zip(CLASSES, COLOURS, strict=True):
        (root / "data" / "train" / name).mkdir(parents=True)
        for i in range(20):
            _image(rng, colour).save(root / "data" / "train" / name / f"{i:02d}.png")
    mp = pytest.MonkeyPatch()
    mp.setenv("LABELREFINE_CACHE", str(root / "cache"))
    try:
        cfg = load_config(None, [*TINY, f"data.spec=imagefolder:{root / 'data'}", "data.noise=none", "method=ce",
                                 "epochs=2"])
        run(cfg, root / "run")
    finally:
        mp.undo()
    # Images that are not like the training ones: another size, grayscale, nested folders.
    new = root / "new" / "deeper"
    new.mkdir(parents=True)
    _image(rng, COLOURS[1], size=24).save(new / "big.png")
    _image(rng, COLOURS[2]).convert("L").save(root / "new" / "gray.png")
    _image(rng, COLOURS[0], size=20).save(new / "photo.jpg")
    (root / "new" / "notes.txt").write_text("not an image")
    return root, root / "run" / "model.pt"


def _decode_like_training(path, size=(16, 16)) -> torch.Tensor:
    """PIL: RGB, bilinear resize to the model's size; as imagefolder decodes with size= and channels=3."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy())


def _check(rows: list[dict], model) -> None:
    header = ["path", "predicted_label", "confidence", *(f"p_{c}" for c in CLASSES)]
    assert list(rows[0]) == header
    images = torch.stack([_decode_like_training(r["path"]) for r in rows])
    expected = load_model(model).predict_proba(images)
    for r, p in zip(rows, expected, strict=True):
        probs = [float(r[f"p_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert probs == pytest.approx(p.tolist(), abs=2e-6)
        assert r["predicted_label"] == CLASSES[int(p.argmax())]
        assert float(r["confidence"]) == pytest.approx(float(p.max()), abs=2e-6)


def test_predict_folder_to_csv(trained, tmp_path, capsys):
    root, model = trained
    out = tmp_path / "preds.csv"
    assert main(["-q", "predict", "--model", str(model), str(root / "data"), "--out", str(out),
                 "--batch-size", "7"]) == 0
    assert "wrote 60 predictions" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 60 and len({r["path"] for r in rows}) == 60
    _check(rows, model)
    # the model learned the colours: most training images are predicted as their folder
    right = sum(r["predicted_label"] == r["path"].split("/")[-2] for r in rows)
    assert right >= 40


def test_predict_files_and_other_sizes_to_stdout(trained, capsys):
    root, model = trained
    one = root / "data" / "train" / "red" / "00.png"
    assert main(["-q", "predict", "--model", str(model), str(root / "new"), str(one)]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    paths = [r["path"] for r in rows]
    assert paths == [str(root / "new" / "deeper" / "big.png"), str(root / "new" / "deeper" / "photo.jpg"),
                     str(root / "new" / "gray.png"), str(one)]
    _check(rows, model)


def _fails(capsys, argv: list[str], match: str) -> None:
    assert main(["-q", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("labelrefine: error: "), err
    assert match in err[0], err[0]
    assert captured.out == ""


def test_predict_errors(trained, tmp_path, capsys):
    root, model = trained
    out = tmp_path / "preds.csv"
    images = str(root / "new")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    blob = store_load(model, kind=MODEL_FORMAT, name="model file")
    blob["networks"] = {"net": {"nonsense": torch.zeros(1)}}
    store_save(tmp_path / "damaged.pt", blob, kind=MODEL_FORMAT)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    cases = [
        (["--model", str(tmp_path / "nope.pt"), images], "does not exist"),
        (["--model", str(root / "run"), images], "is a directory"),
        (["--model", str(tmp_path / "junk.pt"), images], "junk.pt is not a labelrefine file"),
        (["--model", str(tmp_path / "other.pt"), images], "not a labelrefine model"),
        (["--model", str(tmp_path / "damaged.pt"), images], "damaged"),
        (["--model", str(model), str(tmp_path / "missing")], f"path {tmp_path / 'missing'} does not exist"),
        (["--model", str(model), str(tmp_path / "empty")], "holds no images"),
        (["--model", str(model), images, str(tmp_path / "broken.png")], f"cannot read image {tmp_path / 'broken.png'}"),
        (["--model", str(model), images, "--batch-size", "0"], "--batch-size"),
    ]
    for argv, match in cases:
        _fails(capsys, ["predict", *argv, "--out", str(out)], match)
        assert not out.exists() and not list(tmp_path.glob(".preds.csv*"))
    _fails(capsys, ["predict", "--model", str(model), images, "--out", str(tmp_path)], "is a directory")


def test_predict_decodes_float_tiffs_and_names_undecodable_paths(trained, tmp_path, capsys):
    """A float32 TIFF in [0, 1] is scaled to 0..255 as in training (it was decoded as black), and a
    file name that is not UTF-8 is written as its printable form (it crashed the CSV writer)."""
    import os

    _, model = trained
    unit = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.fsencode(tmp_path) + b"/\xff.png", format="PNG")
    predictor = load_model(model)
    decoded = predictor.load_images([tmp_path / "unit.tif"])
    want = torch.from_numpy(np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    assert decoded.shape == (1, 3, 16, 16) and all(torch.equal(decoded[0, c], want) for c in range(3))
    out = tmp_path / "preds.csv"
    assert main(["-q", "predict", "--model", str(model), str(tmp_path), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["path"] for r in rows] == [f"{tmp_path}/unit.tif", f"{tmp_path}/\\xff.png"]  # sorted by raw name
    expected = predictor.predict_proba(torch.cat([want.expand(3, 16, 16)[None],
                                                  torch.zeros((1, 3, 16, 16), dtype=torch.uint8)]))
    for r, p in zip(rows, expected, strict=True):
        assert [float(r[f"p_{c}"]) for c in CLASSES] == pytest.approx(p.tolist(), abs=2e-6)
