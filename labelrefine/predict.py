"""Load a trained ``model.pt`` and predict, without the training code or its config.

``model.pt`` (written by every run) holds the backbone name and options, the input shape, the
normalisation, the class names and the weights of each network (two for DivideMix, whose
prediction is the sum of both nets' logits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .data.augment import make_augment
from .errors import UserError
from .models import create_backbone
from .store import LegacyFile, StoreError, load_legacy
from .store import load as store_load

log = logging.getLogger("labelrefine")

MODEL_FORMAT = "labelrefine-model-v2"  # v2: checksummed store file (labelrefine.store)
LEGACY_MODEL_FORMAT = "labelrefine-model-v1"  # a plain torch file, loaded with weights_only (no checksum)
MAX_IMAGE_SIDE = 4096  # a model.pt asking for larger inputs is refused (predict's memory grows with H*W)


class Predictor:
    """A trained classifier with its preprocessing.

    Attributes:
        classes: class names, index = predicted label.
        image_size: ``(H, W)`` the model expects; in_channels: 1 or 3.
    """

    def __init__(self, blob: dict, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.classes: list[str] = list(blob["classes"])
        self.image_size = tuple(blob["image_size"])
        self.in_channels = int(blob["in_channels"])
        self.method = blob.get("method")
        self.nets = []
        for name, state in blob["networks"].items():
            make = dict(name=blob["backbone"], in_channels=self.in_channels, num_classes=len(self.classes),
                        **blob.get("backbone_kwargs", {}))
            with torch.device("meta"):  # shapes first: options that do not fit the weights allocate nothing
                shapes = {k: tuple(v.shape) for k, v in create_backbone(**make).state_dict().items()}
            if shapes != {k: tuple(v.shape) for k, v in state.items()}:
                k = next((k for k in shapes if k not in state or tuple(state[k].shape) != shapes[k]),
                         next(iter(set(state) - set(shapes)), "?"))
                raise RuntimeError(f"network {name!r}: its weights do not fit backbone {blob['backbone']!r} "
                                   f"{blob.get('backbone_kwargs', {})} (first at {k!r})")
            net = create_backbone(**make)
            net.load_state_dict(state)
            self.nets.append(net.to(self.device).eval())
        self.preprocess = make_augment("none", image_size=self.image_size, channels=self.in_channels,
                                       mean=tuple(blob["mean"]), std=tuple(blob["std"]))

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Logits ``(N, C)`` for uint8 images ``(N, C_in, H, W)`` of the training size."""
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (
                self.in_channels, *self.image_size):
            raise UserError(f"images must be uint8 N×{self.in_channels}×{self.image_size[0]}×{self.image_size[1]}, "
                            f"got {images.dtype} {tuple(images.shape)}")
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = self.preprocess(images[start:start + batch_size].to(self.device))
            out.append(sum(net(x).float() for net in self.nets))
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def predict_proba(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        return torch.softmax(self.logits(images, batch_size), dim=1)

    def load_images(self, files: Sequence[str | Path]) -> torch.Tensor:
        """Decode image files as the training images were decoded, at this model's size and channels.

        See :func:`labelrefine.data.sources.decode_images`; an undecodable file raises
        :class:`UserError` naming it.
        """
        from .data.sources import decode_images

        return decode_images(files, self.image_size, self.in_channels)


def find_images(paths: Sequence[str | Path]) -> list[str]:
    """Expand image files and folders (searched recursively) into a list of image files.

    Files are kept as given (any extension; decoding decides); a folder contributes its files with
    an image extension (:data:`~labelrefine.data.sources.IMAGE_EXTENSIONS`), sorted. A missing path
    or a folder without images raises :class:`UserError`.
    """
    from .data.sources import IMAGE_EXTENSIONS, list_image_files

    files: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = list_image_files(path)
            if not found:
                raise UserError(f"folder {path} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
            files.extend(str(f) for f, _ in found)
        elif path.is_file():
            files.append(str(p))
        else:
            raise UserError(f"path {p} does not exist")
    return files


def _check_blob(blob: object, path: Path) -> dict:
    """Every field of a loaded model.pt has the type and range prediction needs; else a one-line UserError."""
    where = f"model file {path}"
    if not isinstance(blob, dict):
        raise UserError(f"{where} is not a labelrefine model (it holds a {type(blob).__name__}, not a mapping)")

    def bad(field: str, why: str) -> UserError:
        return UserError(f"{where}: field {field!r} {why}")

    def is_int(v: object) -> bool:
        return type(v) is int

    for field in ("backbone", "in_channels", "image_size", "num_classes", "classes", "mean", "std", "networks"):
        if field not in blob:
            raise bad(field, "is missing")
    if not isinstance(blob["backbone"], str) or not blob["backbone"]:
        raise bad("backbone", "must be a backbone name")
    kwargs = blob.get("backbone_kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs) or not all(
            v is None or type(v) in (bool, int, float, str) for v in kwargs.values()):
        raise bad("backbone_kwargs", "must map option names to plain values")
    if blob.get("method") is not None and not isinstance(blob["method"], str):
        raise bad("method", "must be a method name")
    channels = blob["in_channels"]
    if not is_int(channels) or channels not in (1, 3):
        raise bad("in_channels", "must be 1 or 3")
    size = blob["image_size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(is_int(v) for v in size):
        raise bad("image_size", "must be [height, width] (two integers)")
    if not all(1 <= v <= MAX_IMAGE_SIDE for v in size):
        raise bad("image_size", f"{list(size)} is outside 1..{MAX_IMAGE_SIDE} pixels per side")
    for field in ("mean", "std"):
        v = blob[field]
        if not isinstance(v, (list, tuple)) or len(v) != channels or not all(type(x) in (int, float) for x in v):
            raise bad(field, f"must be a list of {channels} numbers (one per input channel)")
        if not all(math.isfinite(x) for x in v):
            raise bad(field, "holds a non-finite value")
    if not all(x > 0 for x in blob["std"]):
        raise bad("std", "must be positive")
    num_classes, classes = blob["num_classes"], blob["classes"]
    if not is_int(num_classes) or num_classes < 1:
        raise bad("num_classes", "must be a positive integer")
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise bad("classes", "must be a list of class names")
    if len(classes) != num_classes:
        raise bad("classes", f"has {len(classes)} names but num_classes is {num_classes}")
    if len(set(classes)) != len(classes):
        dup = next(c for i, c in enumerate(classes) if c in classes[:i])
        raise bad("classes", f"names {dup[:80]!r} twice")
    nets = blob["networks"]
    if not isinstance(nets, dict) or not nets:
        raise bad("networks", "holds no network")
    for name, state in nets.items():
        if not isinstance(name, str) or not isinstance(state, dict) or not state or not all(
                isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in state.items()):
            raise bad("networks", "must map each network's name to its weights (names to tensors)")
        for k, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise bad("networks", f"network {name[:40]!r} has non-finite weights in {k[:80]!r}")
    return blob


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """Load a ``model.pt`` written by ``labelrefine run``.

    The file's SHA-256 is checked before it is unpickled, and it is unpickled with
    ``weights_only=True`` (:mod:`labelrefine.store`); every field is validated. A ``model.pt``
    of format v1 (written before checksums, always loaded with ``weights_only``) still loads,
    with a warning that its weights cannot be verified.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"model file {path} is a directory; give the model.pt inside a run directory")
    if not path.is_file():
        raise UserError(f"model file {path} does not exist")
    try:
        blob = store_load(path, kind=MODEL_FORMAT, name="model file")
    except LegacyFile:
        try:
            blob = load_legacy(path, name="model file")
        except StoreError as e:
            raise UserError(str(e)) from None
        if not isinstance(blob, dict) or blob.get("format") != LEGACY_MODEL_FORMAT:
            raise UserError(f"model file {path} is not a labelrefine model (a plain torch file, not {MODEL_FORMAT})") \
                from None
        log.warning("model file %s has format %s: it carries no checksum, so damage to its weights cannot be "
                    "detected; re-run the training to get a %s file", path, LEGACY_MODEL_FORMAT, MODEL_FORMAT)
    except StoreError as e:
        raise UserError(str(e)) from None
    if not isinstance(blob, dict) or blob.get("format") not in (MODEL_FORMAT, LEGACY_MODEL_FORMAT):
        raise UserError(f"model file {path} is not a labelrefine model ({MODEL_FORMAT})")
    blob = _check_blob(blob, path)
    try:
        return Predictor(blob, device)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"model file {path} is damaged or from another version ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:120]})") from None
