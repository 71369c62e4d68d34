"""One run: data -> noise -> validation split -> method schedule -> artifacts.

:func:`run` is what ``labelrefine run`` calls. It owns the epoch loop: it asks the method for its
schedule, runs each epoch, evaluates after every supervised epoch (noisy-label validation for
model selection, the test set for reporting only), writes ``metrics.jsonl`` and checkpoints,
and at the end writes ``labels.csv``, ``summary.json``, ``model.pt`` and the report.

Clean training labels, when the noise was synthetic or a clean column exists, go only to the
:class:`~labelrefine.evaluation.Oracle`, never to the method.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import __version__
from . import distributed as ddp
from .config import RunConfig, config_hash, config_to_dict, dump_yaml, validate
from .data import DataSplits, ImageSet
from .data.noise import NoiseResult, apply_noise, check_noise_type
from .engine import Context, EpochSpec, backbone_kwargs, resolve_device, to_device
from .errors import TrainingDiverged as TrainingDiverged  # re-exported: it lived here before errors.py
from .errors import UserError
from .evaluation import Oracle, accuracy
from .io import write_bytes, write_csv, write_error, write_json, write_text
from .methods import get_method
from .predict import MODEL_FORMAT
from .progress import progress
from .rundir import ARTIFACTS as ARTIFACTS  # re-exported
from .rundir import check_out_dir, claim, clear_run, remove_stale_tmp
from .store import StoreError
from .store import load as store_load
from .store import save as store_save

log = logging.getLogger("labelrefine")

CHECKPOINT_FORMAT = "labelrefine-checkpoint-v2"  # v2: checksummed store file of plain values (labelrefine.store)


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


def stratified_sample(labels: torch.Tensor, fraction_or_count: float | int, rng: np.random.Generator,
                      num_classes: int) -> np.ndarray:
    """Indices of a class-stratified random sample (sorted).

    An int asks for that many samples in total, a float for that fraction; each class gives
    its proportional share (largest-remainder rounding, so the total is exact).
    """
    y = np.asarray(labels.cpu())
    n = len(y)
    total = fraction_or_count if isinstance(fraction_or_count, int) else int(round(fraction_or_count * n))
    total = min(max(total, 0), n)
    counts = np.bincount(y, minlength=num_classes)
    share = counts * (total / max(n, 1))
    quota = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - quota), kind="stable")
    quota[order[: total - int(quota.sum())]] += 1
    picked = [rng.choice(np.flatnonzero(y == c), size=int(q), replace=False) for c, q in enumerate(quota) if q]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


@dataclass
class Prepared:
    """The data of a run after noise and the validation split."""

    name: str
    classes: list[str]
    train: ImageSet  # the samples the method trains on; labels are the noisy ones
    val: ImageSet | None  # held out from the noisy training split; labels are noisy
    test: ImageSet | None  # the test split with its own labels
    ssl_images: torch.Tensor  # every training-split image (train + val): SSL uses no labels
    noise: NoiseResult  # over the whole training split
    train_clean: torch.Tensor | None  # clean labels of ``train``, for the oracle only


def prepare_data(cfg: RunConfig, cache_dir: str, data: DataSplits | None = None) -> Prepared:
    """Load ``cfg.data.spec`` (or take ``data``, already in memory), apply the noise, carve the noisy val split."""
    from .data.sources import load_data

    d = cfg.data
    takes_rate = check_noise_type(d.noise)
    if data is None:
        data = load_data(d.spec, cache_dir=cache_dir)
    train = data.train
    if data.val is not None:
        log.info("%s: the data set's own val split (%d samples) is not used: model selection uses a split "
                 "carved from the noisy training labels (data.val_fraction)", data.name, len(data.val))
    if d.train_subset and d.train_subset < len(train):
        # A fixed subset (seed 0): it is part of the data set's definition, not of the noise or the run.
        train = train.subset(torch.from_numpy(stratified_sample(train.labels, d.train_subset,
                                                                np.random.default_rng(0), train.num_classes)))
    noise = apply_noise(train, d.noise, d.noise_rate if takes_rate else 0.0, seed=d.noise_seed,
                        pixel_scale=d.pixel_scale)
    noisy = noise.noisy_labels
    clean_known = d.noise != "none"
    val_idx = np.zeros(0, dtype=np.int64)
    if d.val_fraction > 0:
        val_idx = stratified_sample(noisy, float(d.val_fraction), np.random.default_rng(d.noise_seed + 1),
                                    train.num_classes)
    is_val = np.zeros(len(train), dtype=bool)
    is_val[val_idx] = True
    train_idx = torch.from_numpy(np.flatnonzero(~is_val))
    val = None
    if len(val_idx):
        val = train.subset(torch.from_numpy(val_idx))
        val.labels = noisy[torch.from_numpy(val_idx)].clone()
    tr = train.subset(train_idx)
    tr.labels = noisy[train_idx].clone()
    if len(tr) == 0:
        raise UserError(f"data {d.spec!r}: no training samples left after the validation split")
    test = data.test
    if test is not None and d.test_subset and d.test_subset < len(test):
        test = test.subset(torch.from_numpy(stratified_sample(test.labels, d.test_subset,
                                                              np.random.default_rng(0), test.num_classes)))
    return Prepared(
        name=data.name, classes=list(train.classes), train=tr, val=val, test=test,
        ssl_images=train.images, noise=noise,
        train_clean=train.labels[train_idx].clone() if clean_known else None,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(ctx: Context) -> dict:
    """Every generator's state as tensors and plain values (a checkpoint loads with ``weights_only``)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
            "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "batches": ctx.generator.get_state()}


def _set_rng_state(ctx: Context, state: dict) -> None:
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    ctx.generator.set_state(state["batches"])


def _check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """The output directory suits the request (:func:`labelrefine.rundir.check_out_dir`), and under
    ``--resume`` its ``config.yaml`` and ``metrics.jsonl`` are regular files."""
    check_out_dir(out, resume=resume, overwrite=overwrite)
    if resume:
        for name in ("config.yaml", "metrics.jsonl"):
            if (out / name).exists() and not (out / name).is_file():
                raise UserError(f"--resume: {out / name} is not a regular file; restore it or use --overwrite")


_DAMAGED = "restore it or use --overwrite"


def _read_run_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"--resume: {path} cannot be read ({e.strerror}); {_DAMAGED}") from None


def _decode_run_text(path: Path, data: bytes, first_line: int = 1) -> str:
    """UTF-8 text of a run directory's file; damage is a one-line error naming the file and line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise UserError(f"--resume: {path}: line {line} is not UTF-8 text ({e.reason}); {_DAMAGED}") from None


def _complete_lines(data: bytes) -> list[bytes]:
    """The newline-terminated lines of ``data``, without their newlines (a partial last line,
    from a kill in the middle of an append, is not one)."""
    return data.split(b"\n")[:-1]


def _check_config_file(out: Path, cfg: RunConfig, *, must_match: bool) -> None:
    """``config.yaml`` of the run to resume: readable; the same config when no checkpoint decides."""
    path = out / "config.yaml"
    if not path.exists():
        return
    text = _decode_run_text(path, _read_run_bytes(path))
    if not must_match:
        return  # the checkpoint's config hash decides; config.yaml is rewritten from the config
    ours = dump_yaml(cfg)
    if text != ours:
        old, new = text.splitlines(), ours.splitlines()
        line = next((k + 1 for k, (a, b) in enumerate(zip(old, new, strict=False)) if a != b),
                    min(len(old), len(new)) + 1)
        raise UserError(f"--resume: {path} differs from this config (line {line}); resume with the same config "
                        f"or use --overwrite")


def _check_metrics(out: Path, ckpt: dict) -> None:
    """The first ``metrics_lines`` lines of ``metrics.jsonl`` (those a resume keeps) are this
    run's records, one per epoch in schedule order: checked before any training."""
    path = out / "metrics.jsonl"
    state, schedule = ckpt.get("engine"), ckpt.get("schedule")
    keep = state.get("metrics_lines") if isinstance(state, dict) else None
    if not isinstance(keep, int) or not isinstance(schedule, list):
        return  # not this function's business: loading the checkpoint's state reports it
    if keep == 0:
        return
    if not path.is_file():
        raise UserError(f"--resume: {path} is missing but {out / 'checkpoint.pt'} records {keep} epoch(s) of "
                        f"metrics; {_DAMAGED}")
    lines = _complete_lines(_read_run_bytes(path))
    if len(lines) < keep:
        raise UserError(f"--resume: {path} has {len(lines)} complete line(s) but {out / 'checkpoint.pt'} "
                        f"records {keep}; {_DAMAGED}")
    for k, line in enumerate(lines[:keep]):  # the lines after them are dropped unread
        try:
            rec = json.loads(_decode_run_text(path, line, k + 1))
        except json.JSONDecodeError as e:
            raise UserError(f"--resume: {path}: line {k + 1} is not valid JSON ({e.msg}); {_DAMAGED}") from None
        phase = schedule[k].get("phase") if k < len(schedule) and isinstance(schedule[k], dict) else None
        if not isinstance(rec, dict) or rec.get("global_epoch") != k + 1 or rec.get("phase") != phase:
            raise UserError(f"--resume: {path}: line {k + 1} is not the record of epoch {k + 1} ({phase}); "
                            f"{_DAMAGED}")


def _load_checkpoint(path: Path, cfg: RunConfig) -> dict:
    """The checkpoint at ``path``, checksum-verified and unpickled with ``weights_only``; a one-line
    UserError for anything else (a directory, a damaged or foreign file, another format, another config)."""
    try:
        ckpt = store_load(path, kind=CHECKPOINT_FORMAT, name="checkpoint")
    except StoreError as e:
        raise UserError(f"{e}; it cannot be resumed: delete it or use --overwrite") from None
    if not isinstance(ckpt, dict) or not {"config_hash", "schedule", "method", "rng", "engine"} <= set(ckpt):
        raise UserError(f"checkpoint {path} is not a labelrefine checkpoint (its fields are missing); "
                        f"delete it or use --overwrite")
    if ckpt.get("config_hash") != config_hash(cfg):
        raise UserError(f"checkpoint {path} was written with another config (hash {ckpt.get('config_hash')}, "
                        f"now {config_hash(cfg)}); resume with the same config or use --overwrite")
    return ckpt


def _data_fingerprint(prep: Prepared) -> dict:
    """What a checkpoint's state depends on in the data: the class list and the split sizes."""
    return {"num_classes": len(prep.classes), "classes": list(prep.classes), "n_train": len(prep.train),
            "n_val": 0 if prep.val is None else len(prep.val)}


def _check_checkpoint_data(path: Path, ckpt: dict, prep: Prepared, spec: str) -> None:
    """The data on disk must be the data the checkpoint was trained on (same spec, changed files)."""
    saved = ckpt.get("data")
    if not isinstance(saved, dict):
        return  # written before the fingerprint existed: loading the state checks the shapes
    now = _data_fingerprint(prep)
    hint = "the data changed since the run started; restore it or use --overwrite"
    if saved.get("num_classes") != now["num_classes"]:
        raise UserError(f"checkpoint {path} was written for {saved.get('num_classes')} classes but data {spec!r} "
                        f"now has {now['num_classes']} classes; {hint}")
    if saved.get("classes") != now["classes"]:
        old = [*(saved.get("classes") or []), *[None] * now["num_classes"]]  # same count: checked above
        k = next(i for i, name in enumerate(now["classes"]) if old[i] != name)
        raise UserError(f"checkpoint {path} was written for class {k} named {old[k]!r} but data {spec!r} now "
                        f"names it {now['classes'][k]!r}; {hint}")
    for key, what in (("n_train", "training"), ("n_val", "validation")):
        if saved.get(key) != now[key]:
            raise UserError(f"checkpoint {path} was written for {saved.get(key)} {what} samples but data {spec!r} "
                            f"now gives {now[key]}; {hint}")


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


def run(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
        data: DataSplits | None = None) -> dict:
    """Train ``cfg.method`` as configured and write every artifact to ``out_dir``.

    Returns the summary dict (also written as ``summary.json``). Under ``torchrun`` every rank
    calls this; they train data-parallel (:mod:`labelrefine.distributed`) and rank 0 alone
    writes. ``data`` gives the data set in memory instead of loading ``cfg.data.spec`` (the
    Python API; ``cfg.data.spec`` then only names it).
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


def _run(cfg: RunConfig, out: Path, *, resume: bool, overwrite: bool, data: DataSplits | None) -> dict:
    main = ddp.is_main()
    if not main:
        from . import progress as progress_mod

        log.setLevel(logging.WARNING)
        progress_mod.configure("off")
    _check_out_dir(out, resume=resume, overwrite=overwrite)
    ckpt = None
    if resume and (out / "checkpoint.pt").exists():  # a directory there: _load_checkpoint says so
        ckpt = _load_checkpoint(out / "checkpoint.pt", cfg)
        _check_config_file(out, cfg, must_match=False)
        _check_metrics(out, ckpt)
    elif resume and (out / "config.yaml").exists():
        # Stopped before its first checkpoint: start again, but only with the same config.
        _check_config_file(out, cfg, must_match=True)
        log.warning("%s has no checkpoint yet: starting from the first epoch", out)
    elif resume:
        # Claimed, then killed during the imports or the data load: nothing to continue.
        log.warning("%s holds no run yet: starting from the first epoch", out)
    if main:
        remove_stale_tmp(out)  # a kill during an atomic write leaves .NAME.*.tmp files
    get_method(cfg.method)  # fail on an unknown method before loading data
    ddp.barrier()  # every rank has checked the output directory before rank 0 writes to it
    device = resolve_device(cfg.device)
    if ddp.enabled() and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank())
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cache_dir = default_cache_dir(cfg)
    t_start = time.perf_counter()
    if not main:
        ddp.barrier()  # rank 0 decodes first and fills the cache; the others read it
    prep = prepare_data(cfg, cache_dir, data)
    if main:
        ddp.barrier()
    t_data = time.perf_counter() - t_start
    if ckpt is not None:
        _check_checkpoint_data(out / "checkpoint.pt", ckpt, prep, cfg.data.spec)

    _seed_everything(cfg.seed)
    ctx = Context(cfg, prep.train.images, prep.train.labels, len(prep.classes), device=device,
                  ssl_images=prep.ssl_images, cache_dir=cache_dir, noise_rate=cfg.data.noise_rate)
    method = get_method(cfg.method)(ctx)
    oracle = Oracle(prep.train_clean, prep.train.labels) if prep.train_clean is not None else None

    if ckpt is not None:
        schedule = [EpochSpec(**s) for s in ckpt["schedule"]]
        try:
            method.load_state_dict(_to_device(ckpt["method"], device))
        except (RuntimeError, KeyError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"checkpoint {out / 'checkpoint.pt'} does not fit this run ({first}); "
                            f"use --overwrite") from None
        _set_rng_state(ctx, ckpt["rng"])
        state = ckpt["engine"]
        log.info("resuming %s at epoch %d of %d", out, state["done"] + 1, len(schedule))
    else:
        if overwrite and main:
            clear_run(out)  # every file of ours, so nothing of the old run stays beside the new one
        schedule = method.schedule()
        state = {"done": 0, "best": None, "phase_seconds": {}, "metrics_lines": 0, "supervised_started": False,
                 "last_val": None, "last_test": None, "elapsed": 0.0}
    metrics_path = out / "metrics.jsonl"
    checkpoint_epoch = state["done"] if ckpt is not None else None  # the epoch the checkpoint on disk ends
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", dump_yaml(cfg))
        _truncate_lines(metrics_path, state["metrics_lines"])

    val_x = to_device(prep.val.images, device) if prep.val is not None else None
    test_x = to_device(prep.test.images, device) if prep.test is not None else None
    log.info("%s: %s, %d train / %d val / %d test, %s noise %.4f, %d epochs on %s",
             cfg.method, prep.name, len(prep.train), 0 if prep.val is None else len(prep.val),
             0 if prep.test is None else len(prep.test), cfg.data.noise, prep.noise.rate, len(schedule), device)

    t_loop = time.perf_counter()
    elapsed0 = state["elapsed"]
    for i in progress(range(state["done"], len(schedule)), desc=cfg.method, unit="epoch"):
        spec = schedule[i]
        if spec.supervised and not state["supervised_started"]:
            # Reseed: supervised training must not depend on whether SSL ran or came from the cache.
            _seed_everything(cfg.seed + 1)
            ctx.generator.manual_seed(cfg.seed + 1)
            method.on_supervised_start()
            state["supervised_started"] = True
        t0 = time.perf_counter()
        try:
            logs = method.run_epoch(spec)
        except FloatingPointError:
            kept = (f"the last good checkpoint (after epoch {checkpoint_epoch} of {len(schedule)}) is kept in {out}"
                    if checkpoint_epoch else "no checkpoint was written before it, so there is nothing to resume")
            raise TrainingDiverged(f"non-finite loss in phase {spec.phase!r}, iteration {spec.iteration}, "
                                   f"epoch {spec.epoch} (epoch {i + 1} of {len(schedule)}); {kept}") from None
        dt = time.perf_counter() - t0
        for net in method.networks().values():
            ddp.average_buffers(net)  # BatchNorm statistics: the same model on every rank
        state["phase_seconds"][spec.phase] = state["phase_seconds"].get(spec.phase, 0.0) + dt
        record = {**spec.as_dict(), "global_epoch": i + 1, **logs, "seconds": round(dt, 3)}
        if spec.supervised:
            if val_x is not None:
                record["val_acc"] = accuracy(method.predict_logits(val_x), prep.val.labels.to(device))
            if test_x is not None:
                record["test_acc"] = accuracy(method.predict_logits(test_x), prep.test.labels.to(device))
            state["last_val"], state["last_test"] = record.get("val_acc"), record.get("test_acc")
            best = state["best"]
            score = record.get("val_acc", float("-inf"))
            if best is None or score > best["val_acc"] or val_x is None:
                state["best"] = {"epoch": i + 1, "val_acc": score, "test_acc": record.get("test_acc"),
                                 "spec": spec.as_dict(),
                                 "networks": {k: {n: t.detach().to("cpu", copy=True) for n, t in v.state_dict().items()}
                                              for k, v in method.networks().items()}}
        if oracle is not None:
            record.update(oracle.metrics(method.oracle_view()))
        if main:
            _append_line(metrics_path, record)
        state["metrics_lines"] += 1
        state["done"] = i + 1
        state["elapsed"] = elapsed0 + time.perf_counter() - t_loop
        log.info(_epoch_line(record, len(schedule)))
        every = cfg.checkpoint_every
        if every and ((i + 1) % every == 0 or i + 1 == len(schedule)):
            _save_checkpoint(out / "checkpoint.pt", cfg, schedule, method, ctx, state, _data_fingerprint(prep))
            checkpoint_epoch = i + 1

    return _finish(cfg, out, prep, ctx, method, state, oracle, t_data)


def _epoch_line(r: dict, total: int) -> str:
    parts = [f"[{r['global_epoch']}/{total}] {r['phase']}"]
    if r["iteration"]:
        parts.append(f"it {r['iteration']}")
    parts.append(f"ep {r['epoch']} loss {r.get('loss', float('nan')):.4f}")
    for key, label in (("val_acc", "val"), ("test_acc", "test"), ("oracle_label_acc", "label-acc")):
        if key in r:
            parts.append(f"{label} {r[key]:.4f}")
    for key in ("stage_selected", "pseudo_labelled", "labels_changed"):
        if key in r:
            parts.append(f"{key.replace('_', '-')} {r[key]}")
    parts.append(f"{r['seconds']:.1f}s")
    return " ".join(parts)


def _append_line(path: Path, record: dict) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a partial last line is dropped by the next --resume (it keeps whole epochs)
        raise write_error(path, e) from None


def _truncate_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` lines (a resumed run rewrites what came after its checkpoint).

    Works on bytes: the lines kept were checked by :func:`_check_metrics`, the rest (a partial line
    of a kill mid-append, say) is dropped unread.
    """
    if not path.exists():
        return
    lines = _complete_lines(path.read_bytes())[:keep] if keep else []
    write_bytes(path, b"".join(line + b"\n" for line in lines))


def _save_checkpoint(path: Path, cfg: RunConfig, schedule, method, ctx: Context, state: dict,
                     data: dict) -> None:
    method_state = method.state_dict()  # every rank: it may gather over ranks
    if not ddp.is_main():
        return
    ckpt = {"format": CHECKPOINT_FORMAT, "config_hash": config_hash(cfg), "config": config_to_dict(cfg), "data": data,
            "schedule": [{**s.as_dict(), "supervised": s.supervised} for s in schedule],
            "method": method_state, "rng": _rng_state(ctx), "engine": state}
    store_save(path, ckpt, kind=CHECKPOINT_FORMAT)


def _finish(cfg: RunConfig, out: Path, prep: Prepared, ctx: Context, method, state: dict,
            oracle: Oracle | None, t_data: float) -> dict:
    rep = {k: v.cpu() for k, v in method.label_report().items()}
    classes = prep.classes
    given = prep.train.labels
    if not ddp.is_main():
        return {}
    rows = []
    order = torch.argsort(rep["label_quality"], stable=True).tolist()  # suspected errors first
    for i in order:
        rows.append([prep.train.ids[i], classes[int(given[i])], classes[int(rep["refined_label"][i])],
                     f"{float(rep['label_quality'][i]):.6f}", bool(rep["is_label_issue"][i]),
                     int(rep["n_stages_selected"][i])])
    write_csv(out / "labels.csv", ["id", "given_label", "refined_label", "label_quality", "is_label_issue",
                                   "n_stages_selected"], rows)

    best = state["best"]
    nets = best["networks"] if best is not None else {k: v.state_dict() for k, v in method.networks().items()}
    store_save(out / "model.pt", {
        "format": MODEL_FORMAT, "method": cfg.method, "backbone": cfg.model.backbone,
        "backbone_kwargs": backbone_kwargs(cfg), "in_channels": ctx.channels, "image_size": list(ctx.image_size),
        "num_classes": ctx.num_classes, "classes": classes, "mean": list(ctx.mean), "std": list(ctx.std),
        "networks": nets, "selected_epoch": None if best is None else best["epoch"],
        "config": config_to_dict(cfg), "code_version": code_version(),
    }, kind=MODEL_FORMAT)

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
        "n_label_issues": int(rep["is_label_issue"].sum()),
        "seconds": {"data": round(t_data, 3), **{k: round(v, 3) for k, v in state["phase_seconds"].items()},
                    "total_training": round(state["elapsed"], 3)},
        "config_hash": config_hash(cfg), "code_version": code_version(),
        "torch": torch.__version__, "device": str(ctx.device),
        "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if oracle is not None:
        summary.update(oracle.final_metrics(rep["refined_label"], rep["is_label_issue"]))
    try:
        from .report import write_report

        write_report(out, summary, rep, given, classes, prep.train.images, prep.train.ids,
                     predict_logits=method.predict_logits)
    except ImportError as e:  # matplotlib missing: the run's results stand without the report
        log.warning("report skipped: %s", e)
    # Last: summary.json marks the run finished (bench reuses a run that has one), so a run killed
    # before it is resumed and every artifact above is written again.
    write_json(out / "summary.json", summary)
    return summary
