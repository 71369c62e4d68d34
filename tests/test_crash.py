"""Crash safety with real processes: kill -9 at several points (mid-training, during the imports
and the data load), resume, compare; two runs racing for one directory; divergence guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY
from PIL import Image

from labelrefine.errors import TrainingDiverged
from labelrefine.pipeline import run
from labelrefine.rundir import LOCK_NAME, RUN_FILES


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
# A kill mid-SimCLR and mid-DivideMix in the default suite; the other two points (45 s each) are slow.
@pytest.mark.parametrize(("method", "after_lines"), [
    ("ours", 1), pytest.param("ours", 4, marks=pytest.mark.slow), pytest.param("ours", 6, marks=pytest.mark.slow),
    ("dividemix", 2)], ids=["mid-ssl", "mid-warmup", "between-stages", "mid-dividemix"])
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
    # What a kill in the middle of an atomic write leaves: the resume removes them.
    stale = [cut / f".{name}.k1ll3d0{k}.tmp" for k, name in enumerate(("checkpoint.pt", "model.pt", "accuracy.png"))]
    for p in stale:
        p.write_bytes(b"half a file")
    # Without --resume the half-finished run is protected.
    res = subprocess.run(_cli("run", "--config", str(cfg), "--out", str(cut), env=env), env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--resume" in res.stderr
    subprocess.run(_cli("run", "--config", str(cfg), "--out", str(cut), "--resume", env=env), env=env,
                   check=True, timeout=600)
    assert _comparable(cut) == _comparable(full), f"differs after a kill at line {killed_at}"
    assert _listing(cut) == _listing(full), "leftovers beside the resumed run"


def _listing(out: Path) -> list[str]:
    names = sorted(p.name for p in out.iterdir())
    assert set(names) <= set(RUN_FILES), names  # no lock file, no temporary files
    return names


def _image_folder(root: Path, n_per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_per_class), ("test", 20)):
        for c, name in enumerate(["dark", "light"]):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 100, (16, 16), dtype=np.uint8) + np.uint8(120 * c)).save(
                    d / f"{i}.png")
    return root


def _touches(pid: int, root: Path) -> bool:
    """Process ``pid`` or one of its children (the decode pool) has a file under ``root`` open."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    for p in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{p}/fd").iterdir()]
        except OSError:
            continue
        if any(link.startswith(str(root)) for link in links):
            return True
    return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see what the run is doing")
@pytest.mark.parametrize("when", ["imports", "data-load"])
def test_kill_during_startup_then_resume_starts_fresh(when, tmp_path, env):
    """A kill before the first write (during the imports, or while images are decoded) leaves
    the claimed directory; ``--resume`` starts it afresh and ends as an uninterrupted run."""
    sets = ["method=ce", "epochs=2"]
    if when == "data-load":
        data = _image_folder(tmp_path / "data", 1500)
        sets += [f"data.spec=imagefolder:{data},size=8", "data.noise=symmetric"]
    cfg = _config_file(tmp_path, *sets)
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_cli("run", "--config", str(cfg), "--out", str(full), env=env), env=env, check=True, timeout=600)
    env = {**env, "LABELREFINE_CACHE": str(tmp_path / "cache2")}  # decode again, not from the cache
    proc = subprocess.Popen(_cli("run", "--config", str(cfg), "--out", str(cut), env=env), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120

    def ready() -> bool:  # imports: claimed, so torch is being imported now; data-load: decoding
        return (cut / LOCK_NAME).exists() if when == "imports" else _touches(proc.pid, data)

    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert cut.is_dir() and not (cut / "config.yaml").exists(), sorted(p.name for p in cut.iterdir())
    assert (cut / LOCK_NAME).exists()  # stale: its holder is dead, so the flock is free
    res = subprocess.run(_cli("run", "--config", str(cfg), "--out", str(cut), "--resume", env=env), env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert _comparable(cut) == _comparable(full)
    assert _listing(cut) == _listing(full)


def test_two_runs_racing_for_one_directory(tmp_path, env):
    """Started together into one --out: exactly one runs, the other exits 2 naming its PID; the
    directory holds one consistent run."""
    cfg = _config_file(tmp_path, "method=ce", "epochs=2")
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(_cli("run", "--config", str(cfg), "--out", str(ref), env=env), env=env, check=True, timeout=600)
    procs = [subprocess.Popen(_cli("run", "--config", str(cfg), "--out", str(out), env=env), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.pid, p.wait(timeout=600), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    codes = sorted(code for _, code, _ in results)
    assert codes == [0, 2], results
    (winner, _, _), = [r for r in results if r[1] == 0]
    (_, _, err), = [r for r in results if r[1] == 2]
    assert err.splitlines() == [f"labelrefine: error: output directory {out} is in use by another labelrefine run "
                                f"(PID {winner}); wait for it to end or choose another --out"]
    assert _comparable(out) == _comparable(ref)
    assert _lines(out / "metrics.jsonl") == 2
    assert _listing(out) == _listing(ref)


def test_divergence_stops_with_phase_and_epoch(tiny_config, tmp_path):
    cfg = tiny_config("method=ce", "epochs=3", "optim.lr=1e30", "optim.nesterov=false")
    with pytest.raises(TrainingDiverged, match=r"non-finite loss in phase 'train'.*epoch \d") as e:
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()
    # The first epoch diverged: no checkpoint exists, and the message does not claim one.
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    assert "no checkpoint was written" in str(e.value) and "is kept" not in str(e.value)


def test_divergence_after_a_checkpoint_names_it(tiny_config, tmp_path):
    # SSL (its own lr) gives one good epoch and its checkpoint; the supervised lr then diverges.
    cfg = tiny_config("method=ours", "ssl.cache=false", "optim.lr=1e30", "optim.nesterov=false")
    with pytest.raises(TrainingDiverged, match=r"phase 'warmup'.*the last good checkpoint \(after epoch 1 of \d+\) "
                                               r"is kept in"):
        run(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "checkpoint.pt").is_file()


def test_divergence_cli_exit_code(tmp_path, env):
    cfg = _config_file(tmp_path, "method=ce", "optim.lr=1e30", "optim.nesterov=false")
    res = subprocess.run(_cli("run", "--config", str(cfg), "--out", str(tmp_path / "o"), env=env), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("labelrefine: error: non-finite loss")
