"""labelrefine.detect: each detector against a slow reference or an analytic value, the confident
joint against a per-sample loop and against cleanlab, and the scores a run writes."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from labelrefine import detect
from labelrefine.detect import (
    Dynamics,
    confident_joint,
    estimate_issue_count,
    flag_lowest,
    given_probability,
    knn_label_votes,
    logit_margin,
    normalized_margin,
)

#: The columns of cleanlab 2.9's ``CleanLearning.find_label_issues`` DataFrame.
CLEANLAB_COLUMNS = {"is_label_issue", "label_quality", "given_label", "predicted_label"}


def test_probability_and_margins_match_a_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(20, 5, generator=g) * 3, torch.randint(0, 5, (20,), generator=g)
    p = torch.softmax(logits, 1)
    for i in range(20):
        others = [float(logits[i, j]) for j in range(5) if j != int(y[i])]
        pothers = [float(p[i, j]) for j in range(5) if j != int(y[i])]
        assert float(given_probability(logits, y)[i]) == pytest.approx(float(p[i, y[i]]), abs=1e-6)
        assert float(logit_margin(logits, y)[i]) == pytest.approx(float(logits[i, y[i]]) - max(others), abs=1e-5)
        assert float(normalized_margin(p, y)[i]) == pytest.approx((float(p[i, y[i]]) - max(pothers) + 1) / 2,
                                                                  abs=1e-6)


def test_dynamics_average_every_row_and_survive_a_state_round_trip():
    y = torch.tensor([0, 1, 2, 1])
    d = Dynamics(y)
    assert d.means() is None
    a, b = torch.randn(3, 3), torch.randn(2, 3)
    d.update(torch.tensor([0, 1, 1]), a)  # sample 1 twice: both rows count
    d.update(torch.tensor([1, 2]), b)
    p, m = d.means()
    rows = {0: [a[0]], 1: [a[1], a[2], b[0]], 2: [b[1]]}
    for i, rs in rows.items():
        want_p = sum(float(torch.softmax(r, 0)[y[i]]) for r in rs) / len(rs)
        want_m = sum(float(r[y[i]] - max(r[j] for j in range(3) if j != int(y[i]))) for r in rs) / len(rs)
        assert float(p[i]) == pytest.approx(want_p, abs=1e-6) and float(m[i]) == pytest.approx(want_m, abs=1e-5)
    assert float(p[3]) == 0.5 and float(m[3]) == 0.0  # never seen: no evidence either way
    e = Dynamics(y)
    e.load_state_dict(d.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(d.means(), e.means(), strict=True))


def _joint_reference(probs, given, c):
    """Northcutt et al. 2021, eq. (1) and the calibration of section 3.2, one sample at a time."""
    n_label = [sum(1 for g in given if g == i) for i in range(c)]
    t = [sum(float(probs[k, j]) for k in range(len(given)) if given[k] == j) / max(n_label[j], 1) for j in range(c)]
    joint = [[0.0] * c for _ in range(c)]
    for k, g in enumerate(given):
        cand = [j for j in range(c) if n_label[j] and float(probs[k, j]) >= t[j]]
        if cand:
            joint[int(g)][max(cand, key=lambda j: float(probs[k, j]))] += 1
    out = []
    for i in range(c):
        row = sum(joint[i])
        out.append([(joint[i][j] / row if row else float(i == j)) * n_label[i] for j in range(c)])
    return torch.tensor(out, dtype=torch.float64)


def test_confident_joint_matches_a_per_sample_loop():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(60, 4, generator=g) * 2, 1)
    given = torch.randint(0, 3, (60,), generator=g)  # class 3 has no sample: never confident
    q = confident_joint(probs, given, 4)
    assert torch.allclose(q, _joint_reference(probs, given, 4), atol=1e-9)
    assert torch.allclose(q.sum(1), torch.bincount(given, minlength=4).double())


def test_the_estimate_is_exact_for_confident_probabilities():
    # The model is sure of the true class: the confident joint counts exactly the flipped labels.
    true = torch.arange(5).repeat(20)
    given = true.clone()
    given[[0, 7, 13, 21, 44, 60, 61]] = (given[[0, 7, 13, 21, 44, 60, 61]] + 1) % 5
    probs = torch.nn.functional.one_hot(true, 5).double() * 0.9 + 0.02
    assert estimate_issue_count(probs, given, 5) == 7


def test_the_estimate_agrees_with_cleanlab():
    count = pytest.importorskip("cleanlab.count")
    g = torch.Generator().manual_seed(2)
    true = torch.randint(0, 4, (400,), generator=g)
    given = torch.where(torch.rand(400, generator=g) < 0.25, torch.randint(0, 4, (400,), generator=g), true)
    logits = torch.nn.functional.one_hot(true, 4).float() * 2.5 + torch.randn(400, 4, generator=g)
    probs = torch.softmax(logits, 1).double()
    ours = estimate_issue_count(probs, given, 4)
    theirs = count.num_label_issues(given.numpy(), probs.numpy(), estimation_method="off_diagonal_calibrated")
    assert ours > 50 and abs(ours - int(theirs)) <= 2, (ours, theirs)  # cleanlab nudges its thresholds by an epsilon


def test_flag_lowest_takes_the_count_with_stable_ties():
    q = torch.tensor([0.5, 0.1, 0.5, 0.9, 0.1])
    assert flag_lowest(q, 3).tolist() == [True, True, False, False, True]
    assert not flag_lowest(q, 0).any() and flag_lowest(q, 99).all()


def test_knn_agreement_matches_a_brute_force_vote():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)
    votes = knn_label_votes(x, y, 3, k=4, temperature=0.5)
    xn = torch.nn.functional.normalize(x, dim=1)
    for i in range(30):
        sims = sorted(((float(xn[i] @ xn[j]), j) for j in range(30) if j != i), reverse=True)[:4]
        mass = [0.0] * 3
        for s, j in sims:
            mass[int(y[j])] += math.exp(s / 0.5)
        assert votes[i].tolist() == pytest.approx([m / sum(mass) for m in mass], abs=1e-5)


def test_the_k_sweep_equals_one_search_per_k():
    from labelrefine.detect import knn_agreement, knn_agreement_sweep

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(50, 4, generator=g), torch.randint(0, 3, (50,), generator=g)
    sweep = knn_agreement_sweep(x, y, 3, [3, 7, 20])
    for k, agree in sweep.items():
        assert torch.allclose(agree, knn_agreement(knn_label_votes(x, y, 3, k=k), y), atol=1e-6)


def test_a_run_writes_every_detector_and_cleanlabs_columns(tiny_config, tmp_path):
    from labelrefine.pipeline import run

    res = run(tiny_config("method=ours", "ssl.epochs=1"), tmp_path / "run")
    with (tmp_path / "run" / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    cols = set(rows[0])
    assert cols >= CLEANLAB_COLUMNS
    assert set(detect.DETECTORS) <= cols
    for name in detect.DETECTORS:
        vals = [float(r[name]) for r in rows]
        assert all(0.0 <= v <= 1.0 for v in vals), name
    default = detect.DetectConfig()  # the defaults rank and flag
    assert [float(r["label_quality"]) for r in rows] == [float(r[default.score]) for r in rows]
    flagged = sum(r["is_label_issue"] == "True" for r in rows)
    if default.flag == "estimated":
        assert flagged == res.summary["estimated_label_issues_by_source"][default.estimate_from]
        assert all(r["is_label_issue"] == "True" for r in rows[:flagged])  # the lowest quality first
    else:
        assert flagged == sum(r["refined_label"] != r["given_label"] for r in rows)
    table = res.label_table()
    assert set(table.columns) >= CLEANLAB_COLUMNS and list(table.columns) == list(rows[0])
    assert res.summary["estimated_label_issues"] >= 0
    html = (tmp_path / "run" / "report.html").read_text()  # the estimate beside the flagged count, and a PR curve
    assert "estimated by the confident joint" in html and "precision_recall.png" in html
    assert (tmp_path / "run" / "precision_recall.png").is_file()
    # the chosen detector ranks the table; the flagged set is the estimated count of lowest quality
    res2 = run(tiny_config("method=ours", "ssl.epochs=1", "detect.score=knn_ssl", "detect.flag=estimated",
                           "detect.knn_k_sweep=[5, 20]"), tmp_path / "run2")
    t2 = res2.label_table()
    assert {"knn_ssl_k5", "knn_ssl_k20", "knn_model_k5", "knn_model_k20"} <= set(t2.columns)
    assert t2["label_quality"].tolist() == t2["knn_ssl"].tolist()
    n = res2.summary["estimated_label_issues"]
    assert int(t2["is_label_issue"].sum()) == n and bool(t2["is_label_issue"].iloc[:n].all())


def test_the_live_cleanlab_columns_are_ours():
    """The column set above is cleanlab's own, read from a tiny CleanLearning run."""
    pytest.importorskip("cleanlab")
    import numpy as np
    from cleanlab.classification import CleanLearning
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = (x[:, 0] > 0).astype(int)
    issues = CleanLearning(LogisticRegression(), cv_n_folds=3).find_label_issues(x, y)
    assert set(issues.columns) == CLEANLAB_COLUMNS


def test_the_reports_precision_recall_curve_has_sklearns_average_precision():
    from sklearn.metrics import average_precision_score

    from labelrefine.report import precision_recall_png

    g = torch.Generator().manual_seed(4)
    wrong = torch.rand(200, generator=g) < 0.2
    quality = torch.rand(200, generator=g) - 0.3 * wrong.float()
    png, ap = precision_recall_png(quality, wrong, quality < 0.1)
    assert png.startswith(b"\x89PNG")
    assert ap == pytest.approx(average_precision_score(wrong.numpy(), -quality.numpy()), abs=1e-9)


def test_select_quality_and_flags_follow_the_detect_options():
    from labelrefine.detect import DetectConfig, select_flags, select_quality

    scores = {"self_confidence": torch.tensor([0.9, 0.1, 0.5, 0.3]), "aum": torch.tensor([0.2, 0.8, 0.6, 0.4]),
              "knn_ssl": torch.tensor([0.0, 1.0, 0.5, 0.5])}
    assert torch.equal(select_quality(DetectConfig(score="aum"), scores), scores["aum"])
    both = select_quality(DetectConfig(score="combined", combine=["aum", "knn_ssl"]), scores)
    assert torch.allclose(both, torch.tensor([0.1, 0.9, 0.55, 0.45]))
    # a score the run lacks: self_confidence
    assert torch.equal(select_quality(DetectConfig(score="stage_confidence"), scores), scores["self_confidence"])
    changed = torch.tensor([False, True, False, False])
    estimates = {"model": 2, "mean": 3}
    flags, n = select_flags(DetectConfig(flag="refined", estimate_from="model"), scores["aum"], estimates, changed)
    assert torch.equal(flags, changed) and n == 2
    flags, n = select_flags(DetectConfig(flag="estimated", estimate_from="mean"), scores["aum"], estimates, changed)
    assert n == 3 and flags.tolist() == [True, False, True, True]  # the 3 lowest of aum: 0.2, 0.4, 0.6
    # a run without the SimCLR phase has only the model's estimate
    _, n = select_flags(DetectConfig(flag="estimated", estimate_from="knn_ssl"), scores["aum"], {"model": 1}, changed)
    assert n == 1
