"""End-to-end runs: every registered method, every artifact's schema, output-dir safety."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from labelrefine.config import config_from_dict
from labelrefine.detect import DETECTORS
from labelrefine.errors import UserError
from labelrefine.methods import METHODS, list_methods
from labelrefine.pipeline import run
from labelrefine.predict import MODEL_FORMAT
from labelrefine.store import load as store_load

list_methods()  # import every method module so METHODS is complete at collection time

LABEL_COLUMNS = ["id", "given_label", "predicted_label", "refined_label", "label_quality", "is_label_issue",
                 "n_stages_selected"]


def _check_artifacts(out, cfg, n_train: int) -> dict:
    for name in ("config.yaml", "metrics.jsonl", "labels.csv", "summary.json", "model.pt", "report.html",
                 "accuracy.png", "confusion.png"):
        assert (out / name).is_file(), name
    # The resolved config reloads to the same config.
    assert config_from_dict(yaml.safe_load((out / "config.yaml").read_text())) == cfg
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {"phase", "iteration", "epoch", "global_epoch", "loss", "seconds"}
    assert records and all(keys <= set(r) for r in records)
    sup = [r for r in records if r["phase"] != "ssl"]
    assert all({"val_acc", "test_acc", "oracle_label_acc", "lr"} <= set(r) for r in sup)
    rows = list(csv.DictReader((out / "labels.csv").open()))
    cols = list(rows[0])
    assert cols[:len(LABEL_COLUMNS)] == LABEL_COLUMNS
    assert set(cols[len(LABEL_COLUMNS):]) <= set(DETECTORS)  # the detector scores the method has
    assert len(rows) == n_train
    quality = [float(r["label_quality"]) for r in rows]
    assert all(0.0 <= q <= 1.0 for q in quality)
    assert quality == sorted(quality), "labels.csv is ranked, suspected errors first"
    assert all(r["is_label_issue"] in ("True", "False") for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_test_acc", "best_val_test_acc", "best_val_acc", "train_label_acc_before",
                "train_label_acc_after", "seconds", "config_hash", "code_version", "noise"):
        assert key in summary, key
    assert 0.0 <= summary["final_test_acc"] <= 1.0
    assert summary["noise"]["achieved_rate"] > 0.1
    model = store_load(out / "model.pt", kind=MODEL_FORMAT, name="model file")
    assert model["format"] == MODEL_FORMAT and model["classes"] == [str(i) for i in range(10)]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2
    return summary


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_end_to_end(name, tiny_config, tmp_path):
    cfg = tiny_config(f"method={name}")
    summary = run(cfg, tmp_path / "out").summary
    _check_artifacts(tmp_path / "out", cfg, summary["n_train"])
    assert summary["method"] == name


def test_ours_refines_and_reports_stages(tiny_config, tmp_path):
    cfg = tiny_config("refine.loss_target=prediction")
    summary = run(cfg, tmp_path / "out").summary
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in records]
    assert phases == ["ssl"] + ["warmup"] + ["refine"] * 4 + ["finetune"]
    stages = [r for r in records if "stage_selected" in r]
    assert len(stages) == 4 and all("oracle_stage_precision" in r for r in stages)
    ends = [r for r in records if "pseudo_labelled" in r]
    assert [r["iteration"] for r in ends] == [1, 2]
    assert all("oracle_pseudo_precision" in r for r in ends)
    rows = list(csv.DictReader((tmp_path / "out" / "labels.csv").open()))
    assert max(int(r["n_stages_selected"]) for r in rows) <= 4
    assert summary["n_label_issues"] == sum(r["is_label_issue"] == "True" for r in rows)


def test_model_pt_loads_without_training_code(tiny_config, tmp_path):
    """model.pt holds the best-noisy-val weights: its test accuracy is the one the summary reports."""
    from labelrefine.data.splits import prepare_data
    from labelrefine.pipeline import default_cache_dir
    from labelrefine.predict import load_model

    cfg = tiny_config("method=ce", "epochs=2")
    summary = run(cfg, tmp_path / "out").summary
    predictor = load_model(tmp_path / "out" / "model.pt")
    test = prepare_data(cfg, default_cache_dir(cfg)).test
    acc = float((predictor.predict_proba(test.images).argmax(1) == test.labels).double().mean())
    assert acc == pytest.approx(summary["best_val_test_acc"], abs=1e-12)
    assert predictor.classes == [str(i) for i in range(10)]
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt is not a labelrefine file"):
        load_model(tmp_path / "junk.pt")


def test_refuses_existing_run_without_flag(tiny_config, tmp_path):
    cfg = tiny_config("method=ce", "epochs=1")
    run(cfg, tmp_path / "out")
    before = (tmp_path / "out" / "summary.json").read_bytes()
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        run(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "summary.json").read_bytes() == before
    run(cfg, tmp_path / "out", overwrite=True)


def test_overwrite_leaves_nothing_of_the_old_run(tiny_config, tmp_path):
    """--overwrite clears every file of ours (report PNGs and temporary files too) before the new
    run writes: when the new run then fails, none of the old run's files stand beside it."""
    from labelrefine.errors import TrainingDiverged
    from labelrefine.rundir import RUN_FILES

    out = tmp_path / "out"
    run(tiny_config("method=ce", "epochs=1"), out)
    old = sorted(p.name for p in out.iterdir())
    assert set(old) <= set(RUN_FILES) and "accuracy.png" in old and "summary.json" in old
    (out / ".model.pt.k1ll3d00.tmp").write_bytes(b"half a file")  # a kill mid-write
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(TrainingDiverged):
        run(tiny_config("method=ce", "epochs=1", "optim.lr=1e30", "optim.nesterov=false"), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]
    assert "1.0e+30" in (out / "config.yaml").read_text()


def test_same_seed_same_run(tiny_config, tmp_path):
    cfg = tiny_config("method=ours", "refine.loss_target=prediction")
    a = run(cfg, tmp_path / "a").summary
    b = run(cfg, tmp_path / "b").summary
    assert (tmp_path / "a" / "labels.csv").read_bytes() == (tmp_path / "b" / "labels.csv").read_bytes()
    assert a["final_test_acc"] == b["final_test_acc"]


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("extra", [[], ["ssl.epochs=0"], ["dividemix.init=ssl"]])
def test_schedule_uses_only_the_phases_the_method_declares(name, extra, tiny_config):
    """``Method.phases`` is what bench, report and bench speed read: every phase a schedule uses
    must be declared there."""
    import torch

    from labelrefine.data.splits import prepare_data
    from labelrefine.engine import Context
    from labelrefine.pipeline import default_cache_dir

    cfg = tiny_config(f"method={name}", "device=cpu", *extra)
    prep = prepare_data(cfg, default_cache_dir(cfg))
    ctx = Context(cfg, prep.train.images, prep.train.labels, len(prep.classes), device=torch.device("cpu"),
                  ssl_images=prep.ssl_images, cache_dir=default_cache_dir(cfg), noise_rate=cfg.data.noise_rate)
    cls = METHODS[name]
    used = [s.phase for s in cls(ctx).schedule()]
    assert cls.phases and len(set(cls.phases)) == len(cls.phases)
    assert set(used) <= set(cls.phases), (used, cls.phases)
    # declared in schedule order
    assert sorted(set(used), key=used.index) == [p for p in cls.phases if p in used]
