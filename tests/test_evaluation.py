"""The evaluation oracle: hand-computed label metrics."""

from __future__ import annotations

import pytest
import torch

from labelrefine.evaluation import Oracle, accuracy


def test_oracle_metrics_by_hand():
    clean = torch.tensor([0, 1, 2, 0, 1, 2])
    given = torch.tensor([0, 1, 0, 0, 2, 2])  # samples 2 and 4 are wrong
    o = Oracle(clean, given)
    refined = torch.tensor([0, 1, 2, 1, 2, 2])  # fixes 2, breaks 3, leaves 4 wrong
    m = o.metrics({"labels": refined, "pseudo_mask": torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.bool),
                   "stage_selected": torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)})
    assert m["oracle_label_acc"] == pytest.approx(4 / 6)
    assert m["oracle_corrected"] == pytest.approx(1 / 2)
    assert m["oracle_damaged"] == 1
    assert m["oracle_pseudo_precision"] == pytest.approx(1 / 2)
    assert m["oracle_stage_precision"] == pytest.approx(2 / 3)  # selected 0, 1 right; 4 wrong
    flagged = refined != given
    f = o.final_metrics(refined, flagged)
    assert f["train_label_acc_before"] == pytest.approx(4 / 6)
    assert f["train_label_acc_after"] == pytest.approx(4 / 6)
    assert f["issue_precision"] == pytest.approx(1 / 2)  # flagged 2 (wrong) and 3 (right)
    assert f["issue_recall"] == pytest.approx(1 / 2)


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
