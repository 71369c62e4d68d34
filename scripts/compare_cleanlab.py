"""Finding label errors side by side: labelrefine (``ours``) against cleanlab (issue 8 §6).

    pip install -e '.[bench]'      # cleanlab
    python scripts/compare_cleanlab.py --out results/cleanlab-pneumonia --seed 0

1. Loads the training split of ``--data`` (default PneumoniaMNIST) and injects IDN noise
   (``--rate``, default 20%) with ``--seed``. The injected errors (noisy != clean) are the ground
   truth of this evaluation; clean labels go nowhere else.
2. ``ours``: ``labelrefine.pipeline.run`` on the noisy labels with the settings ``labelrefine clean``
   chooses (:func:`labelrefine.api.auto_settings`) and ``data.noise=none``. The run holds out
   ``data.val_fraction`` of the samples as a noisy validation split, so its ``labels.csv`` covers
   only the rest: both tools are measured on exactly those samples.
3. cleanlab: out-of-fold predicted probabilities from ``--folds`` stratified folds (on the noisy
   labels), each fold's model trained by labelrefine's engine as plain CE with the same backbone,
   width and supervised epochs as ``ours`` (``model.pt``: the best epoch on each run's own noisy
   validation split), then ``cleanlab.filter.find_label_issues(labels, pred_probs,
   return_indices_ranked_by="self_confidence")`` over all samples.
4. Writes ``OUT/comparison.md`` and ``OUT/comparison.json``; the runs stay in ``OUT/ours`` and
   ``OUT/cleanlab/fold*`` (with ``OUT/cleanlab/pred_probs.npy``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from labelrefine import progress
from labelrefine.api import config_for
from labelrefine.config import load_config
from labelrefine.data import DataSplits, ImageSet
from labelrefine.data.noise import apply_noise
from labelrefine.data.sources import load_data
from labelrefine.methods.schedule import supervised_budget
from labelrefine.pipeline import code_version, default_cache_dir, run
from labelrefine.predict import load_model

log = logging.getLogger("labelrefine")


def _setup_logging() -> None:
    progress.configure("log")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(flagged: np.ndarray, order: np.ndarray, wrong: np.ndarray, subset: np.ndarray, ks: list[int]) -> dict:
    """Flagged-set precision/recall and ranking precision@k against the injected errors, on ``subset``.

    ``flagged``, ``wrong``, ``subset``: boolean over all positions; ``order``: positions of
    ``subset``, most suspicious first.
    """
    from sklearn.metrics import roc_auc_score

    assert len(order) == int(subset.sum()) and bool(subset[order].all())
    n_err = int(wrong[subset].sum())
    f = flagged & subset
    n_flag = int(f.sum())
    hits = int((f & wrong).sum())
    prec = hits / n_flag if n_flag else None
    rec = hits / n_err if n_err else None
    f1 = 2 * prec * rec / (prec + rec) if prec and rec else None
    at = {}
    for k in ks:
        top = order[:k]
        at[str(k)] = float(wrong[top].mean()) if len(top) else None
    # AUROC of the ranking: the score of a sample is minus its rank (first = most suspicious).
    auroc = float(roc_auc_score(wrong[order], -np.arange(len(order)))) if 0 < n_err < len(order) else None
    return {"n_samples": int(subset.sum()), "n_injected_errors": n_err, "n_flagged": n_flag, "true_positives": hits,
            "precision": prec, "recall": rec, "f1": f1, "precision_at_k": at, "ranking_auroc": auroc}


def run_ours(noisy_set: ImageSet, name: str, args, out: Path) -> dict:
    cfg, chosen = config_for(noisy_set, device=args.device, overrides=[
        f"data.spec={args.data}", f"seed={args.seed}", f"data.noise_seed={args.seed}",
        # Train SimCLR in this run: its time belongs to the wall time (the cache changes nothing else).
        "ssl.cache=false"])
    log.info("ours: settings %s", ", ".join(k for k, _ in chosen))
    t0 = time.perf_counter()
    summary = run(cfg, out, overwrite=True, data=DataSplits(name, noisy_set))
    wall = time.perf_counter() - t0
    with open(out / "labels.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {"cfg": cfg, "chosen": chosen, "summary": summary, "wall": wall, "rows": rows}


def run_cleanlab(noisy_set: ImageSet, name: str, args, epochs: int, out: Path) -> dict:
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold

    n = len(noisy_set)
    y = noisy_set.labels.numpy()
    probs = np.full((n, noisy_set.num_classes), np.nan)
    folds = []
    t0 = time.perf_counter()
    skf = StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=args.seed)
    for k, (tr, te) in enumerate(skf.split(np.zeros(n), y)):
        part = noisy_set.subset(torch.from_numpy(tr))
        cfg, _ = config_for(part, device=args.device, overrides=[
            f"data.spec={args.data}", f"seed={args.seed}", f"data.noise_seed={args.seed}",
            "method=ce", f"epochs={epochs}"])
        d = out / f"fold{k}"
        tf = time.perf_counter()
        s = run(cfg, d, overwrite=True, data=DataSplits(name, part))
        model = load_model(d / "model.pt")
        probs[te] = model.predict_proba(noisy_set.images[torch.from_numpy(te)]).double().numpy()
        folds.append({"fold": k, "n_train": s["n_train"], "n_val": s["n_val"], "n_held_out": len(te),
                      "selected_epoch": s["best_val_epoch"], "best_val_acc": s["best_val_acc"],
                      "seconds": round(time.perf_counter() - tf, 1),
                      "held_out_acc_vs_noisy": float((probs[te].argmax(1) == y[te]).mean())})
        log.info("cleanlab fold %d/%d: %s", k + 1, args.folds, folds[-1])
    probs /= probs.sum(1, keepdims=True)
    t_issues = time.perf_counter()
    ranked = np.asarray(find_label_issues(labels=y, pred_probs=probs, return_indices_ranked_by="self_confidence"),
                        dtype=np.int64)
    t_end = time.perf_counter()
    np.save(out / "pred_probs.npy", probs)
    return {"cfg": cfg, "probs": probs, "ranked": ranked, "folds": folds, "wall": t_end - t0,
            "find_label_issues_seconds": t_end - t_issues}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (runs, comparison.md, comparison.json)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise, the folds and training")
    ap.add_argument("--k", type=int, nargs="+", default=[50, 100, 200],
                    help="precision@k cut-offs (the number of injected errors is always added)")
    ap.add_argument("--folds", type=int, default=5, help="cross-validation folds for cleanlab's pred_probs")
    ap.add_argument("--data", default="imagefolder:../shared/data/pneumoniamnist", help="labelrefine data spec")
    ap.add_argument("--noise", default="idn", help="injected noise type")
    ap.add_argument("--rate", type=float, default=0.2, help="injected noise rate")
    ap.add_argument("--epochs", type=int, default=0,
                    help="supervised epochs of each cleanlab fold model (0 = ours' supervised epochs)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    try:
        import cleanlab
    except ImportError:
        sys.exit("compare_cleanlab.py needs cleanlab: pip install -e '.[bench]'")
    _setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", *sys.argv])

    # 1. data and injected noise
    probe = load_config(None, [f"data.spec={args.data}"])
    data = load_data(args.data, cache_dir=default_cache_dir(probe))
    train = data.train
    clean = train.labels.numpy().copy()
    noise = apply_noise(train, args.noise, args.rate, seed=args.seed)
    noisy = noise.noisy_labels.clone()
    wrong = noisy.numpy() != clean
    n = len(train)
    noisy_set = ImageSet(train.images, noisy, list(train.classes), [str(i) for i in range(n)])
    log.info("%s train: %d images, %s %.0f%% noise: %d labels wrong (%.2f%%)", data.name, n, args.noise,
             100 * args.rate, int(wrong.sum()), 100 * wrong.mean())

    # 2. ours
    ours = run_ours(noisy_set, data.name, args, out / "ours")
    cfg_ours = ours["cfg"]
    epochs = args.epochs or supervised_budget(dataclasses.replace(cfg_ours, epochs=0))
    pos = np.array([int(r["id"]) for r in ours["rows"]], dtype=np.int64)  # labels.csv order = ours' ranking
    subset = np.zeros(n, dtype=bool)
    subset[pos] = True
    cls = {c: i for i, c in enumerate(train.classes)}
    ours_flag = np.zeros(n, dtype=bool)
    ours_flag[pos] = [r["is_label_issue"] == "True" for r in ours["rows"]]
    refined = noisy.numpy().copy()
    refined[pos] = [cls[r["refined_label"]] for r in ours["rows"]]

    # 3. cleanlab
    cl = run_cleanlab(noisy_set, data.name, args, epochs, out / "cleanlab")
    probs, ranked = cl["probs"], cl["ranked"]
    y = noisy.numpy()
    self_conf = probs[np.arange(n), y]
    cl_flag = np.zeros(n, dtype=bool)
    cl_flag[ranked] = True
    rest = np.flatnonzero(~cl_flag)
    rest = rest[np.argsort(self_conf[rest], kind="stable")]
    cl_order_all = np.concatenate([ranked, rest])
    cl_order = cl_order_all[subset[cl_order_all]]
    cl_labels = y.copy()
    cl_labels[cl_flag] = probs[cl_flag].argmax(1)  # cleanlab's suggestion: the argmax of its out-of-fold probs

    # 4. measures
    n_err_sub = int(wrong[subset].sum())
    ks = list(dict.fromkeys([*args.k, n_err_sub]))
    m_ours = measure(ours_flag, pos, wrong, subset, ks)
    m_cl = measure(cl_flag, cl_order, wrong, subset, ks)
    m_cl_all = measure(cl_flag, cl_order_all, wrong, np.ones(n, dtype=bool), list(dict.fromkeys(
        [*args.k, int(wrong.sum())])))
    acc_before = float((y[subset] == clean[subset]).mean())
    m_ours["train_label_acc_before"] = m_cl["train_label_acc_before"] = acc_before
    m_ours["train_label_acc_after"] = float((refined[subset] == clean[subset]).mean())
    m_cl["train_label_acc_after"] = float((cl_labels[subset] == clean[subset]).mean())
    m_ours["wall_seconds"] = round(ours["wall"], 1)
    m_cl["wall_seconds"] = round(cl["wall"], 1)
    s = ours["summary"]
    now = datetime.now(timezone.utc)
    machine = f"{_cpu_name()}, {os.cpu_count()} cores, {platform.machine()}, no GPU" \
        if not torch.cuda.is_available() else f"{torch.cuda.get_device_name(0)}"
    result = {
        "command": command, "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine,
        "python": platform.python_version(), "torch": torch.__version__, "cleanlab_version": cleanlab.__version__,
        "labelrefine": code_version(), "seed": args.seed, "data": args.data, "dataset": data.name,
        "n_train_split": n, "classes": list(train.classes),
        "noise": {"type": args.noise, "requested_rate": args.rate, "achieved_rate": float(wrong.mean()),
                  "n_injected_errors": int(wrong.sum()), "seed": args.seed},
        "common_subset": {"n": int(subset.sum()), "n_injected_errors": n_err_sub,
                          "rate": n_err_sub / int(subset.sum()),
                          "note": f"the samples in ours' labels.csv: ours holds out {s['n_val']} samples "
                                  f"(data.val_fraction={cfg_ours.data.val_fraction}) as its noisy validation split"},
        "ours": {**m_ours, "settings": [k for k, _ in ours["chosen"]], "n_train": s["n_train"], "n_val": s["n_val"],
                 "supervised_epochs": epochs, "best_val_epoch": s["best_val_epoch"],
                 "run_seconds": s["seconds"], "n_label_issues_in_run": s["n_label_issues"]},
        "cleanlab": {**m_cl, "folds": cl["folds"], "epochs_per_fold_model": epochs,
                     "find_label_issues_seconds": round(cl["find_label_issues_seconds"], 2),
                     "filter_by": "prune_by_noise_rate (default)", "return_indices_ranked_by": "self_confidence",
                     "fold_config": {"method": "ce", "epochs": epochs, "backbone": cl["cfg"].model.backbone,
                                     "width": cl["cfg"].model.width, "lr": cl["cfg"].optim.lr,
                                     "batch_size": cl["cfg"].optim.batch_size, "augment": cl["cfg"].augment,
                                     "flip": cl["cfg"].flip, "val_fraction": cl["cfg"].data.val_fraction},
                     "oof_acc_vs_noisy": float((probs.argmax(1) == y).mean()),
                     "oof_acc_vs_clean": float((probs.argmax(1) == clean).mean()),
                     "all_samples": m_cl_all},
    }
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    kcols = [f"P@{k}" if k != n_err_sub else f"P@{k} (= injected errors)" for k in ks]
    head = ["tool", "flagged", "precision", "recall", *kcols, "ranking AUROC", "training-label acc before → after",
            "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in (("labelrefine `ours`", m_ours), (f"cleanlab ({args.folds}-fold CE)", m_cl)):
        auroc = "–" if m["ranking_auroc"] is None else f"{m['ranking_auroc']:.3f}"
        lines.append("| " + " | ".join([
            label, str(m["n_flagged"]), _pct(m["precision"]), _pct(m["recall"]),
            *[_pct(m["precision_at_k"][str(k)]) for k in ks], auroc,
            f"{100 * m['train_label_acc_before']:.2f} → {100 * m['train_label_acc_after']:.2f}",
            f"{m['wall_seconds'] / 60:.1f} min"]) + " |")
    c = result["cleanlab"]["fold_config"]
    md = f"""# Finding label errors: labelrefine vs cleanlab

- machine: {machine}; torch {torch.__version__}, cleanlab {cleanlab.__version__}, labelrefine {code_version()}
- date: {now.strftime("%Y-%m-%d %H:%M UTC")}; seed {args.seed} (one seed)
- data: `{args.data}` training split ({n} images, classes {", ".join(train.classes)})
- noise: {args.noise} {100 * args.rate:.0f}% injected with seed {args.seed}: {int(wrong.sum())} labels wrong \
({100 * wrong.mean():.2f}%); the injected errors are the ground truth
- command: `{command}`

Measured on the {int(subset.sum())} samples in ours' `labels.csv` ({n_err_sub} injected errors, \
{100 * n_err_sub / subset.sum():.2f}%): ours holds out {s['n_val']} samples ({100 * cfg_ours.data.val_fraction:.0f}%) \
as its noisy validation split and does not rank them. cleanlab ranks all {n} samples; its flagged set and \
ranking are restricted to the same {int(subset.sum())}.

{chr(10).join(lines)}

- **ours**: `method=ours` with the settings `labelrefine clean` chooses on a CPU \
({", ".join(f"`{k}`" for k, _ in ours["chosen"])}); SimCLR trained in the run (`ssl.cache=false`). \
Flagged = `is_label_issue` (refined label ≠ given label); ranking = `labels.csv` order (ascending \
`label_quality`, the final model's probability of the given label). Wall time = the whole run \
(SimCLR {s['seconds'].get('ssl', 0):.0f} s, then {epochs} supervised epochs, artifacts and report).
- **cleanlab**: out-of-fold `pred_probs` from {args.folds} stratified folds (on the noisy labels); each fold's \
model is labelrefine's `ce` ({c['backbone']} width {c['width']}, {c['epochs']} epochs, lr {c['lr']}, batch \
{c['batch_size']}, {c['augment']} augmentation, flip {str(c['flip']).lower()}, no SSL), trained on the other \
folds minus a {100 * c['val_fraction']:.0f}% noisy validation split, and `model.pt` is its best epoch on that \
split. Then `cleanlab.filter.find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence")` \
(default `filter_by="prune_by_noise_rate"`) over all {n} samples; ranking = its ranked issues, then the \
unflagged samples by ascending self-confidence. Training-label acc after = flagged labels replaced by the argmax \
of the out-of-fold probabilities. Wall time = the {args.folds} fold runs + prediction + `find_label_issues` \
({cl['find_label_issues_seconds']:.1f} s).
- What differs: ours gets SimCLR pretraining on all images and refines labels as it trains; each cleanlab \
model trains from scratch on ~{100 * (1 - 1 / args.folds) * (1 - c['val_fraction']):.0f}% of the samples and \
scores the held-out fold. Both use the same backbone and {epochs} supervised epochs per model; ours' refinement \
epochs also train on strongly augmented copies of pseudo-labelled samples, so they take more steps.
- cleanlab over all {n} samples: {m_cl_all['n_flagged']} flagged, precision {_pct(m_cl_all['precision'])}, \
recall {_pct(m_cl_all['recall'])}; out-of-fold accuracy {100 * result['cleanlab']['oof_acc_vs_clean']:.2f}% \
against the clean labels.
"""
    (out / "comparison.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
