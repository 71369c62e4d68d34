"""Evaluation that needs ground truth. The runner hands clean labels to :class:`Oracle`
explicitly; methods and the training path never see them.
"""

from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(1).to(labels.device) == labels).double().mean())


class Oracle:
    """Measures training-label quality against the clean training labels.

    Args:
        clean: ``(N,)`` clean labels of the training samples, in the method's order.
        given: ``(N,)`` the noisy labels the method was given.
    """

    def __init__(self, clean: torch.Tensor, given: torch.Tensor):
        self.clean = clean
        self.given = given
        self.wrong = given != clean

    def metrics(self, view: dict[str, torch.Tensor]) -> dict[str, float]:
        """Oracle metrics of a method's ``oracle_view()``; keys are prefixed ``oracle_``."""
        clean = self.clean.to(view["labels"].device)
        labels = view["labels"]
        correct = labels == clean
        out = {"oracle_label_acc": float(correct.double().mean())}
        wrong = self.wrong.to(labels.device)
        if int(wrong.sum()):
            out["oracle_corrected"] = float((wrong & correct).sum() / wrong.sum())
        out["oracle_damaged"] = int((~wrong & ~correct).sum())
        sel = view.get("stage_selected")
        if sel is not None:
            stage_labels = view.get("stage_labels", labels)
            ok = stage_labels == clean
            out["oracle_stage_precision"] = float(ok[sel].double().mean()) if int(sel.sum()) else float("nan")
            out["oracle_stage_recall"] = float((ok & sel).sum() / ok.sum().clamp_min(1))
        mask = view.get("pseudo_mask")
        if mask is not None:
            out["oracle_pseudo_precision"] = float(correct[mask].double().mean()) if int(mask.sum()) else float("nan")
            out["oracle_pseudo_recall"] = float((mask & correct).sum() / correct.sum().clamp_min(1))
        return out

    def final_metrics(self, refined: torch.Tensor, flagged: torch.Tensor) -> dict[str, float | None]:
        """Training-label accuracy before/after, and precision/recall of the flagged issues."""
        clean, given = self.clean.cpu(), self.given.cpu()
        refined, flagged, wrong = refined.cpu(), flagged.cpu(), self.wrong.cpu()
        hits = int((flagged & wrong).sum())
        return {
            "train_label_acc_before": float((given == clean).double().mean()),
            "train_label_acc_after": float((refined == clean).double().mean()),
            "issue_precision": hits / int(flagged.sum()) if int(flagged.sum()) else None,
            "issue_recall": hits / int(wrong.sum()) if int(wrong.sum()) else None,
        }
