"""The interface every method implements, and pieces several methods share."""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import nn

from ..engine import Context, EpochSpec
from ..ssl import SimCLR, load_cached_encoder, save_cached_encoder

log = logging.getLogger("labelrefine")


class Method:
    """A training method as a state machine over a flat list of epochs.

    The engine calls :meth:`schedule` once, then :meth:`run_epoch` for each entry (resuming
    from a checkpoint skips the entries already done), and evaluates the model through
    :meth:`predict_logits` after every supervised epoch. A method never sees clean labels.

    Subclasses set ``name``, ``summary`` (one line), ``paper`` (a citation) and ``phases``: every
    phase name their :meth:`schedule` can use, in schedule order (the bench's per-phase time
    columns, the report's phase colours and ``bench speed`` read them).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    phases: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.given = ctx.y.clone()  # the noisy labels as given; never modified

    # -- the schedule ------------------------------------------------------------------------
    def schedule(self) -> list[EpochSpec]:
        raise NotImplementedError

    def run_epoch(self, spec: EpochSpec) -> dict[str, float]:
        """Train one epoch; return scalar logs (``loss``, ``lr``, method-specific counts)."""
        raise NotImplementedError

    # -- outputs -----------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        """The networks that make predictions (saved in ``model.pt``)."""
        raise NotImplementedError

    def predict_logits(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits ``(N, C)`` for uint8 images (on any device); ``None``: the training set."""
        nets = list(self.networks().values())
        out = self.ctx.logits_all(nets[0], images)
        for net in nets[1:]:
            out = out + self.ctx.logits_all(net, images)
        return out

    def on_supervised_start(self) -> None:
        """Called once, before the first supervised epoch (after any SSL epochs)."""

    def oracle_view(self) -> dict[str, torch.Tensor]:
        """Tensors the evaluation oracle may compare with clean labels after an epoch.

        ``labels`` (the current training labels) always; refinement methods add
        ``stage_selected`` / ``stage_labels`` after a stage and ``pseudo_mask`` after an iteration.
        """
        return {"labels": self.training_labels()}

    def training_labels(self) -> torch.Tensor:
        """The labels the method currently trains on ``(N,)``; the given labels unless it relabels."""
        return self.given

    def label_report(self) -> dict[str, torch.Tensor]:
        """Per-training-sample outputs for ``labels.csv``.

        Returns ``refined_label`` ``(N,)`` int64, ``label_quality`` ``(N,)`` in [0, 1] (low =
        likely wrong), ``is_label_issue`` ``(N,)`` bool and ``n_stages_selected`` ``(N,)``.
        The default: the final model's softmax probability of the given label (cleanlab's
        self-confidence) as quality, its argmax as refined label, an issue when they differ.
        """
        probs = torch.softmax(self.predict_logits(), dim=1)
        pred = probs.argmax(1)
        quality = probs.gather(1, self.given[:, None]).squeeze(1)
        return {"refined_label": pred, "label_quality": quality, "is_label_issue": pred != self.given,
                "n_stages_selected": torch.zeros_like(self.given)}

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class SSLInit:
    """SimCLR pretraining as the first phase of a method (ours, ce_ssl, ours_dividemix).

    ``ssl_specs()`` gives the SSL epochs still to run: none when the encoder cache already
    holds this pretraining (then the model is loaded from it at construction).
    """

    def __init__(self, ctx: Context, model: nn.Module):
        self.ctx = ctx
        self.model = model
        self.epochs = ctx.cfg.ssl.epochs
        self.cached = self.epochs > 0 and load_cached_encoder(ctx, model)
        self.trainer: SimCLR | None = None if self.cached or self.epochs == 0 else SimCLR(ctx, model)

    def specs(self) -> list[EpochSpec]:
        if self.trainer is None:
            return []
        return [EpochSpec("ssl", 0, e, supervised=False) for e in range(1, self.epochs + 1)]

    def run_epoch(self, spec: EpochSpec) -> dict[str, float]:
        assert self.trainer is not None
        logs = self.trainer.train_epoch()
        if spec.epoch == self.epochs:
            save_cached_encoder(self.ctx, self.model, {"epochs": self.epochs, "final_loss": logs["loss"]})
            self.trainer = None  # free the projection head, its optimizer and the SSL image copy
        return logs

    def state_dict(self) -> dict:
        return {"trainer": None if self.trainer is None else self.trainer.state_dict(), "cached": self.cached}

    def load_state_dict(self, state: dict) -> None:
        if state["trainer"] is None:
            self.trainer = None
        else:
            if self.trainer is None:
                self.trainer = SimCLR(self.ctx, self.model)
            self.trainer.load_state_dict(state["trainer"])
