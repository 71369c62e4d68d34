"""Data: sources that load into :class:`ImageSet`, and label-noise generators."""

from .imageset import DataSplits, ImageSet

__all__ = ["DataSplits", "ImageSet"]
