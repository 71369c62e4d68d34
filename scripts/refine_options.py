"""Measure the refinement options the papers leave open (REFERENCES.md) on one data set.

For each variant and seed this runs ``ours`` through the ordinary runner and reads its
artifacts: the accuracy of the training labels after refinement, the precision of the
pseudo-labels at every iteration (oracle metrics, from the clean labels the runner holds), and
test accuracy. Writes a markdown table; finished runs are reused.

    python scripts/refine_options.py --config configs/demo-digits.yaml --seeds 3 --out runs/refine-options

``--suite NAME --setting NAME`` takes the config of that suite's ``ours`` run in that setting
instead (e.g. ``--suite cpu-cifar10 --setting IDN-20%``). ``--group cost`` runs the variants of
issue 15's question "what does the machinery around the refinement cost when it relabels
nothing?" (augmented copies of confirmed labels, the weighted fine-tune, the schedule) instead of
the papers' open options; ``--group strong`` re-measures the open options against today's defaults
where the model is strong. The table gives final noisy-validation accuracy (what a default may be
chosen by) beside the test accuracies (reported, never used), and each variant minus CE on the
same SimCLR initialisation, paired over seeds with a 95% interval. ``--variant PREFIX``
(repeatable) restricts the table to the variants whose name starts with it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from labelrefine.config import load_config
from labelrefine.pipeline import run

# Every variant before the 0.3 row ran with threshold 1.0 (the papers' value, then the default).
P1 = ["refine.threshold=1.0", "refine.loss_target=prediction"]
VARIANTS = {
    "label target (papers, literal)": ["refine.threshold=1.0", "refine.loss_target=label"],
    "label target, no agreement": ["refine.threshold=1.0", "refine.loss_target=label",
                                   "refine.require_agreement=false"],
    "prediction target, threshold 1.0 (max p > 0.37)": P1,
    "prediction, threshold 0.3 (max p > 0.74; the default)": ["refine.loss_target=prediction", "refine.threshold=0.3"],
    "prediction, threshold 0.3, stage losses from the training pass": [
        "refine.loss_target=prediction", "refine.threshold=0.3", "refine.stage_loss=train"],
    "prediction, threshold 0.1 (max p > 0.90)": ["refine.loss_target=prediction", "refine.threshold=0.1"],
    "prediction, no agreement": [*P1, "refine.require_agreement=false"],
    "prediction, label from last stage": [*P1, "refine.label_source=last"],
    "prediction, class-quantile 0.7": [*P1, "refine.threshold_mode=class_quantile", "refine.quantile=0.7"],
    "prediction, no augmented copies": [*P1, "refine.augment_copies=false"],
    "prediction, fine-tune weight p(target)": [*P1, "finetune.weight=target_prob"],
    "prediction, plain-CE fine-tune": [*P1, "finetune.loss=ce"],
    "CE (same budget)": ["method=ce"],
    "CE + SSL init (same budget)": ["method=ce_ssl"],
}
CE_SSL = "CE + SSL init (same budget)"
# Issue 15: when the refinement changes no label, ours should match ce_ssl. Which part costs?
COST_VARIANTS = {
    "ours (defaults)": [],
    "copies only for changed labels": ["refine.copies=changed"],
    "plain-CE fine-tune": ["finetune.loss=ce"],
    "copies for changed + plain-CE fine-tune": ["refine.copies=changed", "finetune.loss=ce"],
    "no fine-tune, one schedule over all epochs, copies for changed": [
        "refine.copies=changed", "finetune.epochs=0", "refine.warmup_epochs=6"],
    "no augmented copies": ["refine.augment_copies=false"],
    CE_SSL: ["method=ce_ssl"],
}
# Issue 15: a threshold that relabels only as far as the warmed-up model has earned it.
THRESHOLD_VARIANTS = {
    "fixed 0.3 (max p > 0.74)": ["refine.threshold_mode=fixed", "refine.threshold=0.3"],
    "fixed 1.0 (max p > 0.37)": ["refine.threshold_mode=fixed", "refine.threshold=1.0"],
    "auto (noisy-val kNN probe)": ["refine.threshold_mode=auto"],
    CE_SSL: ["method=ce_ssl"],
}
# Issue 15: the papers' other open options, re-measured where the warmed-up model is strong (each
# against today's defaults: prediction target, fixed threshold 0.3, stage losses from an evaluation
# pass, one continuous lr schedule).
STRONG_VARIANTS = {
    "ours (defaults)": [],
    "label target, threshold 1.0 (papers, literal)": ["refine.loss_target=label", "refine.threshold=1.0"],
    "class quantile 0.5": ["refine.threshold_mode=class_quantile", "refine.quantile=0.5"],
    "stage losses from the training pass": ["refine.stage_loss=train"],
    "lr restart at each iteration": ["refine.lr_schedule=restart"],
    CE_SSL: ["method=ce_ssl"],
}
GROUPS = {"options": VARIANTS, "cost": COST_VARIANTS, "threshold": THRESHOLD_VARIANTS,
          "strong": STRONG_VARIANTS}


def _mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]  # no pseudo-labels: precision is NaN
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f}"
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"


def _paired(final: list[float], base: dict | None) -> str:
    """The variant's test accuracy minus CE+SSL's, paired over seeds, with its 95% interval."""
    from labelrefine.bench.suites import paired_difference

    if base is None or final is base["final"]:
        return "-"
    m, lo, hi = paired_difference(final, base["final"])
    if lo is None:
        return f"{100 * m:+.2f}"
    return f"{100 * m:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def _config_maker(args, ap):
    """seed, overrides -> RunConfig: from --config, or from a suite's ours run in --setting."""
    if args.config:
        return lambda overrides, seed: load_config(args.config, [*overrides, f"seed={seed}",
                                                                 f"data.noise_seed={seed}"])
    from labelrefine.bench.suites import load_suite, run_config

    suite = load_suite(args.suite)
    settings = {s.name: s for s in suite.settings}
    if args.setting not in settings:
        ap.error(f"--setting: one of {sorted(settings)}")
    return lambda overrides, seed: run_config(suite, settings[args.setting], "ours", seed, overrides)


def main() -> int:
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config")
    src.add_argument("--suite", help="a suite name or file; with --setting: its ours run's config")
    ap.add_argument("--setting", help="the suite's setting (e.g. IDN-20%%)")
    ap.add_argument("--group", choices=sorted(GROUPS), default="options")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--variant", action="append", default=[],
                    help="run only the variants whose name starts with this (repeatable; default: all)")
    args = ap.parse_args()
    make = _config_maker(args, ap)
    out = Path(args.out)
    rows = []
    variants = {n: o for n, o in GROUPS[args.group].items()
                if not args.variant or any(n.startswith(v) for v in args.variant)}
    if not variants:
        ap.error(f"--variant matches none of: {'; '.join(GROUPS[args.group])}")
    for name, overrides in variants.items():
        res: dict[str, list] = {"label_after": [], "pseudo_prec": [], "final": [], "best": [], "before": [],
                                "changed": [], "val": [], "auto": []}
        for seed in range(args.seeds):
            d = out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") / f"seed{seed}"
            if not (d / "summary.json").exists():
                run(make([*args.set, *overrides], seed), d, overwrite=True)
            s = json.loads((d / "summary.json").read_text())
            recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            prec = [r["oracle_pseudo_precision"] for r in recs if "oracle_pseudo_precision" in r]
            res["label_after"].append(s.get("train_label_acc_after"))
            res["before"].append(s.get("train_label_acc_before"))
            res["pseudo_prec"].append(statistics.mean(prec) if prec else None)
            res["final"].append(s["final_test_acc"])
            res["best"].append(s["best_val_test_acc"])
            res["val"].append(s["final_val_acc"])
            chosen = [r["auto_threshold"] for r in recs if "auto_threshold" in r]
            res["auto"].append("/".join("none" if t < 0 else f"{t:g}" for t in chosen) if chosen else None)
            last = [r for r in recs if "labels_differ_from_given" in r]
            res["changed"].append(last[-1]["labels_differ_from_given"] / s["n_train"] if last else None)
        rows.append((name, res))
        print(name, {k: _mean_std(v) for k, v in res.items() if k != "auto"}, file=sys.stderr)
    auto = any(a for _, r in rows for a in r["auto"])
    source = f"config `{args.config}`" if args.config else f"suite `{args.suite}`, setting `{args.setting}`, ours"
    lines = [
        f"{source} {' '.join('--set ' + s for s in args.set)}, seeds 0..{args.seeds - 1} "
        f"(training seed = noise seed). Mean ± std in %.",
        "",
        "| variant | training-label acc before | after | pseudo-label precision (mean over iterations) "
        "| labels changed | final noisy val | final test acc | test − CE+SSL (paired, 95%) "
        "| test acc at best noisy-val epoch |" + (" auto thresholds by iteration, per seed |" if auto else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if auto else ""),
    ]
    base = dict(rows).get(CE_SSL)
    for name, r in rows:
        lines.append(f"| {name} | {_mean_std(r['before'])} | {_mean_std(r['label_after'])} | "
                     f"{_mean_std(r['pseudo_prec'])} | {_mean_std(r['changed'])} | {_mean_std(r['val'])} | "
                     f"{_mean_std(r['final'])} | {_paired(r['final'], base)} | {_mean_std(r['best'])} |"
                     + (f" {', '.join(a for a in r['auto'] if a) or '-'} |" if auto else ""))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
