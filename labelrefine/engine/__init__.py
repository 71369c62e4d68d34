"""The engine: the run context, optimizers and lr schedules, and the one training loop.

* :mod:`.context` - :class:`Context` (device, AMP, the uint8 training data on the device, batching,
  augmentation) and :class:`EpochSpec` (one entry of a method's schedule);
* :mod:`.optim` - :class:`Learner` (an optimizer over a method's networks, its lr schedule and
  gradient scaler; DDP-wrapped networks under torchrun);
* :mod:`.trainer` - :class:`Trainer`, THE loop: epochs, passes, steps, evaluation, metrics, checkpoints;
* :mod:`.checkpoint` - checkpoint files, RNG state and the checks a resume makes.
"""

from .context import (
    Context,
    EpochSpec,
    amp_dtype,
    backbone_kwargs,
    compile_model,
    resolve_device,
    to_device,
)
from .optim import Learner, lr_factor, make_optimizer
from .trainer import Pass, Step, Trainer, merge_parts

__all__ = [
    "Context",
    "EpochSpec",
    "Learner",
    "Pass",
    "Step",
    "Trainer",
    "amp_dtype",
    "backbone_kwargs",
    "compile_model",
    "lr_factor",
    "make_optimizer",
    "merge_parts",
    "resolve_device",
    "to_device",
]
