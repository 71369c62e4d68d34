"""Compare a suite's re-made runs with their first records (bit-identity check of the results).

    python scripts/compare_rerun_records.py results/cpu-cifar10/runs-superseded.jsonl results/cpu-cifar10/runs.jsonl

For every (method, setting, seed) in both files: SAME when the final test accuracy, the best
noisy-validation accuracy and the training-label accuracy after the run are equal, else DIFF with
the values; and each record's wall time (minutes). The config hash is not compared: it changes
when a config key is added, which changes no result at its default. Exit status 1 on any DIFF.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIELDS = ("final_test_acc", "best_val_acc", "train_label_acc_after")


def _records(path: str) -> dict[tuple, dict]:
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return {(r["method"], r["setting"], r["seed"]): r for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a suite's runs.jsonl ({type(e).__name__}: {e})") from None


def _minutes(rec: dict) -> str:
    secs = rec.get("seconds_total")
    return "?" if not isinstance(secs, (int, float)) else f"{secs / 60:.1f}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        first, again = _records(argv[0]), _records(argv[1])
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    diff = 0
    for key in sorted(set(first) & set(again), key=str):
        a, b = first[key], again[key]
        bad = [f"{f} {a.get(f)} -> {b.get(f)}" for f in FIELDS if a.get(f) != b.get(f)]
        diff += bool(bad)
        print(" / ".join(map(str, key)), "DIFF " + "; ".join(bad) if bad else "SAME",
              f"({_minutes(a)} -> {_minutes(b)} min)")
    print(f"{len(set(first) & set(again))} compared, {diff} differ; "
          f"{len(set(first) - set(again))} not re-made yet")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
