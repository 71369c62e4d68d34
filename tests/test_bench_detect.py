"""Detection suites (``bench detect-*``): the metrics against hand-computed values, a tiny suite
end to end (every detector and cleanlab on the same samples), its records and its reuse."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import TINY

from labelrefine.bench import load_suite
from labelrefine.bench.detect import (
    CLEANLAB,
    CLEANLAB_SSL,
    PRODUCT,
    DetectSuite,
    detect_suite_from_dict,
    detection_metrics,
    f1_at_count,
    fold_config,
    run_detect_suite,
)
from labelrefine.detect import DetectConfig
from labelrefine.errors import UserError


def test_metrics_match_hand_computed_values():
    wrong = np.array([True, True, False, False, False, True, False, False])
    quality = np.array([0.1, 0.3, 0.2, 0.9, 0.8, 0.95, 0.7, 0.6])  # ranking: 0, 2, 1, 7, 6, 4, 3, 5
    flagged = np.array([True, False, True, False, False, False, False, False])
    given = np.array([1, 1, 0, 0, 0, 1, 0, 0])
    clean = np.where(wrong, 1 - given, given)
    suggested = 1 - given  # flipping a flagged label: right for 0, wrong for 2
    m = detection_metrics(wrong, quality, flagged, suggested, given, clean)
    # AUROC: of the 3 x 5 (wrong, right) pairs, the wrong one ranks first in 5 + 4 + 0 = 9 pairs.
    assert m["auroc"] == pytest.approx(9 / 15)
    # AUPRC (average precision): hits at ranks 1, 3 and 8 -> (1/1 + 2/3 + 3/8) / 3
    assert m["auprc"] == pytest.approx((1 + 2 / 3 + 3 / 8) / 3)
    assert (m["precision"], m["recall"]) == (0.5, pytest.approx(1 / 3))
    assert m["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert m["p_at_errors"] == pytest.approx(2 / 3) and m["p_at_50"] is None
    assert m["labels_before"] == 5 / 8 and m["labels_after"] == 5 / 8  # one fixed, one broken


def test_f1_at_a_count_flags_the_lowest_qualities():
    wrong = np.array([True, True, False, False, False, True, False, False])
    quality = np.array([0.1, 0.3, 0.2, 0.9, 0.8, 0.95, 0.7, 0.6])  # ranking: 0, 2, 1, 7, ...
    # 3 lowest: samples 0, 2, 1 -> 2 hits; precision 2/3, recall 2/3
    assert f1_at_count(wrong, quality, 3) == pytest.approx(2 / 3)
    assert f1_at_count(wrong, quality, 1) == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))
    assert f1_at_count(wrong, quality, 0) == 0.0
    assert f1_at_count(wrong, quality, 100) == pytest.approx(2 * (3 / 8) / (3 / 8 + 1))  # everything flagged


def test_suite_files_and_their_errors():
    for name in ("detect-digits", "detect-pneumonia"):
        suite = load_suite(name)
        assert isinstance(suite, DetectSuite) and suite.folds == 5 and suite.settings
    with pytest.raises(UserError, match="unknown key 'methods'"):
        detect_suite_from_dict({"kind": "detect", "name": "x", "settings": [{"name": "a"}], "config": {},
                                "methods": ["ce"]}, "x.yaml")
    with pytest.raises(UserError, match="'folds' must be an integer >= 2"):
        detect_suite_from_dict({"kind": "detect", "name": "x", "settings": [{"name": "a"}], "config": {},
                                "folds": 1}, "x.yaml")


def _tiny_suite() -> DetectSuite:
    tiny = [*TINY, "data.train_subset=200", "data.val_fraction=0.1"]
    return detect_suite_from_dict({
        "kind": "detect", "name": "detect-tiny", "title": "tiny", "folds": 2, "cleanlab_ssl": True,
        "settings": [{"name": "IDN-20%", "set": [*tiny, "data.noise=idn", "data.noise_rate=0.2"]}], "config": {}})


def test_fold_models_are_plain_ce_with_ours_epochs(tiny_config):
    cfg = tiny_config("method=ours")
    f = fold_config(cfg, "ce")
    # ours: warmup 1 + 2 iterations of 2 epochs + fine-tune 1 = 6 supervised epochs
    assert (f.method, f.epochs, f.data.noise, f.data.train_subset) == ("ce", 6, "none", 0)
    assert f.model == cfg.model and f.optim == cfg.optim


def test_a_tiny_detection_suite_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("cleanlab")
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    suite, out = _tiny_suite(), tmp_path / "out"
    done = run_detect_suite(suite, out, seeds=1, command="labelrefine bench detect-tiny")
    assert len(done) == 1
    rec = done[0]
    assert rec["n"] == 180 and 0 < rec["n_errors"] < 180  # 10% of 200 held out
    names = set(rec["detectors"])
    assert {PRODUCT, CLEANLAB, CLEANLAB_SSL, "self_confidence", "aum", "knn_ssl", "knn_model"} <= names
    for m in rec["detectors"].values():
        assert 0 <= m["auroc"] <= 1 and 0 <= m["auprc"] <= 1 and m["wall_seconds"] > 0
        assert m["labels_before"] == pytest.approx(1 - rec["noise_rate"])
    for k in range(2):  # the cleanlab folds ran as CE, on the ours run's training samples
        s = json.loads((out / "runs" / "idn-20" / "seed0" / "cleanlab" / f"fold{k}" / "summary.json").read_text())
        assert s["method"] == "ce" and s["n_train"] + s["n_val"] == 90
        s2 = json.loads((out / "runs" / "idn-20" / "seed0" / "cleanlab_ssl" / f"fold{k}" / "summary.json").read_text())
        assert s2["method"] == "ce_ssl" and "ssl" not in s2["seconds"]  # the ours run's encoder, from the cache ...
        ours = json.loads((out / "runs" / "idn-20" / "seed0" / "ours" / "summary.json").read_text())
        assert "ssl" in ours["seconds"] and s2["seconds"]["ssl_pretrain"] == ours["seconds"]["ssl_pretrain"] > 0
    md = (out / "results.md").read_text()
    assert "## IDN-20%" in md and CLEANLAB in md and "Paired differences" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["detector"] for r in rows} == names
    assert (out / "results.png").is_file()
    for name in ("self_confidence", "aum", "knn_ssl"):  # F1 at each of ours' estimates (rule 2)
        f1_at = rec["detectors"][name]["f1_at"]
        assert set(f1_at) == {k for k in rec["estimated_issues"] if k.startswith("ours_")} >= {"ours_model"}
        # the flagged set's count: the estimate detect.estimate_from names (the default)
        assert f1_at[f"ours_{DetectConfig().estimate_from}"] == pytest.approx(rec["detectors"][name]["f1"])
    # A record from before f1_at gets it from the unit's runs, nothing trained, nothing else changed.
    path = out / "detect.jsonl"
    old = json.loads(path.read_text())
    for d in old["detectors"].values():
        d.pop("f1_at", None)
    path.write_text(json.dumps(old) + "\n")
    run_detect_suite(suite, out, seeds=1)
    refreshed = json.loads(path.read_text())
    assert set(refreshed.pop("refreshed")) == {"code_version", "at"}  # what derived it again, and when
    assert refreshed == rec
    # A record derived by an older DERIVATION (before it was recorded) is derived again, to the same rows here.
    from labelrefine.bench.detect import DERIVATION

    assert rec["derivation"] == DERIVATION
    stale = dict(rec)
    del stale["derivation"]
    path.write_text(json.dumps(stale) + "\n")
    run_detect_suite(suite, out, seeds=1)
    again = json.loads(path.read_text())
    assert again.pop("refreshed") and again == rec
    # Other detection defaults (options that only choose among the recorded scores) train
    # nothing: the product's row is derived again from the runs, the other rows stay.
    def boom(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr("labelrefine.pipeline.run", boom)
    posthoc = ["detect.score=self_confidence", "detect.flag=estimated", "detect.estimate_from=model"]
    new = run_detect_suite(suite, out, seeds=1, user_overrides=posthoc)[0]
    assert new["config"]["detect"]["score"] == "self_confidence" and new["config"]["detect"]["flag"] == "estimated"
    assert new["refreshed"]["code_version"] and new["code_version"] == rec["code_version"]  # the run's, as made
    product, sc = new["detectors"][PRODUCT], new["detectors"]["self_confidence"]
    assert product["auprc"] == sc["auprc"] and product["n_flagged"] == new["estimated_issues"]["ours_model"]
    assert product["f1"] == pytest.approx(sc["f1_at"]["ours_model"])
    for name, row in new["detectors"].items():
        if name in (CLEANLAB, CLEANLAB_SSL):  # cleanlab's rows are as recorded
            assert row == rec["detectors"][name]
        elif name != PRODUCT:  # ours' rankings stay; their flagged sets now count detect.estimate_from's estimate
            assert {k: row[k] for k in ("auroc", "auprc", "f1_at")} == \
                {k: rec["detectors"][name][k] for k in ("auroc", "auprc", "f1_at")}
            assert row["n_flagged"] == new["estimated_issues"]["ours_model"]
            assert row["f1"] == pytest.approx(row["f1_at"]["ours_model"])
    assert run_detect_suite(suite, out, seeds=1, user_overrides=posthoc)[0] == new  # now recorded as it is
    # A fresh clone keeps detect.jsonl, not runs/: the unit is recorded and is not run again.
    import shutil

    from labelrefine.bench.detect import _refresh, plan_units

    shutil.rmtree(out / "runs")
    again = run_detect_suite(suite, out, seeds=1, user_overrides=posthoc)
    assert again == [new] and not (out / "runs").exists()
    # ... unless it was made with other detect options: those need the runs, so it runs again
    unit = plan_units(suite, out, seeds=1)[0]
    assert _refresh(unit, json.loads(path.read_text())) == "missing"


def test_tables_order_detectors_the_same_whatever_the_record_order():
    from labelrefine.bench.detect import detector_order

    names = ["mean(aum, knn_ssl)", "knn_ssl_k50", "aum", "knn_ssl", "knn_ssl_k5", PRODUCT, CLEANLAB, "self_confidence"]
    want = [PRODUCT, CLEANLAB, "self_confidence", "aum", "knn_ssl", "knn_ssl_k5", "knn_ssl_k50", "mean(aum, knn_ssl)"]
    assert detector_order(names) == want and detector_order(reversed(names)) == want
