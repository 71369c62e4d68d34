"""`labelrefine bench`: the built-in suites validate, a tiny suite runs end to end, caching works."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from labelrefine.bench import REFERENCE, load_suite, plan, run_suite, suite_from_dict
from labelrefine.bench import suites as bench
from labelrefine.cli import main
from labelrefine.data.sources import parse_spec
from labelrefine.errors import UserError
from labelrefine.methods import list_methods

REGISTERED = [m.name for m in list_methods()]


def _overrides_to_dict(items: list[str]) -> dict:
    from labelrefine.config import apply_overrides

    return apply_overrides({}, list(items))


def tiny_suite(**extra) -> dict:
    return {
        "name": "tiny", "title": "Tiny digits suite", "methods": ["ce", "ours"], "reference": True,
        "settings": [{"name": "Sym-20%", "set": ["data.noise=symmetric", "data.noise_rate=0.2"]},
                     {"name": "IDN-20%", "set": ["data.noise=idn", "data.noise_rate=0.2"]}],
        "config": _overrides_to_dict(TINY), **extra,
    }


@pytest.mark.parametrize("name", ["paper-cifar10", "paper-cifar100", "cpu-cifar10", "cpu-cifar10-quick",
                                  "cpu-pneumonia"])
def test_builtin_suites_build_and_validate(name, tmp_path):
    suite = load_suite(name)
    runs = plan(suite, tmp_path, seeds=2)
    capped = sum(1 for m in suite.methods if suite.method_seeds.get(m, 2) < 2)  # method_seeds: 1
    per_seed = len(suite.settings) * len(suite.methods) + 1
    assert len(runs) == 2 * per_seed - len(suite.settings) * capped
    for r in runs:
        parse_spec(r.cfg.data.spec)  # a valid data spec
        assert r.cfg.seed == r.seed and r.cfg.data.noise_seed == r.seed
        if r.method == REFERENCE:
            assert r.cfg.method == "ce" and r.cfg.data.noise == "none"
        else:
            assert r.cfg.method == r.method and r.cfg.data.noise != "none"
    # every run of a suite has its own directory
    assert len({r.out for r in runs}) == len(runs)


@pytest.mark.parametrize("name,classes", [("paper-cifar10", "cifar10"), ("paper-cifar100", "cifar100")])
def test_paper_suites_hold_the_papers_settings(name, classes, tmp_path):
    suite = load_suite(name)
    assert suite.methods == REGISTERED
    assert [s.name for s in suite.settings] == ["IDN-20%", "IDN-30%", "IDN-50%"]
    runs = {(r.setting.name, r.method): r.cfg for r in plan(suite, tmp_path, seeds=1)}
    ours = runs[("IDN-20%", "ours")]
    assert parse_spec(ours.data.spec)[0] == classes
    assert ours.model.backbone == "preact_resnet18" and ours.model.width == 64
    assert ours.ssl.epochs == 30
    assert (ours.refine.warmup_epochs, ours.refine.iterations) == (5, 4)
    assert ours.refine.first_stages == [2, 3, 4] and ours.refine.later_stages == [2, 5, 7]
    assert ours.refine.threshold == 1.0
    assert ours.data.noise == "idn" and ours.data.noise_rate == 0.2
    assert runs[("IDN-50%", "ce")].data.noise_rate == 0.5
    dm = runs[("IDN-30%", "dividemix")]
    assert dm.epochs == 300 and dm.optim.batch_size == 64 and dm.optim.lr == 0.02
    assert dm.dividemix.warmup_epochs == (10 if classes == "cifar10" else 30)
    assert runs[("IDN-20%", "jocor")].jocor.lam == (0.9 if classes == "cifar10" else 0.85)
    assert runs[("IDN-20%", "coteaching")].epochs == 200


def test_cpu_suites_cover_what_the_issue_asks(tmp_path):
    quick = load_suite("cpu-cifar10-quick")  # every method, under an hour
    assert quick.methods == REGISTERED and quick.budget_minutes == 60
    assert [s.name for s in quick.settings] == ["IDN-20%", "IDN-50%", "CIFAR-10N worse"]
    cfgs = {(r.setting.name, r.method): r.cfg for r in plan(quick, tmp_path, seeds=1)}
    assert cfgs[("CIFAR-10N worse", "ours")].data.noise == "column:worse"
    ours = cfgs[("IDN-50%", "ours")]
    # every phase of the method is kept: SSL, warmup, 4 iterations with stages, fine-tune
    assert ours.ssl.epochs > 0 and ours.refine.warmup_epochs > 0 and ours.refine.iterations == 4
    assert len(ours.refine.first_stages) >= 2 and ours.finetune.epochs > 0
    # issue 15: five methods on the fast recipe, 3 seeds where they decide, costly ones capped at 1
    c10 = load_suite("cpu-cifar10")
    assert c10.methods == ["ce", "ce_ssl", "ours", "dividemix", "ours_dividemix"] and c10.reference
    assert [s.name for s in c10.settings] == ["IDN-20%", "IDN-50%", "CIFAR-10N worse"]
    assert c10.method_seeds == {"dividemix": 1, "ours_dividemix": 1}
    runs = plan(c10, tmp_path, seeds=3)
    cfgs = {(r.setting.name, r.method, r.seed): r.cfg for r in runs}
    assert ("IDN-20%", "ours", 2) in cfgs and ("IDN-20%", "dividemix", 1) not in cfgs
    ours = cfgs[("CIFAR-10N worse", "ours", 0)]
    assert ours.model.backbone == "airbench" and ours.data.train_subset == 15000
    assert ours.optim.label_smoothing == 0.0  # it would cap the confidence the refinement's threshold reads
    assert ours.refine.warmup_epochs + ours.refine.iterations * 3 + ours.finetune.epochs == ours.epochs
    # one SimCLR pretraining for every SimCLR-initialised run; the others keep the run's seed
    assert {r.cfg.ssl.seed for r in runs if r.method in ("ce_ssl", "ours", "ours_dividemix")} == {0}
    assert {r.cfg.ssl.seed for r in runs if r.method in ("ce", "dividemix", REFERENCE)} == {-1}
    # DivideMix's batch was chosen by its noisy-val accuracy (docs/research/dividemix-cost.md); the rest keep 1024
    assert {r.cfg.optim.batch_size for r in runs if r.method in ("dividemix", "ours_dividemix")} == {512}
    assert {r.cfg.optim.batch_size for r in runs if r.method not in ("dividemix", "ours_dividemix")} == {1024}
    pneu = load_suite("cpu-pneumonia")
    assert pneu.methods == ["ce", "ce_ssl", "dividemix", "ours", "ours_dividemix"] and pneu.reference  # issue 15
    assert [s.name for s in pneu.settings] == ["IDN-20%", "IDN-30%"]


def test_tiny_suite_end_to_end_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    suite = suite_from_dict(tiny_suite())
    out = tmp_path / "suite"
    rows = run_suite(suite, out, seeds=1, command="labelrefine bench tiny")
    assert len(rows) == 1 + 2 * 2
    assert all(r["status"] == "ok" for r in rows)
    from labelrefine.artifacts import cpu_name

    assert {r["cpu"] for r in rows} == {cpu_name()} and cpu_name()  # each run records its CPU
    assert f"runs on: {cpu_name()};" in (out / "results.md").read_text()
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in table] == [REFERENCE, "ce", "ours", "ce", "ours"]
    assert set(bench.COLUMNS) == set(table[0])
    clean = float(table[0]["final_test_acc"])
    for r in table:
        s = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert float(r["final_test_acc"]) == pytest.approx(s["final_test_acc"], rel=1e-5)
        assert float(r["r_final"]) == pytest.approx(s["final_test_acc"] / clean, rel=1e-4)
        assert r["config_hash"] == s["config_hash"] and r["code_version"] == s["code_version"]
        assert float(r["seconds_total"]) > 0
    assert float(table[0]["achieved_rate"]) == 0.0
    assert 0.1 < float(table[1]["achieved_rate"]) < 0.3
    assert table[2]["seconds_refine"] and not table[1]["seconds_refine"]  # per-phase wall time
    md = (out / "results.md").read_text()
    assert "| CE on clean labels (reference) |" in md and "| `ours` |" in md and "(R " in md
    assert "labelrefine bench tiny" in md and "Seeds: 1" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second invocation runs nothing and rewrites the same tables.
    def boom(*a, **k):
        raise AssertionError("a cached run was run again")

    monkeypatch.setattr("labelrefine.pipeline.run", boom)
    csv_before = (out / "results.csv").read_text()
    rows2 = run_suite(suite, out, seeds=1, command="labelrefine bench tiny")
    assert [r["final_test_acc"] for r in rows2] == [r["final_test_acc"] for r in rows]
    assert (out / "results.csv").read_text() == csv_before
    assert (out / "results.md").read_text() == md

    # A fresh clone keeps results.* and runs.jsonl but not runs/: the records stand in for them.
    import shutil

    shutil.rmtree(out / "runs")
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(rows)
    assert set(bench.dry_run(suite, out).split()) >= {"recorded"}
    run_suite(suite, out, seeds=1, command="labelrefine bench tiny")
    assert (out / "results.csv").read_text() == csv_before
    assert (out / "results.md").read_text() == md
    # ... but a record made with another config is not used: that run is planned again
    assert "new" in bench.dry_run(suite, out, user_overrides=["optim.lr=0.07"]).split()
    # ... while the detect options that only choose among recorded scores change no training
    posthoc = ["detect.score=self_confidence", "detect.flag=refined"]
    assert "new" not in bench.dry_run(suite, out, user_overrides=posthoc).split()


def test_a_partial_invocation_runs_its_part_and_keeps_the_whole_table(tmp_path, monkeypatch):
    """--settings / --methods choose what runs; results.* still cover every run of the suite."""
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    suite = suite_from_dict(tiny_suite(methods=["ce", "ours"]))
    out = tmp_path / "suite"
    ran: list[str] = []
    from labelrefine import pipeline

    real = pipeline.run

    def spy(cfg, run_out, **kw):
        ran.append(str(Path(run_out).relative_to(out / "runs")))
        return real(cfg, run_out, **kw)

    monkeypatch.setattr("labelrefine.pipeline.run", spy)
    text = bench.dry_run(suite, out, settings=["idn-20"], methods=["ce"])  # by slug
    assert len(text.splitlines()) == 2 and "Sym-20%" not in text
    rows = run_suite(suite, out, seeds=1, command="x", settings=["IDN-20%"], methods=["ce"])
    assert ran == ["clean/ce/seed0", "idn-20/ce/seed0"]
    assert [(r["setting"], r["method"], r["status"]) for r in rows] == [
        ("clean labels", REFERENCE, "ok"), ("Sym-20%", "ce", "pending"), ("Sym-20%", "ours", "pending"),
        ("IDN-20%", "ce", "ok"), ("IDN-20%", "ours", "pending")]
    assert "**Incomplete:** 3 run(s) not finished" in (out / "results.md").read_text()
    # Another part later: the first part's runs stay in the table (cached, not run again).
    ran.clear()
    rows = run_suite(suite, out, seeds=1, command="x", settings=["Sym-20%"], methods=["ce"])
    assert ran == ["sym-20/ce/seed0"]
    assert [r["status"] for r in rows] == ["ok", "ok", "pending", "ok", "pending"]
    assert (bench.equivalent_command(suite, "o", settings=["IDN-20%"])
            == "labelrefine bench tiny --out o --settings IDN-20%")


def test_interrupted_suite_resumes_and_stale_runs_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    suite = suite_from_dict(tiny_suite(methods=["ce"]))
    out = tmp_path / "suite"
    runs = plan(suite, out, seeds=1)
    # A run killed after its first checkpoint: the suite resumes it.
    from labelrefine.pipeline import run

    run_suite(suite, out, seeds=1, command="x")
    summary = runs[1].out / "summary.json"
    summary.unlink()
    assert bench._status(runs[1]) == "resume"
    calls = []
    monkeypatch.setattr("labelrefine.pipeline.run", lambda cfg, o, **k: calls.append(k) or run(cfg, o, **k))
    run_suite(suite, out, seeds=1, command="x")
    assert calls == [{"resume": True, "overwrite": False}]
    # The same directory with another config: refused, then re-run with --overwrite.
    changed = suite_from_dict(tiny_suite(methods=["ce"], config=_overrides_to_dict([*TINY, "optim.lr=0.02"])))
    with pytest.raises(UserError, match="another config"):
        run_suite(changed, out, seeds=1, command="x")
    calls.clear()
    run_suite(changed, out, seeds=1, command="x", overwrite=True)
    assert len(calls) == 3 and all(c["overwrite"] for c in calls)


def test_run_stopped_before_its_report_is_resumed_not_cached(tmp_path, monkeypatch):
    """summary.json, the completion marker, is a run's last write: a run stopped while writing
    its report is unfinished, and the suite resumes it and makes the report."""
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    suite = suite_from_dict(tiny_suite(methods=["ce"]))
    out = tmp_path / "suite"
    first = plan(suite, out, seeds=1)[0]
    from labelrefine import report
    from labelrefine.pipeline import run

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(report, "write_report", killed)
        with pytest.raises(KeyboardInterrupt):
            run(first.cfg, first.out)
    assert (first.out / "model.pt").is_file() and not (first.out / "summary.json").exists()
    assert bench._status(first) == "resume"
    run_suite(suite, out, seeds=1, command="x")
    assert (first.out / "report.html").is_file() and bench._status(first) == "cached"


@pytest.mark.parametrize("args,message", [
    (["bench", "no-such-suite", "--out", "o"], "unknown suite 'no-such-suite'"),
    (["bench", "cpu-cifar10", "--out", "o", "--methods", "ours,nope"], "--methods: 'nope' is not in suite"),
    (["bench", "cpu-cifar10", "--out", "o", "--settings", "IDN-20%,IDN-90%"],
     "--settings: 'IDN-90%' is not a setting of suite cpu-cifar10"),
    (["bench", "speed", "--out", "o", "--settings", "IDN-20%"], "--settings applies to suites only"),
    (["bench", "cpu-cifar10", "--out", "o", "--seeds", "0"], "--seeds 0"),
    (["bench", "cpu-cifar10"], "--out DIR is required"),
    (["bench", "cpu-cifar10", "--out", "o", "--set", "optim.lr=-1"], "optim.lr"),
    (["bench", "cpu-cifar10", "--out", "o", "--set", "nosuchkey=1"], "unknown config key 'nosuchkey'"),
])
def test_bench_cli_errors(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit,message", [
    ({"surprise": 1}, "unknown key 'surprise'"),
    ({"methods": ["ours", "magic"]}, "unknown method 'magic'"),
    ({"settings": []}, "'settings' must be a non-empty list"),
    ({"settings": [{"name": "a"}, {"name": "A"}]}, "setting names must be distinct"),
    ({"config": {"optim": {"lr": "fast"}}}, "optim.lr"),
])
def test_bad_suite_files(edit, message, tmp_path, capsys):
    data = {**tiny_suite(), **edit}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_bench_list_and_dry_run(capsys, tmp_path):
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("cpu-cifar10", "cpu-cifar10-quick", "cpu-pneumonia", "paper-cifar10", "paper-cifar100"):
        assert name in listed
    assert main(["bench", "paper-cifar10", "--out", str(tmp_path / "o"), "--dry-run", "--methods", "ours"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.split()[0] == "new" for line in lines)
    assert not (tmp_path / "o").exists()


def test_phase_columns_come_from_the_method_registry():
    declared = [p for m in list_methods() for p in m.phases]
    assert sorted(bench.PHASES) == sorted(set(declared))
    # results.csv keeps its column order for the phases it always had
    known = ("ssl", "warmup", "refine", "finetune", "train", "dm_warmup", "dm_train")
    assert [p for p in bench.PHASES if p in known] == list(known)
    assert [c for c in bench.COLUMNS if c.startswith("seconds_")] == [
        "seconds_data", *(f"seconds_{p}" for p in bench.PHASES), "seconds_total"]


def test_dry_run_and_the_default_command_line(tmp_path, capsys):
    from labelrefine.bench import dry_run, equivalent_command

    suite = suite_from_dict(tiny_suite())
    text = dry_run(suite, tmp_path / "o", methods=["ours"])
    assert [line.split()[0] for line in text.splitlines()] == ["new"] * 3
    assert capsys.readouterr().out == "" and not (tmp_path / "o").exists()
    assert equivalent_command(suite, "o") == "labelrefine bench tiny --out o"
    assert equivalent_command(load_suite("cpu-pneumonia"), "o d", seeds=3, methods=["ce", "ours"],
                              user_overrides=["epochs=2"], overwrite=True) == (
        "labelrefine bench cpu-pneumonia --out 'o d' --seeds 3 --methods ce,ours --set epochs=2 --overwrite")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(tiny_suite()))
    assert equivalent_command(load_suite(str(path)), "o") == f"labelrefine bench {path} --out o"


def test_paired_difference_against_a_hand_computed_t_interval():
    from labelrefine.bench.suites import paired_difference

    d, lo, hi = paired_difference([0.90, 0.92, 0.91], [0.88, 0.89, 0.90])  # differences .02 .03 .01
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert d == pytest.approx(0.02) and lo == pytest.approx(0.02 - half) and hi == pytest.approx(0.02 + half)
    assert paired_difference([0.5], [0.4])[1:] == (None, None)


def test_results_say_tie_better_worse_and_one_seed_in_words():
    from labelrefine.bench.suites import _md_where_ours_stands

    def row(setting, method, seed, acc):
        return {"status": "ok", "setting": setting, "method": method, "seed": seed, "final_test_acc": acc}

    rows = [row("A", "ours", k, v) for k, v in enumerate([0.90, 0.92, 0.91])]
    rows += [row("A", "ce", k, v) for k, v in enumerate([0.80, 0.81, 0.80])]  # clearly worse than ours
    rows += [row("A", "dividemix", k, v) for k, v in enumerate([0.92, 0.90, 0.915])]  # a tie
    rows += [row("A", "jocor", k, v) for k, v in enumerate([0.95, 0.96, 0.955])]  # clearly better
    rows += [row("B", "ours", 0, 0.5), row("B", "ce", 0, 0.4)]
    text = "\n".join(_md_where_ours_stands(rows, ["A", "B"], ["ce", "dividemix", "jocor", "ours"]))
    assert "| A | `ce` | 3 | +10.67 |" in text and "`ours` better |" in text
    assert "| A | `dividemix` | 3 |" in text and "| tie |" in text
    assert "| A | `jocor` | 3 |" in text and "`ours` worse |" in text
    assert "| B | `ce` | 1 | +10.00 | - | one seed: no interval" in text


def test_method_seeds_caps_the_costly_methods(tmp_path):
    data = tiny_suite()
    data["method_seeds"] = {"ours": 1}
    suite = suite_from_dict(data)
    runs = plan(suite, tmp_path, seeds=3)
    per = {}
    for r in runs:
        per.setdefault(r.method, set()).add(r.seed)
    assert per == {REFERENCE: {0, 1, 2}, "ce": {0, 1, 2}, "ours": {0}}
    for bad in ({"nope": 1}, {"ours": 0}, {"ours": True}, ["ours"]):
        with pytest.raises(UserError, match="method_seeds"):
            suite_from_dict({**tiny_suite(), "method_seeds": bad})


@pytest.mark.parametrize("line, needle", [
    ("{not json", "line 1 is not valid JSON"),
    ('{"setting": "A", "method": "ce", "seed": "x", "config": {}}', "line 1 is not a run record"),
    ('["a list"]', "line 1 is not a run record"),
])
def test_damaged_run_records_are_a_one_line_error(line, needle, tmp_path):
    (tmp_path / "runs.jsonl").write_text(line + "\n")
    with pytest.raises(UserError, match=needle) as info:
        bench.load_records(tmp_path)
    assert "runs.jsonl" in str(info.value) and "\n" not in str(info.value)
