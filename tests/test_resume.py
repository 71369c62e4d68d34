"""Resume from a checkpoint gives the same result as an uninterrupted run (in-process)."""

from __future__ import annotations

import json

import pytest

from labelrefine.engine import Trainer
from labelrefine.engine.checkpoint import CHECKPOINT_FORMAT
from labelrefine.errors import UserError
from labelrefine.methods import get_method
from labelrefine.pipeline import run
from labelrefine.store import save as store_save


class _Stop(Exception):
    pass


def _interrupt_at(monkeypatch, method: str, at_epoch: int) -> None:
    """Make the run raise when the Trainer reaches ``method``'s ``at_epoch``-th epoch (1-based)."""
    original = Trainer.run_epoch
    calls = {"n": 0}

    def run_epoch(self, spec):
        if isinstance(self.method, get_method(method)):
            calls["n"] += 1
            if calls["n"] == at_epoch:
                raise _Stop
        return original(self, spec)

    monkeypatch.setattr(Trainer, "run_epoch", run_epoch)


def _summary(out):
    s = json.loads((out / "summary.json").read_text())
    for volatile in ("seconds", "code_version", "finished_at"):
        s.pop(volatile)
    return s


# ours' schedule here: ssl 1-2, warmup 3, refine it 1: 4-5 (stages 1, 2), it 2: 6-7, finetune 8.
# Stop before any checkpoint (1), mid-SSL (2), between warmup and refinement (4), between two
# stages of an iteration (5), right after a consensus (6), at the fine-tune (8).
# The fast recipe (issue 15): Lookahead's slow weights and step count live in the checkpoint.
RECIPE = ("optim.lookahead=true", "optim.schedule=linear", "optim.norm_bias_lr_scale=8", "eval_every=2")


@pytest.mark.parametrize(("method", "at", "extra"), [
    ("ours", 1, ()), ("ours", 2, ()), ("ours", 4, ()), ("ours", 5, ()), ("ours", 6, ()), ("ours", 8, ()),
    ("ce", 2, ()), ("ce", 3, RECIPE), ("ours", 2, ("ssl.seed=4",))])  # mid-SSL with a pinned SSL seed
def test_resume_equals_uninterrupted(method, at, extra, tiny_config, tmp_path, monkeypatch):
    # No SSL cache: the interrupted run must pretrain again, as the full one did.
    cfg = tiny_config(f"method={method}", "refine.loss_target=prediction", "ssl.epochs=2", "ssl.cache=false", *extra)
    run(cfg, tmp_path / "full")
    with monkeypatch.context() as m:
        _interrupt_at(m, method, at)
        with pytest.raises(_Stop):
            run(cfg, tmp_path / "cut")
    assert not (tmp_path / "cut" / "summary.json").exists()
    run(cfg, tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "labels.csv").read_bytes() == (tmp_path / "full" / "labels.csv").read_bytes()
    assert _summary(tmp_path / "cut") == _summary(tmp_path / "full")
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    for record in full + cut:
        record.pop("seconds")
    assert cut == full


def test_resume_refuses_other_config(tiny_config, tmp_path):
    run(tiny_config("method=ce", "epochs=1"), tmp_path / "out")
    with pytest.raises(UserError, match="another config"):
        run(tiny_config("method=ce", "epochs=2"), tmp_path / "out", resume=True)


@pytest.mark.parametrize("at", [1, 6])  # stopped before its first checkpoint; after one
def test_resume_with_other_detect_options(at, tiny_config, tmp_path, monkeypatch):
    """detect.score/combine/flag/estimate_from only choose among the scores a run records: a run
    resumes under others (a changed default, say) and ends as one made with them from the start."""
    base = ("method=ours", "ssl.epochs=2", "ssl.cache=false")
    other = tiny_config(*base, "detect.score=aum", "detect.flag=estimated", "detect.estimate_from=mean")
    run(other, tmp_path / "full")
    with monkeypatch.context() as m:
        _interrupt_at(m, "ours", at)
        with pytest.raises(_Stop):
            run(tiny_config(*base, "detect.score=self_confidence", "detect.flag=refined"), tmp_path / "cut")
    run(other, tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "labels.csv").read_bytes() == (tmp_path / "full" / "labels.csv").read_bytes()
    assert (tmp_path / "cut" / "config.yaml").read_bytes() == (tmp_path / "full" / "config.yaml").read_bytes()
    # detect.knn_k changes the scores a run computes: still refused
    with pytest.raises(UserError, match="another config"):
        run(tiny_config(*base, "detect.score=aum", "detect.flag=estimated", "detect.estimate_from=mean",
                        "detect.knn_k=3"), tmp_path / "cut", resume=True)


def test_resume_without_checkpoint(tiny_config, tmp_path):
    # A directory that does not exist was never claimed by a run (a typo?): refused, not created.
    with pytest.raises(UserError, match="no run to resume"):
        run(tiny_config("method=ce"), tmp_path / "missing", resume=True)
    assert not (tmp_path / "missing").exists()
    # One with files that are not a run's: refused.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="no run to resume"):
        run(tiny_config("method=ce"), tmp_path / "other", resume=True)


@pytest.mark.parametrize("left", ["nothing", "a stale lock", "temporary files"])
def test_resume_of_a_claimed_directory_without_a_run_starts_fresh(left, tiny_config, tmp_path):
    """What a run killed during its imports or data load leaves (the claimed directory, perhaps
    its lock file): --resume starts from the first epoch and ends as an uninterrupted run."""
    from labelrefine.rundir import LOCK_NAME

    cfg = tiny_config("method=ce", "epochs=2")
    run(cfg, tmp_path / "full")
    out = tmp_path / "out"
    out.mkdir()
    if left == "a stale lock":
        (out / LOCK_NAME).write_text("999999\n")
    elif left == "temporary files":
        (out / ".config.yaml.k1ll3d00.tmp").write_text("seed: ")
    run(cfg, out, resume=True)
    assert (out / "labels.csv").read_bytes() == (tmp_path / "full" / "labels.csv").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())


@pytest.mark.parametrize("damage, match", [
    ("truncate", "checkpoint.pt is truncated"), ("garbage", "checkpoint.pt is not a labelrefine file"),
    ("foreign", "checkpoint.pt is a plain torch file without labelrefine's checksum header"),
    ("foreign-store", "checkpoint.pt is not a labelrefine checkpoint")])
def test_damaged_checkpoint_is_a_clear_error(damage, match, tiny_config, tmp_path):
    import torch

    cfg = tiny_config("method=ce", "epochs=1")
    run(cfg, tmp_path / "out")
    ckpt = tmp_path / "out" / "checkpoint.pt"
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"\x00" * 100)
    elif damage == "foreign":
        torch.save({"format": "something-else"}, ckpt)
    else:  # a valid store file of the right kind, but not a checkpoint's content
        store_save(ckpt, {"format": "something-else"}, kind=CHECKPOINT_FORMAT)
    summary = (tmp_path / "out" / "summary.json").read_bytes()
    with pytest.raises(UserError, match=match):
        run(cfg, tmp_path / "out", resume=True)
    assert (tmp_path / "out" / "summary.json").read_bytes() == summary
