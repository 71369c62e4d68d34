"""The README's summary of the detection suites, generated from their records.

    python scripts/detection_summary.py results/detect-digits results/detect-pneumonia \
        results/detect-cifar10n

Reads each directory's ``detect.jsonl`` (written by ``labelrefine bench detect-*``) and prints two
Markdown tables: what ``labelrefine clean`` gives with its defaults (the records' "clean (default)"
row) against cleanlab's 5-fold self-confidence, per setting, with the paired differences over
seeds; and the AUPRC of every single detector per setting. Cells are mean ± std over the seeds a
setting has; every number is read from the records, none is typed in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from labelrefine.bench.detect import CLEANLAB, CLEANLAB_SSL, PRODUCT
from labelrefine.bench.suites import paired_difference

# The AUPRC table's rows: the product, each single score at the default k, the kNN scores at the
# largest measured k, the mean of all six, and cleanlab's two recipes.
DETECTORS = [PRODUCT, "self_confidence", "stage_confidence", "aum", "knn_ssl", "knn_ssl_k50", "knn_model",
             "knn_model_k50", "mean(all six)", CLEANLAB, CLEANLAB_SSL]
NAMES = {"detect-digits": "digits", "detect-pneumonia": "X-rays", "detect-cifar10n": "CIFAR-10N"}


def _cell(values: list[float], digits: int = 3, scale: float = 1.0) -> str:
    if not values:
        return "–"
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _diff(a: list[float], b: list[float]) -> str:
    m, lo, hi = paired_difference(a, b)
    if lo is None:
        return f"{m:+.3f} (one seed)"
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "tie"
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}"


def load(dirs: list[str]) -> dict[str, list[dict]]:
    """{setting label: its records, by seed}, in the order of ``dirs``."""
    out: dict[str, list[dict]] = {}
    for d in dirs:
        path = Path(d) / "detect.jsonl"
        if not path.is_file():
            raise SystemExit(f"error: {path}: no such file (run labelrefine bench on it first)")
        name = NAMES.get(Path(d).name, Path(d).name)
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(f"{name} {r['setting']}", []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def product_table(settings: dict[str, list[dict]]) -> list[str]:
    lines = ["| setting | seeds | ranked / wrong labels | AUROC: default / cleanlab | AUPRC: default / cleanlab "
             "| AUPRC difference [95% CI] | F1: default / cleanlab | P@#errors (%): default / cleanlab "
             "| wall (min): default / cleanlab |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, recs in settings.items():
        def col(det, key, recs=recs):
            return [r["detectors"][det][key] for r in recs]

        wall = [[v / 60 for v in col(det, "wall_seconds")] for det in (PRODUCT, CLEANLAB)]
        lines.append(
            f"| {name} | {len(recs)} | {recs[0]['n']:,} / {_cell([r['n_errors'] for r in recs], 0)} "
            f"| {_cell(col(PRODUCT, 'auroc'))} / {_cell(col(CLEANLAB, 'auroc'))} "
            f"| {_cell(col(PRODUCT, 'auprc'))} / {_cell(col(CLEANLAB, 'auprc'))} "
            f"| {_diff(col(PRODUCT, 'auprc'), col(CLEANLAB, 'auprc'))} "
            f"| {_cell(col(PRODUCT, 'f1'))} / {_cell(col(CLEANLAB, 'f1'))} "
            f"| {_cell(col(PRODUCT, 'p_at_errors'), 1, 100)} / {_cell(col(CLEANLAB, 'p_at_errors'), 1, 100)} "
            f"| {_cell(wall[0], 2)} / {_cell(wall[1], 2)} |")
    return lines


def auroc_diff_table(settings: dict[str, list[dict]]) -> list[str]:
    lines = ["| setting | AUROC difference, default − cleanlab [95% CI] | flagged by the default: count / rate "
             "| true rate |", "|---|---|---|---|"]
    for name, recs in settings.items():
        a = [r["detectors"][PRODUCT]["auroc"] for r in recs]
        b = [r["detectors"][CLEANLAB]["auroc"] for r in recs]
        flagged = [r["detectors"][PRODUCT]["n_flagged"] for r in recs]
        rate = [r["detectors"][PRODUCT]["n_flagged"] / r["n"] for r in recs]
        true = [r["n_errors"] / r["n"] for r in recs]
        lines.append(f"| {name} | {_diff(a, b)} | {_cell(flagged, 0)} / {_cell(rate, 1, 100)}% "
                     f"| {_cell(true, 1, 100)}% |")
    return lines


def auprc_table(settings: dict[str, list[dict]]) -> list[str]:
    lines = ["| detector | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for det in DETECTORS:
        cells = []
        for recs in settings.values():
            vals = [r["detectors"][det]["auprc"] for r in recs if det in r["detectors"]]
            cells.append(_cell(vals))
        lines.append(f"| {det} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="result directories holding detect.jsonl")
    settings = load(ap.parse_args().dirs)
    print("\n".join([*product_table(settings), "", *auroc_diff_table(settings), "", *auprc_table(settings)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
