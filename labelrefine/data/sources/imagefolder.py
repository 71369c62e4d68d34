"""``imagefolder:DIR``: ``DIR/{train,test,val}/<class>/<image>``, as torchvision's ImageFolder."""

from __future__ import annotations

import logging
import os

from ...errors import UserError
from ..imageset import DataSplits
from .files import _existing_dir, _folder_split
from .plan import _Plan, load_planned
from .registry import SourceRequest, register_source

log = logging.getLogger("labelrefine")


@register_source("imagefolder", doc="``DIR/{train,test,val}/<class>/<image>``")
def load(req: SourceRequest) -> DataSplits:
    assert req.path is not None
    return load_planned(_plan_imagefolder(req.path), req)


def _plan_imagefolder(path: str) -> _Plan:
    root = _existing_dir(path, "imagefolder: data folder")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(
            f"imagefolder: {root} has no 'train' folder; expected {train_dir}{os.sep}<class>{os.sep}<image>"
        )
    classes, train = _folder_split(train_dir, root, None)
    splits = {"train": train}
    for split in ("val", "test"):
        if (root / split).is_dir():
            splits[split] = _folder_split(root / split, root, classes)[1]
    if "test" not in splits:
        log.warning("imagefolder: %s has no 'test' folder; loading without a test split", root)
    return _Plan("imagefolder", root.name, root, classes, splits, {})

