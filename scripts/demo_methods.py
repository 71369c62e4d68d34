"""Run every registered method on one config and seed; print a markdown table.

    python scripts/demo_methods.py --config configs/demo-digits.yaml --out runs/demo-methods

Finished runs (a summary.json in their directory) are reused. The full benchmark command with
seeds, suites and caching is `labelrefine bench` (issue 5); this is the demo-sized table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from labelrefine.config import load_config
from labelrefine.methods import list_methods
from labelrefine.pipeline import run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    lines = ["| method | final test acc | test acc at best noisy-val epoch | training-label acc before → after "
             "| flagged issues: precision / recall | wall s (data + training) |", "|---|---|---|---|---|---|"]
    for m in list_methods():
        d = Path(args.out) / m.name
        if not (d / "summary.json").exists():
            run(load_config(args.config, [*args.set, f"method={m.name}"]), d, overwrite=True)
        s = json.loads((d / "summary.json").read_text())
        wall = s["seconds"]["data"] + s["seconds"]["total_training"]
        prec, rec = s.get("issue_precision"), s.get("issue_recall")
        lines.append(f"| `{m.name}` | {100 * s['final_test_acc']:.2f} | {100 * s['best_val_test_acc']:.2f} | "
                     f"{100 * s['train_label_acc_before']:.2f} → {100 * s['train_label_acc_after']:.2f} | "
                     f"{'-' if prec is None else f'{100 * prec:.1f}'} / {'-' if rec is None else f'{100 * rec:.1f}'} "
                     f"| {wall:.0f} |")
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
