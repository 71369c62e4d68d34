"""The ``labelrefine`` command line: parse, validate, call the library, show the result.

Every user error ends as one line ``labelrefine: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .allocator import tune_allocator
from .errors import TrainingDiverged, UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 (argparse prints the whole usage)."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())}\n")
        sys.exit(EXIT_USAGE)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    from . import progress

    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    progress.configure("off" if quiet else "auto")
    handler = progress.TqdmLoggingHandler() if progress.mode() == "bar" else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("labelrefine")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _format_matrix(matrix, classes: Sequence[str]) -> str:
    width = max(6, *(len(c) for c in classes))
    head = " " * (width + 2) + " ".join(f"{c[:width]:>{width}}" for c in classes)
    lines = [head]
    for name, row in zip(classes, matrix.tolist(), strict=True):
        lines.append(f"{name[:width]:>{width}}  " + " ".join(f"{v:>{width}.4f}" for v in row))
    return "\n".join(lines)


def cmd_noise(args: argparse.Namespace) -> int:
    from .config import RANGES
    from .data.noise import apply_noise, check_noise_type
    from .data.sources import load_data
    from .io import check_output_file, write_csv

    # Validate everything before the (possibly slow) data load.
    fixed = not check_noise_type(args.type)
    if not fixed and args.rate is None:
        raise UserError(f"--rate is required for noise type {args.type!r}")
    if fixed and args.rate is not None:
        raise UserError(f"--rate does not apply to noise type {args.type!r}: its rate is whatever the labels hold")
    rate = 0.0 if args.rate is None else args.rate
    if not fixed and not 0.0 <= rate < 1.0:
        raise UserError(f"--rate {rate} is outside [0, 1)")
    seeds = RANGES["data.noise_seed"]  # --seed is the config's data.noise_seed
    if not seeds.contains(args.seed):
        raise UserError(f"--seed {args.seed} is outside {seeds.describe()}")
    if args.out:
        check_output_file(args.out, overwrite=args.overwrite, example="noise.csv")
    data = load_data(args.data)
    train = data.train
    res = apply_noise(train, args.type, rate, seed=args.seed, pixel_scale=args.pixel_scale)
    print(f"data: {args.data}  train samples: {len(train)}  classes: {train.num_classes}")
    print(f"noise: {args.type}  requested rate: {rate if not fixed else '-'}  seed: {args.seed}")
    print(f"achieved rate: {res.rate:.4f}")
    print("transition matrix (row = clean label, column = noisy label):")
    print(_format_matrix(res.transition, train.classes))
    if args.out:
        classes = train.classes
        clean = train.labels.tolist()
        noisy = res.noisy_labels.tolist()
        rows = [[i, classes[a], classes[b], int(a != b)] for i, a, b in zip(train.ids, clean, noisy, strict=True)]
        write_csv(args.out, ["id", "clean_label", "noisy_label", "is_noisy"], rows)
        print(f"wrote {args.out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import load_config
    from .rundir import check_out_dir, claim

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    cfg = load_config(args.config, args.set)
    # Claim the directory before the slow imports (torch) and the data load: a second run into it
    # is refused at once, an unwritable path too, and a kill from here on leaves a directory that
    # --resume starts afresh.
    with claim(args.out):
        check_out_dir(Path(args.out), resume=args.resume, overwrite=args.overwrite)
        from .pipeline import run

        result = run(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    if result is None:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    summary = result.summary
    keys = ("final_test_acc", "best_val_acc", "best_val_test_acc", "train_label_acc_before", "train_label_acc_after")
    for key in keys:
        if summary.get(key) is not None:
            print(f"{key}: {summary[key]:.4f}")
    print(f"achieved noise rate: {summary['noise']['achieved_rate']:.4f}")
    print(f"label issues flagged: {summary['n_label_issues']}")
    print(f"artifacts: {args.out}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import load_config
    from .rundir import check_out_dir, claim

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    probe = load_config(args.config, [f"data.spec={args.data}", *args.set])  # validates before the data load
    with claim(args.out):  # before the slow imports and the data load: see cmd_run
        check_out_dir(Path(args.out), resume=args.resume, overwrite=args.overwrite)
        from .api import auto_resize, config_for
        from .data.sources import load_data
        from .engine import resolve_device
        from .pipeline import default_cache_dir, run

        spec = args.data
        resized = auto_resize(spec, resolve_device(probe.device).type)
        if resized is not None:
            spec, why = resized
            print(f"resizing: {why}")
        data = load_data(spec, cache_dir=default_cache_dir(probe))
        train = data.train
        cfg, chosen = config_for(train, device=probe.device, config=args.config,
                                 overrides=[f"data.spec={spec}", *args.set])
        c, h, w = train.shape
        print(f"data: {spec}: {len(train)} training images, {h}x{w}, {c} channel(s), {train.num_classes} "
              f"classes" + (f"; test split {len(data.test)}" if data.test is not None else "; no test split"))
        if chosen:
            print("settings chosen for this data (override with --set KEY=VALUE):")
            for k, (item, why) in enumerate(chosen):  # a reason shared by a run of items: printed once
                print(f"  {item:<30} {why if k == 0 or chosen[k - 1][1] != why else ''}".rstrip())
        result = run(cfg, args.out, resume=args.resume, overwrite=args.overwrite, data=data)
    if result is None:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    summary, rep = result.summary, result.labels
    n = len(result.ids)
    flagged = [i for i in result.order() if bool(rep.is_label_issue[i])]
    suggested = rep.suggested(result.given)
    if rep.estimated_issues is not None:
        print(f"estimated wrong labels: {rep.estimated_issues} of {n} ({rep.estimated_issues / max(n, 1):.1%}, "
              f"the confident joint's estimate of the noise rate)")
    print(f"suspected label errors (flagged): {len(flagged)} of {n} ({len(flagged) / max(n, 1):.1%})")
    for i in flagged[: args.show]:
        print(f"  {result.ids[i]}: given {result.classes[int(result.given[i])]!r}, suggested "
              f"{result.classes[int(suggested[i])]!r} (label quality {float(rep.label_quality[i]):.3f})")
    if summary.get("final_test_acc") is not None:
        print(f"test accuracy (final epoch): {summary['final_test_acc']:.4f}; at the best noisy-val epoch: "
              f"{summary['best_val_test_acc']:.4f}")
    print(f"ranked table: {args.out}/labels.csv   report: {args.out}/report.html   model: {args.out}/model.pt")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from .bench import builtin_suites, dry_run, load_suite, run_suite

    if args.list:
        for name, path in sorted(builtin_suites().items()):
            suite = load_suite(str(path))
            budget = f" (~{suite.budget_minutes} min here)" if suite.budget_minutes else ""
            print(f"{name:<16} {suite.title}{budget}")
        print(f"{'speed':<16} Training speed: step vs model limit, SimCLR vs a DataLoader pipeline, method cost, "
              f"scaling, memory (~10 min here)")
        return 0
    if not args.suite:
        raise UserError("bench: give a SUITE (see labelrefine bench --list)")
    if not args.out:
        raise UserError("bench: --out DIR is required")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    settings = [m.strip() for m in args.settings.split(",") if m.strip()] if args.settings else None
    command = "labelrefine bench " + " ".join(shlex.quote(a) for a in args.argv_tail)
    if args.suite == SPEED:
        if settings:
            raise UserError("bench speed: --settings applies to suites only")
        return _bench_speed(args, methods, command)
    suite = load_suite(args.suite)
    from .bench.detect import DetectSuite

    if isinstance(suite, DetectSuite):
        return _bench_detect(args, suite, methods, settings, command)
    if args.dry_run:
        print(dry_run(suite, args.out, seeds=args.seeds, methods=methods, user_overrides=args.set,
                      overwrite=args.overwrite, settings=settings))
        return 0
    run_suite(suite, args.out, seeds=args.seeds, methods=methods, user_overrides=args.set,
              overwrite=args.overwrite, command=command, settings=settings)
    print(f"results: {args.out}/results.md, {args.out}/results.csv, {args.out}/results.png")
    return 0


SPEED = "speed"  # `labelrefine bench speed`: the speed measurements, not a suite file


def _bench_detect(args: argparse.Namespace, suite, methods: list[str] | None, settings: list[str] | None,
                  command: str) -> int:
    from .bench.detect import load_unit_records, plan_units, run_detect_suite, unit_status

    if methods:
        raise UserError(f"bench {suite.name}: --methods does not apply to a detection suite (it runs every "
                        f"detector and cleanlab)")
    if args.dry_run:
        records = load_unit_records(Path(args.out))
        for u in plan_units(suite, Path(args.out), seeds=args.seeds, settings=settings, user_overrides=args.set):
            print(f"{u.label}: {unit_status(u, records)}  {u.out}")
        return 0
    run_detect_suite(suite, args.out, seeds=args.seeds, settings=settings, user_overrides=args.set,
                     overwrite=args.overwrite, command=command)
    print(f"results: {args.out}/results.md, {args.out}/results.csv, {args.out}/results.png")
    return 0


def _bench_speed(args: argparse.Namespace, methods: list[str] | None, command: str) -> int:
    from .bench.speed import run_speed

    for flag, given in (("--dry-run", args.dry_run), ("--seeds", args.seeds != 1), ("--overwrite", args.overwrite)):
        if given:
            raise UserError(f"bench speed: {flag} does not apply (speed runs no suite; it rewrites speed.md/.csv)")
    result = run_speed(args.out, args.set, methods=methods, command=command)
    print(result.markdown)
    print(f"results: {args.out}/speed.md, {args.out}/speed.csv")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import csv

    from .data.sources import printable_name
    from .io import check_output_file, write_csv
    from .predict import find_images, load_model

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected a positive number")
    if args.out:
        check_output_file(args.out, overwrite=args.overwrite, example="preds.csv")
    predictor = load_model(args.model)
    files = find_images(args.paths)
    probs = predictor.predict_proba(predictor.load_images(files), batch_size=args.batch_size)
    conf, pred = probs.max(dim=1)
    header = ["path", "predicted_label", "confidence", *(f"p_{c}" for c in predictor.classes)]
    rows = [[printable_name(f), predictor.classes[int(k)], f"{float(c):.6f}", *(f"{v:.6f}" for v in row)]
            for f, k, c, row in zip(files, pred.tolist(), conf.tolist(), probs.tolist(), strict=True)]
    if args.out:
        write_csv(args.out, header, rows)
        print(f"wrote {len(rows)} predictions to {args.out}")
    else:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import list_methods

    methods = list_methods()
    width = max(len(m.name) for m in methods)
    for m in methods:
        print(f"{m.name:<{width}}  {m.summary}  [{m.paper}]")
    return 0


def _run_arguments(p: argparse.ArgumentParser, *, config_help: str) -> None:
    """The options ``run`` and ``clean`` share: --config, --set, --out, --resume, --overwrite."""
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set refine.threshold=0.8 (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in DIR")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="labelrefine",
        description="Train image classifiers on noisy labels and find the wrong ones.",
    )
    p.add_argument("--version", action="version", version=f"labelrefine {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_noise, _add_run, _add_clean, _add_bench, _add_predict):
        add(sub)
    m = sub.add_parser("methods", help="list the registered methods")
    m.set_defaults(func=cmd_methods)
    return p


def _add_noise(sub) -> None:
    n = sub.add_parser(
        "noise",
        help="inject label noise into a data set's training labels and report it",
        description="Apply synthetic (symmetric, pairflip, idn) or given (column:NAME) label noise to the "
        "training split, print the achieved rate and the transition matrix, optionally write a CSV.",
    )
    n.add_argument("--data", required=True, metavar="SPEC",
                   help="data spec: digits, imagefolder:DIR, csv:FILE, json:FILE, npz:FILE, cifar10:ROOT, ...")
    n.add_argument("--type", required=True, metavar="TYPE",
                   help="none | symmetric | pairflip | idn | column:NAME (a label column of the data, e.g. worse)")
    n.add_argument("--rate", type=float, default=None, metavar="R", help="noise rate in [0, 1)")
    n.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    n.add_argument("--pixel-scale", type=float, default=255.0,
                   help="IDN only: value of a white pixel in the projection (255 = raw pixels, the reference)")
    n.add_argument("--out", metavar="FILE", help="write id,clean_label,noisy_label,is_noisy to this CSV")
    n.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    n.set_defaults(func=cmd_noise)


def _add_run(sub) -> None:
    r = sub.add_parser(
        "run",
        help="train a method on a data set with label noise and write every artifact",
        description="Run a method as configured: SSL, warmup, refinement, fine-tune (or a baseline). Writes "
        "config.yaml, metrics.jsonl, labels.csv, summary.json, model.pt and report.html to --out.",
    )
    _run_arguments(r, config_help="YAML config (default: built-in defaults)")
    r.set_defaults(func=cmd_run)


def _add_clean(sub) -> None:
    c = sub.add_parser(
        "clean",
        help="find the wrong labels of your own data set: ranked labels.csv, report.html, model.pt",
        description="Run the method on a data set's given labels with settings chosen from its size, resolution "
        "and the device (printed; --set overrides any). Writes labels.csv ranked with the suspected errors "
        "first, report.html (summary, estimated transition matrix, gallery of suspects, curves) and model.pt.",
    )
    c.add_argument("--data", required=True, metavar="SPEC",
                   help="imagefolder:DIR, csv:FILE, json:FILE, npz:FILE, ... (see the README's Data section)")
    _run_arguments(c, config_help="a run config to start from instead of the automatic settings")
    c.add_argument("--show", type=int, default=10, metavar="K", help="print the top K suspects (default 10)")
    c.set_defaults(func=cmd_clean)


def _add_bench(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="run a benchmark suite (methods x noise settings x seeds) and write its results table",
        description="Run every method of a suite on each of its noise settings and seeds, plus CE on clean "
        "labels, as ordinary runs under DIR/runs/; finished runs are reused, unfinished ones resumed. Writes "
        "DIR/results.csv, DIR/results.md and DIR/results.png.",
    )
    b.add_argument("suite", nargs="?", metavar="SUITE",
                   help="a built-in suite name, a suite YAML file, or 'speed' (the training-speed measurements)")
    b.add_argument("--out", metavar="DIR", help="output directory of the suite")
    b.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 (default 1)")
    b.add_argument("--methods", metavar="A,B", help="only these methods of the suite (the clean reference always runs)")
    b.add_argument("--settings", metavar="A,B",
                   help="only these noise settings of the suite, by name or directory slug (the clean reference "
                   "always runs); the results table still covers the whole suite")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every run, e.g. --set data.spec=cifar10:/data (repeatable)")
    b.add_argument("--overwrite", action="store_true", help="re-run runs that were made with another config")
    b.add_argument("--dry-run", action="store_true", help="print the planned runs and their cache status")
    b.add_argument("--list", action="store_true", help="list the built-in suites")
    b.set_defaults(func=cmd_bench)


def _add_predict(sub) -> None:
    pr = sub.add_parser(
        "predict",
        help="classify image files with a trained model.pt",
        description="Classify image files (folders are searched recursively) with the model.pt of a run. Each "
        "image is decoded as training images were, resized to the model's size and converted to its channels. "
        "Writes path,predicted_label,confidence,p_<class>... as CSV to --out or to stdout.",
    )
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    pr.add_argument("--model", required=True, metavar="FILE", help="a run's model.pt")
    pr.add_argument("--out", metavar="FILE", help="write the CSV here (default: stdout)")
    pr.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    pr.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per forward pass (default 256)")
    pr.set_defaults(func=cmd_predict)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv_tail = argv[argv.index(args.command) + 1:] if getattr(args, "command", None) in argv else []
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(args.verbose, args.quiet)
    tune_allocator()
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        sys.stderr.write(f"labelrefine: error: {e}\n")
        return EXIT_USAGE
    except TrainingDiverged as e:
        sys.stderr.write(f"labelrefine: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("labelrefine: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
