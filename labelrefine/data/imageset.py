"""The one in-memory representation every data source loads into.

An :class:`ImageSet` is a split (train, val or test) held as a uint8 ``N×C×H×W`` tensor plus
int64 labels, class names and a per-sample id. Training code moves the uint8 tensor to the
device once and augments batches there; nothing is decoded per step.

A :class:`DataSplits` bundles the splits of one data set, all with the same class list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError


@dataclass
class ImageSet:
    """One split of an image data set, fully in memory.

    Attributes:
        images: uint8 tensor of shape ``(N, C, H, W)``; C is 1 (grayscale) or 3 (RGB).
        labels: int64 tensor of shape ``(N,)`` with values in ``[0, len(classes))``.
        classes: class names; ``labels[i]`` indexes into it.
        ids: per-sample id, usually the path relative to the data set's root.
        extra_labels: optional further label columns (for example CIFAR-10N's ``worse``),
            each an int64 ``(N,)`` tensor in the same class indexing as ``labels``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    ids: list[str]
    extra_labels: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check shapes, dtypes and label ranges; raise :class:`UserError` when broken."""
        x, y = self.images, self.labels
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            raise UserError(f"images must be a uint8 N×C×H×W tensor, got {_describe(x)}")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
            raise UserError(f"labels must be an int64 vector, got {_describe(y)}")
        n = x.shape[0]
        if y.shape[0] != n:
            raise UserError(f"images and labels differ in length: {n} images, {y.shape[0]} labels")
        if len(self.ids) != n:
            raise UserError(f"images and ids differ in length: {n} images, {len(self.ids)} ids")
        if not self.classes:
            raise UserError("class list is empty")
        for name, col in {"labels": y, **self.extra_labels}.items():
            if col.shape != (n,):
                raise UserError(f"label column {name!r} has shape {tuple(col.shape)}, expected ({n},)")
            if n and (int(col.min()) < 0 or int(col.max()) >= len(self.classes)):
                bad = int(col.min()) if int(col.min()) < 0 else int(col.max())
                raise UserError(
                    f"label column {name!r} has value {bad} outside [0, {len(self.classes) - 1}]"
                )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor) -> ImageSet:
        """A new ImageSet holding the samples at ``index`` (a LongTensor or bool mask)."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        idx = index.tolist()
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            classes=list(self.classes),
            ids=[self.ids[i] for i in idx],
            extra_labels={k: v[index] for k, v in self.extra_labels.items()},
        )

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)


@dataclass
class DataSplits:
    """All splits of one data set. ``val`` and ``test`` may be absent (``None``).

    ``ssl_images``: uint8 images SimCLR pretrains on instead of the training split's (label-free;
    e.g. a cross-validation fold's model pretrained on every image of the data set).
    """

    name: str
    train: ImageSet
    test: ImageSet | None = None
    val: ImageSet | None = None
    ssl_images: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.ssl_images is not None and tuple(self.ssl_images.shape[1:]) != tuple(self.train.shape):
            raise UserError(f"{self.name}: ssl_images are {tuple(self.ssl_images.shape[1:])} (CxHxW), "
                            f"the training images {tuple(self.train.shape)}")
        for split_name in ("test", "val"):
            split = getattr(self, split_name)
            if split is not None and split.classes != self.train.classes:
                raise UserError(
                    f"{self.name}: {split_name} classes {split.classes} differ from train classes "
                    f"{self.train.classes}"
                )
            if split is not None and split.shape[0] != self.train.shape[0]:
                raise UserError(
                    f"{self.name}: {split_name} images have {split.shape[0]} channels, "
                    f"train images {self.train.shape[0]}"
                )

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def splits(self) -> dict[str, ImageSet]:
        """The splits that are present, by name."""
        out = {"train": self.train}
        if self.val is not None:
            out["val"] = self.val
        if self.test is not None:
            out["test"] = self.test
        return out


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
