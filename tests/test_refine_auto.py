"""``refine.threshold_mode=auto``: each iteration's threshold chosen on the noisy validation split
by a kNN probe (``labelrefine.refine.guarded_threshold``), or no relabelling at all."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY

from labelrefine.config import load_config
from labelrefine.knn import knn_neighbours, knn_votes, neighbour_votes
from labelrefine.pipeline import run
from labelrefine.refine import AUTO_THRESHOLDS, StageHistory, guarded_threshold


def _one_neighbour(n_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation image j's only neighbour is training sample j."""
    return torch.arange(n_val)[:, None], torch.ones(n_val, 1)


def test_the_threshold_with_the_largest_paired_gain_wins_by_hand():
    base = torch.tensor([0, 0, 1, 1])
    pseudo = torch.tensor([1, 1, 1, 0])
    max_loss = torch.tensor([0.05, 0.4, 0.01, 0.8])
    val = torch.tensor([1, 0, 1, 1])  # with one neighbour each, base gives val 0 vote mass 0, 1-3 mass 1
    idx, w = _one_neighbour(4)
    eligible = torch.ones(4, dtype=torch.bool)
    choice = guarded_threshold(max_loss, eligible, pseudo, base, idx, w, val, 2)
    # t = 0.05: sample 2 only (pseudo = its label): no change. t in 0.1..0.3: sample 0 is fixed,
    # changes [1, 0, 0, 0]: mean 1/4, sd 1/2, t statistic 0.25 / (0.5 / 2) = 1. t = 0.5, 0.7: sample 1
    # is damaged too, [1, -1, 0, 0]: mean 0. t = 1.0: and sample 3, [1, -1, 0, -1]: mean -1/4.
    means = {t: m for t, (m, _) in choice.per_threshold.items()}
    assert means == pytest.approx({0.05: 0.0, 0.1: 0.25, 0.2: 0.25, 0.3: 0.25, 0.5: 0.0, 0.7: 0.0, 1.0: -0.25})
    assert choice.per_threshold[0.1][1] == pytest.approx(1.0)
    assert choice.per_threshold[1.0][1] == pytest.approx(-0.25 / (math.sqrt(11 / 12) / 2))
    assert choice.threshold == 0.1 == choice.best and choice.gain == pytest.approx(0.25)  # ties: smaller t
    # the paired t of 1 is below a stricter z_min: nothing is relabelled, the best candidate is still named
    strict = guarded_threshold(max_loss, eligible, pseudo, base, idx, w, val, 2, z_min=1.5)
    assert strict.threshold is None and strict.best == 0.1 and strict.gain == 0.0
    # a sample that is not eligible (e.g. its prediction changed between stages) never moves
    eligible[0] = False
    assert guarded_threshold(max_loss, eligible, pseudo, base, idx, w, val, 2).threshold is None


def test_the_probe_reads_vote_mass_so_a_minority_relabel_counts():
    """Ten neighbours of which one is relabelled: the vote's argmax cannot move, its mass does."""
    base = torch.zeros(10, dtype=torch.long)
    base[0] = 1  # one wrong label among the neighbours of every validation image
    pseudo = torch.zeros(10, dtype=torch.long)
    idx, w = torch.arange(10).expand(5, 10), torch.ones(5, 10)
    val = torch.zeros(5, dtype=torch.long)
    choice = guarded_threshold(torch.full((10,), 0.01), torch.ones(10, dtype=torch.bool), pseudo, base, idx, w,
                               val, 2)
    assert choice.threshold == 0.05 and choice.gain == pytest.approx(0.1) and choice.z == math.inf


def test_a_relabelling_that_only_damages_is_refused():
    g = torch.Generator().manual_seed(0)
    n, c = 400, 5
    truth = torch.randint(0, c, (n,), generator=g)
    base = truth.clone()
    pseudo = (truth + 1) % c  # every pseudo-label wrong: a weak model's confident mistakes
    max_loss = torch.rand(n, generator=g)
    idx, w = _one_neighbour(n)
    choice = guarded_threshold(max_loss, torch.ones(n, dtype=torch.bool), pseudo, base, idx, w, truth, c)
    assert choice.threshold is None and choice.gain == 0
    assert all(m < 0 for t, (m, _) in choice.per_threshold.items() if t > max_loss.min())


def test_a_relabelling_that_fixes_labels_is_taken_with_its_z():
    g = torch.Generator().manual_seed(1)
    n, c = 400, 5
    truth = torch.randint(0, c, (n,), generator=g)
    base = torch.where(torch.rand(n, generator=g) < 0.3, (truth + 2) % c, truth)  # 30% wrong
    pseudo = truth  # the model knows better: every pseudo-label right
    max_loss = torch.rand(n, generator=g)
    idx, w = _one_neighbour(n)
    choice = guarded_threshold(max_loss, torch.ones(n, dtype=torch.bool), pseudo, base, idx, w, truth, c)
    assert choice.threshold == max(AUTO_THRESHOLDS)  # every threshold helps; the loosest most
    fixed = ((base != truth) & (max_loss < 1.0)).float()
    assert choice.gain == pytest.approx(float(fixed.mean()))
    assert choice.z == pytest.approx(float(fixed.mean() / (fixed.std() / math.sqrt(n))))


def test_neighbour_votes_equal_knn_votes():
    g = torch.Generator().manual_seed(2)
    bank, query = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    labels = torch.randint(0, 3, (50,), generator=g)
    idx, w = knn_neighbours(bank, query, k=9)
    assert torch.allclose(neighbour_votes(idx, w, labels, 3), knn_votes(bank, labels, query, 3, k=9))


def test_history_keeps_the_largest_stage_loss_and_old_states_load():
    h = StageHistory.empty(3, 2)
    logits = torch.zeros(3, 2)
    h.record(torch.ones(3, dtype=torch.bool), logits, torch.tensor([0.1, 0.5, 0.2]))
    h.record(torch.ones(3, dtype=torch.bool), logits, torch.tensor([0.3, 0.4, 0.1]))
    assert torch.allclose(h.max_loss, torch.tensor([0.3, 0.5, 0.2]))
    old = {k: v for k, v in h.state_dict().items() if k != "max_loss"}  # a checkpoint from before the field
    assert StageHistory.from_state(old).max_loss is None


def test_auto_end_to_end_logs_its_choice_and_relabels_only_what_it_chose(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [*TINY, "method=ours", "refine.threshold_mode=auto", "data.val_fraction=0.2"])
    run(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in records if "auto_threshold" in r]
    assert len(ends) == cfg.refine.iterations
    for r in ends:
        assert r["auto_threshold"] in (-1.0, *AUTO_THRESHOLDS)
        if r["auto_threshold"] == -1.0:
            assert r["pseudo_labelled"] == 0 and r["labels_changed"] == 0
        else:
            assert r["auto_val_gain"] > 0 and r["auto_val_z"] >= 1.0 and r["auto_best"] == r["auto_threshold"]


def test_auto_without_a_validation_split_falls_back_to_the_fixed_threshold(tmp_path, monkeypatch, caplog):
    import json

    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [*TINY, "method=ours", "refine.threshold_mode=auto", "data.val_fraction=0"])
    with caplog.at_level("WARNING", logger="labelrefine"):
        run(cfg, tmp_path / "run")
    assert "using the fixed refine.threshold=0.3 instead" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("auto_threshold" in r for r in records) and any("pseudo_labelled" in r for r in records)
