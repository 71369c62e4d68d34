"""Optimizers and learning-rate schedules: a :class:`Learner` is one optimizer with its networks.

The :class:`~labelrefine.engine.trainer.Trainer` sets each learner's lr before a step
(:meth:`Learner.set_lr`) and steps it with the loss a method's training step returns
(:meth:`Learner.step`: backward, the data-parallel gradient average, the optimizer step, through
the fp16 GradScaler when there is one). A method never calls ``backward`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .. import distributed as ddp
from ..config import RunConfig


def lr_factor(progress: float, total: float, schedule: str, warmup: float = 0.0) -> float:
    """Multiplier of the peak lr after ``progress`` of ``total`` epochs (fractions allowed)."""
    if warmup > 0 and progress < warmup:
        return (progress + 1e-3) / warmup
    if schedule == "constant" or total <= 0:
        return 1.0
    t = min(max(progress / total, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(params, cfg: RunConfig, lr: float, *, kind: str | None = None,
                   weight_decay: float | None = None) -> torch.optim.Optimizer:
    """``optim.optimizer`` (or ``kind``: sgd | adam) with the ``optim`` section's settings;
    ``weight_decay`` replaces ``optim.weight_decay`` when given."""
    o = cfg.optim
    wd = o.weight_decay if weight_decay is None else weight_decay
    if (kind or o.optimizer) == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=wd,
                           nesterov=o.nesterov and o.momentum > 0)


class Learner:
    """One optimizer over one or more networks, with its lr schedule and progress.

    The lr follows ``schedule`` over ``total_epochs`` of this learner, evaluated per step from the
    fractional epoch count (:attr:`progress`, advanced by the Trainer), so the schedule survives a
    resume and epochs of different lengths (the augmented copies make refinement epochs longer).

    Args:
        ctx: the run context (config, device, AMP).
        total_epochs: the schedule's length in epochs.
        model: the network (default: a new backbone from ``ctx``). ``models`` gives several networks
            under one optimizer instead (JoCoR); :attr:`model` is then an ``nn.ModuleList`` of them.
        lr_scale, lr, optimizer, weight_decay: the peak lr is ``(lr or optim.lr) * lr_scale``; the
            optimizer is ``optimizer`` (sgd | adam, default ``optim.optimizer``) with ``weight_decay``
            (default ``optim.weight_decay``).
        params, base_lr, torch_optimizer: a ready optimizer over ``params`` instead (SimCLR trains the
            encoder and its projection head); then ``base_lr`` is its peak lr.
        schedule, warmup: the lr schedule (default ``optim.schedule`` and ``optim.warmup_lr_epochs``).
        wrap: the modules the Trainer's data-parallel wrapper holds (default: the networks); their
            gradients are averaged over ranks during the backward pass.

    Attributes:
        nets: the networks to call in training forwards: each one wrapped in PyTorch's
            ``DistributedDataParallel`` under torchrun, the plain modules otherwise. Evaluation,
            state dicts and everything else use the plain modules.
    """

    def __init__(self, ctx, total_epochs: float, *, model: nn.Module | None = None,
                 models: Sequence[nn.Module] | None = None, lr_scale: float = 1.0, optimizer: str | None = None,
                 lr: float | None = None, weight_decay: float | None = None,
                 torch_optimizer: torch.optim.Optimizer | None = None, base_lr: float | None = None,
                 schedule: str | None = None, warmup: float | None = None,
                 wrap: Sequence[nn.Module] | None = None):
        o = ctx.cfg.optim
        self.ctx = ctx
        if models is not None:
            self.model: nn.Module = nn.ModuleList(models)
            plain = list(models)
        else:
            self.model = model if model is not None else ctx.new_model()
            plain = [self.model]
        self.total_epochs = float(total_epochs)
        self.schedule = o.schedule if schedule is None else schedule
        self.warmup = o.warmup_lr_epochs if warmup is None else warmup
        if torch_optimizer is not None:
            self.base_lr = float(base_lr)
            self.optimizer = torch_optimizer
        else:
            self.base_lr = (o.lr if lr is None else lr) * lr_scale
            self.optimizer = make_optimizer(self.model.parameters(), ctx.cfg, self.base_lr, kind=optimizer,
                                            weight_decay=weight_decay)
        self.scaler = ctx.grad_scaler()
        self.progress = 0.0  # epochs done, fractional
        self.nets = [ddp.wrap(m, ctx.device) for m in (plain if wrap is None else wrap)]

    def set_lr(self) -> float:
        lr = self.base_lr * lr_factor(self.progress, self.total_epochs, self.schedule, self.warmup)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def step(self, loss: torch.Tensor) -> None:
        """Backward and step, through the fp16 GradScaler when there is one. Data parallel: the
        ``DistributedDataParallel`` wrappers of :attr:`nets` average the gradients over ranks
        during the backward pass."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "progress": self.progress, "total_epochs": self.total_epochs,
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = state["progress"]
        self.total_epochs = state["total_epochs"]
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
