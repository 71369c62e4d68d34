"""Load a trained ``model.pt`` and predict, without the training code or its config.

``model.pt`` (written by every run) holds the backbone name and options, the input shape, the
normalisation, the class names and the weights of each network (two for DivideMix, whose
prediction is the sum of both nets' logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .data.augment import make_augment
from .errors import UserError
from .models import create_backbone

MODEL_FORMAT = "labelrefine-model-v1"


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
        for state in blob["networks"].values():
            net = create_backbone(blob["backbone"], in_channels=self.in_channels, num_classes=len(self.classes),
                                  **blob.get("backbone_kwargs", {}))
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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """Load a ``model.pt`` written by ``labelrefine run``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"model file {path} is a directory; give the model.pt inside a run directory")
    if not path.is_file():
        raise UserError(f"model file {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"model file {path} is unreadable ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise UserError(f"model file {path} is not a labelrefine model ({MODEL_FORMAT})")
    try:
        return Predictor(blob, device)
    except (KeyError, RuntimeError) as e:
        raise UserError(f"model file {path} is damaged or from another version ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
