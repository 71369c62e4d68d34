"""``json:FILE``: a Chaoyang-style manifest ``[{"name": path, "label": int}, ...]``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...io import read_text_file
from ..imageset import DataSplits
from .files import _check_duplicates, _existing_file, _option_path, _stat_files
from .names import _short, index_labels, present_classes
from .plan import _Plan, _SplitPlan, load_planned
from .registry import SourceRequest, register_source
from .spec import _parse_classes

log = logging.getLogger("labelrefine")


@register_source("json", options=("test", "classes"),
                 doc='Chaoyang-style ``[{"name": path, "label": int}, ...]``: ``test=FILE classes=a;b;c``')
def load(req: SourceRequest) -> DataSplits:
    assert req.path is not None
    return load_planned(_plan_json(req.path, req.options), req)


_INT64_MAX = 2**63 - 1


def _read_json_manifest(file: Path) -> tuple[list[str], np.ndarray]:
    """Paths (as written) and int64 ``(N,)`` labels of a ``[{"name": ..., "label": int}]`` file."""
    text = read_text_file(file, str(file), encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{file}: not valid JSON for a manifest (lists or objects nested too deeply)") from None
    except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
        raise UserError(f"{file}: not valid JSON for a manifest ({str(e).split(':')[0]})") from None
    if not isinstance(data, list):
        raise UserError(
            f'{file}: expected a JSON list of {{"name": path, "label": int}}, got {type(data).__name__}'
        )
    if not data:
        raise UserError(f"{file}: empty manifest (an empty list)")
    names: list[str] = []
    labels: list[int] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise UserError(
                f"{file}: entry {i} is a {type(entry).__name__}, expected an object with name and label"
            )
        for key in ("name", "label"):
            if key not in entry:
                raise UserError(f"{file}: entry {i} has no {key!r}")
        name, label = entry["name"], entry["label"]
        if not isinstance(name, str) or not name:
            raise UserError(f"{file}: entry {i}: 'name' must be a non-empty path string, got {_short(name)}")
        if isinstance(label, bool) or not isinstance(label, int):
            raise UserError(f"{file}: entry {i}: 'label' must be an integer, got {_short(label)}")
        if label < 0:
            raise UserError(f"{file}: entry {i}: 'label' {_short(label)} is negative")
        if label > _INT64_MAX:
            raise UserError(f"{file}: entry {i}: 'label' {_short(label)} is too large (at most 2**63 - 1)")
        names.append(name)
        labels.append(label)
    return names, np.array(labels, dtype=np.int64)


def _plan_json(path: str, options: dict[str, str | bool]) -> _Plan:
    file = _existing_file(path, "json: manifest")
    classes = _parse_classes(options.get("classes"))
    test_file: Path | None = None
    if options.get("test") is not None:
        test_file = _option_path(str(options["test"]), file, "test")
        if not test_file.is_file():
            raise UserError(f"option test={options['test']}: {test_file} is not a file")
    elif "train" in file.name:
        guess = file.with_name(file.name.replace("train", "test"))
        if guess.is_file():
            test_file = guess.resolve()
            log.info("json: using %s as the test split", test_file)
    sources = {"train": file} | ({"test": test_file} if test_file is not None else {})
    read = {name: _read_json_manifest(f) for name, f in sources.items()}
    present = None
    if classes is None:  # integer labels name their classes: the values present, ascending
        present = present_classes([labels for _, labels in read.values()])
        classes = [str(v) for v in present.tolist()]
    splits: dict[str, _SplitPlan] = {}
    for name, (names, labels) in read.items():
        src = sources[name]
        if present is not None:
            labels = index_labels(present, labels)[0]
        elif labels.max() >= len(classes):
            bad = int(np.flatnonzero(labels >= len(classes))[0])
            raise UserError(
                f"{src}: entry {bad}: 'label' {int(labels[bad])} outside [0, {len(classes) - 1}] "
                f"({len(classes)} classes)"
            )
        base = str(src.parent)
        plan = _SplitPlan(files=[os.path.join(base, n) for n in names], ids=names, labels=labels)
        splits[name] = plan
    _check_duplicates(
        [(p.files, p.ids, p.labels, sources[n], range(len(p.files))) for n, p in splits.items()], classes, "entry"
    )
    for name, plan in splits.items():
        _stat_files(plan, sources[name])
    if test_file is None:  # after the checks: a bad manifest is one error line, not a warning and an error
        log.warning("json: no test split for %s (give one with test=FILE)", file)
    key_options = {"test": str(test_file) if test_file else None, "classes": classes}
    return _Plan("json", file.stem, file, classes, splits, key_options, list(sources.values()))

