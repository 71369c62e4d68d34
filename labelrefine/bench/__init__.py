"""Benchmarks: accuracy suites (:mod:`.suites`, their YAML files in ``suites/``) and ``bench speed``
(:mod:`.speed`, imported on demand: it is not re-exported here).

``from labelrefine.bench import load_suite, run_suite`` keeps working as it did when this was one
module, ``labelrefine/bench.py``.
"""

from .suites import (
    COLUMNS,
    PHASES,
    REFERENCE,
    REFERENCE_SETTING,
    PlannedRun,
    Setting,
    Suite,
    builtin_suites,
    collect,
    dry_run,
    equivalent_command,
    load_suite,
    plan,
    registered_phases,
    results_markdown,
    run_config,
    run_suite,
    suite_from_dict,
    write_chart,
    write_results,
)

__all__ = ["COLUMNS", "PHASES", "REFERENCE", "REFERENCE_SETTING", "PlannedRun", "Setting", "Suite", "builtin_suites",
           "collect", "dry_run", "equivalent_command", "load_suite", "plan", "registered_phases", "results_markdown",
           "run_config", "run_suite", "suite_from_dict", "write_chart", "write_results"]
