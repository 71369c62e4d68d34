"""Models: image classifiers registered by name (see :mod:`labelrefine.models.backbones`)."""

from .backbones import (
    BACKBONES,
    Classifier,
    create_backbone,
    encoder_state,
    is_classifier_key,
    list_backbones,
    register_backbone,
)

__all__ = ["BACKBONES", "Classifier", "create_backbone", "encoder_state", "is_classifier_key", "list_backbones",
           "register_backbone"]
