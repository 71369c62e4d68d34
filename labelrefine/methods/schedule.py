"""Epoch budgets and refinement stages: the schedule arithmetic the methods share.

The baselines train for the same number of supervised epochs as ``ours`` (:func:`supervised_budget`)
unless ``epochs`` is set, so a comparison is at equal cost.
"""

from __future__ import annotations


def stages_of(cfg, iteration: int) -> list[int]:
    """The stage epochs of refinement iteration ``iteration`` (1-based): ``first_stages`` or ``later_stages``."""
    r = cfg.refine
    return list(r.first_stages if iteration == 1 else r.later_stages)


def iteration_length(cfg, iteration: int) -> int:
    """Epochs of refinement iteration ``iteration`` (1-based)."""
    return cfg.refine.iteration_epochs or max(stages_of(cfg, iteration))


def refinement_epochs(cfg) -> int:
    """Epochs of all refinement iterations together."""
    return sum(iteration_length(cfg, i) for i in range(1, cfg.refine.iterations + 1))


def supervised_budget(cfg) -> int:
    """Epochs of supervised training: ``epochs`` if set, else the same budget as ``ours``
    (warmup + every refinement iteration + fine-tune)."""
    if cfg.epochs > 0:
        return cfg.epochs
    return cfg.refine.warmup_epochs + refinement_epochs(cfg) + cfg.finetune.epochs
