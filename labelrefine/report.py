"""Plots and a self-contained HTML report of a run (images embedded, opens offline).

``report.html`` has three sections: a summary (estimated noise rate, labels changed, the
estimated given → suggested transition matrix, the run's key/value summary), a gallery of the
training images most suspected of a wrong label, and the training curves. No scripts, no external
references; every text from the data (class names, sample ids) is HTML-escaped.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .io import write_bytes, write_text
from .methods.base import LabelReport

# Background shades of the training-curve phases: these keep their colours; every other phase a
# registered method declares (Method.phases) gets the next of PHASE_PALETTE, in registry order.
FIXED_PHASE_COLORS = {"ssl": "#eeeeee", "warmup": "#fff3d6", "refine": "#e3f0ff", "finetune": "#e6f7e6",
                      "train": "#ffffff"}
PHASE_PALETTE = ("#f3e6ff", "#ffe6ea", "#e0f7f4", "#f5f0d8", "#ffe9dc", "#e8ecf4", "#eaf5dc", "#f7e1f2")


@functools.cache
def phase_colors() -> dict[str, str]:
    """Phase name -> background colour, for every phase of every registered method."""
    from .methods import list_methods

    colors = dict(FIXED_PHASE_COLORS)
    others = [p for p in dict.fromkeys(p for m in list_methods() for p in m.phases) if p not in colors]
    for k, phase in enumerate(others):
        colors[phase] = PHASE_PALETTE[k % len(PHASE_PALETTE)]
    return colors


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
            ax.axvspan(start, r["global_epoch"] + 0.5, color=phase_colors().get(r["phase"], "#ffffff"), zorder=0)
            label = r["phase"] + (f" {r['iteration']}" if r["iteration"] else "")
            ax.text((start + r["global_epoch"] + 0.5) / 2, 1.0, label, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7)
            start = None


def make_plots(records: list[dict], rep: LabelReport, given: torch.Tensor, classes: list[str]) -> dict[str, bytes]:
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
    conf = torch.bincount(given.cpu() * c + rep.refined_label.cpu(), minlength=c * c).reshape(c, c)
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


def precision_recall_png(quality: torch.Tensor, wrong: torch.Tensor, flagged: torch.Tensor) -> tuple[bytes, float]:
    """``precision_recall.png``: precision against recall of the wrong labels as the ranking
    (ascending ``label_quality``) goes down, with the flagged set marked; and the AUPRC (average
    precision). Evaluation only: ``wrong`` comes from the clean labels."""
    import matplotlib.pyplot as plt

    order = torch.argsort(quality.cpu(), stable=True)
    hits = wrong.cpu()[order].double()
    tp = hits.cumsum(0)
    n_err = max(float(hits.sum()), 1.0)
    precision = tp / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    recall = tp / n_err
    ap = float((precision * hits).sum() / n_err)
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.plot(recall.numpy(), precision.numpy(), "-", color="#1f77b4", label=f"ranking (AUPRC {ap:.3f})")
    k = int(flagged.sum())
    if 0 < k <= len(hits):
        ax.plot([float(recall[k - 1])], [float(precision[k - 1])], "o", color="#d62728",
                label=f"the {k} flagged (if they are the lowest ranked)")
    ax.axhline(float(hits.mean()) if len(hits) else 0.0, color="grey", lw=0.8, ls="--", label="noise rate (chance)")
    ax.set_xlabel("recall of the wrong labels")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Finding the wrong labels (from the clean labels, for evaluation)", fontsize=8)
    data = _png(fig)
    plt.close(fig)
    return data, ap



#: Largest class count for which the summary shows the transition matrix as an HTML table.
MATRIX_TABLE_MAX_CLASSES = 30
#: Thumbnails are scaled to about this many pixels on their longer side.
THUMB_PX = 96


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def suspect_order(rep: dict) -> list[int]:
    """Indices of the flagged training samples (``is_label_issue``), lowest ``label_quality`` first.

    Ties keep the sample order, so this is the order of the flagged rows of ``labels.csv``.
    """
    order = torch.argsort(rep.label_quality.cpu(), stable=True)
    flagged = rep.is_label_issue.cpu().bool()[order]
    return order[flagged].tolist()


def thumbnail_png(image: torch.Tensor | np.ndarray, target: int = THUMB_PX) -> bytes:
    """A PNG of one uint8 ``C×H×W`` image (C = 1 or 3) about ``target`` pixels on its longer side.

    Small images are enlarged by a whole factor with nearest-neighbour (pixels stay sharp);
    large ones are shrunk with a box filter.
    """
    from PIL import Image

    a = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image, dtype=np.uint8)
    im = Image.fromarray(np.ascontiguousarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)))  # L or RGB
    w, h = im.size
    side = max(w, h)
    if side < target:
        k = max(1, round(target / side))
        im = im.resize((w * k, h * k), Image.Resampling.NEAREST)
    elif side > target:
        im = im.resize((max(1, round(w * target / side)), max(1, round(h * target / side))), Image.Resampling.BOX)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def transition_counts(given: torch.Tensor, refined: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` counts: row = given label, column = suggested (refined) label."""
    c = num_classes
    return torch.bincount(given.cpu().long() * c + refined.cpu().long(), minlength=c * c).reshape(c, c)


def _heat(frac: float) -> str:
    """Inline style of a matrix cell: white (0) to dark blue (1); white text on dark cells."""
    r, g, b = (round(255 + (t - 255) * frac) for t in (8, 69, 148))
    return f"background:rgb({r},{g},{b});color:{'#fff' if frac > 0.55 else '#222'}"


def _matrix_table(counts: torch.Tensor, classes: list[str]) -> str:
    rows_n = counts.sum(1)
    head = "".join(f'<th scope="col" class="cls">{_esc(c)}</th>' for c in classes)
    lines = [f'<table class="matrix" id="transition"><thead><tr><th scope="col">given \\ suggested</th>'
             f'<th scope="col">n</th>{head}</tr></thead><tbody>']
    for i, name in enumerate(classes):
        n = int(rows_n[i])
        cells = []
        for j, other in enumerate(classes):
            k = int(counts[i, j])
            if n == 0:
                cells.append('<td title="no training sample has this given label">–</td>')
                continue
            frac = k / n
            title = f"given {name} → suggested {other}: {k} of {n} ({frac:.4f})"
            text = f"{frac:.3f}" if k else "0"
            cells.append(f'<td style="{_heat(frac) if k else "color:#bbb"}" title="{_esc(title)}">{text}</td>')
        lines.append(f'<tr><th scope="row" class="cls">{_esc(name)}</th><td>{n}</td>{"".join(cells)}</tr>')
    lines.append("</tbody></table>")
    return "".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _summary_section(summary: dict, rep: LabelReport, given: torch.Tensor, classes: list[str],
                     pngs: dict[str, bytes]) -> tuple[str, bool]:
    """The summary section; returns it and whether it embedded ``confusion.png`` (many classes)."""
    n = len(given)
    flagged = rep.is_label_issue.cpu().bool()
    refined = rep.refined_label.cpu()
    changed = int((refined != given.cpu()).sum())
    est = summary.get("estimated_noise_rate")
    if est is None:
        est = float(flagged.double().mean()) if n else 0.0
    facts = [
        ("method", _esc(summary.get("method"))),
        ("data set", f"{_esc(summary.get('dataset'))} (<code>{_esc(summary.get('data'))}</code>)"),
        ("sizes", f"{summary.get('n_train', n)} train, {summary.get('n_val', 0)} val, {summary.get('n_test', 0)} test; "
                  f"{len(classes)} classes"),
    ]
    noise = summary.get("noise") if isinstance(summary.get("noise"), dict) else {}
    if noise.get("type"):
        facts.append(("noise injected", _esc(_fmt({k: v for k, v in noise.items() if v is not None}))))
    oracle = " <em>(from the clean labels, for evaluation)</em>"
    if summary.get("estimated_label_issues") is not None:
        rate = (f"<strong>{_pct(est)}</strong> ({summary['estimated_label_issues']} of {n} labels, estimated by "
                f"the confident joint); flagged as issues: <strong>{int(flagged.sum())}</strong>")
    else:
        rate = (f"<strong>{_pct(est)}</strong> ({int(flagged.sum())} of {n} training labels flagged as issues by "
                f"the method)")
    before = summary.get("train_label_acc_before")
    if before is not None:
        rate += f"; true rate: {_pct(1 - before)}{oracle}"
    facts.append(("estimated noise rate", rate))
    moved = f"{changed} of {n} ({_pct(changed / n if n else 0.0)}): suggested label ≠ given label"
    after = summary.get("train_label_acc_after")
    if after is not None:
        moved += f"; wrong labels after refinement: {_pct(1 - after)}{oracle}"
    facts.append(("labels changed", moved))
    for key, label in (("issue_precision", "precision of the flagged issues"),
                       ("issue_recall", "recall of the wrong labels")):
        if summary.get(key) is not None:
            facts.append((label, f"{_pct(summary[key])}{oracle}"))
    for key, label in (("best_val_test_acc", "test accuracy (model.pt, best noisy-val epoch)"),
                       ("final_test_acc", "test accuracy (last epoch)")):
        if isinstance(summary.get(key), float):
            facts.append((label, _pct(summary[key])))
    facts_html = "".join(f'<tr><th scope="row">{k}</th><td>{v}</td></tr>' for k, v in facts)

    counts = transition_counts(given, refined, len(classes))
    used_png = False
    if len(classes) <= MATRIX_TABLE_MAX_CLASSES:
        matrix = _matrix_table(counts, classes)
    else:
        used_png = "confusion.png" in pngs
        matrix = (f'<p class="note">{len(classes)} classes: too many for a table (the limit is '
                  f'{MATRIX_TABLE_MAX_CLASSES}). The counts are in the plot below and in <code>labels.csv</code>.</p>')
        if used_png:
            matrix += (f'<figure><img alt="given vs refined label counts" src="{_data_uri(pngs["confusion.png"])}">'
                       "<figcaption>confusion.png: given (rows) vs refined (columns) label counts"
                       "</figcaption></figure>")
    kv = "".join(f'<tr><th scope="row">{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>' for k, v in summary.items())
    section = f"""<section id="summary"><h2>Summary</h2>
<table class="facts">{facts_html}</table>
<h3>Estimated transition matrix</h3>
<p>Row = given label, column = the label the method suggests (its refined label); each row is the fraction of the
samples with that given label, so it sums to 1 (raw counts on hover). Off-diagonal mass is what the method thinks
is mislabelled.</p>
{matrix}
<details><summary>All summary values (<code>summary.json</code>)</summary><table class="kv">{kv}</table></details>
</section>"""
    return section, used_png


def _gallery_section(rep: LabelReport, given: torch.Tensor, classes: list[str], images: torch.Tensor, ids: list[str],
                     top_k: int, predict_logits: Callable[[torch.Tensor], torch.Tensor] | None) -> str:
    suspects = suspect_order(rep)
    n_flagged = len(suspects)
    shown = suspects[:max(top_k, 0)]
    if not shown:
        body = ("<p>The method flagged no training label as a likely error, so there is nothing to show."
                if n_flagged == 0 else "<p>The gallery is switched off (top_k = 0).") + "</p>"
        return f'<section id="gallery"><h2>Suspected label errors</h2>{body}</section>'
    refined = rep.suggested(given).cpu()
    quality = rep.label_quality.cpu()
    idx = torch.tensor(shown, dtype=torch.long)
    if predict_logits is not None:
        with torch.no_grad():
            probs = torch.softmax(predict_logits(images[idx]).float().cpu(), dim=1)
        conf = probs.gather(1, refined[idx][:, None]).squeeze(1).tolist()
        conf_name = "p(suggested)"
        conf_doc = ("<em>p(suggested)</em> is the trained model's softmax probability of the suggested label for "
                    "that image (the model at the end of training, no augmentation)")
    else:
        conf = (1.0 - quality[idx]).tolist()
        conf_name = "1 − quality"
        conf_doc = ("<em>1 − quality</em> is one minus the sample's <code>label_quality</code> in "
                    "<code>labels.csv</code> (the method's own signal; higher = more suspect)")
    figs = []
    for k, i in enumerate(shown):
        g, r = classes[int(given[i])], classes[int(refined[i])]
        alt = f"training image {ids[i]}: given {g}, suggested {r}"
        figs.append(
            f'<figure class="suspect"><img alt="{_esc(alt)}" src="{_data_uri(thumbnail_png(images[i]))}">'
            f'<figcaption><span class="sid">{_esc(ids[i])}</span>'
            f'<span class="given">given: {_esc(g)}</span>'
            f'<span class="suggested">suggested: {_esc(r)}</span>'
            f'<span class="conf">{conf_name}: {conf[k]:.3f}</span></figcaption></figure>')
    more = f" (of {n_flagged} flagged; all are in <code>labels.csv</code>)" if n_flagged > len(shown) else ""
    return f"""<section id="gallery"><h2>Suspected label errors</h2>
<p>The {len(shown)} training images whose labels the method flags as issues, lowest label quality
first{more}. Each shows the sample id, the given label, the label the method suggests, and {conf_doc}.</p>
<div class="grid">{''.join(figs)}</div>
</section>"""


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}
table.matrix td{text-align:right;font-variant-numeric:tabular-nums;min-width:3em}
table.matrix th.cls{max-width:9em;overflow-wrap:anywhere;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure.suspect{margin:0;width:130px;border:1px solid #ddd;padding:4px;font-size:12px}
figure.suspect img{display:block;margin:0 auto;image-rendering:pixelated;max-width:120px}
figure.suspect figcaption span{display:block;overflow-wrap:anywhere}
figure.suspect .sid{color:#666}figure.suspect .suggested{font-weight:600}
#plots figure{display:inline-block;margin:1em}img{max-width:100%}.note{color:#555}
details{margin:1em 0}summary{cursor:pointer}"""


def build_html(summary: dict, rep: LabelReport, given: torch.Tensor, classes: list[str], images: torch.Tensor,
               ids: list[str], pngs: dict[str, bytes], *, top_k: int = 48,
               predict_logits: Callable[[torch.Tensor], torch.Tensor] | None = None) -> str:
    """The text of ``report.html`` (see :func:`write_report`)."""
    summary_html, used_png = _summary_section(summary, rep, given, classes, pngs)
    gallery_html = _gallery_section(rep, given, classes, images, ids, top_k, predict_logits)
    plots = "".join(
        f'<figure><img alt="{_esc(name)}" src="{_data_uri(data)}"><figcaption>{_esc(name)}</figcaption></figure>'
        for name, data in pngs.items() if not (used_png and name == "confusion.png"))
    title = f"labelrefine: {summary.get('method')} on {summary.get('dataset')}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{CSS}</style></head>
<body><h1>{_esc(title)}</h1>
{summary_html}
{gallery_html}
<section id="plots"><h2>Training curves</h2>{plots}</section>
</body></html>
"""


def write_report(out: Path, summary: dict, rep: LabelReport, given: torch.Tensor, classes: list[str],
                 images: torch.Tensor, ids: list[str], *, top_k: int = 48,
                 predict_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 clean: torch.Tensor | None = None) -> None:
    """Write the PNGs and ``report.html`` (every image embedded as a data URI) into ``out``.

    Args:
        summary: the run's ``summary.json`` dict.
        rep: the method's :class:`~labelrefine.methods.base.LabelReport`.
        given: ``(N,)`` the given (noisy) training labels; classes: the class names.
        images: uint8 ``(N, C, H, W)`` training images and ``ids`` their ids, in the order of ``rep``.
        top_k: how many suspected label errors the gallery shows.
        predict_logits: the trained model (uint8 images → logits). With it, a gallery image's
            confidence is the model's probability of the suggested label; without, 1 − label_quality.
        clean: the clean training labels when they are known (synthetic noise, a clean column):
            evaluation only, for the precision-recall curve of the ranking.
    """
    out = Path(out)
    if not len(images) == len(ids) == len(given) == len(rep.refined_label):
        raise ValueError(f"write_report: {len(images)} images, {len(ids)} ids, {len(given)} labels and "
                         f"{len(rep.refined_label)} report rows differ")
    pngs = make_plots(_read_metrics(out), rep, given, classes)
    if clean is not None and len(clean) == len(given):
        pngs["precision_recall.png"], _ = precision_recall_png(rep.label_quality, clean.cpu() != given.cpu(),
                                                               rep.is_label_issue)
    for name, data in pngs.items():
        write_bytes(out / name, data)  # atomic: a kill never leaves a truncated PNG
    write_text(out / "report.html", build_html(summary, rep, given, classes, images, ids, pngs, top_k=top_k,
                                                predict_logits=predict_logits))
