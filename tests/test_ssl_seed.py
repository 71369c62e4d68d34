"""``ssl.seed``: one SimCLR pretraining shared by every run seed, and a cache that stays consistent."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY

from labelrefine.config import load_config
from labelrefine.pipeline import run
from labelrefine.store import load as store_load


def _cfg(cache, *extra):
    return load_config(None, [*TINY, "method=ce_ssl", "ssl.epochs=2", f"data.cache_dir={cache}", *extra])


def _encoder(cache):
    (path,) = (cache / "ssl").glob("*.pt")
    return path.name, store_load(path, kind="labelrefine-ssl-encoder-v1", name="SSL cache")["encoder"]


def _result(out):
    """labels.csv, the summary and the supervised epochs' metrics, less what names the cache
    directory (config_hash) or counts the schedule's SSL epochs (global epoch numbers)."""
    s = json.loads((out / "summary.json").read_text())
    for volatile in ("seconds", "code_version", "finished_at", "config_hash", "best_val_epoch"):
        s.pop(volatile)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [{k: v for k, v in r.items() if k not in ("seconds", "global_epoch")}
               for r in records if r["phase"] != "ssl"]
    return (out / "labels.csv").read_bytes(), s, records


def test_a_pinned_ssl_seed_pretrains_the_same_encoder_for_every_run_seed(tmp_path):
    # Separate caches, so each run pretrains: run seeds 0 and 3 give the same encoder and the same key.
    run(_cfg(tmp_path / "c0", "seed=0", "ssl.seed=5"), tmp_path / "r0")
    run(_cfg(tmp_path / "c3", "seed=3", "ssl.seed=5"), tmp_path / "r3")
    (name0, enc0), (name3, enc3) = _encoder(tmp_path / "c0"), _encoder(tmp_path / "c3")
    assert name0 == name3 and set(enc0) == set(enc3)
    assert all(torch.equal(enc0[k], enc3[k]) for k in enc0)
    # ... and another ssl.seed gives another encoder under another key
    run(_cfg(tmp_path / "c6", "seed=0", "ssl.seed=6"), tmp_path / "r6")
    name6, enc6 = _encoder(tmp_path / "c6")
    assert name6 != name0 and not all(torch.equal(enc0[k], enc6[k]) for k in enc0)


@pytest.mark.parametrize("extra", [(), ("optim.lookahead=true",)])  # Lookahead's slow copy starts after SSL
def test_a_pinned_run_is_the_same_from_the_cache_as_pretrained(extra, tmp_path):
    """Seed 3 pretrains in an empty cache; seed 3 again reads the encoder seed 0 cached: same run."""
    run(_cfg(tmp_path / "shared", "seed=0", "ssl.seed=5", *extra), tmp_path / "r0")
    run(_cfg(tmp_path / "shared", "seed=3", "ssl.seed=5", *extra), tmp_path / "hit")
    run(_cfg(tmp_path / "empty", "seed=3", "ssl.seed=5", *extra), tmp_path / "miss")
    hit, miss = _result(tmp_path / "hit"), _result(tmp_path / "miss")
    assert hit == miss
    phases = [json.loads(line)["phase"] for line in (tmp_path / "miss" / "metrics.jsonl").read_text().splitlines()]
    assert phases.count("ssl") == 2  # the miss pretrained ...
    phases = [json.loads(line)["phase"] for line in (tmp_path / "hit" / "metrics.jsonl").read_text().splitlines()]
    assert "ssl" not in phases  # ... the hit did not


def test_the_default_keeps_the_run_seed_and_the_old_cache_key(tmp_path):
    """ssl.seed = -1 (default) pretrains per run seed, under the key encoders had before the option."""
    import dataclasses
    import hashlib

    from test_recipe import _ctx

    from labelrefine.engine import backbone_kwargs
    from labelrefine.methods.simclr import CACHE_VERSION, encoder_cache_key, images_fingerprint

    cfg = _cfg(tmp_path / "c", "seed=2")
    ctx = _ctx(cfg)
    ssl = {k: v for k, v in dataclasses.asdict(cfg.ssl).items() if k not in ("cache", "seed")}
    legacy = json.dumps({"version": CACHE_VERSION, "images": images_fingerprint(ctx.ssl_all),
                         "backbone": cfg.model.backbone, "backbone_kwargs": backbone_kwargs(cfg), "ssl": ssl,
                         "flip": cfg.flip, "seed": 2}, sort_keys=True)
    assert encoder_cache_key(ctx) == hashlib.sha256(legacy.encode()).hexdigest()[:24]
    assert encoder_cache_key(_ctx(_cfg(tmp_path / "c", "seed=1"))) != encoder_cache_key(ctx)
    pinned = [encoder_cache_key(_ctx(_cfg(tmp_path / "c", f"seed={s}", "ssl.seed=2"))) for s in (1, 2)]
    assert pinned[0] == pinned[1] != encoder_cache_key(ctx)  # pinned 2 is not the run-seed-2 stream
