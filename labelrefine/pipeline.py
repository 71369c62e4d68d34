"""One run: data -> noise -> validation split -> the Trainer -> artifacts, returned in memory.

:func:`run` is what ``labelrefine run``, ``labelrefine clean``, ``bench`` and the Python API call.
It claims the run directory, checks what a resume needs, loads the data (:mod:`labelrefine.data.splits`),
builds the :class:`~labelrefine.engine.context.Context` and the method, hands them to the
:class:`~labelrefine.engine.trainer.Trainer`, and writes the artifacts (:mod:`labelrefine.artifacts`).
It returns a :class:`~labelrefine.artifacts.RunResult`: the summary, the label report and the
predictor, so callers never parse ``labels.csv`` or reload ``model.pt``.

Clean training labels, when the noise was synthetic or a clean column exists, go only to the
:class:`~labelrefine.evaluation.Oracle`, never to the method.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import torch

from . import __version__
from . import distributed as ddp
from .allocator import tune_allocator
from .artifacts import RunResult, finish
from .config import RunConfig, dump_yaml, validate
from .data import DataSplits
from .data.splits import Prepared, fingerprint, prepare_data
from .engine import Context, Trainer, resolve_device
from .engine import checkpoint as ckpt_io
from .errors import UserError
from .evaluation import Oracle
from .io import write_text
from .methods import get_method
from .rundir import check_out_dir, claim, clear_run, remove_stale_tmp

log = logging.getLogger("labelrefine")


def default_cache_dir(cfg: RunConfig) -> str:
    if cfg.data.cache_dir:
        return cfg.data.cache_dir
    return os.environ.get("LABELREFINE_CACHE") or str(Path.home() / ".cache" / "labelrefine")


def code_version() -> str:
    """Package version plus the git commit (and ``-dirty``) when run from a checkout."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return f"{__version__}+g{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def run(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
        data: DataSplits | None = None) -> RunResult | None:
    """Train ``cfg.method`` as configured and write every artifact to ``out_dir``.

    Returns the :class:`RunResult` (its summary is also written as ``summary.json``). Under
    ``torchrun`` every rank calls this; they train data-parallel (:mod:`labelrefine.distributed`)
    and rank 0 alone writes and gets the result (the other ranks get ``None``). ``data`` gives the
    data set in memory instead of loading ``cfg.data.spec`` (the Python API; ``cfg.data.spec``
    then only names it).
    """
    validate(cfg)  # a RunConfig built in Python has not been through load_config's checks
    started_group = not ddp.enabled()
    ddp.init_from_env(resolve_device(cfg.device).type)
    started_group = started_group and ddp.enabled()
    try:
        with claim(out_dir, writer=ddp.is_main()):  # the CLI may hold it already: then this is a no-op
            return _run(cfg, Path(out_dir), resume=resume, overwrite=overwrite, data=data)
    finally:
        if started_group:
            ddp.shutdown()


def _run(cfg: RunConfig, out: Path, *, resume: bool, overwrite: bool, data: DataSplits | None) -> RunResult | None:
    main = ddp.is_main()
    if not main:
        from . import progress as progress_mod

        log.setLevel(logging.WARNING)
        progress_mod.configure("off")
    ckpt = _check_resume(cfg, out, resume=resume, overwrite=overwrite)
    get_method(cfg.method)  # fail on an unknown method before loading data
    ddp.barrier()  # every rank has checked the output directory before rank 0 writes to it
    device = _setup_device(cfg)
    cache_dir = default_cache_dir(cfg)
    t_start = time.perf_counter()
    if not main:
        ddp.barrier()  # rank 0 decodes first and fills the cache; the others read it
    prep = prepare_data(cfg, cache_dir, data)
    if main:
        ddp.barrier()
    t_data = time.perf_counter() - t_start
    if ckpt is not None:
        ckpt_io.check_data(out / "checkpoint.pt", ckpt, fingerprint(prep), cfg.data.spec)

    ckpt_io.seed_everything(cfg.seed)
    ctx = Context(cfg, prep.train.images, prep.train.labels, len(prep.classes), device=device,
                  ssl_images=prep.ssl_images, cache_dir=cache_dir, noise_rate=cfg.data.noise_rate)
    method = get_method(cfg.method)(ctx)
    oracle = Oracle(prep.train_clean, prep.train.labels) if prep.train_clean is not None else None
    trainer = Trainer(ctx, method, out=out, val=prep.val, test=prep.test, oracle=oracle,
                      data_fingerprint=fingerprint(prep))
    trainer.start(ckpt)
    if ckpt is None and overwrite and main:
        clear_run(out)  # every file of ours, so nothing of the old run stays beside the new one
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", dump_yaml(cfg))
        ckpt_io.truncate_lines(out / "metrics.jsonl", trainer.state["metrics_lines"])
    _log_start(cfg, prep, len(trainer.schedule), device)
    state = trainer.fit()
    return finish(cfg, out, prep, ctx, method, state, oracle, t_data, code_version())


def _check_resume(cfg: RunConfig, out: Path, *, resume: bool, overwrite: bool) -> dict | None:
    """Check the output directory for the request; under ``--resume`` return the checkpoint to
    continue from (None: start from the first epoch). Nothing is trained or written yet."""
    check_out_dir(out, resume=resume, overwrite=overwrite)
    if resume:
        for name in ("config.yaml", "metrics.jsonl"):
            if (out / name).exists() and not (out / name).is_file():
                raise UserError(f"--resume: {out / name} is not a regular file; restore it or use --overwrite")
    ckpt = None
    if resume and (out / "checkpoint.pt").exists():  # a directory there: load() says so
        ckpt = ckpt_io.load(out / "checkpoint.pt", cfg)
        ckpt_io.check_config_file(out, cfg, must_match=False)
        ckpt_io.check_metrics(out, ckpt)
    elif resume and (out / "config.yaml").exists():
        # Stopped before its first checkpoint: start again, but only with the same config.
        ckpt_io.check_config_file(out, cfg, must_match=True)
        log.warning("%s has no checkpoint yet: starting from the first epoch", out)
    elif resume:
        # Claimed, then killed during the imports or the data load: nothing to continue.
        log.warning("%s holds no run yet: starting from the first epoch", out)
    if ddp.is_main():
        remove_stale_tmp(out)  # a kill during an atomic write leaves .NAME.*.tmp files
    return ckpt


def _setup_device(cfg: RunConfig) -> torch.device:
    tune_allocator()
    device = resolve_device(cfg.device)
    if ddp.enabled() and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank())
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return device


def _log_start(cfg: RunConfig, prep: Prepared, epochs: int, device: torch.device) -> None:
    log.info("%s: %s, %d train / %d val / %d test, %s noise %.4f, %d epochs on %s",
             cfg.method, prep.name, len(prep.train), 0 if prep.val is None else len(prep.val),
             0 if prep.test is None else len(prep.test), cfg.data.noise, prep.noise.rate, epochs, device)
