"""A finished run's outputs: ``labels.csv``, ``model.pt``, ``summary.json``, the report, and the
:class:`RunResult` that hands the same things to callers in memory."""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import distributed as ddp
from .config import RunConfig, config_hash, config_to_dict
from .data.noise import check_noise_type
from .data.splits import Prepared
from .engine import Context, backbone_kwargs
from .evaluation import Oracle
from .io import write_csv, write_json
from .methods.base import LabelReport
from .predict import MODEL_FORMAT, Predictor
from .store import save as store_save

log = logging.getLogger("labelrefine")

#: The columns every ``labels.csv`` and :meth:`RunResult.label_table` has: cleanlab's
#: (``CleanLearning.find_label_issues``: ``is_label_issue``, ``label_quality``, ``given_label``,
#: ``predicted_label``) and ours. After them come the run's detector scores
#: (:data:`labelrefine.detect.DETECTORS`, those it has), so a user sees why a sample was flagged.
LABEL_COLUMNS = ["id", "given_label", "predicted_label", "refined_label", "label_quality", "is_label_issue",
                 "n_stages_selected"]


@dataclass
class RunResult:
    """What :func:`labelrefine.pipeline.run` returns, in memory (the files hold the same).

    Attributes:
        summary: the content of ``summary.json``.
        labels: the method's per-sample label report (on the CPU), in training-sample order.
        ids: the training samples' ids; classes: the class names; given: the given (noisy) labels.
        predictor: the selected model (the epoch of best noisy-validation accuracy), as ``model.pt``.
        out: the run directory.
    """

    summary: dict
    labels: LabelReport
    ids: list[str]
    classes: list[str]
    given: torch.Tensor
    predictor: Predictor | None
    out: Path

    def score_columns(self) -> list[str]:
        """The detector score columns this run's table has: :data:`~labelrefine.detect.DETECTORS`
        order, then any others (``detect.knn_k_sweep``'s) by name."""
        from .detect import DETECTORS

        have = self.labels.scores
        def by_k(name: str) -> tuple[str, int]:  # knn_model_k5 before knn_model_k20
            head, _, k = name.rpartition("_k")
            return (head, int(k)) if k.isdigit() else (name, 0)

        return [name for name in DETECTORS if name in have] + sorted((n for n in have if n not in DETECTORS), key=by_k)

    def predicted(self) -> torch.Tensor:
        """The final model's predicted class per sample (the refined label if the method gives none)."""
        rep = self.labels
        return rep.refined_label if rep.predicted_label is None else rep.predicted_label

    def order(self) -> list[int]:
        """Sample positions, suspected errors first (ascending quality; ties keep sample order)."""
        return torch.argsort(self.labels.label_quality, stable=True).tolist()

    def label_table(self):
        """``labels.csv`` as a pandas DataFrame (``label_quality`` unrounded; the CSV has 6 decimals)."""
        import pandas as pd

        rep, order = self.labels, self.order()
        names, pred = self.classes, self.predicted()
        extra = self.score_columns()
        return pd.DataFrame({
            "id": [self.ids[i] for i in order],
            "given_label": [names[int(self.given[i])] for i in order],
            "predicted_label": [names[int(pred[i])] for i in order],
            "refined_label": [names[int(rep.refined_label[i])] for i in order],
            "label_quality": rep.label_quality[order].double().numpy(),
            "is_label_issue": rep.is_label_issue[order].bool().numpy(),
            "n_stages_selected": rep.n_stages_selected[order].long().numpy(),
            **{name: rep.scores[name][order].double().numpy() for name in extra},
        }, columns=LABEL_COLUMNS + extra)


def write_labels(path: Path, result: RunResult) -> None:
    rep, names, pred = result.labels, result.classes, result.predicted()
    extra = result.score_columns()
    scores = [rep.scores[name].double() for name in extra]
    rows = [[result.ids[i], names[int(result.given[i])], names[int(pred[i])], names[int(rep.refined_label[i])],
             f"{float(rep.label_quality[i]):.6f}", bool(rep.is_label_issue[i]), int(rep.n_stages_selected[i]),
             *(f"{float(s[i]):.6f}" for s in scores)]
            for i in result.order()]
    write_csv(path, LABEL_COLUMNS + extra, rows)


def model_blob(cfg: RunConfig, ctx: Context, method, state: dict, classes: list[str], version: str) -> dict:
    """The content of ``model.pt``: the best-validation epoch's networks (the last epoch's without
    a validation split) and what prediction needs (backbone, input shape, normalisation, classes)."""
    best = state["best"]
    nets = best["networks"] if best is not None else {k: v.state_dict() for k, v in method.networks().items()}
    return {"format": MODEL_FORMAT, "method": cfg.method, "backbone": cfg.model.backbone,
            "backbone_kwargs": backbone_kwargs(cfg), "in_channels": ctx.channels, "image_size": list(ctx.image_size),
            "num_classes": ctx.num_classes, "classes": classes, "mean": list(ctx.mean), "std": list(ctx.std),
            "networks": nets, "selected_epoch": None if best is None else best["epoch"],
            "config": config_to_dict(cfg), "code_version": version}


def utc_now() -> str:
    """The time now, as results record it (``2026-12-05T13:00:00Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows: a run's speed and its
    exact numbers depend on it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary_of(cfg: RunConfig, prep: Prepared, ctx: Context, state: dict, rep: LabelReport,
               oracle: Oracle | None, t_data: float, version: str) -> dict:
    best = state["best"]
    summary = {
        "method": cfg.method, "data": cfg.data.spec, "dataset": prep.name, "seed": cfg.seed,
        "noise": {"type": cfg.data.noise, "requested_rate": cfg.data.noise_rate if check_noise_type(cfg.data.noise)
                  else None, "achieved_rate": prep.noise.rate, "seed": cfg.data.noise_seed},
        "n_train": len(prep.train), "n_val": 0 if prep.val is None else len(prep.val),
        "n_test": 0 if prep.test is None else len(prep.test),
        "final_test_acc": state["last_test"], "final_val_acc": state["last_val"],
        "best_val_acc": None if best is None else best["val_acc"],
        "best_val_epoch": None if best is None else best["epoch"],
        "best_val_test_acc": None if best is None else best["test_acc"],
        "n_label_issues": int(rep.is_label_issue.sum()),
        **({} if rep.estimated_issues is None else {
            "estimated_label_issues": rep.estimated_issues,
            "estimated_noise_rate": rep.estimated_issues / max(len(rep.label_quality), 1),
            "estimated_label_issues_by_source": dict(rep.estimates)}),
        **({} if state.get("ssl_knn_test_acc") is None else {"ssl_knn_test_acc": state["ssl_knn_test_acc"]}),
        "seconds": {"data": round(t_data, 3), **{k: round(v, 3) for k, v in state["phase_seconds"].items()},
                    "total_training": round(state["elapsed"], 3)},
        "config_hash": config_hash(cfg), "code_version": version,
        "torch": torch.__version__, "device": str(ctx.device), "cpu": cpu_name(),
        "finished_at": utc_now(),
    }
    if oracle is not None:
        summary.update(oracle.final_metrics(rep.refined_label, rep.is_label_issue))
    return summary


def finish(cfg: RunConfig, out: Path, prep: Prepared, ctx: Context, method, state: dict,
           oracle: Oracle | None, t_data: float, version: str) -> RunResult | None:
    """Write every artifact of a trained run (rank 0) and return them as a :class:`RunResult`."""
    rep = method.label_report().cpu()  # every rank: it may gather over ranks
    if not ddp.is_main():
        return None
    blob = model_blob(cfg, ctx, method, state, prep.classes, version)
    summary = summary_of(cfg, prep, ctx, state, rep, oracle, t_data, version)
    ssl = getattr(method, "ssl", None) or getattr(getattr(method, "ours", None), "ssl", None)
    if ssl is not None and ssl.epochs > 0 and ssl.seconds is not None:
        # What the SimCLR encoder cost, pretrained here (then also the "ssl" phase's seconds) or
        # read from the cache (no "ssl" phase: the seconds the cache entry recorded).
        summary["seconds"]["ssl_pretrain"] = round(float(ssl.seconds), 3)
    result = RunResult(summary=summary, labels=rep, ids=list(prep.train.ids), classes=list(prep.classes),
                       given=prep.train.labels, predictor=None, out=out)
    write_labels(out / "labels.csv", result)
    store_save(out / "model.pt", blob, kind=MODEL_FORMAT)
    try:
        from .report import write_report

        write_report(out, summary, rep, prep.train.labels, prep.classes, prep.train.images, prep.train.ids,
                     predict_logits=method.predict_logits, clean=None if oracle is None else oracle.clean)
    except ImportError as e:  # matplotlib missing: the run's results stand without the report
        log.warning("report skipped: %s", e)
    # Last: summary.json marks the run finished (bench reuses a run that has one), so a run killed
    # before it is resumed and every artifact above is written again.
    write_json(out / "summary.json", summary)
    with torch.random.fork_rng(devices=[]):  # building the networks draws initial weights: not from the run's RNG
        result.predictor = Predictor(blob)
    return result
