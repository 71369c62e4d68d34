"""Benchmark suites: methods × noise settings × seeds, each an ordinary run, one results table.

A suite is a YAML file (the built-in ones live in ``labelrefine/bench/suites/``; ``labelrefine bench
--list`` shows them, and any path to a suite file works too)::

    name: cpu-cifar10
    title: CIFAR-10 (JPEG copy), CPU profile
    budget_minutes: 60          # what the profile is sized for (reported, never enforced)
    methods: all                # or a list of registered names
    reference: true             # also run CE on the clean labels (the R = acc / clean-CE column)
    settings:                   # the table's columns
      - {name: IDN-20%, set: [data.noise=idn, data.noise_rate=0.2]}
    method_overrides:           # optional per-method --set lists
      jocor: [epochs=10]
    method_seeds:               # optional: at most this many seeds for a method (costly ones)
      dividemix: 1
    config: {...}               # the base run config (see labelrefine.config)

Run ``r`` of a suite lives in ``OUT/runs/<setting>/<method>/seed<k>/`` with every artifact of an
ordinary ``labelrefine run``. A run whose ``summary.json`` (a run's last write: its completion
marker) has the config hash of the planned run is reused; an unfinished one is resumed from its
checkpoint; one that was made with another config is an error unless ``--overwrite``.
``OUT/results.csv``, ``OUT/results.md``, ``OUT/results.png`` and ``OUT/runs.jsonl`` (one record
per finished run, with its config) are rewritten (atomically) after every run; a recorded run
whose directory is gone (a fresh clone) is not run again.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import platform
import re
import shlex
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..config import (
    RunConfig,
    apply_overrides,
    config_difference,
    config_from_dict,
    config_hash,
    config_to_dict,
    read_yaml_file,
    yaml_load,
)
from ..errors import TrainingDiverged, UserError, short_repr
from ..io import write_text
from ..rundir import FINISHED_MARKER

log = logging.getLogger("labelrefine")

REFERENCE = "ce_clean"  # the method column name of the clean-label CE reference
REFERENCE_SETTING = "clean"
SUITE_KEYS = {"name", "title", "description", "budget_minutes", "methods", "reference", "settings",
              "method_overrides", "method_seeds", "config", "profile_notes"}


def registered_phases() -> tuple[str, ...]:
    """Every phase name a registered method declares (``Method.phases``), once each: ``ours``'
    phases first, in its order, then the other methods' new ones in registry order."""
    from ..methods import list_methods

    methods = sorted(list_methods(), key=lambda m: m.name != "ours")  # stable: registry order otherwise
    return tuple(dict.fromkeys(p for m in methods for p in m.phases))


# Order of the per-phase wall-time columns (phases a method does not have stay empty).
PHASES = registered_phases()


@dataclass
class Setting:
    name: str
    overrides: list[str]

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "setting"


@dataclass
class Suite:
    name: str
    title: str
    settings: list[Setting]
    methods: list[str]
    config: dict[str, Any]
    reference: bool = True
    budget_minutes: float | None = None
    description: str = ""
    profile_notes: list[str] = field(default_factory=list)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    method_seeds: dict[str, int] = field(default_factory=dict)  # method -> at most this many seeds
    source: str = ""


@dataclass
class PlannedRun:
    setting: Setting
    method: str  # a registered method, or REFERENCE
    seed: int
    cfg: RunConfig
    out: Path

    @property
    def label(self) -> str:
        return f"{self.setting.name} / {self.method} / seed {self.seed}"


# ---------------------------------------------------------------------------------------------
# Suites


def builtin_suites() -> dict[str, Path]:
    """Name → path of the suite files shipped with the package."""
    root = resources.files("labelrefine.bench") / "suites"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def load_suite(name_or_path: str):
    """A built-in suite by name, or a suite YAML file by path: a :class:`Suite`, or a
    :class:`~labelrefine.bench.detect.DetectSuite` for ``kind: detect``."""
    suites = builtin_suites()
    if name_or_path in suites:
        path = suites[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"unknown suite {name_or_path!r}: not a built-in suite ({', '.join(sorted(suites))}) "
                            f"and not a suite file")
    data = read_yaml_file(path, "suite file")
    from .detect import detect_suite_from_dict, is_detect_suite

    if is_detect_suite(data):  # kind: detect (labelrefine.bench.detect)
        return detect_suite_from_dict(data, str(path))
    return suite_from_dict(data, str(path))


def suite_from_dict(data: Any, source: str = "<dict>") -> Suite:
    from ..methods import list_methods

    def bad(msg: str) -> UserError:
        return UserError(f"suite {source}: {msg}")

    if not isinstance(data, dict):
        raise bad("must be a mapping")
    unknown = sorted(set(data) - SUITE_KEYS, key=str)  # YAML keys may be ints, bools or null too
    if unknown:
        raise bad(f"unknown key {short_repr(unknown[0])}; known: {', '.join(sorted(SUITE_KEYS))}")
    for key in ("name", "settings", "config"):
        if key not in data:
            raise bad(f"missing key {key!r}")
    registered = [m.name for m in list_methods()]
    methods = data.get("methods", "all")
    if methods == "all":
        methods = registered
    if not isinstance(methods, list) or not methods:
        raise bad("'methods' must be 'all' or a non-empty list of method names")
    for m in methods:
        if m not in registered:
            raise bad(f"unknown method {short_repr(m)}; registered: {', '.join(registered)}")
    settings = parse_settings(data["settings"], bad)
    slugs = [s.slug for s in settings]
    if len(set(slugs)) != len(slugs) or REFERENCE_SETTING in slugs:
        raise bad(f"setting names must be distinct and not {REFERENCE_SETTING!r}: "
                  f"{short_repr([s.name for s in settings])}")
    overrides = data.get("method_overrides") or {}
    if not isinstance(overrides, dict):
        raise bad("'method_overrides' must map method names to KEY=VALUE lists")
    for m, items in overrides.items():
        if m not in registered and m != REFERENCE:
            raise bad(f"method_overrides: unknown method {short_repr(m)}")
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise bad(f"method_overrides.{m} must be a list of KEY=VALUE strings")
    method_seeds = data.get("method_seeds") or {}
    if not isinstance(method_seeds, dict):
        raise bad("'method_seeds' must map method names to seed counts")
    for m, n in method_seeds.items():
        if m not in registered:
            raise bad(f"method_seeds: unknown method {short_repr(m)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad(f"method_seeds.{m} must be an integer >= 1, got {short_repr(n)}")
    budget, notes = common_fields(data, bad)
    if not isinstance(data.get("reference", True), bool):
        raise bad(f"'reference' must be true or false, got {short_repr(data['reference'])}")
    return Suite(
        name=str(data["name"]), title=str(data.get("title", data["name"])), settings=settings, methods=methods,
        config=data["config"], reference=data.get("reference", True),
        budget_minutes=budget, description=str(data.get("description", "")).strip(),
        profile_notes=[str(x) for x in notes],
        method_overrides={k: [str(x) for x in v] for k, v in overrides.items()}, source=source,
        method_seeds=dict(method_seeds),
    )


def run_config(suite: Suite, setting: Setting, method: str, seed: int, user_overrides: list[str]) -> RunConfig:
    """The resolved config of one run: suite config < setting < method overrides < seed < --set."""
    data = copy.deepcopy(suite.config)
    items = list(setting.overrides)
    if method == REFERENCE:
        items += [*suite.method_overrides.get("ce", []), *suite.method_overrides.get(REFERENCE, []),
                  "method=ce", "data.noise=none"]
    else:
        items += [*suite.method_overrides.get(method, []), f"method={method}"]
    items += [f"seed={seed}", f"data.noise_seed={seed}", *user_overrides]
    try:
        return config_from_dict(apply_overrides(data, items))
    except UserError as e:
        raise UserError(f"suite {_cut(suite.name)}, {_cut(setting.name)} / {method}: {e}") from None


def _cut(text: str, limit: int = 60) -> str:
    """A name from a suite file, shortened for an error message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def select_settings(suite_name: str, settings: list[Setting], wanted: list[str] | None) -> list[Setting]:
    """The settings ``--settings`` names (by name or slug), in the suite's order; all without it."""
    if not wanted:
        return settings
    known = {key: s for s in settings for key in (s.name, s.slug)}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise UserError(f"--settings: {short_repr(unknown[0])} is not a setting of suite {suite_name} "
                        f"({', '.join(s.name for s in settings)})")
    ids = {id(known[name]) for name in wanted}
    return [s for s in settings if id(s) in ids]


def parse_settings(raw: Any, bad) -> list[Setting]:
    """A suite file's ``settings`` list; ``bad(message)`` builds the error naming the file."""
    if not isinstance(raw, list) or not raw:
        raise bad("'settings' must be a non-empty list")
    settings = []
    for i, s in enumerate(raw):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("set", []), list):
            raise bad(f"settings[{i}] must be a mapping with a 'name' and a 'set' list of KEY=VALUE strings")
        settings.append(Setting(s["name"], [str(x) for x in s.get("set", [])]))
    return settings


def common_fields(data: dict, bad) -> tuple[float | None, list]:
    """Checks of what every suite kind has: ``config`` (a mapping), ``budget_minutes`` and
    ``profile_notes``; returns the last two."""
    if not isinstance(data["config"], dict):
        raise bad("'config' must be a mapping (a run config)")
    budget = data.get("budget_minutes")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0 < budget < math.inf):
        raise bad(f"'budget_minutes' must be a number of minutes in (0, inf), got {short_repr(budget)}")
    notes = data.get("profile_notes", [])
    if not isinstance(notes, list):
        raise bad(f"'profile_notes' must be a list, got {short_repr(notes)}")
    return budget, notes


def plan(suite: Suite, out: Path, *, seeds: int, methods: list[str] | None = None,
         user_overrides: list[str] | None = None, settings: list[str] | None = None) -> list[PlannedRun]:
    """Every run of the suite, the clean reference first, then setting by setting.

    ``methods`` / ``settings`` keep only those methods / noise settings (by name or slug); the
    clean reference is always planned.
    """
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: need at least 1")
    chosen = suite.methods
    if methods:
        unknown = [m for m in methods if m not in suite.methods]
        if unknown:
            raise UserError(f"--methods: {short_repr(unknown[0])} is not in suite {suite.name} "
                            f"({', '.join(suite.methods)})")
        chosen = [m for m in suite.methods if m in methods]
    chosen_settings = select_settings(suite.name, suite.settings, settings)
    user = list(user_overrides or [])
    runs: list[PlannedRun] = []
    for seed in range(seeds):
        if suite.reference:
            ref = Setting("clean labels", [])
            runs.append(PlannedRun(ref, REFERENCE, seed, run_config(suite, suite.settings[0], REFERENCE, seed, user),
                                   out / "runs" / REFERENCE_SETTING / "ce" / f"seed{seed}"))
        for s in chosen_settings:
            for m in chosen:
                if seed >= suite.method_seeds.get(m, seeds):
                    continue
                runs.append(PlannedRun(s, m, seed, run_config(suite, s, m, seed, user),
                                       out / "runs" / s.slug / m / f"seed{seed}"))
    return runs


# ---------------------------------------------------------------------------------------------
# Running


RECORDS = "runs.jsonl"  # in the suite's --out: one JSON record per finished run (its row + its config)


def load_records(out: Path) -> dict[tuple[str, str, int], dict]:
    """The finished runs recorded in ``out/runs.jsonl``, by (setting, method, seed).

    The records are what a suite keeps when its run directories are gone (a fresh clone keeps
    ``results.*`` and ``runs.jsonl`` but not ``runs/``): a recorded run with today's config is
    not run again, so a long suite may span sessions.
    """
    path = out / RECORDS
    records: dict[tuple[str, str, int], dict] = {}
    for n, rec in json_lines(path):
        if (not isinstance(rec, dict) or not {"setting", "method", "seed", "config"} <= set(rec)
                or not isinstance(rec["seed"], int) or isinstance(rec["seed"], bool)
                or not isinstance(rec["setting"], str) or not isinstance(rec["method"], str)):
            raise UserError(f"{path}: line {n} is not a run record (setting, method, integer seed, config)")
        records[(str(rec["setting"]), str(rec["method"]), int(rec["seed"]))] = rec
    return records


def json_lines(path: Path):
    """``(line number, value)`` of each non-blank line of a JSON-lines file (none if it is absent);
    a line that is not JSON is an error naming the file and line."""
    if not path.is_file():
        return
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}: line {n} is not valid JSON") from None


def same_run(stored: Any, cfg: RunConfig) -> bool:
    """Whether a stored config (a run's ``config.yaml`` or a record's, as parsed) made the run
    ``cfg`` asks for: options added since it was written count at their defaults, and the
    ``detect`` options that only choose among the recorded scores
    (:data:`labelrefine.detect.POST_HOC_KEYS`) are not compared, so a change of the detection
    defaults re-runs nothing (a record's own label-issue columns keep the values it was made with)."""
    from ..detect import POST_HOC_KEYS

    return config_difference(stored, cfg, ignore=POST_HOC_KEYS) is None


def _recorded(r: PlannedRun, records: dict[tuple[str, str, int], dict]) -> dict | None:
    """``r``'s record when it was made with ``r``'s config (:func:`same_run`)."""
    rec = records.get((r.setting.name, r.method, r.seed))
    if rec is not None and same_run(rec["config"], r.cfg):
        return rec
    return None


def _status(r: PlannedRun, records: dict[tuple[str, str, int], dict] | None = None) -> str:
    """cached | recorded | resume | new | stale (another config; an error unless overwrite).

    Finished means ``summary.json`` exists: a run writes it after every other artifact.
    ``recorded``: no run directory, but a record in ``runs.jsonl`` with this config.
    """
    summary = r.out / FINISHED_MARKER
    if summary.is_file():
        try:
            done = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("config_hash") == config_hash(r.cfg) or _same_config(r) is True:
            return "cached"
        return "stale"
    if (r.out / "config.yaml").exists():
        same = _same_config(r)
        return "resume" if same is None or same else "stale"  # None: damaged, the resume names the file
    if _recorded(r, records or {}) is not None:  # only when the run's directory is gone
        return "recorded"
    return "new"


def read_run_config(out: Path) -> dict | None:
    """A run directory's ``config.yaml``, parsed; ``None`` when it cannot be read or parsed."""
    try:
        stored = yaml_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return stored if isinstance(stored, dict) else None


def _same_config(r: PlannedRun) -> bool | None:
    """Whether the run directory's ``config.yaml`` is ``r``'s config (:func:`same_run`); ``None``
    when the file cannot be read or parsed."""
    stored = read_run_config(r.out)
    return None if stored is None else same_run(stored, r.cfg)


def _check_plan(suite: Suite, out: Path, *, seeds: int, methods: list[str] | None,
                user_overrides: list[str] | None, overwrite: bool,
                settings: list[str] | None = None) -> tuple[list[PlannedRun], list[str]]:
    """The planned runs and their statuses; an error if one is stale and not ``overwrite``."""
    runs = plan(suite, out, seeds=seeds, methods=methods, user_overrides=user_overrides, settings=settings)
    records = load_records(out)
    statuses = [_status(r, records) for r in runs]
    stale = [r for r, s in zip(runs, statuses, strict=True) if s == "stale"]
    if stale and not overwrite:
        raise UserError(f"{stale[0].out} holds a run made with another config; pass --overwrite to rerun "
                        f"({len(stale)} such run(s)) or choose another --out")
    todo = sum(s not in ("cached", "recorded") for s in statuses)
    log.info("suite %s: %d runs (%d cached, %d to run) -> %s", suite.name, len(runs), len(runs) - todo, todo, out)
    return runs, statuses


def dry_run(suite: Suite, out: str | Path, *, seeds: int = 1, methods: list[str] | None = None,
            user_overrides: list[str] | None = None, overwrite: bool = False,
            settings: list[str] | None = None) -> str:
    """What :func:`run_suite` would do, one line per planned run (status, label, config hash,
    directory); nothing is run or written."""
    runs, statuses = _check_plan(suite, Path(out), seeds=seeds, methods=methods, user_overrides=user_overrides,
                                 overwrite=overwrite, settings=settings)
    return "\n".join(f"{s:>7}  {r.label:<45} {config_hash(r.cfg)}  {r.out}"
                     for r, s in zip(runs, statuses, strict=True))


def equivalent_command(suite: Suite, out: str | Path, *, seeds: int = 1, methods: list[str] | None = None,
                       user_overrides: list[str] | None = None, overwrite: bool = False,
                       settings: list[str] | None = None) -> str:
    """The ``labelrefine bench`` command line of a :func:`run_suite` call (for ``results.md``
    when the caller gives none)."""
    builtin = builtin_suites().get(suite.name)
    is_file = bool(suite.source) and Path(suite.source).is_file()
    name = suite.source if is_file and (builtin is None or str(builtin) != suite.source) else suite.name
    parts = [name, "--out", str(out)]
    if seeds != 1:
        parts += ["--seeds", str(seeds)]
    if methods:
        parts += ["--methods", ",".join(methods)]
    if settings:
        parts += ["--settings", ",".join(settings)]
    for item in user_overrides or []:
        parts += ["--set", item]
    if overwrite:
        parts.append("--overwrite")
    return "labelrefine bench " + " ".join(shlex.quote(p) for p in parts)


def run_suite(suite: Suite, out: str | Path, *, seeds: int = 1, methods: list[str] | None = None,
              user_overrides: list[str] | None = None, overwrite: bool = False,
              command: str | None = None, settings: list[str] | None = None) -> list[dict]:
    """Run (or reuse) every planned run and write the results files; returns the result rows.

    ``command`` is the command line ``results.md`` shows (default: :func:`equivalent_command`).
    The results files cover the whole suite at ``seeds`` seeds, whatever ``methods`` and
    ``settings`` chose to run: runs of the others are shown from their directories or records
    (``pending`` when there is neither), so a partial invocation does not shrink the table.
    """
    from ..pipeline import run

    out = Path(out)
    runs, statuses = _check_plan(suite, out, seeds=seeds, methods=methods, user_overrides=user_overrides,
                                 overwrite=overwrite, settings=settings)
    command = command or equivalent_command(suite, out, seeds=seeds, methods=methods,
                                            user_overrides=user_overrides, overwrite=overwrite, settings=settings)
    table = runs
    if methods or settings:
        table = plan(suite, out, seeds=seeds, user_overrides=user_overrides)
    chosen = {r.out: k for k, r in enumerate(runs)}
    # A run outside this invocation whose directory holds another config is not shown as finished.
    outside = {t: "stale" for t, r in enumerate(table) if r.out not in chosen and _status(r) == "stale"}
    failures: dict[int, str] = {}

    def table_failures() -> dict[int, str]:
        by_out = {runs[k].out: v for k, v in failures.items()}
        return {**outside, **{t: by_out[r.out] for t, r in enumerate(table) if r.out in by_out}}

    t0 = time.perf_counter()
    for k, (r, s) in enumerate(zip(runs, statuses, strict=True)):
        if s in ("cached", "recorded"):
            log.info("[%d/%d] %s: %s", k + 1, len(runs), r.label, s)
            continue
        log.info("[%d/%d] %s: %s", k + 1, len(runs), r.label, {"new": "running", "resume": "resuming",
                                                                 "stale": "re-running (--overwrite)"}[s])
        try:
            run(r.cfg, r.out, resume=s == "resume", overwrite=s == "stale")
        except TrainingDiverged as e:
            log.error("%s: %s", r.label, e)
            failures[k] = "diverged"
        except UserError as e:  # one run's bad setting must not stop the others
            log.error("%s: %s", r.label, e)
            failures[k] = "error"
        write_results(suite, out, table, table_failures(), command=command, seeds=seeds)
    rows = write_results(suite, out, table, table_failures(), command=command, seeds=seeds)
    log.info("suite %s: done in %.1f min (this invocation); results in %s", suite.name,
             (time.perf_counter() - t0) / 60, out / "results.md")
    if failures:
        raise UserError(f"suite {suite.name}: {len(failures)} run(s) failed: "
                        + ", ".join(f"{runs[k].label} ({v})" for k, v in failures.items())
                        + f"; the others are in {out / 'results.md'}")
    return rows


# ---------------------------------------------------------------------------------------------
# Results


def _row(suite: Suite, r: PlannedRun, status: str) -> dict[str, Any]:
    row: dict[str, Any] = {"suite": suite.name, "setting": r.setting.name, "method": r.method, "seed": r.seed,
                           "status": status}
    path = r.out / "summary.json"
    if not path.is_file():
        return row
    s = json.loads(path.read_text(encoding="utf-8"))
    noise = s["noise"]
    sec = s["seconds"]
    row.update({
        "dataset": s["dataset"], "data": s["data"], "noise_type": noise["type"],
        "requested_rate": noise["requested_rate"], "achieved_rate": noise["achieved_rate"],
        "n_train": s["n_train"], "n_val": s["n_val"], "n_test": s["n_test"],
        "final_test_acc": s["final_test_acc"], "best_val_test_acc": s["best_val_test_acc"],
        "best_val_acc": s["best_val_acc"], "best_val_epoch": s["best_val_epoch"],
        "train_label_acc_before": s.get("train_label_acc_before"),
        "train_label_acc_after": s.get("train_label_acc_after"),
        "issue_precision": s.get("issue_precision"), "issue_recall": s.get("issue_recall"),
        "seconds_data": sec.get("data"),
        **{f"seconds_{p}": sec.get(p) for p in PHASES},
        "seconds_total": sec.get("total_training"),
        "ssl_knn_test_acc": s.get("ssl_knn_test_acc"),
        "config_hash": s["config_hash"], "code_version": s["code_version"], "device": s.get("device"),
        "cpu": s.get("cpu"),
        "run_dir": str(r.out), "finished_at": s.get("finished_at"), "status": "ok",
    })
    return row


COLUMNS = ["suite", "dataset", "setting", "noise_type", "requested_rate", "achieved_rate", "method", "seed",
           "status", "final_test_acc", "best_val_test_acc", "best_val_acc", "best_val_epoch", "r_final",
           "r_best_val", "train_label_acc_before", "train_label_acc_after", "issue_precision", "issue_recall",
           "ssl_knn_test_acc", "n_train", "n_val", "n_test", "seconds_data", *[f"seconds_{p}" for p in PHASES],
           "seconds_total", "config_hash", "code_version", "device", "cpu", "finished_at", "data", "run_dir"]


def collect(suite: Suite, runs: list[PlannedRun], failures: dict[int, str] | None = None,
            records: dict[tuple[str, str, int], dict] | None = None) -> list[dict]:
    """One row per planned run (finished, recorded or not), with R against the clean reference of its seed."""
    failures, records = failures or {}, records or {}
    rows = []
    for k, r in enumerate(runs):
        row = _row(suite, r, failures.get(k, "pending"))
        rec = _recorded(r, records) if row["status"] != "ok" and k not in failures else None
        rows.append(row if rec is None else {c: v for c, v in rec.items() if c != "config"})
    clean = {row["seed"]: row for row in rows if row["method"] == REFERENCE and row["status"] == "ok"}
    for row in rows:
        ref = clean.get(row["seed"])
        for key, rkey in (("final_test_acc", "r_final"), ("best_val_test_acc", "r_best_val")):
            v, c = row.get(key), None if ref is None else ref.get(key)
            row[rkey] = v / c if v is not None and c else None
    return rows


def _fmt_csv(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def write_results(suite: Suite, out: Path, runs: list[PlannedRun], failures: dict[int, str] | None = None, *,
                  command: str, seeds: int) -> list[dict]:
    records = load_records(out)
    rows = collect(suite, runs, failures, records)
    for r, row in zip(runs, rows, strict=True):
        key = (r.setting.name, r.method, r.seed)
        if row["status"] == "ok" and (r.out / FINISHED_MARKER).is_file():  # (a recorded row keeps its record)
            # the config the run was made with (its config.yaml), not today's resolution of it
            records[key] = {**row, "config": read_run_config(r.out) or config_to_dict(r.cfg)}
    write_text(out / RECORDS, "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in records.values()))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _fmt_csv(row.get(k)) for k in COLUMNS})
    write_text(out / "results.csv", buf.getvalue())
    write_text(out / "results.md", results_markdown(suite, rows, command=command, seeds=seeds))
    try:
        write_chart(suite, rows, out / "results.png")
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency
        log.warning("chart skipped: %s", e)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _cells(rows: list[dict], key: str) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(setting, method) → (mean, std, n) of ``key`` over the finished seeds."""
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get(key) is not None:
            groups.setdefault((row["setting"], row["method"]), []).append(float(row[key]))
    return {k: (*_mean_std(v), len(v)) for k, v in groups.items()}


def _machine(rows: list[dict]) -> str:
    import torch

    from ..artifacts import cpu_name

    devices = sorted({str(r.get("device")) for r in rows if r.get("device")})
    # The CPUs the runs recorded (a suite may span machines); runs from before the field say nothing.
    cpus = sorted({str(r["cpu"]) for r in rows if r.get("cpu")})
    unknown = sum(1 for r in rows if not r.get("cpu"))
    cpu = "; ".join(cpus) if cpus else "not recorded by the runs"
    if cpus and unknown:
        cpu += f"; {unknown} run(s) from before CPUs were recorded"
    return (f"{platform.system()} {platform.machine()}, runs on: {cpu}; this table written on {cpu_name()}, "
            f"{os.cpu_count()} logical CPUs, torch {torch.__version__}, device {', '.join(devices) or '-'}")


def _dates(rows: list[dict]) -> str:
    """The UTC days the finished runs ended on (from their summaries, so re-rendering is stable)."""
    days = sorted({str(r["finished_at"])[:10] for r in rows if r.get("finished_at")})
    if not days:
        return "-"
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def results_markdown(suite: Suite, rows: list[dict], *, command: str, seeds: int) -> str:
    settings = [s.name for s in suite.settings]
    methods = [m for m in suite.methods if any(r["method"] == m for r in rows)]
    lines = _md_head(suite, rows, command=command, seeds=seeds)
    lines += _accuracy_table(rows, settings, methods, "final_test_acc", "r_final",
                             "Test accuracy (%), final epoch — R = accuracy ÷ clean-label CE accuracy; bold = best")
    lines += _accuracy_table(rows, settings, methods, "best_val_test_acc", "r_best_val",
                             "Test accuracy (%) of the epoch with the best noisy-validation accuracy")
    lines += _md_where_ours_stands(rows, settings, methods)
    lines += _md_label_accuracy(rows, settings, methods)
    lines += _md_wall_time(rows, settings, methods)
    return "\n".join(lines)


def _md_head(suite: Suite, rows: list[dict], *, command: str, seeds: int) -> list[str]:
    """Title, description, how the table was made, the profile notes and what is not finished."""
    finished = [r for r in rows if r["status"] == "ok"]
    versions = sorted({r["code_version"] for r in finished})
    total = sum(float(r["seconds_data"] or 0) + float(r["seconds_total"] or 0) for r in finished)
    lines = [f"# {suite.title} (`{suite.name}`)", ""]
    if suite.description:
        lines += [suite.description, ""]
    lines += [
        f"- Command: `{command}`",
        f"- Machine: {_machine(finished)}",
        f"- Date: {_dates(finished)}; code {', '.join(versions) or '-'}",
        f"- Seeds: {seeds} (training seed = noise seed = 0..{seeds - 1}); cells are mean ± std over seeds"
        + "".join(f"; `{m}` at most {n}" for m, n in suite.method_seeds.items() if n < seeds),
        f"- Runs finished: {len(finished)} of {len(rows)}; summed run wall time {total / 60:.1f} min"
        + (f" (profile sized for ≤ {suite.budget_minutes} min)" if suite.budget_minutes else ""),
        "",
    ]
    for note in suite.profile_notes:
        lines.append(f"  - {note}")
    if suite.profile_notes:
        lines.append("")
    pending = [r for r in rows if r["status"] != "ok"]
    if pending:
        lines += [f"**Incomplete:** {len(pending)} run(s) not finished: "
                  + ", ".join(f"{r['setting']} / {r['method']} / seed {r['seed']} ({r['status']})" for r in pending[:8])
                  + (" …" if len(pending) > 8 else ""), ""]
    return lines


def _accuracy_table(rows: list[dict], settings: list[str], methods: list[str], key: str, rkey: str,
                    title: str) -> list[str]:
    """Mean ± std of ``key`` (and R, ``rkey``) per method and setting, the clean reference first;
    the best method of a setting in bold."""
    ref = _cells(rows, key).get(("clean labels", REFERENCE))
    rates = _cells(rows, "achieved_rate")
    cells, rcells = _cells(rows, key), _cells(rows, rkey)
    head = []
    for s in settings:
        rate = next((v for (ss, _), v in rates.items() if ss == s), None)
        head.append(f"{s}" + (f" ({100 * rate[0]:.1f}% noisy)" if rate else ""))
    out = [f"## {title}", "", "| Method | " + " | ".join(head) + " |", "|---|" + "---|" * len(settings)]
    if ref is not None:
        out.append("| CE on clean labels (reference) | " + " | ".join(
            [f"{100 * ref[0]:.2f} ± {100 * ref[1]:.2f}"] * len(settings)) + " |")
    best = {s: max((cells[(s, m)][0] for m in methods if (s, m) in cells), default=None) for s in settings}
    for m in methods:
        row = [f"`{m}`"]
        for s in settings:
            c = cells.get((s, m))
            if c is None:
                row.append("—")
                continue
            txt = f"{100 * c[0]:.2f} ± {100 * c[1]:.2f}" if c[2] > 1 else f"{100 * c[0]:.2f} (1 seed)"
            if (s, m) in rcells:
                txt += f" (R {rcells[(s, m)][0]:.2f})"
            if best[s] is not None and c[0] == best[s]:
                txt = f"**{txt}**"
            row.append(txt)
        out.append("| " + " | ".join(row) + " |")
    return [*out, ""]


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float | None, float | None]:
    """Mean of the paired differences ``a - b`` and its 95% Student-t interval (None for one pair)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, sd = _mean_std(d)
    if len(d) < 2:
        return m, None, None
    from scipy.stats import t

    half = float(t.ppf(0.975, len(d) - 1)) * sd / math.sqrt(len(d))
    return m, m - half, m + half


def _md_where_ours_stands(rows: list[dict], settings: list[str], methods: list[str]) -> list[str]:
    """Per setting and method: ``ours`` minus it, paired over the seeds both finished, with a 95%
    interval; an interval that contains 0 is a tie, said in words."""
    if "ours" not in methods:
        return []
    by: dict[tuple[str, str], dict[int, float]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get("final_test_acc") is not None:
            by.setdefault((row["setting"], row["method"]), {})[int(row["seed"])] = float(row["final_test_acc"])
    lines = ["## `ours` against each method: paired difference over seeds (final-epoch test accuracy)", "",
             "Each seed pairs the two methods on the same noisy labels; the interval is a 95% Student-t "
             "interval of the mean difference. An interval containing 0 is a tie.", "",
             "| Setting | ours − method | seeds | difference (points) | 95% interval | verdict |",
             "|---|---|---|---|---|---|"]
    for s in settings:
        mine = by.get((s, "ours"), {})
        for m in methods:
            other = by.get((s, m), {})
            seeds = sorted(set(mine) & set(other))
            if m == "ours" or not seeds:
                continue
            d, lo, hi = paired_difference([mine[k] for k in seeds], [other[k] for k in seeds])
            if lo is None:
                interval, verdict = "-", "one seed: no interval, not evidence either way"
            elif lo <= 0 <= hi:
                interval, verdict = f"[{100 * lo:+.2f}, {100 * hi:+.2f}]", "tie"
            else:
                interval = f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
                verdict = "`ours` better" if d > 0 else "`ours` worse"
            lines.append(f"| {s} | `{m}` | {len(seeds)} | {100 * d:+.2f} | {interval} | {verdict} |")
    lines.append("")
    return lines


def _md_label_accuracy(rows: list[dict], settings: list[str], methods: list[str]) -> list[str]:
    """Training-label accuracy before → after, for the methods whose final labels differ from the given ones."""
    before, after = _cells(rows, "train_label_acc_before"), _cells(rows, "train_label_acc_after")
    relabel = [m for m in methods if any(after.get((s, m), (None,))[0] != before.get((s, m), (None,))[0]
                                         for s in settings if (s, m) in after)]
    if not relabel:
        return []
    lines = ["## Training-label accuracy (%): the given labels → the method's final labels", "",
             "`ours`: its refined training labels; `ours_dividemix` and the baselines: the final model's "
             "predictions on the training images. Against the clean labels.", "",
             "| Method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for m in relabel:
        cellsx = []
        for s in settings:
            b, a = before.get((s, m)), after.get((s, m))
            cellsx.append("—" if a is None else f"{100 * b[0]:.2f} → {100 * a[0]:.2f}")
        lines.append(f"| `{m}` | " + " | ".join(cellsx) + " |")
    lines.append("")
    return lines


def _md_wall_time(rows: list[dict], settings: list[str], methods: list[str]) -> list[str]:
    """Mean wall time (data + training) of a run per method and setting."""
    wall: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["status"] == "ok":
            wall.setdefault((r["setting"], r["method"]), []).append(float(r["seconds_data"] or 0) +
                                                                    float(r["seconds_total"] or 0))
    lines = ["## Wall time per run (minutes, data + training)", "",
             "| Method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    if ("clean labels", REFERENCE) in wall:
        v = wall[("clean labels", REFERENCE)]
        lines.append("| CE on clean labels (reference) | " + " | ".join([f"{sum(v) / len(v) / 60:.1f}"] * len(settings))
                     + " |")
    for m in methods:
        lines.append(f"| `{m}` | " + " | ".join(
            "—" if (s, m) not in wall else f"{sum(wall[(s, m)]) / len(wall[(s, m)]) / 60:.1f}" for s in settings)
            + " |")
    lines.append("")
    return lines


def write_chart(suite: Suite, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    settings = [s.name for s in suite.settings]
    methods = [m for m in suite.methods if any(r["method"] == m for r in rows)]
    cells = _cells(rows, "final_test_acc")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.45 * len(methods) * len(settings)), 3.8))
    width = 0.8 / max(len(methods), 1)
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(settings))]
        ys = [100 * cells[(s, m)][0] if (s, m) in cells else float("nan") for s in settings]
        es = [100 * cells[(s, m)][1] if (s, m) in cells else 0.0 for s in settings]
        ax.bar(xs, ys, width, yerr=es, label=m, color=cmap(j % 10), edgecolor="black" if m == "ours" else None,
               linewidth=1.2 if m == "ours" else 0)
    ref = cells.get(("clean labels", REFERENCE))
    if ref is not None:
        ax.axhline(100 * ref[0], color="black", ls="--", lw=1, label="CE, clean labels")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(suite.title, fontsize=10)
    ax.legend(fontsize=7, ncol=min(len(methods) + 1, 5), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
