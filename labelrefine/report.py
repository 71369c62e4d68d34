"""Plots and a self-contained HTML report of a run (images embedded, opens offline)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import torch

from .io import write_text

PHASE_COLORS = {"ssl": "#eeeeee", "warmup": "#fff3d6", "refine": "#e3f0ff", "finetune": "#e6f7e6",
                "train": "#ffffff"}


def _read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _shade_phases(ax, records: list[dict]) -> None:
    start = None
    for k, r in enumerate(records):
        key = (r["phase"], r["iteration"])
        nxt = (records[k + 1]["phase"], records[k + 1]["iteration"]) if k + 1 < len(records) else None
        if start is None:
            start = r["global_epoch"] - 0.5
        if nxt != key:
            ax.axvspan(start, r["global_epoch"] + 0.5, color=PHASE_COLORS.get(r["phase"], "#ffffff"), zorder=0)
            label = r["phase"] + (f" {r['iteration']}" if r["iteration"] else "")
            ax.text((start + r["global_epoch"] + 0.5) / 2, 1.0, label, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7)
            start = None


def make_plots(records: list[dict], rep: dict, given: torch.Tensor, classes: list[str]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs: dict[str, bytes] = {}
    if records:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        _shade_phases(ax, records)
        for key, style in (("val_acc", "o-"), ("test_acc", "s-"), ("oracle_label_acc", "^--")):
            pts = [(r["global_epoch"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, ms=3, label={"val_acc": "val acc (noisy labels)",
                                                                    "test_acc": "test acc",
                                                                    "oracle_label_acc": "training-label acc"}[key])
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="lower right")
        pngs["accuracy.png"] = _png(fig)
        plt.close(fig)
    its = [r for r in records if "pseudo_labelled" in r]
    if its:
        fig, ax = plt.subplots(figsize=(5, 3))
        x = [r["iteration"] for r in its]
        ax.bar(x, [r["pseudo_labelled"] for r in its], color="#8fb8e8", label="pseudo-labelled")
        ax.bar(x, [r["labels_differ_from_given"] for r in its], color="#e8a08f", width=0.5,
               label="differ from given")
        ax.set_xlabel("iteration")
        ax.set_ylabel("samples")
        if any("oracle_label_acc" in r for r in its):
            ax2 = ax.twinx()
            ax2.plot(x, [r.get("oracle_label_acc", float("nan")) for r in its], "k^-", label="label acc")
            ax2.set_ylabel("training-label accuracy")
        ax.legend(fontsize=7, loc="lower left")
        pngs["labels.png"] = _png(fig)
        plt.close(fig)
    c = len(classes)
    conf = torch.bincount(given.cpu() * c + rep["refined_label"].cpu(), minlength=c * c).reshape(c, c)
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * c, 12), min(1.6 + 0.45 * c, 11)))
    im = ax.imshow(conf.numpy(), cmap="Blues")
    if c <= 20:
        ax.set_xticks(range(c), [n[:10] for n in classes], rotation=60, fontsize=7)
        ax.set_yticks(range(c), [n[:10] for n in classes], fontsize=7)
        for i in range(c):
            for j in range(c):
                ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if conf[i, j] > conf.max() / 2 else "black")
    ax.set_xlabel("refined label")
    ax.set_ylabel("given (noisy) label")
    fig.colorbar(im, ax=ax, fraction=0.046)
    pngs["confusion.png"] = _png(fig)
    plt.close(fig)
    return pngs


def write_report(out: Path, summary: dict, rep: dict, given: torch.Tensor, classes: list[str]) -> None:
    """Write the PNGs and ``report.html`` (PNGs embedded as data URIs) into ``out``."""
    records = _read_metrics(out)
    pngs = make_plots(records, rep, given, classes)
    for name, data in pngs.items():
        (out / name).write_bytes(data)
    rows = []
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4f}"
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>")
    imgs = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{name}</figcaption></figure>" for name, data in pngs.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>labelrefine report: {html.escape(str(summary.get('method')))}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}}
figure{{display:inline-block;margin:1em}}img{{max-width:100%}}</style></head>
<body><h1>labelrefine: {html.escape(str(summary.get('method')))} on {html.escape(str(summary.get('dataset')))}</h1>
<h2>Summary</h2><table>{''.join(rows)}</table>
<h2>Training</h2><div id="plots">{imgs}</div>
</body></html>
"""
    write_text(out / "report.html", page)
