"""Detection suites (``detect-*``): how well each label-error detector finds the wrong labels,
against cleanlab on the same samples, in one invocation on one machine.

A detection suite is a suite YAML file with ``kind: detect``::

    name: detect-pneumonia
    kind: detect
    title: ...
    folds: 5                    # cleanlab's cross-validation folds
    cleanlab_ssl: true          # also cleanlab on SimCLR-initialised fold models (ce_ssl)
    subset_per_seed: false      # true: seed k also draws the training subset (data.subset_seed=k)
    settings: [{name: IDN-20%, set: [data.noise=idn, data.noise_rate=0.2]}]
    config: {...}               # the run config of ``ours`` (what ``labelrefine clean`` runs)

For each setting and seed (a *unit*, in ``OUT/runs/<setting>/seed<k>/``):

1. ``ours/``: one ordinary run of ``ours``; its ``labels.csv`` holds every detector's score
   (:data:`labelrefine.detect.DETECTORS`) and the summary the estimated number of wrong labels.
2. ``cleanlab/fold<i>/``: cleanlab's recipe with our engine: out-of-fold predicted probabilities
   from ``folds`` stratified folds of the same training samples (on their noisy labels), each
   fold's model trained as plain CE with ours' backbone, recipe and supervised epochs (``model.pt``:
   its best epoch on its own noisy validation split); then ``cleanlab.filter.find_label_issues``
   flags, and the out-of-fold self-confidence ranks.
3. ``cleanlab_ssl/fold<i>/``: the same with CE from ours' SimCLR encoder (pretrained once on every
   training image, label-free, and shared through the encoder cache), so cleanlab gets our
   features too.

The clean labels (synthetic noise, or a clean column) are read only here, by the evaluation.
Metrics per detector: AUROC and AUPRC of the ranking, precision/recall/F1 of the flagged set,
precision at k = the number of wrong labels and at 50/100/200, the training-label accuracy after
the flagged labels are replaced by the detector's suggestions, and wall time (ours: its run plus
its SimCLR pretraining, cached or not; cleanlab: its fold runs, predictions and
``find_label_issues``). ``OUT/detect.jsonl`` keeps one record per finished unit, so a suite spans
sessions and fresh clones; ``results.md``, ``results.csv`` and ``results.png`` cover every unit.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig, apply_overrides, config_difference, config_from_dict, config_hash, config_to_dict
from ..errors import UserError, short_repr
from ..io import write_text
from .suites import (
    Setting,
    _cut,
    _dates,
    _machine,
    common_fields,
    json_lines,
    paired_difference,
    parse_settings,
    read_run_config,
    same_run,
    select_settings,
)

log = logging.getLogger("labelrefine")

DETECT_KEYS = {"name", "kind", "title", "description", "budget_minutes", "folds", "cleanlab_ssl",
               "subset_per_seed", "settings", "config", "profile_notes"}
RECORDS = "detect.jsonl"
KS = (50, 100, 200)
PRODUCT = "clean (default)"  # the row of what `labelrefine clean` gives with its defaults
CLEANLAB = "cleanlab (k-fold CE)"
CLEANLAB_SSL = "cleanlab (k-fold CE from SimCLR)"
#: Combinations of detector scores measured offline from labels.csv (the mean of the scores, each in [0, 1]).
COMBINATIONS = {
    "mean(self_confidence, knn_ssl)": ("self_confidence", "knn_ssl"),
    "mean(stage_confidence, knn_ssl)": ("stage_confidence", "knn_ssl"),
    "mean(aum, knn_ssl)": ("aum", "knn_ssl"),
    "mean(self_confidence, aum, knn_ssl)": ("self_confidence", "aum", "knn_ssl"),
    "mean(all six)": ("self_confidence", "normalized_margin", "stage_confidence", "aum", "knn_ssl", "knn_model"),
}


@dataclass
class DetectSuite:
    name: str
    title: str
    settings: list[Setting]
    config: dict[str, Any]
    folds: int = 5
    cleanlab_ssl: bool = True
    subset_per_seed: bool = False
    budget_minutes: float | None = None
    description: str = ""
    profile_notes: list[str] = field(default_factory=list)
    source: str = ""


def is_detect_suite(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == "detect"


def detect_suite_from_dict(data: Any, source: str = "<dict>") -> DetectSuite:
    def bad(msg: str) -> UserError:
        return UserError(f"suite {source}: {msg}")

    unknown = sorted(set(data) - DETECT_KEYS, key=str)
    if unknown:
        raise bad(f"unknown key {short_repr(unknown[0])}; known for kind: detect: {', '.join(sorted(DETECT_KEYS))}")
    for key in ("name", "settings", "config"):
        if key not in data:
            raise bad(f"missing key {key!r}")
    settings = parse_settings(data["settings"], bad)
    if len({s.slug for s in settings}) != len(settings):
        raise bad(f"setting names must be distinct: {short_repr([s.name for s in settings])}")
    folds = data.get("folds", 5)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise bad(f"'folds' must be an integer >= 2, got {short_repr(folds)}")
    for key in ("cleanlab_ssl", "subset_per_seed"):
        if not isinstance(data.get(key, False), bool):
            raise bad(f"'{key}' must be true or false, got {short_repr(data[key])}")
    budget, notes = common_fields(data, bad)
    return DetectSuite(name=str(data["name"]), title=str(data.get("title", data["name"])), settings=settings,
                       config=data["config"], folds=folds, cleanlab_ssl=data.get("cleanlab_ssl", True),
                       subset_per_seed=data.get("subset_per_seed", False), budget_minutes=budget,
                       description=str(data.get("description", "")).strip(), profile_notes=[str(x) for x in notes],
                       source=source)


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass
class Unit:
    setting: Setting
    seed: int
    cfg: RunConfig  # the ours run
    out: Path

    @property
    def label(self) -> str:
        return f"{self.setting.name} / seed {self.seed}"


def unit_config(suite: DetectSuite, setting: Setting, seed: int, user: list[str]) -> RunConfig:
    items = [*setting.overrides, "method=ours", f"seed={seed}", f"data.noise_seed={seed}"]
    if suite.subset_per_seed:
        items.append(f"data.subset_seed={seed}")
    try:
        return config_from_dict(apply_overrides(copy.deepcopy(suite.config), [*items, *user]))
    except UserError as e:
        raise UserError(f"suite {_cut(suite.name)}, {_cut(setting.name)}: {e}") from None


def plan_units(suite: DetectSuite, out: Path, *, seeds: int, settings: list[str] | None = None,
               user_overrides: list[str] | None = None) -> list[Unit]:
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: need at least 1")
    chosen = select_settings(suite.name, suite.settings, settings)
    user = list(user_overrides or [])
    return [Unit(s, seed, unit_config(suite, s, seed, user), out / "runs" / s.slug / f"seed{seed}")
            for seed in range(seeds) for s in chosen]


def fold_config(cfg: RunConfig, method: str) -> RunConfig:
    """A cleanlab fold model's config: ours' backbone and recipe as plain CE (or CE from the
    SimCLR encoder) for ours' supervised epochs, on labels that are already the noisy ones."""
    from ..methods.schedule import supervised_budget

    epochs = supervised_budget(dataclasses.replace(cfg, epochs=0))
    return config_from_dict(apply_overrides(config_to_dict(cfg), [
        f"method={method}", "data.noise=none", "data.train_subset=0", f"epochs={epochs}"]))


def load_unit_records(out: Path) -> dict[tuple[str, int], dict]:
    path = out / RECORDS
    records = {}
    for n, rec in json_lines(path):
        if not isinstance(rec, dict) or not {"setting", "seed", "config", "detectors"} <= set(rec):
            raise UserError(f"{path}: line {n} is not a unit record (setting, seed, config, detectors)")
        records[(str(rec["setting"]), int(rec["seed"]))] = rec
    return records


def _recorded(u: Unit, records: dict) -> dict | None:
    rec = records.get((u.setting.name, u.seed))
    return rec if rec is not None and same_run(rec["config"], u.cfg) else None


def unit_status(u: Unit, records: dict) -> str:
    """recorded (its record has this config) | partial (some of its runs exist) | new."""
    if _recorded(u, records) is not None:
        return "recorded"
    return "partial" if u.out.exists() else "new"


# ---------------------------------------------------------------------------------------------
# Running


def _ensure_run(cfg: RunConfig, out: Path, *, data=None, overwrite: bool = False) -> dict:
    """The summary of the run of ``cfg`` in ``out``: reused when finished with this config,
    resumed when unfinished, run otherwise (another config: an error unless ``overwrite``)."""
    from ..pipeline import run
    from ..rundir import FINISHED_MARKER

    summary_path = out / FINISHED_MARKER
    if summary_path.is_file():
        done = json.loads(summary_path.read_text(encoding="utf-8"))
        if done.get("config_hash") == config_hash(cfg) or same_run(read_run_config(out), cfg):
            return done
        if not overwrite:
            raise UserError(f"{out} holds a run with another config; use --overwrite to run it again")
        run(cfg, out, overwrite=True, data=data)
    else:
        run(cfg, out, resume=(out / "config.yaml").exists(), data=data)
    return json.loads(summary_path.read_text(encoding="utf-8"))


def _read_labels(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cross_validated(prep, cfg: RunConfig, method: str, folds: int, seed: int, out: Path,
                     overwrite: bool) -> tuple[np.ndarray, float]:
    """Out-of-fold class probabilities ``(N, C)`` of ``prep.train`` and the seconds they took
    (the fold runs' data + training time, and the predictions)."""
    from sklearn.model_selection import StratifiedKFold

    from ..data import DataSplits
    from ..predict import load_model

    train = prep.train
    y = train.labels.numpy()
    probs = np.full((len(train), train.num_classes), np.nan)
    seconds = 0.0
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fcfg = fold_config(cfg, method)
    for k, (tr, te) in enumerate(splitter.split(np.zeros(len(y)), y)):
        part = train.subset(torch.from_numpy(tr))
        data = DataSplits(prep.name, part, ssl_images=prep.ssl_images)
        summary = _ensure_run(fcfg, out / f"fold{k}", data=data, overwrite=overwrite)
        t0 = time.perf_counter()
        model = load_model(out / f"fold{k}" / "model.pt")
        probs[te] = model.predict_proba(train.images[torch.from_numpy(te)]).double().numpy()
        seconds += summary["seconds"]["data"] + summary["seconds"]["total_training"] + time.perf_counter() - t0
        log.info("%s fold %d/%d: held-out accuracy on the noisy labels %.4f", method, k + 1, folds,
                 float((probs[te].argmax(1) == y[te]).mean()))
    return probs / probs.sum(1, keepdims=True), seconds


def f1_at_count(wrong: np.ndarray, quality: np.ndarray, count: int) -> float:
    """F1 of flagging the ``count`` lowest-quality samples (ties: the earlier sample first)."""
    from ..detect import flag_lowest

    flagged = flag_lowest(torch.from_numpy(np.asarray(quality, dtype=np.float64)), count).numpy()
    hits, n_err, n_flag = int((flagged & wrong).sum()), int(wrong.sum()), int(flagged.sum())
    return 2 * hits / (n_err + n_flag) if n_err + n_flag else 0.0


def detection_metrics(wrong: np.ndarray, quality: np.ndarray, flagged: np.ndarray, suggested: np.ndarray,
                      given: np.ndarray, clean: np.ndarray) -> dict[str, Any]:
    """The metrics of one detector against the known wrong labels (``wrong``: bool ``(N,)``).

    ``quality``: low = suspected (the ranking); ``flagged``: the flagged set; ``suggested``: the
    label that replaces a flagged one.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    n_err = int(wrong.sum())
    order = np.argsort(quality, kind="stable")
    both = 0 < n_err < len(wrong)
    out: dict[str, Any] = {
        "auroc": float(roc_auc_score(wrong, -quality)) if both else None,
        "auprc": float(average_precision_score(wrong, -quality)) if both else None,
        "n_flagged": int(flagged.sum()),
    }
    hits = int((flagged & wrong).sum())
    prec = hits / out["n_flagged"] if out["n_flagged"] else None
    rec = hits / n_err if n_err else None
    out.update(precision=prec, recall=rec, f1=2 * prec * rec / (prec + rec) if prec and rec else 0.0)
    out["p_at_errors"] = float(wrong[order[:n_err]].mean()) if n_err else None
    for k in KS:
        out[f"p_at_{k}"] = float(wrong[order[:k]].mean()) if k <= len(order) else None
    fixed = np.where(flagged, suggested, given)
    out["labels_before"] = float((given == clean).mean())
    out["labels_after"] = float((fixed == clean).mean())
    return out


#: How ours' rows are derived from a finished run; a record derived otherwise is derived again
#: from its runs where they are on disk (2: the product's suggested label is the refined label
#: where it changed, else the model's prediction, as ``labelrefine clean`` suggests).
DERIVATION = 2


def _ours_detectors(u: Unit, prep, summary: dict) -> tuple[dict[str, dict], dict[str, int], np.ndarray]:
    """The metrics of ours' detectors from its finished run, the estimated numbers of wrong
    labels by source, and the wrong-label mask of ``prep.train``."""
    from ..detect import flag_lowest, select_flags, select_quality

    rows = _read_labels(u.out / "ours" / "labels.csv")
    pos = {sid: i for i, sid in enumerate(prep.train.ids)}
    if len(rows) != len(pos) or any(r["id"] not in pos for r in rows):
        raise UserError(f"{u.out / 'ours' / 'labels.csv'}: its samples are not the suite's training samples")
    idx = np.array([pos[r["id"]] for r in rows])
    classes = {c: i for i, c in enumerate(prep.classes)}
    given, clean = prep.train.labels.numpy(), prep.train_clean.numpy()
    wrong = given != clean
    n = len(given)

    def column(name: str) -> np.ndarray:
        out = np.empty(n, dtype=np.float64)
        out[idx] = [float(r[name]) for r in rows]
        return out

    def labels(name: str) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        out[idx] = [classes[r[name]] for r in rows]
        return out

    scores = {name: column(name) for name in rows[0] if _is_detector(name)}
    scores.update({name: np.mean([scores[p] for p in parts], axis=0)
                   for name, parts in COMBINATIONS.items() if all(p in scores for p in parts)})
    predicted, refined = labels("predicted_label"), labels("refined_label")
    by_source = summary.get("estimated_label_issues_by_source") or {"model": summary["estimated_label_issues"]}
    n_est = int(by_source.get(u.cfg.detect.estimate_from, by_source["model"]))
    estimates = {f"ours_{k}": v for k, v in by_source.items()}
    secs = summary["seconds"]
    # A cached encoder's pretraining is not in this run's training time: add what it cost.
    cached_ssl = (secs.get("ssl_pretrain") or 0.0) if "ssl" not in secs else 0.0
    ours_wall = secs["data"] + secs["total_training"] + cached_ssl

    # The product's ranking and flags under the unit's detect options, derived from the recorded
    # scores the way the run derives them (so a run made with other POST_HOC_KEYS serves as well).
    tensors = {name: torch.from_numpy(q) for name, q in scores.items()}
    quality = select_quality(u.cfg.detect, tensors)
    flagged, _ = select_flags(u.cfg.detect, quality, by_source, torch.from_numpy(refined != given))
    suggested = np.where(refined != given, refined, predicted)  # LabelReport.suggested
    detectors: dict[str, dict] = {PRODUCT: detection_metrics(wrong, quality.numpy(), flagged.numpy(), suggested,
                                                             given, clean)}
    for name, q in scores.items():
        detectors[name] = detection_metrics(wrong, q, flag_lowest(torch.from_numpy(q), n_est).numpy(),
                                            predicted, given, clean)
        # The flagged set's F1 had the count come from each estimate source (docs/detection.md, rule 2).
        detectors[name]["f1_at"] = {src: f1_at_count(wrong, q, count) for src, count in estimates.items()}
    for d in detectors.values():
        d["wall_seconds"] = ours_wall
    return detectors, estimates, wrong


def _refresh(u: Unit, rec: dict) -> str:
    """Bring a unit's record up to date from its finished ours run, training nothing: add
    ``f1_at`` where it was written before that existed, and derive ours' rows again where it was
    made with other :data:`~labelrefine.detect.POST_HOC_KEYS` than the unit's (a changed detection
    default) or by another :data:`DERIVATION`. ``"same"``: nothing to do (or only ``f1_at`` or the
    derivation out of date and the run gone: kept as it is);
    ``"refreshed"``: updated; ``"missing"``: other detect options and the run is not on disk."""
    from ..artifacts import utc_now
    from ..data.splits import prepare_data
    from ..pipeline import code_version, default_cache_dir
    from ..rundir import FINISHED_MARKER

    ours = [name for name in rec["detectors"] if name not in (PRODUCT, CLEANLAB, CLEANLAB_SSL)]
    other_options = config_difference(rec["config"], u.cfg) is not None
    current = rec.get("derivation", 1) == DERIVATION
    if not other_options and current and all("f1_at" in rec["detectors"][name] for name in ours):
        return "same"
    path = u.out / "ours" / FINISHED_MARKER
    if not path.is_file() or not same_run(read_run_config(u.out / "ours"), u.cfg):
        return "missing" if other_options else "same"
    summary = json.loads(path.read_text(encoding="utf-8"))
    detectors, estimates, _ = _ours_detectors(u, prepare_data(u.cfg, default_cache_dir(u.cfg)), summary)
    rec["detectors"].update(detectors)
    rec["estimated_issues"] = {**rec.get("estimated_issues", {}), **estimates}
    rec["config"], rec["config_hash"] = config_to_dict(u.cfg), config_hash(u.cfg)
    rec["derivation"] = DERIVATION
    # The run (and its code_version / finished_at) is as made; say what derived the rows again.
    rec["refreshed"] = {"code_version": code_version(), "at": utc_now()}
    return "refreshed"


def evaluate_unit(suite: DetectSuite, u: Unit, *, overwrite: bool = False) -> dict:
    """Run (or reuse) a unit's runs and measure every detector; the unit's record."""
    try:
        import cleanlab
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise UserError("detection suites need cleanlab: pip install 'labelrefine[bench]' (or pip install cleanlab)") \
            from None
    from ..artifacts import cpu_name, utc_now
    from ..data.splits import prepare_data
    from ..pipeline import code_version, default_cache_dir

    prep = prepare_data(u.cfg, default_cache_dir(u.cfg))
    if prep.train_clean is None:
        raise UserError(f"suite {suite.name}, {u.setting.name}: the clean labels are unknown (data.noise=none); "
                        f"a detection suite needs synthetic noise or a clean column")
    summary = _ensure_run(u.cfg, u.out / "ours", overwrite=overwrite)
    detectors, estimates, wrong = _ours_detectors(u, prep, summary)
    given, clean = prep.train.labels.numpy(), prep.train_clean.numpy()
    n = len(given)
    ssl_seconds = summary["seconds"].get("ssl_pretrain") or 0.0

    variants = [(CLEANLAB, "ce", u.out / "cleanlab")]
    if suite.cleanlab_ssl:
        variants.append((CLEANLAB_SSL, "ce_ssl", u.out / "cleanlab_ssl"))
    for name, method, where in variants:
        probs, seconds = _cross_validated(prep, u.cfg, method, suite.folds, u.seed, where, overwrite)
        t0 = time.perf_counter()
        issues = np.asarray(find_label_issues(labels=given, pred_probs=probs,
                                              return_indices_ranked_by="self_confidence"), dtype=np.int64)
        seconds += time.perf_counter() - t0
        f = np.zeros(n, dtype=bool)
        f[issues] = True
        detectors[name] = detection_metrics(wrong, probs[np.arange(n), given], f, probs.argmax(1), given, clean)
        detectors[name]["wall_seconds"] = seconds + (ssl_seconds if method == "ce_ssl" else 0.0)
        estimates[method] = int(f.sum())
    return {"setting": u.setting.name, "seed": u.seed, "config": config_to_dict(u.cfg),
            "config_hash": config_hash(u.cfg),
            "n": n, "n_errors": int(wrong.sum()), "noise_rate": float(wrong.mean()), "estimated_issues": estimates,
            "detectors": detectors, "ssl_pretrain_seconds": ssl_seconds, "cpu": cpu_name(),
            "device": summary.get("device"), "torch": torch.__version__, "cleanlab": cleanlab.__version__,
            "code_version": code_version(), "finished_at": utc_now(),
            "folds": suite.folds, "derivation": DERIVATION}


def _is_detector(column: str) -> bool:
    """A labels.csv column that holds a detector's score (detect.knn_k_sweep's included)."""
    from ..detect import DETECTORS

    return column in DETECTORS or column.startswith(("knn_ssl_k", "knn_model_k"))


def run_detect_suite(suite: DetectSuite, out: str | Path, *, seeds: int = 1, settings: list[str] | None = None,
                     user_overrides: list[str] | None = None, overwrite: bool = False,
                     command: str = "") -> list[dict]:
    """Run (or reuse) every unit and write the results files; returns the unit records."""
    out = Path(out)
    units = plan_units(suite, out, seeds=seeds, settings=settings, user_overrides=user_overrides)
    table = plan_units(suite, out, seeds=seeds, user_overrides=user_overrides) if settings else units
    records = load_unit_records(out)
    t0 = time.perf_counter()
    for k, u in enumerate(units):
        rec = _recorded(u, records)
        state = None if rec is None else _refresh(u, rec)
        if state == "same":  # recorded with this config: nothing to re-run
            log.info("[%d/%d] %s: recorded", k + 1, len(units), u.label)
            continue
        if state == "refreshed":
            log.info("[%d/%d] %s: recorded; its detectors derived again from its runs", k + 1, len(units), u.label)
            _write_records(out, records)
            continue
        if state == "missing":
            log.info("[%d/%d] %s: recorded with other detect options and its runs are gone: running it again",
                     k + 1, len(units), u.label)
        log.info("[%d/%d] %s: running", k + 1, len(units), u.label)
        records[(u.setting.name, u.seed)] = evaluate_unit(suite, u, overwrite=overwrite)
        _write_records(out, records)
        write_detect_results(suite, out, table, records, command=command, seeds=seeds)
    done = write_detect_results(suite, out, table, records, command=command, seeds=seeds)
    log.info("suite %s: done in %.1f min (this invocation); results in %s", suite.name,
             (time.perf_counter() - t0) / 60, out / "results.md")
    return done


def _write_records(out: Path, records: dict) -> None:
    lines = [json.dumps(r, sort_keys=True) for _, r in sorted(records.items())]
    write_text(out / RECORDS, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Results

METRICS = [("auroc", "AUROC", 3), ("auprc", "AUPRC", 3), ("precision", "precision", 1), ("recall", "recall", 1),
           ("f1", "F1", 3), ("p_at_errors", "P@#errors", 1), ("p_at_100", "P@100", 1)]


def _fmt(values: list[float], digits: int, pct: bool) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    scale = 100 if pct else 1
    mean = float(np.mean(vals)) * scale
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(vals, ddof=1)) * scale:.{digits}f}"


def write_detect_results(suite: DetectSuite, out: Path, units: list[Unit], records: dict, *, command: str,
                         seeds: int) -> list[dict]:
    done = [records[(u.setting.name, u.seed)] for u in units
            if (u.setting.name, u.seed) in records and _recorded(u, records) is not None]
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.csv", _csv(done))
    write_text(out / "results.md", _markdown(suite, units, done, command=command, seeds=seeds))
    _chart(suite, done, out / "results.png")
    return done


CSV_COLUMNS = ["setting", "seed", "detector", "n", "n_errors", "auroc", "auprc", "n_flagged", "precision", "recall",
               "f1", "p_at_errors", *[f"p_at_{k}" for k in KS], "labels_before", "labels_after", "wall_seconds"]


def detector_order(names) -> list[str]:
    """The tables' row order, whatever order a record holds them in: the product, cleanlab,
    every detector (each followed by its other k), the combinations, then anything else."""
    from ..detect import DETECTORS

    names = list(dict.fromkeys(names))
    fixed = [PRODUCT, CLEANLAB, CLEANLAB_SSL, *DETECTORS, *COMBINATIONS]

    def key(name: str) -> tuple[int, int, str]:
        base = name.split("_k")[0] if name.startswith(("knn_ssl_k", "knn_model_k")) else name
        if base in fixed:
            return fixed.index(base), int(name[len(base) + 2:]) if base != name else 0, name
        return len(fixed), 0, name

    return sorted(names, key=key)


def _csv(done: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in done:
        for name in detector_order(r["detectors"]):
            m = r["detectors"][name]
            row = {"setting": r["setting"], "seed": r["seed"], "detector": name, "n": r["n"], "n_errors": r["n_errors"],
                   **m}
            w.writerow(["" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                        for c in CSV_COLUMNS])
    return buf.getvalue()


def _markdown(suite: DetectSuite, units: list[Unit], done: list[dict], *, command: str, seeds: int) -> str:
    rows_for_machine = [{"cpu": r.get("cpu"), "device": r.get("device"), "torch": r.get("torch"),
                         "finished_at": r.get("finished_at"), "code_version": r.get("code_version")} for r in done]
    lines = [f"# {suite.title} (`{suite.name}`)", "", suite.description, "",
             f"- Command: `{command}`" if command else f"- Command: `labelrefine bench {suite.name} --seeds {seeds}`",
             f"- Machine: {_machine(rows_for_machine)}" if done else "- Machine: (no unit finished yet)",
             f"- Date: {_dates(rows_for_machine)}" if done else "",
             f"- Seeds: {seeds} (seed k = training seed = noise seed"
             f"{' = subset seed' if suite.subset_per_seed else ''}); "
             f"cells are mean ± std over seeds; cleanlab with {suite.folds}-fold cross-validation, cleanlab "
             f"{done[0]['cleanlab'] if done else ''}",
             f"- Units finished: {len(done)} of {len(units)}", ""]
    lines += [f"  - {note}" for note in suite.profile_notes]
    missing = [u.label for u in units if not any(r["setting"] == u.setting.name and r["seed"] == u.seed for r in done)]
    if missing:
        lines += ["", f"**Incomplete:** not finished: {', '.join(missing)}."]
    for s in suite.settings:
        recs = [r for r in done if r["setting"] == s.name]
        if not recs:
            continue
        names = detector_order(n for r in recs for n in r["detectors"])
        rate = np.mean([r["noise_rate"] for r in recs])
        head = " | ".join(h for _, h, _ in METRICS)
        lines += ["", f"## {s.name} ({100 * rate:.1f}% of {recs[0]['n']} training labels wrong; "
                  f"{len(recs)} seed(s))", "",
                  f"| detector | {head} | flagged | labels before → after | wall (min) |",
                  "|---|" + "---|" * (len(METRICS) + 3)]
        for name in names:
            ms = [r["detectors"][name] for r in recs if name in r["detectors"]]
            cells = [_fmt([m.get(k) for m in ms], d, pct=d == 1) for k, _, d in METRICS]
            flagged = _fmt([float(m["n_flagged"]) for m in ms], 0, False)
            labels = (f"{_fmt([m['labels_before'] for m in ms], 2, True)} → "
                      f"{_fmt([m['labels_after'] for m in ms], 2, True)}")
            wall = _fmt([m["wall_seconds"] / 60 for m in ms], 1, False)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {flagged} | {labels} | {wall} |")
        est = list(dict.fromkeys(k for r in recs for k in r["estimated_issues"]))

        def estimate(k: str, recs: list[dict] = recs) -> str:
            return _fmt([float(r["estimated_issues"][k]) for r in recs if k in r["estimated_issues"]], 0, False)

        lines += ["", "Estimated number of wrong labels (true: "
                  + _fmt([float(r["n_errors"]) for r in recs], 0, False) + "): "
                  + "; ".join(f"{k} {estimate(k)}" for k in est) + "."]
        lines += ["", f"Paired differences against {CLEANLAB} over seeds (95% Student-t interval; an interval "
                  "containing 0 is a tie):", "", "| detector | AUROC difference | AUPRC difference | verdict |",
                  "|---|---|---|---|"]
        for name in names:
            if name == CLEANLAB:
                continue
            cells, verdicts = [], []
            for key in ("auroc", "auprc"):
                pairs = [r["detectors"] for r in recs if name in r["detectors"] and CLEANLAB in r["detectors"]]
                a, b = [d[name][key] for d in pairs], [d[CLEANLAB][key] for d in pairs]
                if not a or any(v is None for v in a + b):
                    cells.append("–")
                    continue
                d, lo, hi = paired_difference(a, b)
                if lo is None:
                    cells.append(f"{d:+.3f} (1 seed)")
                    verdicts.append("one seed")
                    continue
                cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
                verdicts.append("better" if lo > 0 else "worse" if hi < 0 else "tie")
            verdict = " / ".join(verdicts) if verdicts else "–"
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {verdict} (AUROC / AUPRC) |")
    return "\n".join(x for x in lines if x is not None) + "\n"


def _chart(suite: DetectSuite, done: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    settings = [s.name for s in suite.settings if any(r["setting"] == s.name for r in done)]
    if not settings:
        return
    names = detector_order(n for r in done for n in r["detectors"])
    fig, axes = plt.subplots(1, len(settings), figsize=(4 + 3 * len(settings), 0.35 * len(names) + 1.5), squeeze=False)
    for ax, s in zip(axes[0], settings, strict=True):
        recs = [r for r in done if r["setting"] == s]
        means = [np.mean([r["detectors"][n]["auprc"] for r in recs if n in r["detectors"]
                          and r["detectors"][n]["auprc"] is not None] or [np.nan]) for n in names]
        colours = ["#d62728" if n.startswith("cleanlab") else "#1f77b4" for n in names]
        ax.barh(range(len(names)), means, color=colours)
        ax.set_yticks(range(len(names)), names if ax is axes[0][0] else [""] * len(names), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("AUPRC (mean over seeds)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
