"""Crash safety with real processes: kill -9 at several points, resume, compare; divergence guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from labelrefine.run import TrainingDiverged, run


def _config_file(tmp_path: Path, *overrides: str) -> Path:
    from labelrefine.config import config_to_dict, load_config

    cfg = load_config(None, [*TINY, "ssl.epochs=3", "ssl.cache=false", "refine.warmup_epochs=2",
                             "refine.loss_target=prediction", *overrides])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def _cli(*args: str, env: dict) -> list[str]:
    return [sys.executable, "-m", "labelrefine", "-q", *args]


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _comparable(out: Path) -> tuple[bytes, dict, list]:
    summary = json.loads((out / "summary.json").read_text())
    for k in ("seconds", "code_version", "finished_at"):
        summary.pop(k)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("seconds")
    return (out / "labels.csv").read_bytes(), summary, records


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["LABELREFINE_CACHE"] = str(tmp_path / "cache")
    return e


# ours: ssl 1-3, warmup 4-5, refine it 1: 6-7 (stages 1, 2), it 2: 8-9, finetune 10.
# dividemix: warmup 1, MixMatch epochs 2-4.
@pytest.mark.parametrize(("method", "after_lines"), [("ours", 1), ("ours", 4), ("ours", 6), ("dividemix", 2)],
                         ids=["mid-ssl", "mid-warmup", "between-stages", "mid-dividemix"])
def test_kill_and_resume(method, after_lines, tmp_path, env):
    cfg = _config_file(tmp_path, f"method={method}", "epochs=4")
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_cli("run", "--config", str(cfg), "--out", str(full), env=env), env=env, check=True,
                   timeout=600)
    proc = subprocess.Popen(_cli("run", "--config", str(cfg), "--out", str(cut), env=env), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _lines(cut / "metrics.jsonl") < after_lines and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _lines(cut / "metrics.jsonl")
    assert killed_at < _lines(full / "metrics.jsonl")
    assert not (cut / "summary.json").exists()
    # Without --resume the half-finished run is protected.
    res = subprocess.run(_cli("run", "--config", str(cfg), "--out", str(cut), env=env), env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--resume" in res.stderr
    subprocess.run(_cli("run", "--config", str(cfg), "--out", str(cut), "--resume", env=env), env=env,
                   check=True, timeout=600)
    assert _comparable(cut) == _comparable(full), f"differs after a kill at line {killed_at}"


def test_divergence_stops_with_phase_and_epoch(tiny_config, tmp_path):
    cfg = tiny_config("method=ce", "epochs=3", "optim.lr=1e30", "optim.nesterov=false")
    with pytest.raises(TrainingDiverged, match=r"non-finite loss in phase 'train'.*epoch \d"):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()


def test_divergence_cli_exit_code(tmp_path, env):
    cfg = _config_file(tmp_path, "method=ce", "optim.lr=1e30", "optim.nesterov=false")
    res = subprocess.run(_cli("run", "--config", str(cfg), "--out", str(tmp_path / "o"), env=env), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("labelrefine: error: non-finite loss")
