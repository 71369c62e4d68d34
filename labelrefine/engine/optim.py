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


def lr_factor(progress: float, total: float, schedule: str, warmup: float = 0.0, *,
              warmup_start: float = 0.0, final: float = 0.0) -> float:
    """Multiplier of the peak lr after ``progress`` of ``total`` epochs (fractions allowed).

    A linear warmup from ``warmup_start`` to 1 over the first ``warmup`` epochs, then
    ``constant`` (1), ``cosine`` (1 to 0 over all ``total`` epochs, as before the warmup was
    added) or ``linear`` (1 down to ``final`` at ``total``, from the warmup's end: airbench's
    triangle).
    """
    if warmup > 0 and progress < warmup:
        return warmup_start + (1.0 - warmup_start) * ((progress + 1e-3) / warmup)
    if schedule == "constant" or total <= 0:
        return 1.0
    if schedule == "linear":
        span = total - warmup
        t = 1.0 if span <= 0 else min(max((progress - warmup) / span, 0.0), 1.0)
        return 1.0 + (final - 1.0) * t
    t = min(max(progress / total, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def norm_biases(model: nn.Module) -> list[nn.Parameter]:
    """The shifts (biases) of every normalisation layer of ``model`` (BatchNorm, GroupNorm, LayerNorm)."""
    kinds = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return [m.bias for m in model.modules() if isinstance(m, kinds) and m.bias is not None and m.bias.requires_grad]


def param_groups(model: nn.Module, cfg: RunConfig, weight_decay: float) -> list[dict]:
    """One group, or two when ``optim.norm_bias_lr_scale`` != 1: the normalisation biases get
    ``lr_scale`` times the lr and ``1/lr_scale`` times the weight decay (airbench: 64, so that
    their per-step decay stays that of the other weights)."""
    scale = cfg.optim.norm_bias_lr_scale
    params = [p for p in model.parameters() if p.requires_grad]
    if scale == 1.0:
        return [{"params": params, "weight_decay": weight_decay, "lr_scale": 1.0}]
    biases = {id(p) for p in norm_biases(model)}
    return [{"params": [p for p in params if id(p) not in biases], "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": [p for p in params if id(p) in biases], "weight_decay": weight_decay / scale,
             "lr_scale": scale}]


def make_optimizer(params, cfg: RunConfig, lr: float, *, kind: str | None = None,
                   weight_decay: float | None = None) -> torch.optim.Optimizer:
    """``optim.optimizer`` (or ``kind``: sgd | adam) with the ``optim`` section's settings;
    ``weight_decay`` replaces ``optim.weight_decay`` when given. ``params`` may be groups
    (:func:`param_groups`)."""
    o = cfg.optim
    wd = o.weight_decay if weight_decay is None else weight_decay
    if (kind or o.optimizer) == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=wd,
                           nesterov=o.nesterov and o.momentum > 0)


class Lookahead:
    """airbench's Lookahead: every ``every`` steps the slow copy moves towards the trained
    ("fast") weights, ``slow <- lerp(slow, fast, 1 - a)``, and the fast weights restart from it;
    ``a = decay**every * t**3`` grows with the schedule's progress ``t`` in [0, 1], so averaging
    is off early and strongest at the end. It covers the whole state dict (BatchNorm running
    statistics included); :meth:`finish` copies the slow weights into the model at the end.
    """

    def __init__(self, model: nn.Module, *, every: int = 5, decay: float = 0.95):
        self.model, self.every, self.decay = model, every, decay
        # Taken before the first optimizer step (begin), not here: a learner is built before
        # SimCLR pretraining or a cached encoder changes the weights it will train.
        self.slow: dict[str, torch.Tensor] | None = None
        self.steps = 0

    @torch.no_grad()
    def begin(self) -> None:
        """Before an optimizer step: the first one snapshots the weights as the slow copy."""
        if self.slow is None:
            self.slow = {k: v.detach().clone() for k, v in self.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, t: float) -> None:
        self.steps += 1
        if self.steps % self.every:
            return
        a = self.decay ** self.every * min(max(t, 0.0), 1.0) ** 3
        fast = self.model.state_dict()
        for k, slow in self.slow.items():
            slow.lerp_(fast[k], 1.0 - a)
            fast[k].copy_(slow)

    @torch.no_grad()
    def finish(self) -> None:
        if self.slow is None:  # never stepped
            return
        fast = self.model.state_dict()
        for k, slow in self.slow.items():
            fast[k].copy_(slow)

    def state_dict(self) -> dict:
        return {"slow": self.slow, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        fast = self.model.state_dict()
        self.slow = None if state["slow"] is None else {
            k: v.to(device=fast[k].device, dtype=fast[k].dtype).clone() for k, v in state["slow"].items()}
        self.steps = state["steps"]


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
            wd = o.weight_decay if weight_decay is None else weight_decay
            self.optimizer = make_optimizer(param_groups(self.model, ctx.cfg, wd), ctx.cfg, self.base_lr,
                                            kind=optimizer, weight_decay=wd)
        # airbench's Lookahead (optim.lookahead), for the supervised learners (not SimCLR's).
        self.lookahead = Lookahead(self.model) if o.lookahead and torch_optimizer is None else None
        self.scaler = ctx.grad_scaler()
        self.progress = 0.0  # epochs done, fractional
        self.nets = [ddp.wrap(m, ctx.device) for m in (plain if wrap is None else wrap)]

    def set_lr(self) -> float:
        o = self.ctx.cfg.optim
        lr = self.base_lr * lr_factor(self.progress, self.total_epochs, self.schedule, self.warmup,
                                      warmup_start=o.warmup_start, final=o.final_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def end_pass(self) -> None:
        """After a pass (the Trainer calls it): at the end of the schedule, Lookahead's slow
        weights become the model."""
        if self.lookahead is not None and self.progress >= self.total_epochs:
            self.lookahead.finish()

    def step(self, loss: torch.Tensor) -> None:
        """Backward and step, through the fp16 GradScaler when there is one. Data parallel: the
        ``DistributedDataParallel`` wrappers of :attr:`nets` average the gradients over ranks
        during the backward pass."""
        self.zero_grad()
        self.backward(loss)
        self.apply()

    # The three parts of :meth:`step`, for a step whose batch is processed in parts (the Trainer's
    # gradient accumulation): zero_grad once, backward every part's loss, apply once.
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.lookahead is not None:
            self.lookahead.begin()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``loss``'s gradients (scaled by the GradScaler when there is one)."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def apply(self) -> None:
        """The optimizer step on the accumulated gradients, then Lookahead."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.lookahead is not None:
            self.lookahead.step(self.progress / self.total_epochs if self.total_epochs > 0 else 1.0)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "progress": self.progress, "total_epochs": self.total_epochs,
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                **({} if self.lookahead is None else {"lookahead": self.lookahead.state_dict()})}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = state["progress"]
        self.total_epochs = state["total_epochs"]
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])
