"""report.html: summary with the estimated transition matrix, gallery of suspected errors, plots."""

from __future__ import annotations

import base64
import csv
import io
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from labelrefine.methods.base import LabelReport
from labelrefine.pipeline import run
from labelrefine.report import FIXED_PHASE_COLORS, MATRIX_TABLE_MAX_CLASSES, phase_colors, write_report

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """Collects what the tests look at and checks that every element is closed in order."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict]] = []
        self.sections: list[str] = []
        self.figures: list[dict] = []  # gallery figures: {"src": ..., "alt": ..., "spans": {class: text}}
        self.matrix: list[list[tuple[str, str | None]]] = []  # rows of (cell text, title)
        self.texts: list[str] = []
        self.attrs: list[str] = []
        self._span: str | None = None
        self._cell: list | None = None
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed elements: {[t for t, _ in self.stack]}"

    def _inside(self, tag: str, **want) -> bool:
        return any(t == tag and all(a.get(k) == v for k, v in want.items()) for t, a in self.stack)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs.extend(v for v in a.values() if v)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "figure" and a.get("class") == "suspect":
            self.figures.append({"spans": {}})
        if tag == "img" and self._inside("figure", **{"class": "suspect"}):
            self.figures[-1].update(src=a["src"], alt=a.get("alt"))
        if tag == "span" and self._inside("figure", **{"class": "suspect"}):
            self._span = a.get("class")
            self.figures[-1]["spans"][self._span] = ""
        if tag == "tr" and self._inside("table", id="transition") and self._inside("tbody"):
            self.matrix.append([])
        if tag == "td" and self._inside("table", id="transition") and self._inside("tbody"):
            self._cell = ["", a.get("title")]
        if tag not in VOID:
            self.stack.append((tag, a))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1][0] == tag, f"</{tag}> closes {self.stack[-1][0] if self.stack else None}"
        self.stack.pop()
        if tag == "span":
            self._span = None
        if tag == "td" and self._cell is not None:
            self.matrix[-1].append(tuple(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.texts.append(data)
        if self._span is not None:
            self.figures[-1]["spans"][self._span] += data
        if self._cell is not None:
            self._cell[0] += data


def _png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _no_external(text: str) -> None:
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()


def test_report_of_a_tiny_run(tiny_config, tmp_path):
    # threshold 2.5: the tiny model is weak, so the default threshold would relabel nothing
    cfg = tiny_config("method=ours", "refine.threshold=2.5")
    summary = run(cfg, tmp_path / "out").summary
    text = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>")
    page = Page(text)
    _no_external(text)
    assert page.sections == ["summary", "gallery", "plots"]

    rows = list(csv.DictReader((tmp_path / "out" / "labels.csv").open(encoding="utf-8")))
    flagged = [r for r in rows if r["is_label_issue"] == "True"]
    assert flagged, "the test needs a run that flags some labels"
    k = min(48, len(flagged))
    assert len(page.figures) == k
    for fig, row in zip(page.figures, flagged[:k], strict=True):
        im = _png(fig["src"])
        assert im.size == (96, 96)  # 8×8 digits enlarged 12× with nearest-neighbour
        assert fig["spans"]["sid"] == row["id"]
        assert fig["spans"]["given"] == f"given: {row['given_label']}"
        # the refined label where it changed, else the model's prediction
        want = row["refined_label"] if row["refined_label"] != row["given_label"] else row["predicted_label"]
        assert fig["spans"]["suggested"] == f"suggested: {want}"
        name, value = fig["spans"]["conf"].split(": ")
        assert name == "p(suggested)" and 0.0 <= float(value) <= 1.0

    # The transition matrix: 10 rows, each row-normalised; titles hold the raw counts.
    assert len(page.matrix) == 10
    for cells in page.matrix:
        n = int(cells[0][0])
        assert len(cells) == 11
        if n == 0:  # no sample has this given label: the row is empty
            assert all(t == "–" for t, _ in cells[1:])
            continue
        assert sum(float(t) for t, _ in cells[1:]) == pytest.approx(1.0, abs=0.01)
        counts = [int(title.split(": ")[1].split(" of ")[0]) for _, title in cells[1:]]
        assert sum(counts) == n
    assert sum(int(cells[0][0]) for cells in page.matrix) == summary["n_train"]

    joined = " ".join(page.texts)
    est = summary["n_label_issues"] / summary["n_train"]
    assert f"{100 * est:.1f}%" in joined
    assert f"{100 * (1 - summary['train_label_acc_before']):.1f}%" in joined
    assert "(from the clean labels, for evaluation)" in joined
    assert "<details>" in text and "config_hash" in joined
    assert text.count('<figure><img alt="') >= 2  # the training plots are still there
    for src in (a for a in page.attrs if a.startswith("data:image/png")):
        _png(src)


NASTY = ['<b>cat</b>', 'a&b', 'say "hi"']


def _rep(n: int, c: int, issues: list[int]) -> tuple[LabelReport, torch.Tensor]:
    given = torch.arange(n) % c
    refined = given.clone()
    flags = torch.zeros(n, dtype=torch.bool)
    for i in issues:
        refined[i] = (given[i] + 1) % c
        flags[i] = True
    quality = torch.linspace(0.9, 0.1, n)  # later samples look worse
    return LabelReport(refined, quality, flags, torch.zeros(n, dtype=torch.long)), given


def test_html_escapes_names_and_ids(tmp_path):
    n = 12
    rep, given = _rep(n, 3, issues=[1, 5, 10])
    images = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8)
    ids = [f'img<{i}>&"q".png' for i in range(n)]
    summary = {"method": "ours", "dataset": 'set<&">', "data": "npz:x<&>.npz", "n_train": n}
    write_report(tmp_path, summary, rep, given, NASTY, images, ids, top_k=2)
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    _no_external(text)
    for raw in ("<b>", 'say "hi"', "a&b", "<1>", 'set<&">'):
        assert raw not in text
    # Flagged 10 and 5 (lowest quality first), cut to top_k = 2; captions round-trip exactly.
    assert [f["spans"]["sid"] for f in page.figures] == [ids[10], ids[5]]
    assert page.figures[0]["spans"]["given"] == f"given: {NASTY[int(given[10])]}"
    assert page.figures[0]["spans"]["suggested"] == f"suggested: {NASTY[int(rep.refined_label[10])]}"
    name, value = page.figures[0]["spans"]["conf"].split(": ")
    assert name == "1 − quality" and float(value) == pytest.approx(1 - float(rep.label_quality[10]), abs=1e-3)
    assert _png(page.figures[0]["src"]).size == (84, 84) and _png(page.figures[0]["src"]).mode == "RGB"
    joined = "".join(page.texts)
    for name in NASTY:
        assert name in joined
    assert "of 3 flagged" in joined
    assert len(page.matrix) == 3


def test_report_without_issues_gray_and_many_classes(tmp_path):
    c = MATRIX_TABLE_MAX_CLASSES + 90
    n = 2 * c
    rep, given = _rep(n, c, issues=[])
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    ids = [str(i) for i in range(n)]
    write_report(tmp_path, {"method": "ce", "dataset": "many"}, rep, given, [f"c{i}" for i in range(c)], images,
                 ids, predict_logits=lambda x: torch.zeros(len(x), c))
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert page.sections == ["summary", "gallery", "plots"]
    assert page.figures == [] and "flagged no training label" in text
    assert 'id="transition"' not in text and "too many for a table" in text
    assert text.count("data:image/png;base64,") == 1  # only confusion.png (no metrics.jsonl), in the summary

    rep, given = _rep(n, c, issues=[3])
    (tmp_path / "gray").mkdir()
    write_report(tmp_path / "gray", {"method": "ce", "dataset": "many"}, rep, given, [f"c{i}" for i in range(c)],
                 images, ids, predict_logits=lambda x: torch.zeros(len(x), c))
    page = Page((tmp_path / "gray" / "report.html").read_text(encoding="utf-8"))
    assert len(page.figures) == 1
    im = _png(page.figures[0]["src"])
    assert im.size == (96, 96) and im.mode == "L"
    assert page.figures[0]["spans"]["conf"] == f"p(suggested): {1 / c:.3f}"


def test_every_declared_phase_has_its_own_colour():
    from labelrefine.methods import list_methods

    colors = phase_colors()
    declared = {p for m in list_methods() for p in m.phases}
    assert declared <= set(colors)
    assert all(colors[p] == c for p, c in FIXED_PHASE_COLORS.items())
    assert len({colors[p] for p in declared}) == len(declared)


def test_the_suggested_label_is_the_refined_one_where_it_changed_else_the_models():
    given = torch.tensor([0, 1, 2, 0])
    refined = torch.tensor([1, 1, 2, 0])  # sample 0 refined; 1-3 kept their label
    predicted = torch.tensor([2, 0, 2, 1])  # the model disagrees on 1 and 3
    rep = LabelReport(refined, torch.rand(4), torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long),
                      predicted_label=predicted)
    assert rep.suggested(given).tolist() == [1, 0, 2, 1]
    rep.predicted_label = None  # a method that gives no prediction: its refined label
    assert rep.suggested(given).tolist() == refined.tolist()
