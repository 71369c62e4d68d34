"""Shared fixtures: a tiny, fast run config for end-to-end tests."""

from __future__ import annotations

import pytest

from labelrefine.config import load_config

TINY = [
    "data.spec=digits", "data.train_subset=300", "data.test_subset=100", "data.noise=idn", "data.noise_rate=0.2",
    "model.backbone=tiny", "flip=false", "optim.batch_size=64", "optim.lr=0.05",
    "ssl.epochs=1", "ssl.batch_size=128", "refine.warmup_epochs=1", "refine.iterations=2",
    "refine.first_stages=[1, 2]", "refine.later_stages=[1, 2]", "finetune.epochs=1", "epochs=3",
    "dividemix.warmup_epochs=1",
]


@pytest.fixture
def tiny_config(tmp_path, monkeypatch):
    """A config factory: ``tiny_config("method=ce", ...)`` -> RunConfig with a private cache."""
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))

    def make(*overrides: str):
        return load_config(None, [*TINY, *overrides])

    return make
