"""``csv:FILE``: a manifest with a path column and label columns (class names or integers).

Options: ``path=COL label=COL split=COL test=PATH classes=a;b;c``. A CSV test table must use the
manifest's kind of labels (integers or names); an image listed twice (within a split or across
splits; paths compared after normalisation) is an error naming both lines.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...io import read_text_file
from ..imageset import DataSplits
from .files import _check_duplicates, _existing_file, _folder_split, _option_path, _stat_files
from .names import _class_list, _short, index_labels, present_classes
from .plan import _Plan, _SplitPlan, load_planned
from .registry import SourceRequest, register_source
from .spec import _parse_classes


@register_source("csv", options=("path", "label", "split", "test", "classes"),
                 doc="manifest: ``path=COL label=COL split=COL test=PATH classes=a;b;c``")
def load(req: SourceRequest) -> DataSplits:
    assert req.path is not None
    return load_planned(_plan_csv(req.path, req.options), req)


_PATH_COLUMNS = ("path", "file", "filename", "image", "name")


_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class ManifestSplit:
    """One split of a manifest: ids (paths as written), absolute files, int64 ``(N,)`` labels.

    ``extra_labels`` holds the further label columns (int64 ``(N,)``, same class indexing);
    ``lines`` the 1-based line of each row in ``source`` (``None`` for a folder split).
    """

    ids: list[str]
    files: list[str]
    labels: np.ndarray
    extra_labels: dict[str, np.ndarray]
    source: Path
    lines: list[int] | None


@dataclass
class Manifest:
    """A parsed CSV manifest: its classes, main label column and splits (no images loaded)."""

    file: Path
    classes: list[str]
    label_column: str
    path_column: str
    splits: dict[str, ManifestSplit]
    test_source: Path | None = None


@dataclass
class _CsvTable:
    file: Path
    header: list[str]
    columns: dict[str, np.ndarray]  # stripped string values, one array per column
    lines: np.ndarray  # 1-based line number of each row


def _read_csv_table(file: Path) -> _CsvTable:
    text = read_text_file(file, str(file), encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{file}: empty manifest (no header line)") from None
    except csv.Error as e:
        raise UserError(f"{file}: line 1: malformed CSV ({e})") from None
    header = [h.strip() for h in header]
    if any(not h for h in header):
        raise UserError(f"{file}: header has an empty column name (column {header.index('') + 1})")
    dups = [h for h in header if header.count(h) > 1]
    if dups:
        raise UserError(f"{file}: column {dups[0]!r} appears twice in the header")
    rows: list[list[str]] = []
    lines: list[int] = []
    ncol = len(header)
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != ncol:
                raise UserError(f"{file}: line {reader.line_num}: {len(row)} fields, the header has {ncol}")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise UserError(f"{file}: line {reader.line_num}: malformed CSV ({e})") from None
    if not rows:
        raise UserError(f"{file}: empty manifest (a header but no rows)")
    cols = {
        h: np.char.strip(np.array(vals, dtype=str))
        for h, vals in zip(header, zip(*rows, strict=True), strict=True)
    }
    return _CsvTable(file, header, cols, np.array(lines, dtype=np.int64))


def _pick_column(table: _CsvTable, option: str, given: str | None, defaults: Sequence[str]) -> str | None:
    if given is not None:
        if given not in table.columns:
            raise UserError(
                f"{table.file}: no column {given!r} (from {option}={given}); "
                f"columns: {', '.join(table.header)}"
            )
        return given
    return next((c for c in defaults if c in table.columns), None)


def _int_column(values: np.ndarray) -> np.ndarray | None:
    """The column as int64 when every value parses as an int, else ``None``."""
    try:
        return values.astype(np.int64)
    except (ValueError, OverflowError):
        return None


def _resolve_label_columns(
    tables: Sequence[_CsvTable], label_cols: Sequence[Sequence[str]], classes: list[str] | None
) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """Map every label column of every table to int64 class indices.

    ``tables[0]`` is the manifest, a second one the test table. Without ``classes``: when
    every label column of the manifest holds integers, the classes are the integers present in
    all tables (:func:`present_classes`), and a test table must hold integers too; otherwise a
    column holds class names when any of its values is not an integer, the classes are the
    sorted names of all tables and the integer columns index into them. With ``classes``:
    integers index into it, names must be in it. Returns the class list and, per table,
    column → int64 array.
    """
    names = sorted({c for cols in label_cols for c in cols})
    parsed: list[dict[str, np.ndarray | None]] = []
    for table, cols in zip(tables, label_cols, strict=True):
        parsed.append({c: _int_column(table.columns[c]) for c in cols})
    if classes is None and all(v is not None for v in parsed[0].values()):
        return _resolve_int_labels(tables, label_cols, parsed)
    is_int = {c: all(p[c] is not None for p in parsed if c in p) for c in names}
    if classes is None:
        _check_label_kinds(tables, label_cols, parsed)
        found: set[str] = set()
        for table, cols in zip(tables, label_cols, strict=True):
            for c in cols:
                if not is_int[c]:
                    values = np.unique(table.columns[c])
                    if values[0] == "":
                        bad = int(np.flatnonzero(table.columns[c] == "")[0])
                        raise UserError(f"{table.file}: line {table.lines[bad]}: column {c!r} is empty")
                    found.update(values.tolist())
        classes = sorted(found)
    index = {c: i for i, c in enumerate(classes)}
    out: list[dict[str, np.ndarray]] = []
    for table, cols, ints in zip(tables, label_cols, parsed, strict=True):
        mapped: dict[str, np.ndarray] = {}
        for c in cols:
            values = ints[c] if is_int[c] else None
            if values is not None:
                bad_mask = (values < 0) | (values >= len(classes))
                if bad_mask.any():
                    bad = int(np.flatnonzero(bad_mask)[0])
                    raise UserError(
                        f"{table.file}: line {table.lines[bad]}: column {c!r} has label {int(values[bad])} "
                        f"outside [0, {len(classes) - 1}] ({len(classes)} classes)"
                    )
                mapped[c] = values
            else:
                uniq, inverse = np.unique(table.columns[c], return_inverse=True)
                missing = [u for u in uniq.tolist() if u not in index]
                if missing:
                    bad = int(np.flatnonzero(table.columns[c] == missing[0])[0])
                    what = (
                        "is empty"
                        if missing[0] == ""
                        else f"has label {_short(missing[0])!r}, not one of the classes"
                    )
                    raise UserError(
                        f"{table.file}: line {table.lines[bad]}: column {c!r} {what} ({_class_list(classes)})"
                    )
                lut = np.array([index[u] for u in uniq.tolist()], dtype=np.int64)
                mapped[c] = lut[inverse.reshape(-1)]
        out.append(mapped)
    return classes, out


def _check_label_kinds(
    tables: Sequence[_CsvTable], label_cols: Sequence[Sequence[str]], parsed: Sequence[dict[str, np.ndarray | None]]
) -> None:
    """A test table's label column must be of the manifest's kind (integers or names): where
    the kinds differ, a test value that is not one of the manifest's values of that column
    raises :class:`UserError` (it would silently become a class of its own)."""
    main = tables[0]
    for table, cols, ints in zip(tables[1:], label_cols[1:], parsed[1:], strict=True):
        for c in cols:
            if c not in parsed[0] or (parsed[0][c] is None) == (ints[c] is None):
                continue
            known = np.unique(main.columns[c])
            outside = ~np.isin(table.columns[c], known)
            if outside.any():
                bad = int(np.flatnonzero(outside)[0])
                kind = "class names" if parsed[0][c] is None else "integer labels"
                raise UserError(
                    f"{table.file}: line {table.lines[bad]}: column {c!r} has label "
                    f"{_short(str(table.columns[c][bad]))!r}, not one of the training classes "
                    f"({_class_list(known.tolist())}: {main.file.name} has {kind})"
                )


def _resolve_int_labels(
    tables: Sequence[_CsvTable],
    label_cols: Sequence[Sequence[str]],
    parsed: Sequence[dict[str, np.ndarray | None]],
) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """Integer labels without a class list: the classes are the integers present, by value."""
    for table, cols, ints in zip(tables, label_cols, parsed, strict=True):
        for c in cols:
            values = ints[c]
            if values is not None and values.size and values.min() < 0:
                bad = int(np.argmax(values < 0))
                raise UserError(
                    f"{table.file}: line {table.lines[bad]}: column {c!r} has label {int(values[bad])}; "
                    f"integer labels must be >= 0"
                )
    present = present_classes([v for ints in parsed for v in ints.values() if v is not None])
    classes = [str(v) for v in present.tolist()]
    for table, cols, ints in zip(tables[1:], label_cols[1:], parsed[1:], strict=True):
        for c in cols:
            if ints[c] is None:  # names (or an empty value) where the training labels are integers
                text = table.columns[c].tolist()
                bad = next(i for i, v in enumerate(text) if _int_column(np.array([v])) is None)
                what = "is empty" if text[bad] == "" else (
                    f"has label {_short(text[bad])!r}, not one of the training classes ({_class_list(classes)}: "
                    f"{tables[0].file.name} has integer labels)"
                )
                raise UserError(f"{table.file}: line {table.lines[bad]}: column {c!r} {what}")
    out = [{c: index_labels(present, v)[0] for c, v in ints.items()} for ints in parsed]  # type: ignore[arg-type]
    return classes, out


def read_manifest(
    file: str | Path,
    *,
    path_column: str | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
    test: str | Path | None = None,
    classes: Sequence[str] | None = None,
) -> Manifest:
    """Parse a CSV manifest into labels per split without decoding any image.

    Args:
        file: the CSV; image paths in it are relative to its folder.
        path_column: column of image paths (default: first of path, file, filename, image, name).
        label_column: main label column (default ``label``, else ``clean``, else the first
            column that is neither the path nor the split column). Every other column except
            path and split becomes an extra label column.
        split_column: column with train/val/test (default ``split`` when present; without one
            every row is train).
        test: an extra test split: a folder of ``<class>/<image>`` or a CSV of the same format.
        classes: explicit class list; labels are then names from it or indices into it.

    Returns:
        a :class:`Manifest`; each split's ``labels`` is int64 ``(N,)``.
    """
    file = _existing_file(file, "csv: manifest")
    table = _read_csv_table(file)
    pcol, scol, lcol, label_cols = _manifest_columns(table, path_column, label_column, split_column)
    tables, cols = [table], [label_cols]
    test_path: Path | None = None
    test_table: _CsvTable | None = None
    if test is not None:
        test_path = _option_path(str(test), file, "test")
        if test_path.is_file():
            test_table, tcols = _test_table(test_path, pcol, scol, lcol)
            tables.append(test_table)
            cols.append(tcols)
    canon = _canonical_splits(table, scol)
    if test_path is not None and canon is not None and (canon == "test").any():
        raise UserError(f"{file}: has test rows in column {scol!r} and test={test} was given too; use one")
    class_list, mapped = _resolve_label_columns(tables, cols, list(classes) if classes is not None else None)

    splits: dict[str, ManifestSplit] = {}
    if canon is None:
        splits["train"] = _manifest_split(table, mapped[0], pcol, lcol, None)
    else:
        for name in ("train", "val", "test"):
            rows = np.flatnonzero(canon == name)
            if rows.size:
                splits[name] = _manifest_split(table, mapped[0], pcol, lcol, rows)
    if test_path is not None:
        if test_table is not None:
            splits["test"] = _manifest_split(test_table, mapped[1], pcol, lcol, None)
        else:
            plan = _folder_split(test_path, test_path.parent, class_list)[1]
            splits["test"] = ManifestSplit(plan.ids, plan.files, plan.labels, {}, test_path, None)
    _check_duplicates(
        [(s.files, s.ids, s.labels, s.source, s.lines) for s in splits.values()], class_list, "line"
    )
    return Manifest(file, class_list, lcol, pcol, splits, test_path)


def _manifest_columns(
    table: _CsvTable, path_column: str | None, label_column: str | None, split_column: str | None
) -> tuple[str, str | None, str, list[str]]:
    """The path, split and main label columns, and all label columns (main first)."""
    file = table.file
    pcol = _pick_column(table, "path", path_column, _PATH_COLUMNS)
    if pcol is None:
        raise UserError(
            f"{file}: no path column (looked for {', '.join(_PATH_COLUMNS)}); name it with path=COL"
        )
    scol = _pick_column(table, "split", split_column, ("split",))
    candidates = [c for c in table.header if c not in (pcol, scol)]
    lcol = _pick_column(table, "label", label_column, ("label", "clean", *candidates))
    if lcol is None or lcol in (pcol, scol):
        raise UserError(
            f"{file}: no label column (columns: {', '.join(table.header)}); name it with label=COL"
        )
    return pcol, scol, lcol, [lcol] + [c for c in candidates if c != lcol]


def _test_table(test_path: Path, pcol: str, scol: str | None, lcol: str) -> tuple[_CsvTable, list[str]]:
    """A CSV test table and its label columns (main first); it must have the manifest's path and label columns."""
    test_table = _read_csv_table(test_path)
    if pcol not in test_table.columns:
        raise UserError(
            f"{test_path}: no path column {pcol!r} (columns: {', '.join(test_table.header)})"
        )
    if lcol not in test_table.columns:
        raise UserError(
            f"{test_path}: no label column {lcol!r} (columns: {', '.join(test_table.header)})"
        )
    test_scol = (
        scol if scol in test_table.columns else ("split" if "split" in test_table.columns else None)
    )
    return test_table, [lcol] + [c for c in test_table.header if c not in (pcol, test_scol, lcol)]


def _canonical_splits(table: _CsvTable, scol: str | None) -> np.ndarray | None:
    """Each row's split (train, val or test) from the split column; ``None`` without one."""
    if scol is None:
        return None
    file = table.file
    raw = np.char.lower(table.columns[scol])
    known = np.isin(raw, list(_SPLIT_NAMES))
    if not known.all():
        bad = int(np.flatnonzero(~known)[0])
        raise UserError(
            f"{file}: line {table.lines[bad]}: column {scol!r} has {_short(str(table.columns[scol][bad]))!r}; "
            f"expected train, val or test"
        )
    canon = np.array([_SPLIT_NAMES[v] for v in raw.tolist()])
    if not (canon == "train").any():
        raise UserError(f"{file}: no rows with {scol}=train")
    return canon


def _manifest_split(
    t: _CsvTable, m: dict[str, np.ndarray], pcol: str, main: str, rows: np.ndarray | None
) -> ManifestSplit:
    """The rows ``rows`` (all when ``None``) of table ``t``, with labels ``m`` mapped to class indices."""
    paths = t.columns[pcol] if rows is None else t.columns[pcol][rows]
    lines = t.lines if rows is None else t.lines[rows]
    empty = np.flatnonzero(paths == "")
    if empty.size:
        raise UserError(f"{t.file}: line {lines[empty[0]]}: column {pcol!r} is empty")
    ids = paths.tolist()
    base = str(t.file.parent)
    return ManifestSplit(
        ids=ids,
        files=[os.path.join(base, p) for p in ids],
        labels=m[main] if rows is None else m[main][rows],
        extra_labels={c: (v if rows is None else v[rows]) for c, v in m.items() if c != main},
        source=t.file,
        lines=lines.tolist(),
    )


def _plan_csv(path: str, options: dict[str, str | bool]) -> _Plan:
    def opt(key: str) -> str | None:
        v = options.get(key)
        return None if v is None else str(v)

    classes = _parse_classes(options.get("classes"))
    m = read_manifest(
        path,
        path_column=opt("path"),
        label_column=opt("label"),
        split_column=opt("split"),
        test=opt("test"),
        classes=classes,
    )
    splits: dict[str, _SplitPlan] = {}
    for name, s in m.splits.items():
        plan = _SplitPlan(files=s.files, ids=s.ids, labels=s.labels, extra=s.extra_labels)
        _stat_files(plan, s.source, s.lines)
        splits[name] = plan
    manifests = [m.file] + ([m.test_source] if m.test_source is not None and m.test_source.is_file() else [])
    key_options = {
        "path": m.path_column,
        "label": m.label_column,
        "split": opt("split"),
        "test": str(m.test_source) if m.test_source is not None else None,
        "classes": m.classes,
    }
    return _Plan("csv", m.file.stem, m.file, m.classes, splits, key_options, manifests)
