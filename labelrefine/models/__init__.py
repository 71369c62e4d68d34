"""Models: image classifiers registered by name (see :mod:`labelrefine.models.backbones`)."""

from .backbones import BACKBONES, Classifier, create_backbone, list_backbones, register_backbone

__all__ = ["BACKBONES", "Classifier", "create_backbone", "list_backbones", "register_backbone"]
