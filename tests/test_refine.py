"""Stage selection and consensus on hand-made loss histories."""

from __future__ import annotations

import math

import pytest
import torch

from labelrefine.refine import StageHistory, consensus, select, stage_losses, update_labels


def _logits_for(preds: list[int], c: int = 3, margin: float = 5.0) -> torch.Tensor:
    out = torch.zeros(len(preds), c)
    out[torch.arange(len(preds)), torch.tensor(preds)] = margin
    return out


def test_stage_losses_against_label_and_prediction():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    lse = torch.logsumexp(logits, 1)
    against_label = stage_losses(logits, labels, target="label")
    torch.testing.assert_close(against_label, lse - torch.tensor([2.0, 1.0]))
    against_pred = stage_losses(logits, labels, target="prediction")
    torch.testing.assert_close(against_pred, lse - torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError):
        stage_losses(logits, labels, target="other")


def test_fixed_threshold_is_strict():
    losses = torch.tensor([0.2, 1.0, 0.999, 3.0])
    assert select(losses, threshold=1.0).tolist() == [True, False, True, False]


def test_threshold_one_means_probability_above_inverse_e():
    # CE < 1 against the label  <=>  p(label) > e^-1.
    p = torch.tensor([[math.exp(-1) + 1e-4, 1 - math.exp(-1) - 1e-4], [math.exp(-1) - 1e-4, 1 - math.exp(-1) + 1e-4]])
    losses = stage_losses(p.log(), torch.tensor([0, 0]))
    assert select(losses, threshold=1.0).tolist() == [True, False]


def test_class_quantile_selects_per_class_fraction():
    losses = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.05, 0.2, 0.7, 5.0])
    classes = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    sel = select(losses, threshold=1.0, mode="class_quantile", classes=classes, num_classes=2, quantile=0.5)
    # class 0: two smallest of (0.1, 0.5, 0.3, 0.9) -> 0.1, 0.3; class 1: 0.05, 0.2.
    assert sel.tolist() == [True, False, True, False, True, True, False, False]
    # The fixed threshold still caps it: nothing at or above it is selected.
    sel = select(losses, threshold=0.25, mode="class_quantile", classes=classes, num_classes=2, quantile=1.0)
    assert sel.tolist() == [True, False, False, False, True, True, False, False]


def test_class_quantile_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(500, generator=g) * 2
    classes = torch.randint(0, 7, (500,), generator=g)
    fast = select(losses, threshold=1.5, mode="class_quantile", classes=classes, num_classes=7, quantile=0.3)
    slow = torch.zeros(500, dtype=torch.bool)
    for c in range(7):
        idx = (classes == c).nonzero().flatten()
        k = math.ceil(0.3 * len(idx))
        keep = idx[torch.argsort(losses[idx], stable=True)[:k]]
        slow[keep] = True
    assert torch.equal(fast, slow & (losses < 1.5))


def test_consensus_requires_every_stage():
    h = StageHistory.empty(4, 3)
    # sample 0 selected at all stages; sample 1 misses stage 2; 2 never; 3 all but prediction changes.
    h.record(torch.tensor([True, True, False, True]), _logits_for([1, 0, 2, 0]))
    h.record(torch.tensor([True, False, False, True]), _logits_for([1, 0, 2, 2]))
    h.record(torch.tensor([True, True, False, True]), _logits_for([1, 0, 2, 2]))
    assert h.n_selected.tolist() == [3, 2, 0, 3]
    mask, pseudo = consensus(h, require_agreement=False, label_source="last")
    assert mask.tolist() == [True, False, False, True]
    assert pseudo[mask].tolist() == [1, 2]
    mask, _ = consensus(h, require_agreement=True, label_source="last")
    assert mask.tolist() == [True, False, False, False]


def test_consensus_label_source_mean_vs_last():
    h = StageHistory.empty(1, 3)
    h.record(torch.tensor([True]), torch.tensor([[0.0, 4.0, 0.0]]))
    h.record(torch.tensor([True]), torch.tensor([[0.0, 4.0, 0.0]]))
    h.record(torch.tensor([True]), torch.tensor([[0.0, 0.0, 0.5]]))
    _, last = consensus(h, require_agreement=False, label_source="last")
    _, mean = consensus(h, require_agreement=False, label_source="mean")
    assert last.item() == 2 and mean.item() == 1


def test_consensus_without_stages_selects_nothing():
    mask, _ = consensus(StageHistory.empty(5, 2))
    assert not mask.any()


def test_update_labels_keep_previous_or_revert():
    given = torch.tensor([0, 1, 2, 0])
    current = torch.tensor([0, 2, 2, 1])  # sample 1 and 3 were relabelled earlier
    mask = torch.tensor([True, False, True, False])
    pseudo = torch.tensor([1, 0, 0, 0])
    assert update_labels(current, given, mask, pseudo, keep_previous=True).tolist() == [1, 2, 0, 1]
    assert update_labels(current, given, mask, pseudo, keep_previous=False).tolist() == [1, 1, 0, 0]


def test_history_state_round_trip():
    h = StageHistory.empty(3, 2)
    h.record(torch.tensor([True, False, True]), torch.randn(3, 2))
    h2 = StageHistory.from_state(h.state_dict())
    assert h2.stages == 1 and torch.equal(h2.prob_sum, h.prob_sum)
