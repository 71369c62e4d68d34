"""Data sources: turn a data spec string into :class:`DataSplits`.

Spec grammar::

    SPEC    := KIND [":" PATH] ("," OPTION)*
    OPTION  := KEY "=" VALUE | FLAG

``KIND`` is a registered kind (:func:`known_kinds`, table below); every kind except ``digits``
needs a ``PATH`` (which therefore cannot contain a comma). Each kind is one module of this
package (imported automatically) registered with :func:`register_source`; its options
(``size``/``channels`` work for all) and its line in the table come from that registration.

Common options: ``size=S`` or ``size=HxW`` resizes every image (PIL bilinear); ``channels=1|3``
converts (default: 1 when every training image is grayscale, else 3).

Decoded image files (imagefolder, csv, json) are cached; see :mod:`labelrefine.data.cache`.

Modules: :mod:`.registry` (the registry), :mod:`.spec` (spec parsing), :mod:`.names` (class
lists, printable ids), :mod:`.files` (folders, stat, duplicates), :mod:`.plan` (image-file
plans and the cache), :mod:`.decode` (decoding, pixel conversion), then one module per kind.

Rules every loader follows:

* Integer labels without a class list name their classes by value, as folder names do: the
  classes are the distinct values present (all splits), ascending, named ``str(value)``; so
  labels ``0..C-1`` that all occur keep their indices, and labels {0, 100000000} are 2 classes.
  With ``classes=`` (or an npz's ``class_names``) integers are indices into that list.
* A CSV test table must use the manifest's kind of labels (integers or names); an image listed
  twice (within a split or across splits; paths compared after normalisation) is an error
  naming both lines (CSV) or entries (JSON).
* Ids and class names are printable UTF-8: a file name that is not valid UTF-8 keeps its
  valid characters and spells each undecodable byte ``\\xNN`` (:func:`printable_name`).
* Image folders follow symbolic links, except one back into a folder that contains it (an
  error naming the link); an unresolvable link is skipped.
* 16-bit and float grayscale images are scaled to 8 bits as :func:`decode._to_mode` describes
  (float data in [0, 1] × 255).

Kinds:

"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ..imageset import DataSplits

# The kind modules register themselves on import: the built-in ones first, in this order (the
# order of known_kinds() and of the table), then every other module of this package that is not a
# shared piece, alphabetically. So a new kind is one new module here; nothing else to edit.
from . import digits, imagefolder, csv_manifest, json_manifest, npz, cifar  # noqa: F401, I001  isort: skip
from .csv_manifest import Manifest, ManifestSplit, _plan_csv, read_manifest
from .decode import DECODE_PARALLEL_MIN, _adjust_array, _decode_file, _rgb_to_gray, _to_mode, decode_images
from .files import IMAGE_EXTENSIONS, list_image_files
from .imagefolder import _plan_imagefolder
from .json_manifest import _plan_json
from .names import _class_list, _short, check_class_names, index_labels, present_classes, printable_name
from .registry import COMMON_OPTIONS, SOURCES, SourceKind, SourceRequest, known_kinds, register_source
from .spec import _parse_bool, _parse_channels, _parse_classes, _parse_size, parse_spec

_SHARED_MODULES = frozenset({"registry", "spec", "names", "files", "plan", "decode", "probe"})


def _import_kind_modules() -> None:
    """Import (register) every module of this package that is not a shared piece."""
    for name in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if name not in _SHARED_MODULES and not name.startswith("_"):
            importlib.import_module(f"{__name__}.{name}")


_import_kind_modules()

__all__ = [
    "COMMON_OPTIONS", "DECODE_PARALLEL_MIN", "IMAGE_EXTENSIONS", "KNOWN_KINDS", "SOURCES", "Manifest",
    "ManifestSplit", "SourceKind", "SourceRequest", "check_class_names", "decode_images", "index_labels",
    "kinds_table", "known_kinds", "list_image_files", "load_data", "parse_spec", "present_classes",
    "printable_name", "read_manifest", "register_source",
    # private helpers other modules and the tests use
    "_adjust_array", "_class_list", "_decode_file", "_parse_bool", "_parse_channels", "_parse_classes",
    "_parse_size", "_plan_csv", "_plan_imagefolder", "_plan_json", "_rgb_to_gray", "_short", "_to_mode",
]


def load_data(spec: str, *, cache_dir: str | Path | None = None) -> DataSplits:
    """Load the data set described by ``spec`` (see the module docstring for the grammar).

    Every split comes back as an :class:`ImageSet` with uint8 ``N×C×H×W`` images and int64
    ``(N,)`` labels; all splits share the class list, channel count and image size.
    Image-file kinds (imagefolder, csv, json) are decoded once and then read from the cache in
    ``cache_dir`` (default ``$LABELREFINE_CACHE`` or ``~/.cache/labelrefine``).
    """
    kind, path, options = parse_spec(spec)
    size = _parse_size(options.get("size"))
    channels = _parse_channels(options.get("channels"))
    return SOURCES[kind].load(SourceRequest(spec, kind, path, options, size, channels, cache_dir))


def kinds_table() -> str:
    """The registered kinds as an RST simple table: kind, then its doc line."""
    rows = [(k, s.doc) for k, s in SOURCES.items()]
    width = max(len(k) for k, _ in rows)
    rule = f"{'=' * width}  {'=' * max(len(d) for _, d in rows)}"
    return "\n".join([rule, *(f"{k:<{width}}  {d}" for k, d in rows), rule])


def __getattr__(name: str) -> object:
    if name == "KNOWN_KINDS":  # derived from the registry, so a kind registered later is in it too
        return known_kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __doc__ is not None:  # python -OO strips docstrings
    __doc__ += kinds_table() + "\n"
