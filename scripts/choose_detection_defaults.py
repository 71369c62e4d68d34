"""Apply the pre-registered rule of docs/detection.md to the detection suites' records.

    python scripts/choose_detection_defaults.py results/detect-digits results/detect-pneumonia \
        results/detect-cifar10n

Reads each directory's ``detect.jsonl`` (one record per setting and seed, written by
``labelrefine bench detect-*``) and prints the two decisions of the rule, with the numbers they
rest on:

1. ``detect.score`` / ``detect.knn_k``: the highest AUPRC averaged over settings (the mean over
   seeds of each setting first, every setting weighted equally); a detector within 0.005 of the
   best ties with it, and ties go to the simplest (one score before a combination, fewer extra
   passes, then the smaller k).
2. ``detect.flag`` / ``detect.estimate_from``: the estimate source with the smallest mean absolute
   relative error of its estimated number of wrong labels; ``flag=estimated`` with it if the chosen
   ranking's F1 at that count, averaged over settings, is at least the F1 of ``flag=refined``.

Only the records' metrics are read: the clean labels entered them in the benchmark's evaluation.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from labelrefine.bench.detect import CLEANLAB, CLEANLAB_SSL, COMBINATIONS, PRODUCT

TIE = 0.005
# Extra passes over the data a detector needs beyond the run itself (docs/detection.md's table).
EXTRA_PASSES = {"self_confidence": 0, "normalized_margin": 0, "stage_confidence": 0, "aum": 0,
                "knn_ssl": 1, "knn_model": 1}
DEFAULT_K = 10


def _parts(name: str) -> tuple[str, int]:
    """detector column -> (its score, its k): knn_model_k20 -> (knn_model, 20)."""
    m = re.fullmatch(r"(knn_ssl|knn_model)_k(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, DEFAULT_K)


def simplicity(name: str) -> tuple[int, int, int]:
    """Sort key, simplest first: (a combination?, extra passes, k)."""
    if name in COMBINATIONS:
        parts = [_parts(p)[0] for p in COMBINATIONS[name]]
        return 1, sum(EXTRA_PASSES.get(p, 1) for p in parts), DEFAULT_K
    score, k = _parts(name)
    return 0, EXTRA_PASSES.get(score, 1), k if score.startswith("knn") else 0


def per_setting(records: list[dict], value) -> dict[str, float]:
    """{setting: mean over its seeds of value(record)} (records lacking the value are skipped)."""
    by: dict[str, list[float]] = {}
    for r in records:
        v = value(r)
        if v is not None:
            by.setdefault(f"{r['suite']}/{r['setting']}", []).append(v)
    return {k: statistics.mean(v) for k, v in by.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="result directories holding detect.jsonl")
    args = ap.parse_args()
    records = []
    for d in args.dirs:
        path = Path(d) / "detect.jsonl"
        if not path.is_file():
            print(f"error: {path}: no such file (run labelrefine bench on it first)", file=sys.stderr)
            return 2
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                records.append({**json.loads(line), "suite": Path(d).name})
    settings = sorted({f"{r['suite']}/{r['setting']}" for r in records})
    seeds = {s: sum(f"{r['suite']}/{r['setting']}" == s for r in records) for s in settings}
    print(f"{len(records)} records, {len(settings)} settings: "
          + ", ".join(f"{s} ({seeds[s]} seeds)" for s in settings))

    # Rule 1: the ranking.
    names = set.intersection(*(set(r["detectors"]) for r in records)) - {PRODUCT, CLEANLAB, CLEANLAB_SSL}
    auprc = {n: per_setting(records, lambda r, n=n: r["detectors"][n]["auprc"]) for n in names}
    mean_auprc = {n: statistics.mean(v.values()) for n, v in auprc.items() if len(v) == len(settings)}
    for ref in (CLEANLAB, CLEANLAB_SSL):
        v = per_setting(records, lambda r, ref=ref: (r["detectors"].get(ref) or {}).get("auprc"))
        if len(v) == len(settings):
            mean_auprc[ref] = statistics.mean(v.values())
    ranked = sorted(mean_auprc, key=lambda n: -mean_auprc[n])
    print("\nRule 1: mean AUPRC over settings")
    for n in ranked:
        cells = " ".join(f"{auprc[n][s]:.3f}" for s in settings) if n in auprc else ""
        print(f"  {n:40s} {mean_auprc[n]:.4f}   {cells}")
    candidates = [n for n in ranked if n not in (CLEANLAB, CLEANLAB_SSL)]
    best = candidates[0]
    tied = [n for n in candidates if mean_auprc[best] - mean_auprc[n] < TIE]
    chosen = min(tied, key=lambda n: (simplicity(n), -mean_auprc[n]))
    print(f"  best {best} ({mean_auprc[best]:.4f}); tied within {TIE}: {', '.join(tied)}; "
          f"simplest: {chosen}")

    # Rule 2: the flagged set.
    true = per_setting(records, lambda r: r["n_errors"])
    sources = sorted({k for r in records for k in r["estimated_issues"] if k.startswith("ours_")})
    err = {}
    print("\nRule 2: estimated number of wrong labels (mean over seeds) against the true number")
    for src in sources:
        est = per_setting(records, lambda r, src=src: r["estimated_issues"].get(src))
        if len(est) < len(settings):
            continue
        err[src] = statistics.mean(abs(est[s] - true[s]) / true[s] for s in settings)
        print(f"  {src:14s} mean |relative error| {err[src]:.3f}   "
              + " ".join(f"{s}: {est[s]:.0f}/{true[s]:.0f}" for s in settings))
    source = min(err, key=err.get)
    f1_est = per_setting(records, lambda r: (r["detectors"][chosen].get("f1_at") or {}).get(source))
    f1_ref = per_setting(records, lambda r: r["detectors"][PRODUCT]["f1"])
    if len(f1_est) < len(settings):
        print(f"error: some records lack {chosen}'s f1_at; re-run labelrefine bench on their directories "
              f"(with their runs on disk) to add it", file=sys.stderr)
        return 2
    m_est, m_ref = statistics.mean(f1_est.values()), statistics.mean(f1_ref.values())
    flag = "estimated" if m_est >= m_ref else "refined"
    print(f"  closest source: {source}; F1 of {chosen} flagging that many {m_est:.4f} "
          f"vs flag=refined {m_ref:.4f} -> flag={flag}")

    score, k = _parts(chosen)
    decision = {"detect.score": "combined" if chosen in COMBINATIONS else score, "detect.flag": flag}
    if chosen in COMBINATIONS:
        decision["detect.combine"] = list(COMBINATIONS[chosen])
    if score.startswith("knn"):
        decision["detect.knn_k"] = k
    if flag == "estimated":
        decision["detect.estimate_from"] = source.removeprefix("ours_")
    print("\nDecision: " + ", ".join(f"{k}={v}" for k, v in decision.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
