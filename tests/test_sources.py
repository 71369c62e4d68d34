"""Tests for labelrefine.data.sources: every kind, option, the cache and the error messages."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from labelrefine.data import sources
from labelrefine.data.cache import STORE_FORMAT
from labelrefine.data.imageset import DataSplits, ImageSet
from labelrefine.data.sources import (
    KNOWN_KINDS,
    decode,  # the module whose globals the decoders look up
    load_data,
    parse_spec,
    read_manifest,
)
from labelrefine.data.sources.registry import COMMON_OPTIONS, SOURCES, SourceRequest, register_source
from labelrefine.errors import UserError
from labelrefine.store import save as store_save

CIFAR10_DIR = Path("/work/shared/data/cifar10")
CIFAR10_CSV = CIFAR10_DIR / "cifar10n_train_labels.csv"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _rgb(seed: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _gray(seed: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _make_folder(
    root: Path, layout: dict[str, dict[str, int]], *, gray: bool = False, ext: str = ".png"
) -> Path:
    """``root/<split>/<class>/<i>.png`` with ``layout[split][class]`` images each."""
    seed = 0
    for split, classes in layout.items():
        for cls, n in classes.items():
            for i in range(n):
                seed += 1
                _save(root / split / cls / f"{i:02d}{ext}", _gray(seed) if gray else _rgb(seed))
    return root


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _make_folder(
        tmp_path / "data",
        {"train": {"cat": 3, "dog": 2, "bird": 1}, "test": {"cat": 1, "dog": 1}},
    )


@pytest.fixture
def decode_counter(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts calls of the per-file decoder."""
    calls: list[str] = []
    real = decode._decode_file

    def counting(path, size, mode):
        calls.append(path)
        return real(path, size, mode)

    monkeypatch.setattr(decode, "_decode_file", counting)
    return calls


# --------------------------------------------------------------------------------------------
# spec parsing
# --------------------------------------------------------------------------------------------


def test_parse_spec_forms():
    assert parse_spec("digits") == ("digits", None, {})
    assert parse_spec("imagefolder:/data/xr,size=64,channels=1") == (
        "imagefolder",
        "/data/xr",
        {"size": "64", "channels": "1"},
    )
    assert parse_spec("csv:labels.csv,label=worse,test=../test") == (
        "csv",
        "labels.csv",
        {"label": "worse", "test": "../test"},
    )
    assert parse_spec("cifar10:/root,download") == ("cifar10", "/root", {"download": True})
    assert parse_spec("cifar100:/root,download=no") == ("cifar100", "/root", {"download": False})
    assert parse_spec("  CSV:C:/x/y.csv , size=8 ,") == ("csv", "C:/x/y.csv", {"size": "8"})
    assert set(KNOWN_KINDS) >= {"digits", "imagefolder", "csv", "json", "npz", "cifar10", "cifar100"}  # + new modules


def test_every_registered_kind_has_options_and_a_doc_line():
    assert tuple(SOURCES) == KNOWN_KINDS
    assert KNOWN_KINDS[:7] == ("digits", "imagefolder", "csv", "json", "npz", "cifar10", "cifar100")  # table order
    for kind, source in SOURCES.items():
        assert source.kind == kind and callable(source.load)
        assert source.options >= COMMON_OPTIONS and source.flags <= source.options
        assert source.doc.strip() and "\n" not in source.doc, kind
        assert source.needs_path or source.no_path_note, kind
        assert kind in sources.__doc__ and source.doc in sources.__doc__  # the docs table is generated


def test_every_module_of_the_package_is_shared_or_registers_a_kind():
    import pkgutil

    modules = {m.name for m in pkgutil.iter_modules(sources.__path__)} - sources._SHARED_MODULES
    registered = {s.load.__module__.rsplit(".", 1)[1] for s in SOURCES.values() if s.load.__module__.startswith(
        "labelrefine.data.sources.")}
    assert modules == registered  # a kind module imports itself: nothing else to edit


def test_unknown_kind_error_lists_the_registered_kinds():
    with pytest.raises(UserError) as e:
        parse_spec("mnist:/x")
    assert str(e.value).endswith(f"known kinds: {', '.join(SOURCES)}")


@pytest.fixture
def toy_source():
    """A kind registered by a test, as a new module would: no other edit needed."""

    @register_source("toy", options=("n", "fancy"), flags=("fancy",), doc="a toy kind for the registry tests")
    def load(req: SourceRequest) -> DataSplits:
        n = int(req.options.get("n", 4))
        images = torch.zeros((n, 1, *(req.size or (2, 2))), dtype=torch.uint8)
        train = ImageSet(images, torch.arange(n) % 2, ["a", "b"], [f"{req.path}/{i}" for i in range(n)])
        return DataSplits(name=f"toy{'-fancy' if req.options.get('fancy') else ''}", train=train)

    yield
    del SOURCES["toy"]


def test_a_registered_kind_parses_and_loads(toy_source):
    assert sources.KNOWN_KINDS[-1] == "toy"  # derived from the registry on every access
    assert parse_spec("toy:/p,n=3,fancy") == ("toy", "/p", {"n": "3", "fancy": True})
    d = load_data("toy:/p,n=3,fancy,size=4x5")
    assert d.name == "toy-fancy" and d.train.images.shape == (3, 1, 4, 5) and d.train.ids[0] == "/p/0"
    with pytest.raises(UserError, match=r"unknown option 'classes' for kind 'toy'; known options: channels, "
                                        r"fancy, n, size"):
        parse_spec("toy:/p,classes=a;b")
    with pytest.raises(UserError, match=r"known kinds: digits, .*, toy$"):
        parse_spec("mnist:/x")
    with pytest.raises(ValueError, match="registered twice"):
        register_source("toy", doc="again")(lambda req: None)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("mnist:/x", r"'mnist:/x'.*unknown kind 'mnist'.*known kinds: digits, imagefolder, csv"),
        ("imagefolder:/x,sise=3", r"unknown option 'sise' for kind 'imagefolder'"),
        ("digits,download", r"unknown option 'download' for kind 'digits'"),
        ("imagefolder:/x,size=3,size=4", r"option 'size' given twice"),
        ("imagefolder", r"kind 'imagefolder' needs a path"),
        ("imagefolder:", r"kind 'imagefolder' needs a path"),
        ("digits:/x", r"'digits' takes no path"),
        ("imagefolder:/x,size", r"option 'size' needs a value"),
        ("cifar10:/x,download=maybe", r"option 'download' is a flag"),
        ("", r"empty data spec"),
    ],
)
def test_parse_spec_errors(spec: str, match: str):
    with pytest.raises(UserError, match=match):
        parse_spec(spec)


@pytest.mark.parametrize(
    ("option", "match"),
    [("size=0", r"option size=0"), ("size=3x", r"option size=3x"), ("channels=2", r"option channels=2")],
)
def test_bad_option_values(option: str, match: str, cache: Path):
    with pytest.raises(UserError, match=match):
        load_data(f"digits,{option}", cache_dir=cache)


def test_unknown_kind_via_load_data(cache: Path):
    with pytest.raises(UserError, match=r"unknown kind 'foo'.*known kinds"):
        load_data("foo:/bar", cache_dir=cache)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits():
    d = load_data("digits")
    assert d.name == "digits"
    assert d.classes == [str(i) for i in range(10)]
    assert len(d.train) == 1347 and len(d.test) == 1450 - 1000 and d.val is None
    assert d.train.images.shape[1:] == (1, 8, 8) and d.train.images.dtype == torch.uint8
    assert int(d.train.images.max()) == 255 and int(d.train.images.min()) == 0
    assert d.train.ids[0].startswith("digits/")
    all_ids = {int(i.split("/")[1]) for i in d.train.ids + d.test.ids}
    assert all_ids == set(range(1797))
    # stratified: every class in the test split in proportion
    counts = d.test.class_counts()
    assert counts.min() >= 43 and counts.max() <= 47
    # deterministic and matches the sklearn pixels
    from sklearn.datasets import load_digits

    raw = load_digits()
    i = int(d.test.ids[5].split("/")[1])
    expect = np.rint(raw.images[i] * 255 / 16).astype(np.uint8)
    assert np.array_equal(d.test.images[5, 0].numpy(), expect)
    assert int(d.test.labels[5]) == raw.target[i]
    assert load_data("digits").train.ids == d.train.ids


def test_digits_size_and_channels():
    d = load_data("digits,size=16,channels=3")
    assert d.train.images.shape[1:] == (3, 16, 16)
    assert torch.equal(d.train.images[:, 0], d.train.images[:, 2])
    d = load_data("digits,size=12x20")
    assert d.test.images.shape[1:] == (1, 12, 20)


# --------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------


def test_imagefolder_basic(folder: Path, cache: Path):
    d = load_data(f"imagefolder:{folder}", cache_dir=cache)
    assert d.name == "data"
    assert d.classes == ["bird", "cat", "dog"]
    assert d.train.ids == [
        "train/bird/00.png",
        "train/cat/00.png",
        "train/cat/01.png",
        "train/cat/02.png",
        "train/dog/00.png",
        "train/dog/01.png",
    ]
    assert d.train.labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert d.test.ids == ["test/cat/00.png", "test/dog/00.png"] and d.test.labels.tolist() == [1, 2]
    assert d.train.images.shape == (6, 3, 8, 8) and d.train.images.dtype == torch.uint8
    expect = np.asarray(Image.open(folder / "train/cat/01.png"))
    assert np.array_equal(d.train.images[2].permute(1, 2, 0).numpy(), expect)
    assert d.val is None
    # nothing written next to the data
    assert sorted(p.name for p in folder.iterdir()) == ["test", "train"]
    assert len(list(cache.glob("*.pt"))) == 1


def test_imagefolder_val_and_mixed_modes(tmp_path: Path, cache: Path):
    root = tmp_path / "d"
    _save(root / "train/a/x.PNG", _gray(1))  # upper-case extension
    _save(root / "train/a/y.jpg", _rgb(2))
    _save(root / "train/b/sub/z.bmp", _rgb(3))  # nested folders count
    (root / "train/b/notes.txt").write_text("not an image")
    _save(root / "val/b/v.png", _gray(4))
    _save(root / "test/a/t.png", _gray(5))
    d = load_data(f"imagefolder:{root}", cache_dir=cache)
    assert d.train.ids == ["train/a/x.PNG", "train/a/y.jpg", "train/b/sub/z.bmp"]
    assert d.val.ids == ["val/b/v.png"] and d.val.labels.tolist() == [1]
    assert d.train.shape == (3, 8, 8) and d.val.shape == (3, 8, 8)  # mixed → RGB
    g = d.train.images[0]
    assert torch.equal(g[0], g[1]) and torch.equal(g[0], torch.from_numpy(_gray(1)))


def test_imagefolder_grayscale_default_and_channels(tmp_path: Path, cache: Path):
    root = _make_folder(tmp_path / "g", {"train": {"a": 2, "b": 2}, "test": {"a": 1}}, gray=True)
    assert load_data(f"imagefolder:{root}", cache_dir=cache).train.shape == (1, 8, 8)
    d3 = load_data(f"imagefolder:{root},channels=3", cache_dir=cache)
    assert d3.train.shape == (3, 8, 8) and torch.equal(d3.train.images[:, 0], d3.train.images[:, 1])
    # RGB train with a gray test image → 3 channels; channels=1 → PIL's RGB→L conversion
    rgb = _make_folder(tmp_path / "c", {"train": {"a": 2}}, gray=False)
    _save(rgb / "test/a/g.png", _gray(9))
    d = load_data(f"imagefolder:{rgb}", cache_dir=cache)
    assert d.train.shape == (3, 8, 8) and d.test.shape == (3, 8, 8)
    d1 = load_data(f"imagefolder:{rgb},channels=1", cache_dir=cache)
    expect = np.asarray(Image.open(rgb / "train/a/01.png").convert("L"))
    assert np.array_equal(d1.train.images[1, 0].numpy(), expect)


def test_rgb_to_gray_matches_pil():
    x = _rgb(7, (16, 16))
    ours = sources._rgb_to_gray(x[None], 3)[0]
    assert np.array_equal(ours, np.asarray(Image.fromarray(x).convert("L")))


def test_sixteen_bit_gray(tmp_path: Path, cache: Path):
    root = tmp_path / "d"
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    _save(root / "train/a/x.png", arr)
    d = load_data(f"imagefolder:{root}", cache_dir=cache)
    assert d.train.shape == (1, 8, 8)
    assert np.array_equal(d.train.images[0, 0].numpy(), np.rint(arr / 257).astype(np.uint8))


def test_imagefolder_size(tmp_path: Path, cache: Path):
    root = tmp_path / "d"
    _save(root / "train/a/x.png", _rgb(1, (8, 8)))
    _save(root / "train/a/y.png", _rgb(2, (12, 10)))
    with pytest.raises(UserError, match=r"train/a/y\.png: image is 12x10.*x\.png is 8x8.*size="):
        load_data(f"imagefolder:{root}", cache_dir=cache)
    d = load_data(f"imagefolder:{root},size=6x4", cache_dir=cache)
    assert d.train.images.shape == (2, 3, 6, 4)
    expect = np.asarray(Image.open(root / "train/a/y.png").resize((4, 6), Image.Resampling.BILINEAR))
    assert np.array_equal(d.train.images[1].permute(1, 2, 0).numpy(), expect)
    assert load_data(f"imagefolder:{root},size=16", cache_dir=cache).train.shape == (3, 16, 16)


def test_imagefolder_no_test_warns(tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture):
    root = _make_folder(tmp_path / "d", {"train": {"a": 1, "b": 1}})
    with caplog.at_level(logging.WARNING, logger="labelrefine"):
        d = load_data(f"imagefolder:{root}", cache_dir=cache)
    assert d.test is None and "no 'test' folder" in caplog.text


def test_imagefolder_errors(tmp_path: Path, cache: Path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=rf"{missing} does not exist"):
        load_data(f"imagefolder:{missing}", cache_dir=cache)
    no_train = tmp_path / "no_train"
    _make_folder(no_train, {"test": {"a": 1}})
    with pytest.raises(UserError, match=r"no_train has no 'train' folder"):
        load_data(f"imagefolder:{no_train}", cache_dir=cache)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=r"empty/train: no class folders"):
        load_data(f"imagefolder:{empty}", cache_dir=cache)
    hollow = _make_folder(tmp_path / "hollow", {"train": {"a": 1}})
    (hollow / "train" / "b").mkdir()
    (hollow / "train" / "b" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"hollow/train/b: class folder has no images"):
        load_data(f"imagefolder:{hollow}", cache_dir=cache)
    extra = _make_folder(tmp_path / "extra", {"train": {"a": 1}, "test": {"a": 1, "zebra": 1}})
    with pytest.raises(UserError, match=r"extra/test/zebra: class folder 'zebra' is not one of the training"):
        load_data(f"imagefolder:{extra}", cache_dir=cache)
    empty_test = _make_folder(tmp_path / "et", {"train": {"a": 1}})
    (empty_test / "test").mkdir()
    with pytest.raises(UserError, match=r"et/test: no class folders"):
        load_data(f"imagefolder:{empty_test}", cache_dir=cache)


def test_corrupt_and_truncated_images(tmp_path: Path, cache: Path):
    root = _make_folder(tmp_path / "d", {"train": {"a": 2}, "test": {"a": 1}})
    (root / "train/a/bad.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match=r"cannot read image .*train/a/bad\.png"):
        load_data(f"imagefolder:{root}", cache_dir=cache)
    os.remove(root / "train/a/bad.png")

    for ext in (".png", ".jpg"):
        big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        path = _save(root / f"train/a/trunc{ext}", big)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(UserError, match=rf"cannot read image .*train/a/trunc\{ext}"):
            load_data(f"imagefolder:{root},size=8", cache_dir=cache)
        os.remove(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------


def test_cache_reuse_and_invalidation(folder: Path, cache: Path, decode_counter: list[str]):
    spec = f"imagefolder:{folder}"
    first = load_data(spec, cache_dir=cache)
    assert len(decode_counter) == 8
    second = load_data(spec, cache_dir=cache)
    assert len(decode_counter) == 8  # served from the cache
    assert torch.equal(first.train.images, second.train.images) and first.train.ids == second.train.ids
    assert torch.equal(first.test.labels, second.test.labels)

    # other options → another cache entry
    load_data(spec + ",channels=1", cache_dir=cache)
    assert len(decode_counter) == 16
    assert len(list(cache.glob("*.pt"))) == 2

    # touching an image (same bytes, new mtime) invalidates it
    img = folder / "train/cat/00.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    load_data(spec, cache_dir=cache)
    assert len(decode_counter) == 24
    # ... and is overwritten in place, not accumulated
    assert len(list(cache.glob("*.pt"))) == 2
    load_data(spec, cache_dir=cache)
    assert len(decode_counter) == 24

    # a changed image is decoded anew
    _save(folder / "train/cat/00.png", _rgb(1234))
    d = load_data(spec, cache_dir=cache)
    assert len(decode_counter) == 32
    assert np.array_equal(d.train.images[1].permute(1, 2, 0).numpy(), _rgb(1234))

    # adding a file changes the key
    _save(folder / "train/bird/01.png", _rgb(77))
    assert len(load_data(spec, cache_dir=cache).train) == 7
    assert len(decode_counter) == 41


def test_cache_not_decoding_on_hit(folder: Path, cache: Path, monkeypatch: pytest.MonkeyPatch):
    load_data(f"imagefolder:{folder}", cache_dir=cache)

    def boom(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(decode, "_decode_file", boom)
    assert len(load_data(f"imagefolder:{folder}", cache_dir=cache).train) == 6


def test_corrupt_cache_is_ignored(
    folder: Path, cache: Path, decode_counter: list[str], caplog: pytest.LogCaptureFixture
):
    spec = f"imagefolder:{folder}"
    good = load_data(spec, cache_dir=cache)
    (file,) = cache.glob("*.pt")
    for junk in (b"garbage", file.read_bytes()[:1000]):
        file.write_bytes(junk)
        with caplog.at_level(logging.WARNING, logger="labelrefine"):
            again = load_data(spec, cache_dir=cache)
        assert "ignoring unreadable cache file" in caplog.text
        assert torch.equal(good.train.images, again.train.images)
        caplog.clear()
    # a valid cache file with the wrong content is also ignored
    store_save(file, {"version": 1, "key": "x", "images": {}}, kind=STORE_FORMAT)
    load_data(spec, cache_dir=cache)
    assert len(decode_counter) == 4 * 8
    assert not list(cache.glob(".*tmp"))  # no temporary files left behind


def test_cache_dir_from_environment(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env_cache = tmp_path / "envcache"
    monkeypatch.setenv("LABELREFINE_CACHE", str(env_cache))
    load_data(f"imagefolder:{folder}")
    assert len(list(env_cache.glob("imagefolder-*.pt"))) == 1


def test_unwritable_cache_is_not_fatal(folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="labelrefine"):
        d = load_data(f"imagefolder:{folder}", cache_dir=blocker / "sub")
    assert len(d.train) == 6 and "could not write the image cache" in caplog.text


def test_parallel_decode_matches_serial(folder: Path, cache: Path, monkeypatch: pytest.MonkeyPatch):
    serial = load_data(f"imagefolder:{folder}", cache_dir=cache / "a")
    monkeypatch.setattr(decode, "DECODE_PARALLEL_MIN", 1)
    monkeypatch.setattr(decode, "_workers", lambda n: 2)
    parallel = load_data(f"imagefolder:{folder}", cache_dir=cache / "b")
    assert torch.equal(serial.train.images, parallel.train.images)
    assert torch.equal(serial.test.images, parallel.test.images)


# --------------------------------------------------------------------------------------------
# csv
# --------------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return path


@pytest.fixture
def csv_data(tmp_path: Path) -> Path:
    """images in tmp/csv/img/*.png (RGB and gray mixed) and a manifest with two label columns."""
    root = tmp_path / "csv"
    for i in range(6):
        _save(root / "img" / f"{i}.png", _rgb(i) if i % 2 else _gray(i))
    return _write_csv(
        root / "labels.csv",
        [
            ["path", "clean", "worse"],
            ["img/0.png", "cat", "cat"],
            ["img/1.png", "dog", "cat"],
            ["img/2.png", "cat", "bird"],
            ["img/3.png", "dog", "dog"],
        ],
    )


def test_csv_basic(csv_data: Path, cache: Path):
    d = load_data(f"csv:{csv_data}", cache_dir=cache)
    assert d.name == "labels"
    assert d.classes == ["bird", "cat", "dog"]  # union over all label columns, sorted
    assert d.train.ids == ["img/0.png", "img/1.png", "img/2.png", "img/3.png"]
    assert d.train.labels.tolist() == [1, 2, 1, 2]  # clean is the default label column
    assert list(d.train.extra_labels) == ["worse"]
    assert d.train.extra_labels["worse"].tolist() == [1, 1, 0, 2]
    assert d.test is None and d.train.shape == (3, 8, 8)
    # label= switches the main column; clean becomes an extra label
    w = load_data(f"csv:{csv_data},label=worse", cache_dir=cache)
    assert w.train.labels.tolist() == [1, 1, 0, 2] and list(w.train.extra_labels) == ["clean"]


def test_csv_default_columns_and_options(tmp_path: Path, cache: Path):
    root = tmp_path / "m"
    _save(root / "a.png", _gray(1))
    _save(root / "b.png", _gray(2))
    # 'label' wins over other columns; 'file' is a path column; quoted fields work
    path = root / "m.csv"
    path.write_text('other,file,label\n"x",a.png,"yes"\ny,b.png,no\n')
    d = load_data(f"csv:{path}", cache_dir=cache)
    assert d.classes == ["no", "x", "y", "yes"]
    assert d.train.labels.tolist() == [3, 0] and d.train.extra_labels["other"].tolist() == [1, 2]
    assert d.train.shape == (1, 8, 8)
    # explicit path= / label= / classes=
    path2 = _write_csv(root / "m2.csv", [["img", "tag", "note"], ["a.png", "no", "x"], ["b.png", "yes", "x"]])
    d = load_data(f"csv:{path2},path=img,label=tag,classes=yes;no;x", cache_dir=cache)
    assert d.classes == ["yes", "no", "x"] and d.train.labels.tolist() == [1, 0]
    # the first non-path column is the label when there is neither label nor clean
    d = load_data(f"csv:{path2},path=img", cache_dir=cache)
    assert d.train.labels.tolist() == [0, 2] and d.classes == ["no", "x", "yes"]
    assert d.train.extra_labels["note"].tolist() == [1, 1]


def test_csv_split_column(tmp_path: Path, cache: Path):
    root = tmp_path / "s"
    for i in range(5):
        _save(root / f"{i}.png", _rgb(i))
    path = _write_csv(
        root / "all.csv",
        [
            ["name", "label", "split"],
            ["0.png", "a", "train"],
            ["1.png", "b", "TEST"],
            ["2.png", "a", "val"],
            ["3.png", "b", "train"],
            ["4.png", "b", "test"],
        ],
    )
    d = load_data(f"csv:{path}", cache_dir=cache)
    assert d.train.ids == ["0.png", "3.png"] and d.test.ids == ["1.png", "4.png"] and d.val.ids == ["2.png"]
    assert d.test.labels.tolist() == [1, 1] and d.train.extra_labels == {}
    # split=COL names another column
    path2 = _write_csv(
        root / "p.csv", [["path", "label", "part"], ["0.png", "a", "train"], ["1.png", "b", "test"]]
    )
    d = load_data(f"csv:{path2},split=part", cache_dir=cache)
    assert d.train.ids == ["0.png"] and d.test.ids == ["1.png"]
    bad = _write_csv(
        root / "bad.csv", [["path", "label", "split"], ["0.png", "a", "train"], ["1.png", "b", "dev"]]
    )
    with pytest.raises(UserError, match=r"bad\.csv: line 3: column 'split' has 'dev'"):
        load_data(f"csv:{bad}", cache_dir=cache)


def test_csv_test_option(tmp_path: Path, cache: Path, csv_data: Path, monkeypatch: pytest.MonkeyPatch):
    root = csv_data.parent
    _save(root / "test" / "dog" / "t0.png", _rgb(50))
    _save(root / "test" / "cat" / "t1.png", _rgb(51))
    monkeypatch.chdir(tmp_path)  # test=test resolves next to the manifest
    d = load_data(f"csv:{csv_data},test=test", cache_dir=cache)
    assert d.test.ids == ["test/cat/t1.png", "test/dog/t0.png"] and d.test.labels.tolist() == [1, 2]
    # a test CSV in the same format; its labels join the class union
    test_csv = _write_csv(root / "test.csv", [["path", "clean", "worse"], ["img/4.png", "cow", "dog"]])
    d = load_data(f"csv:{csv_data},test={test_csv}", cache_dir=cache)
    assert d.classes == ["bird", "cat", "cow", "dog"]
    assert d.test.ids == ["img/4.png"] and d.test.labels.tolist() == [2]
    assert d.test.extra_labels["worse"].tolist() == [3]
    # a test folder with an unknown class
    _save(root / "test" / "zebra" / "z.png", _rgb(52))
    with pytest.raises(UserError, match=r"test/zebra: class folder 'zebra' is not one of the training"):
        load_data(f"csv:{csv_data},test=test", cache_dir=cache)
    with pytest.raises(UserError, match=r"option test=nowhere: not found"):
        load_data(f"csv:{csv_data},test=nowhere", cache_dir=cache)


def test_csv_int_labels(tmp_path: Path, cache: Path):
    root = tmp_path / "i"
    for i in range(3):
        _save(root / f"{i}.png", _gray(i))
    path = _write_csv(root / "i.csv", [["path", "label", "noisy"], ["0.png", "0", "3"], ["1.png", "2", "2"]])
    d = load_data(f"csv:{path}", cache_dir=cache)
    # integer labels name their classes by value: the ones present (1 is not), ascending
    assert d.classes == ["0", "2", "3"] and d.train.labels.tolist() == [0, 1]
    assert d.train.extra_labels["noisy"].tolist() == [2, 1]
    d = load_data(f"csv:{path},classes=a;b;c;d;e", cache_dir=cache)
    assert d.classes == ["a", "b", "c", "d", "e"] and d.train.labels.tolist() == [0, 2]
    with pytest.raises(UserError, match=r"i\.csv: line 2: column 'noisy' has label 3 outside \[0, 2\]"):
        load_data(f"csv:{path},classes=a;b;c", cache_dir=cache)
    neg = _write_csv(root / "neg.csv", [["path", "label"], ["0.png", "1"], ["1.png", "-1"]])
    with pytest.raises(UserError, match=r"neg\.csv: line 3: column 'label' has label -1"):
        load_data(f"csv:{neg}", cache_dir=cache)


def test_csv_errors(tmp_path: Path, cache: Path, csv_data: Path):
    root = csv_data.parent
    with pytest.raises(UserError, match=r"labels\.csv: no column 'nope' \(from label=nope\)"):
        load_data(f"csv:{csv_data},label=nope", cache_dir=cache)
    with pytest.raises(UserError, match=r"labels\.csv: no column 'img' \(from path=img\)"):
        load_data(f"csv:{csv_data},path=img", cache_dir=cache)
    nopath = _write_csv(root / "nopath.csv", [["where", "label"], ["img/0.png", "a"]])
    with pytest.raises(UserError, match=r"nopath\.csv: no path column"):
        load_data(f"csv:{nopath}", cache_dir=cache)
    nolabel = _write_csv(root / "nolabel.csv", [["path"], ["img/0.png"]])
    with pytest.raises(UserError, match=r"nolabel\.csv: no label column"):
        load_data(f"csv:{nolabel}", cache_dir=cache)
    with pytest.raises(UserError, match=r"labels\.csv: line 4: column 'worse' has label 'bird', not one of"):
        load_data(f"csv:{csv_data},classes=cat;dog", cache_dir=cache)
    empty = root / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match=r"empty\.csv: empty manifest"):
        load_data(f"csv:{empty}", cache_dir=cache)
    header_only = _write_csv(root / "header.csv", [["path", "label"]])
    with pytest.raises(UserError, match=r"header\.csv: empty manifest"):
        load_data(f"csv:{header_only}", cache_dir=cache)
    gone = _write_csv(root / "gone.csv", [["path", "label"], ["img/0.png", "a"], ["img/missing.png", "b"]])
    with pytest.raises(UserError, match=r"gone\.csv: line 3: image 'img/missing\.png' not found"):
        load_data(f"csv:{gone}", cache_dir=cache)
    ragged = _write_csv(root / "ragged.csv", [["path", "label"], ["img/0.png", "a", "extra"]])
    with pytest.raises(UserError, match=r"ragged\.csv: line 2: 3 fields, the header has 2"):
        load_data(f"csv:{ragged}", cache_dir=cache)
    blank = _write_csv(root / "blank.csv", [["path", "label"], ["img/0.png", ""]])
    with pytest.raises(UserError, match=r"blank\.csv: line 2: column 'label' is empty"):
        load_data(f"csv:{blank}", cache_dir=cache)
    with pytest.raises(UserError, match=r"missing\.csv does not exist"):
        load_data(f"csv:{root / 'missing.csv'}", cache_dir=cache)


def test_csv_cache_tracks_manifest(csv_data: Path, cache: Path, decode_counter: list[str]):
    load_data(f"csv:{csv_data}", cache_dir=cache)
    load_data(f"csv:{csv_data}", cache_dir=cache)
    assert len(decode_counter) == 4
    text = csv_data.read_text().replace("img/3.png,dog,dog", "img/5.png,dog,dog")
    csv_data.write_text(text)
    d = load_data(f"csv:{csv_data}", cache_dir=cache)
    assert len(decode_counter) == 8 and d.train.ids[-1] == "img/5.png"
    # a label-only change also changes the key (labels are re-read anyway)
    csv_data.write_text(text.replace("img/0.png,cat,cat", "img/0.png,dog,cat"))
    d = load_data(f"csv:{csv_data}", cache_dir=cache)
    assert d.train.labels.tolist()[0] == 2


def test_read_manifest_without_images(csv_data: Path):
    m = read_manifest(csv_data)
    assert m.classes == ["bird", "cat", "dog"] and m.label_column == "clean" and m.path_column == "path"
    train = m.splits["train"]
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [1, 2, 1, 2]
    assert train.lines == [2, 3, 4, 5]
    assert Path(train.files[0]) == csv_data.parent / "img/0.png"


# --------------------------------------------------------------------------------------------
# json (Chaoyang)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def chaoyang(tmp_path: Path) -> Path:
    root = tmp_path / "chaoyang"
    for i in range(6):
        _save(root / "train" / f"{i}.jpg", _rgb(i, (12, 12)))
    for i in range(2):
        _save(root / "test" / f"{i}.jpg", _rgb(100 + i, (12, 12)))
    (root / "train.json").write_text(
        json.dumps([{"name": f"train/{i}.jpg", "label": i % 4} for i in range(6)])
    )
    (root / "test.json").write_text(json.dumps([{"name": f"test/{i}.jpg", "label": 3 - i} for i in range(2)]))
    return root


def test_json_chaoyang(chaoyang: Path, cache: Path):
    d = load_data(f"json:{chaoyang / 'train.json'}", cache_dir=cache)
    assert d.classes == ["0", "1", "2", "3"]  # no guessing of the real names
    assert d.train.ids == [f"train/{i}.jpg" for i in range(6)] and d.train.labels.tolist() == [
        0,
        1,
        2,
        3,
        0,
        1,
    ]
    assert d.test.ids == ["test/0.jpg", "test/1.jpg"] and d.test.labels.tolist() == [3, 2]  # found beside it
    assert d.train.images.shape == (6, 3, 12, 12)
    d = load_data(
        f"json:{chaoyang / 'train.json'},classes=normal;serrated;adenocarcinoma;adenoma,size=8",
        cache_dir=cache,
    )
    assert d.classes == ["normal", "serrated", "adenocarcinoma", "adenoma"] and d.test.shape == (3, 8, 8)
    # explicit test=, and no test at all
    (chaoyang / "other.json").write_text(json.dumps([{"name": "test/1.jpg", "label": 0}]))
    d = load_data(f"json:{chaoyang / 'train.json'},test={chaoyang / 'other.json'}", cache_dir=cache)
    assert d.test.ids == ["test/1.jpg"]
    (chaoyang / "all.json").write_text((chaoyang / "train.json").read_text())
    assert load_data(f"json:{chaoyang / 'all.json'}", cache_dir=cache).test is None


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"name": "x"}, r"bad\.json: expected a JSON list"),
        ([], r"bad\.json: empty manifest"),
        ([{"name": "train/0.jpg", "label": 0}, {"label": 1}], r"bad\.json: entry 1 has no 'name'"),
        ([{"name": "train/0.jpg"}], r"bad\.json: entry 0 has no 'label'"),
        ([{"name": "train/0.jpg", "label": "cat"}], r"bad\.json: entry 0: 'label' must be an integer"),
        ([{"name": "train/0.jpg", "label": 1.5}], r"bad\.json: entry 0: 'label' must be an integer"),
        ([{"name": "train/0.jpg", "label": -1}], r"bad\.json: entry 0: 'label' -1 is negative"),
        ([{"name": "train/9.jpg", "label": 0}], r"bad\.json: entry 0: image 'train/9\.jpg' not found"),
        ([1], r"bad\.json: entry 0 is a int"),
    ],
)
def test_json_errors(chaoyang: Path, cache: Path, content: object, match: str):
    (chaoyang / "bad.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match=match):
        load_data(f"json:{chaoyang / 'bad.json'}", cache_dir=cache)


def test_json_more_errors(chaoyang: Path, cache: Path):
    with pytest.raises(UserError, match=r"train\.json: entry 2: 'label' 2 outside \[0, 1\]"):
        load_data(f"json:{chaoyang / 'train.json'},classes=a;b", cache_dir=cache)
    (chaoyang / "broken.json").write_text("[{")
    with pytest.raises(UserError, match=r"broken\.json: not valid JSON"):
        load_data(f"json:{chaoyang / 'broken.json'}", cache_dir=cache)


def test_json_cache_tracks_manifest(chaoyang: Path, cache: Path, decode_counter: list[str]):
    spec = f"json:{chaoyang / 'train.json'}"
    load_data(spec, cache_dir=cache)
    load_data(spec, cache_dir=cache)
    assert len(decode_counter) == 8
    (chaoyang / "test.json").write_text(json.dumps([{"name": "test/0.jpg", "label": 1}]))
    d = load_data(spec, cache_dir=cache)
    assert len(decode_counter) == 15 and d.test.labels.tolist() == [1]


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------


def test_npz_layouts(tmp_path: Path):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    f = tmp_path / "rgb.npz"
    np.savez(
        f,
        x_train=hwc,
        y_train=np.array([[0], [1], [2], [1], [0]]),
        x_test=hwc[:2],
        y_test=np.array([2, 1]),
        x_val=hwc[:1],
        y_val=np.array([0]),
        class_names=np.array(["a", "b", "c"]),
    )
    d = load_data(f"npz:{f}")
    assert d.name == "rgb" and d.classes == ["a", "b", "c"]
    assert d.train.images.shape == (5, 3, 6, 6)
    assert np.array_equal(d.train.images.permute(0, 2, 3, 1).numpy(), hwc)
    assert d.train.labels.tolist() == [0, 1, 2, 1, 0] and d.val.labels.tolist() == [0]
    assert d.train.ids[:2] == ["train/0", "train/1"] and d.test.ids == ["test/0", "test/1"]
    d = load_data(f"npz:{f},classes=x;y;z;w,size=4,channels=1")
    assert d.classes == ["x", "y", "z", "w"] and d.train.images.shape == (5, 1, 4, 4)

    gray = rng.integers(0, 256, (4, 5, 5), dtype=np.uint8)
    f = tmp_path / "gray.npz"
    np.savez(f, x_train=gray, y_train=np.array([0, 1, 1, 0]), x_test=gray[:1], y_test=np.array([1]))
    d = load_data(f"npz:{f}")
    assert d.train.images.shape == (4, 1, 5, 5) and d.classes == ["0", "1"]
    assert np.array_equal(d.train.images[:, 0].numpy(), gray)
    assert load_data(f"npz:{f},channels=3").test.shape == (3, 5, 5)

    chw = rng.integers(0, 256, (3, 3, 7, 7), dtype=np.uint8)
    f = tmp_path / "chw.npz"
    np.savez(f, x_train=chw, y_train=np.array([0, 1, 2]), x_test=chw, y_test=np.array([0, 1, 2]))
    assert torch.equal(load_data(f"npz:{f}").train.images, torch.from_numpy(chw))


def test_npz_float_scaling(tmp_path: Path):
    unit = np.array([0.0, 0.5, 1.0, 0.25], dtype=np.float32).reshape(1, 2, 2)
    f = tmp_path / "unit.npz"
    np.savez(f, x_train=unit, y_train=np.array([0]), x_test=unit, y_test=np.array([0]))
    assert load_data(f"npz:{f}").train.images.flatten().tolist() == [0, 128, 255, 64]
    wide = np.array([0.0, 2.4, 254.6, 255.0]).reshape(1, 2, 2)
    f = tmp_path / "wide.npz"
    np.savez(f, x_train=wide, y_train=np.array([0]), x_test=wide, y_test=np.array([0]))
    assert load_data(f"npz:{f}").train.images.flatten().tolist() == [0, 2, 255, 255]


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"y_train": np.zeros(99, dtype=int)}, r"bad\.npz: x_train has 100 rows but y_train has 99"),
        ({"x_test": None}, r"bad\.npz: missing array 'x_test'"),
        ({"x_val": np.zeros((2, 4, 4), np.uint8)}, r"bad\.npz: missing array 'y_val'"),
        ({"x_train": np.full((100, 4, 4), 300.0)}, r"bad\.npz: x_train has float values in \[300, 300\]"),
        ({"x_train": np.full((100, 4, 4), -0.5)}, r"bad\.npz: x_train has float values"),
        ({"x_train": np.zeros((100, 4, 4), bool)}, r"bad\.npz: x_train has dtype bool"),
        ({"x_train": np.zeros((100, 4, 4, 5), np.uint8)}, r"bad\.npz: x_train has shape \(100, 4, 4, 5\)"),
        ({"y_train": -np.ones(100, dtype=int)}, r"bad\.npz: y_train has negative label -1"),
        ({"y_test": np.array([0, 7])}, r"bad\.npz: y_test has label 7 .*outside \[0, 1\]"),
        ({"y_train": np.zeros((100, 2), int)}, r"bad\.npz: y_train has shape \(100, 2\)"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, match: str):
    base = {
        "x_train": np.zeros((100, 4, 4), np.uint8),
        "y_train": np.arange(100) % 2,
        "x_test": np.zeros((2, 4, 4), np.uint8),
        "y_test": np.array([0, 1]),
        "class_names": np.array(["a", "b"]),
    }
    base.update(arrays)
    f = tmp_path / "bad.npz"
    np.savez(f, **{k: v for k, v in base.items() if v is not None})
    with pytest.raises(UserError, match=match):
        load_data(f"npz:{f}")


def test_npz_not_a_file(tmp_path: Path):
    with pytest.raises(UserError, match=r"nope\.npz does not exist"):
        load_data(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"junk\.npz: not a readable \.npz file"):
        load_data(f"npz:{tmp_path / 'junk.npz'}")


# --------------------------------------------------------------------------------------------
# cifar10 / cifar100 (fake pickles in torchvision's layout)
# --------------------------------------------------------------------------------------------


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _fake_cifar10(root: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(base / "batches.meta", {"label_names": names, "num_cases_per_batch": 2})
    all_data = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        all_data.append(data)
        _pickle(base / f"data_batch_{i}", {"data": data, "labels": [i, (i * 3) % 10], "batch_label": f"b{i}"})
    _pickle(
        base / "test_batch", {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [9, 0, 1]}
    )
    return np.concatenate(all_data)


def test_cifar10(tmp_path: Path):
    data = _fake_cifar10(tmp_path)
    d = load_data(f"cifar10:{tmp_path}")
    assert d.name == "cifar10" and d.classes[0] == "airplane" and d.num_classes == 10
    assert d.train.images.shape == (10, 3, 32, 32) and d.test.images.shape == (3, 3, 32, 32)
    assert np.array_equal(d.train.images.reshape(10, -1).numpy(), data)
    assert d.train.labels.tolist() == [1, 3, 2, 6, 3, 9, 4, 2, 5, 5] and d.test.labels.tolist() == [9, 0, 1]
    assert d.train.ids[:2] == ["train/0", "train/1"] and d.test.ids[-1] == "test/2"
    assert load_data(f"cifar10:{tmp_path},channels=1,size=16").train.shape == (1, 16, 16)
    # the batches folder itself is accepted as ROOT
    assert len(load_data(f"cifar10:{tmp_path / 'cifar-10-batches-py'}").train) == 10


def test_cifar100(tmp_path: Path):
    base = tmp_path / "cifar-100-python"
    fine = [f"class{i}" for i in range(100)]
    _pickle(base / "meta", {"fine_label_names": fine, "coarse_label_names": ["c"] * 20})
    train = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    _pickle(base / "train", {"data": train, "fine_labels": [0, 99, 5, 5], "coarse_labels": [0, 1, 2, 3]})
    _pickle(base / "test", {"data": train[:2], "fine_labels": [1, 2], "coarse_labels": [0, 0]})
    d = load_data(f"cifar100:{tmp_path}")
    assert d.classes == fine and d.train.labels.tolist() == [0, 99, 5, 5]
    assert torch.equal(d.train.images, torch.from_numpy(train.reshape(4, 3, 32, 32)))


def test_cifar_errors(tmp_path: Path):
    with pytest.raises(UserError, match=r"cifar-10-batches-py does not exist; add ,download"):
        load_data(f"cifar10:{tmp_path}")
    with pytest.raises(UserError, match=r"cifar-100-python does not exist; add ,download"):
        load_data(f"cifar100:{tmp_path}")
    _fake_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(UserError, match=r"data_batch_3 is missing"):
        load_data(f"cifar10:{tmp_path}")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"data_batch_3: not a readable CIFAR pickle"):
        load_data(f"cifar10:{tmp_path}")


# --------------------------------------------------------------------------------------------
# the real CIFAR-10 (JPEG copy) with CIFAR-10N labels, when present
# --------------------------------------------------------------------------------------------

needs_cifar10 = pytest.mark.skipif(not CIFAR10_CSV.is_file(), reason="no /work/shared/data/cifar10")


@needs_cifar10
def test_real_cifar10n_labels_fast():
    """The CSV's label columns (no image decoding) and the folder listing (no decoding)."""
    m = read_manifest(CIFAR10_CSV)
    train = m.splits["train"]
    assert list(m.splits) == ["train"] and m.label_column == "clean"
    assert len(train.labels) == 50_000 and len(m.classes) == 10 and m.classes[6] == "frog"
    assert sorted(train.extra_labels) == ["aggre", "random1", "random2", "random3", "worse"]
    rate = {k: float((v != train.labels).mean()) for k, v in train.extra_labels.items()}
    assert round(rate["worse"], 4) == 0.4021 and round(rate["aggre"], 4) == 0.0901
    assert train.ids[0] == "train/frog/0000.jpg"
    plan = sources._plan_imagefolder(str(CIFAR10_DIR))
    assert len(plan.splits["train"].files) == 50_000 and len(plan.splits["test"].files) == 10_000
    assert plan.classes == m.classes


@needs_cifar10
@pytest.mark.slow
def test_real_cifar10_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Decodes all 60,000 JPEGs twice (two sources); about 8 s each on 2 cores."""
    d = load_data(f"imagefolder:{CIFAR10_DIR}", cache_dir=tmp_path)
    assert len(d.train) == 50_000 and len(d.test) == 10_000 and d.train.shape == (3, 32, 32)
    with monkeypatch.context() as m:
        m.setattr(decode, "_decode_all", lambda *a, **k: pytest.fail("decoded again despite the cache"))
        d2 = load_data(f"imagefolder:{CIFAR10_DIR}", cache_dir=tmp_path)
    assert torch.equal(d.train.labels, d2.train.labels) and torch.equal(d.train.images, d2.train.images)

    c = load_data(f"csv:{CIFAR10_CSV},test=test", cache_dir=tmp_path)
    assert len(c.train) == 50_000 and len(c.test) == 10_000 and c.train.shape == (3, 32, 32)
    rate = {k: float((v != c.train.labels).float().mean()) for k, v in c.train.extra_labels.items()}
    assert round(rate["worse"], 4) == 0.4021 and round(rate["aggre"], 4) == 0.0901
    # the same image decodes identically through both sources
    i = d.train.ids.index(c.train.ids[123])
    assert torch.equal(d.train.images[i], c.train.images[123])
    assert torch.equal(d.test.images, c.test.images)


# --------------------------------------------------------------------------------------------
# issue 13 (data lane): sparse integer labels, undecodable file names, symlinks, float TIFFs
# --------------------------------------------------------------------------------------------


def test_huge_csv_label_is_a_class_of_its_own_without_a_huge_allocation(tmp_path: Path):
    """A CSV label of 100000000 once made 100,000,001 classes (and a dense C×C matrix): now 2 classes.

    Run through the CLI in a child process limited to 2 GB of data memory, so that a class list
    of range(max_label + 1) fails at once (MemoryError) instead of running for minutes.
    """
    import resource
    import subprocess
    import sys

    root = tmp_path / "m"
    for i in range(6):
        _save(root / f"{i}.png", _gray(i))
    _write_csv(root / "m.csv", [["path", "label"]] + [[f"{i}.png", str(i % 2 * 100_000_000)] for i in range(6)])

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "LABELREFINE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "labelrefine", "noise", "--data", f"csv:{root / 'm.csv'}",
                        "--type", "symmetric", "--rate", "0.3", "--out", str(tmp_path / "n.csv")],
                       preexec_fn=limit, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "classes: 2" in r.stdout
    rows = (tmp_path / "n.csv").read_text().splitlines()
    assert rows[0] == "id,clean_label,noisy_label,is_noisy" and rows[2].startswith("1.png,100000000,")
    d = load_data(f"csv:{root / 'm.csv'}", cache_dir=tmp_path / "cache")
    assert d.classes == ["0", "100000000"] and d.train.labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_sparse_integer_labels_name_their_classes(tmp_path: Path, cache: Path):
    """CSV, JSON and NPZ: integer labels are mapped to the values present, ascending (as names are)."""
    root = tmp_path / "s"
    for i in range(4):
        _save(root / f"{i}.png", _gray(i))
    csv_file = _write_csv(root / "m.csv", [["path", "label"], ["0.png", "7"], ["1.png", "3"], ["2.png", "10"]])
    test_csv = _write_csv(root / "t.csv", [["path", "label"], ["3.png", "12"]])
    d = load_data(f"csv:{csv_file},test={test_csv}", cache_dir=cache)
    assert d.classes == ["3", "7", "10", "12"]  # by value, not as text; the test's labels join them
    assert d.train.labels.tolist() == [1, 0, 2] and d.test.labels.tolist() == [3]
    # with classes= the integers stay indices into the list
    d = load_data(f"csv:{csv_file},classes={';'.join('abcdefghijk')}", cache_dir=cache)
    assert d.train.labels.tolist() == [7, 3, 10]

    (root / "m.json").write_text(json.dumps([{"name": f"{i}.png", "label": v}
                                             for i, v in enumerate([5, 10**12, 5])]))
    (root / "t.json").write_text(json.dumps([{"name": "3.png", "label": 2}]))
    d = load_data(f"json:{root / 'm.json'},test={root / 't.json'}", cache_dir=cache)
    assert d.classes == ["2", "5", str(10**12)] and d.train.labels.tolist() == [1, 2, 1]
    assert d.test.labels.tolist() == [0]

    f = tmp_path / "gaps.npz"
    x = np.zeros((4, 4, 4), np.uint8)
    np.savez(f, x_train=x, y_train=np.array([1, 4, 4, 1]), x_test=x[:1], y_test=np.array([9]))
    d = load_data(f"npz:{f}")
    assert d.classes == ["1", "4", "9"] and d.train.labels.tolist() == [0, 1, 1, 0] and d.test.labels.tolist() == [2]


def test_non_utf8_file_name_gets_a_printable_id(tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture):
    root = _make_folder(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    img = Image.fromarray(_rgb(99))
    img.save(os.fsencode(root / "train" / "cat") + b"/caf\xe9.png", format="PNG")
    (root / "train" / "dog").rename(os.fsdecode(os.fsencode(root / "train") + b"/d\xf6g"))
    (root / "test" / "dog").rename(os.fsdecode(os.fsencode(root / "test") + b"/d\xf6g"))
    with caplog.at_level(logging.WARNING, logger="labelrefine"):
        d = load_data(f"imagefolder:{root}", cache_dir=cache)
    assert d.classes == ["cat", "d\\xf6g"]
    assert "train/cat/caf\\xe9.png" in d.train.ids and "test/d\\xf6g/00.png" in d.test.ids
    assert all(i.encode("utf-8") for i in d.train.ids + d.test.ids)  # every id is writable as UTF-8
    k = d.train.ids.index("train/cat/caf\\xe9.png")
    assert np.array_equal(d.train.images[k].permute(1, 2, 0).numpy(), _rgb(99))  # read from its real path
    assert "not valid UTF-8" in caplog.text and "caf\\xe9.png" in caplog.text
    # a JSON name with an escaped lone surrogate is the same file: the same printable id
    (root / "m.json").write_text('[{"name": "train/cat/caf\\udce9.png", "label": 0}]')
    assert load_data(f"json:{root / 'm.json'}", cache_dir=cache).train.ids == ["train/cat/caf\\xe9.png"]


def test_run_on_a_folder_with_a_non_utf8_file_name_writes_labels_and_report(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    """The run used to train, then fail writing labels.csv (UnicodeEncodeError) and lose everything."""
    from labelrefine.cli import main

    root = _make_folder(tmp_path / "d", {"train": {"cat": 10, "dog": 10}, "test": {"cat": 2, "dog": 2}})
    Image.fromarray(_rgb(7)).save(os.fsencode(root / "train" / "cat") + b"/\xff.png", format="PNG")
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    sets = [f"data.spec=imagefolder:{root}", "data.noise=none", "method=ce", "epochs=1", "ssl.epochs=0",
            "model.backbone=tiny", "data.train_subset=0", "data.test_subset=0", "data.val_fraction=0"]
    assert main(["-q", "run", *(f"--set={s}" for s in sets), "--out", str(out)]) == 0
    ids = [line.split(",")[0] for line in (out / "labels.csv").read_text(encoding="utf-8").splitlines()[1:]]
    assert len(ids) == 21 and "train/cat/\\xff.png" in ids
    assert (out / "report.html").is_file() and (out / "model.pt").is_file()


def test_symlinks_in_an_imagefolder(tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture):
    """Links to images or other folders are followed; a dangling link is skipped with a warning."""
    root = _make_folder(tmp_path / "d", {"train": {"cat": 2, "dog": 2}})
    (root / "train" / "cat" / "more").symlink_to(root / "train" / "dog", target_is_directory=True)
    (root / "train" / "dog" / "gone.png").symlink_to(root / "nowhere.png")
    (root / "train" / "dog" / "self.png").symlink_to("self.png")  # a loop of links to no file
    with caplog.at_level(logging.WARNING, logger="labelrefine"):
        d = load_data(f"imagefolder:{root}", cache_dir=cache)
    assert d.train.ids == ["train/cat/00.png", "train/cat/01.png", "train/cat/more/00.png", "train/cat/more/01.png",
                           "train/dog/00.png", "train/dog/01.png"]
    assert "gone.png: skipped" in caplog.text and "self.png: skipped" in caplog.text
    (root / "train" / "dog" / "up").symlink_to(root / "train", target_is_directory=True)
    # found through cat/more (-> dog) first: cat/more/up/dog points back at dog, which contains it
    with pytest.raises(UserError, match=r"/up/dog: symbolic link loop: it points to .*train/dog, a folder that"):
        load_data(f"imagefolder:{root}", cache_dir=cache)


def test_float_and_16_bit_tiffs_are_scaled_not_black(tmp_path: Path, cache: Path):
    """float32 TIFFs in [0, 1] × 255, in [0, 255] as they are; 16-bit / 257 (training and predict decode)."""
    root = tmp_path / "t"
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    wide = np.linspace(0, 255, 64, dtype=np.float32).reshape(8, 8)
    sixteen = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    for name, arr in (("unit", unit), ("wide", wide), ("sixteen", sixteen)):
        _save(root / "train" / "a" / f"{name}.tif", arr)
    d = load_data(f"imagefolder:{root}", cache_dir=cache)
    got = {i.split("/")[-1]: d.train.images[k, 0].numpy() for k, i in enumerate(d.train.ids)}
    expected = {"unit.tif": np.rint(unit.astype(np.float64) * 255), "wide.tif": np.rint(wide),
                "sixteen.tif": np.rint(sixteen / 257.0)}
    for name, want in expected.items():
        assert np.array_equal(got[name], want.astype(np.uint8)), name
    assert got["unit.tif"].max() == 255
    files = [str(root / "train" / "a" / n) for n in ("unit.tif", "wide.tif", "sixteen.tif")]
    decoded = sources.decode_images(files, (8, 8), 3)  # what predict uses
    for k, name in enumerate(("unit.tif", "wide.tif", "sixteen.tif")):
        assert all(np.array_equal(decoded[k, c].numpy(), expected[name].astype(np.uint8)) for c in range(3))


def test_class_names_and_short_messages():
    sources.check_class_names(["a", "b"], "x")
    with pytest.raises(UserError, match=r"^classes: class 'a' listed twice$"):
        sources.check_class_names(["a", "b", "a"], "classes")
    with pytest.raises(UserError, match=r"^classes: empty class name$"):
        sources.check_class_names(["a", ""], "classes")
    assert sources._short(10**300) == "a number of about 301 digits" and len(sources._short("x" * 1000)) == 60
    assert sources._short(10**30) == str(10**30) and sources._short(7 ** 9000).startswith("a number of about")
    assert sources.printable_name("café/x.png") == "café/x.png"
    assert sources.printable_name(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
