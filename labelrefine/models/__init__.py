"""Models: image classifiers registered by name (see :mod:`labelrefine.models.backbones`).

Every module here that defines a backbone is imported below so that it registers itself.
"""

from .airbench import AirbenchNet, whiten_init  # importing it registers "airbench"
from .backbones import (
    BACKBONES,
    Classifier,
    create_backbone,
    encoder_state,
    is_classifier_key,
    list_backbones,
    register_backbone,
)

__all__ = ["BACKBONES", "AirbenchNet", "Classifier", "create_backbone", "encoder_state", "is_classifier_key",
           "list_backbones", "register_backbone", "whiten_init"]
