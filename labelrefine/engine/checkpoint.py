"""Checkpoints and the run directory's line files: what a resume reads back, checked before use.

A checkpoint (``checkpoint.pt``, a checksummed :mod:`labelrefine.store` file) holds the config
hash, the schedule, the method's state, every RNG's state and the Trainer's loop state; the
first ``metrics_lines`` lines of ``metrics.jsonl`` are the epochs it covers.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import distributed as ddp
from ..config import RunConfig, config_difference, config_hash, config_to_dict, dump_yaml, yaml_load
from ..detect import POST_HOC_KEYS
from ..errors import UserError
from ..io import write_bytes, write_error
from ..store import StoreError
from ..store import load as store_load
from ..store import save as store_save
from .context import Context

CHECKPOINT_FORMAT = "labelrefine-checkpoint-v2"  # v2: checksummed store file of plain values (labelrefine.store)

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(ctx: Context) -> dict:
    """Every generator's state as tensors and plain values (a checkpoint loads with ``weights_only``)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
            "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "batches": ctx.generator.get_state()}


def set_rng_state(ctx: Context, state: dict) -> None:
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    ctx.generator.set_state(state["batches"])

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


def check_config_file(out: Path, cfg: RunConfig, *, must_match: bool) -> None:
    """``config.yaml`` of the run to resume: readable; the same config when no checkpoint decides."""
    path = out / "config.yaml"
    if not path.exists():
        return
    text = _decode_run_text(path, _read_run_bytes(path))
    if not must_match:
        return  # the checkpoint's config hash decides; config.yaml is rewritten from the config
    if text == dump_yaml(cfg):
        return
    try:
        # The detect options that only choose among the scores a run records may change.
        key = config_difference(yaml_load(text), cfg, ignore=POST_HOC_KEYS)
    except yaml.YAMLError:
        key = "<not valid YAML>"
    if key is not None:
        raise UserError(f"--resume: {path} differs from this config (at {key}); resume with the same config "
                        f"or use --overwrite")


def check_metrics(out: Path, ckpt: dict) -> None:
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


def load(path: Path, cfg: RunConfig) -> dict:
    """The checkpoint at ``path``, checksum-verified and unpickled with ``weights_only``; a one-line
    UserError for anything else (a directory, a damaged or foreign file, another format, another config)."""
    try:
        ckpt = store_load(path, kind=CHECKPOINT_FORMAT, name="checkpoint")
    except StoreError as e:
        raise UserError(f"{e}; it cannot be resumed: delete it or use --overwrite") from None
    if not isinstance(ckpt, dict) or not {"config_hash", "schedule", "method", "rng", "engine"} <= set(ckpt):
        raise UserError(f"checkpoint {path} is not a labelrefine checkpoint (its fields are missing); "
                        f"delete it or use --overwrite")
    if (ckpt.get("config_hash") != config_hash(cfg)
            and config_difference(ckpt.get("config"), cfg, ignore=POST_HOC_KEYS) is not None):
        raise UserError(f"checkpoint {path} was written with another config (hash {ckpt.get('config_hash')}, "
                        f"now {config_hash(cfg)}); resume with the same config or use --overwrite")
    return ckpt

def check_data(path: Path, ckpt: dict, now: dict, spec: str) -> None:
    """The data on disk must be the data the checkpoint was trained on (same spec, changed files);
    ``now`` is the data's fingerprint (:func:`labelrefine.data.splits.fingerprint`)."""
    saved = ckpt.get("data")
    if not isinstance(saved, dict):
        return  # written before the fingerprint existed: loading the state checks the shapes
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

def append_line(path: Path, record: dict) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a partial last line is dropped by the next --resume (it keeps whole epochs)
        raise write_error(path, e) from None


def truncate_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` lines (a resumed run rewrites what came after its checkpoint).

    Works on bytes: the lines kept were checked by :func:`check_metrics`, the rest (a partial line
    of a kill mid-append, say) is dropped unread.
    """
    if not path.exists():
        return
    lines = _complete_lines(path.read_bytes())[:keep] if keep else []
    write_bytes(path, b"".join(line + b"\n" for line in lines))


def save(path: Path, cfg: RunConfig, schedule, method, ctx: Context, state: dict, data: dict) -> None:
    """Write the checkpoint (rank 0; every rank calls this, as the method's state may gather)."""
    method_state = method.state_dict()  # every rank: it may gather over ranks
    if not ddp.is_main():
        return
    ckpt = {"format": CHECKPOINT_FORMAT, "config_hash": config_hash(cfg), "config": config_to_dict(cfg), "data": data,
            "schedule": [{**s.as_dict(), "supervised": s.supervised} for s in schedule],
            "method": method_state, "rng": rng_state(ctx), "engine": state}
    store_save(path, ckpt, kind=CHECKPOINT_FORMAT)

def restore(ctx: Context, method, ckpt: dict, path: Path) -> None:
    """Load the method's state and every RNG's state from ``ckpt`` (read from ``path``)."""
    try:
        method.load_state_dict(_to_device(ckpt["method"], ctx.device))
    except (RuntimeError, KeyError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"checkpoint {path} does not fit this run ({first}); use --overwrite") from None
    set_rng_state(ctx, ckpt["rng"])
