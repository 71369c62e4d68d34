"""`labelrefine bench speed` on tiny synthetic data (files, rows, targets: never a speed value), and
the GPU-path flags (bf16 autocast, channels_last, torch.compile, pinned non-blocking transfers) on the CPU."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch

from labelrefine.bench.speed import linear_fit, method_plan, speed_config
from labelrefine.cli import main
from labelrefine.data.splits import prepare_data
from labelrefine.engine import Context, Learner, Trainer, to_device
from labelrefine.errors import UserError
from labelrefine.methods import list_methods
from labelrefine.methods.base import supervised_pass
from labelrefine.methods.simclr import SimCLR

THROUGHPUT = ["limit_supervised", "supervised_step", "limit_simclr", "simclr_step", "peer_simclr",
              "aug_strong_only", "peer_loader_only"]
TARGETS = ["supervised_vs_limit", "simclr_vs_limit", "simclr_vs_peer", "ours_vs_ce", "refine_overhead",
           "scaling_r2", "peak_rss_gib", "ours_vs_ce_stage_loss_train", "refine_overhead_stage_loss_train"]
SIZES = [64, 128, 256]


def _synthetic_npz(path, n_train=320, n_test=20, size=16, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8),
             y_train=np.arange(n_train) % 10, x_test=rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8),
             y_test=np.arange(n_test) % 10)
    return path


def _tiny_speed_args(tmp_path) -> list[str]:
    spec = _synthetic_npz(tmp_path / "synth.npz")
    items = [f"data.spec=npz:{spec}", "data.train_subset=256", "model.backbone=tiny", "optim.batch_size=64",
             "ssl.batch_size=64", "optim.eval_batch_size=128", "threads=0", "speed.epochs=1",
             f"speed.sizes=[{','.join(map(str, SIZES))}]", "speed.workers=1"]
    return [a for item in items for a in ("--set", item)]


def test_bench_speed_tiny_writes_every_row_and_target(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LABELREFINE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "speed"
    assert main(["-q", "bench", "speed", "--out", str(out), *_tiny_speed_args(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "## Targets (issue 6)" in printed and f"{out}/speed.md" in printed

    md = (out / "speed.md").read_text(encoding="utf-8")
    with open(out / "speed.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["section", "name", "value", "unit", "target", "result", "note"]
    got = {(r["section"], r["name"]): r for r in rows}
    methods = [m.name for m in list_methods()]
    expected = [("throughput", n) for n in THROUGHPUT]
    expected += [("method_cost", m) for m in methods] + [("method_ratio", m) for m in methods]
    expected += [("method_cost", "ours_iteration2"), ("method_cost", "ours_stage_loss_train")]
    expected += [("refine_overhead", n) for n in ("iteration_seconds", "stage_eval_consensus_seconds", "fraction",
                                                  "fraction_evaluation_passes", "fraction_selection_consensus")]
    expected += [("scaling", f"ce_epoch_{n}") for n in SIZES]
    expected += [("scaling", n) for n in ("fit_intercept", "fit_slope_per_1000", "fit_r2")]
    expected += [("memory", n) for n in ("peak_rss", "peak_rss_children", "data_uint8", "largest_train_store")]
    expected += [("target", n) for n in TARGETS] + [("run", "wall_seconds"), ("run", "ce_repeat")]
    expected += [("target", "simclr_vs_peer_bound")]
    expected += [("peer", "main_process_waiting"), ("peer", "worker_cpu_ms_per_image"), ("memory", "peak_rss_after_0")]
    for key in expected:
        assert key in got, f"missing row {key}"
        value = float(got[key]["value"])
        assert math.isfinite(value), f"{key}: {value}"
    for key, r in got.items():
        assert r["value"] == "" or math.isfinite(float(r["value"])), key
    for name in TARGETS:
        r = got[("target", name)]
        assert r["result"] in ("PASS", "FAIL") and r["target"], r
        assert f"**{r['result']}**" in md
    for name in (*THROUGHPUT, *methods):
        assert f"`{name}`" in md
    # Ratios are consistent with the rows they come from (no timing is asserted).
    ce = float(got[("method_cost", "ce")]["value"])
    assert float(got[("method_ratio", "ours")]["value"]) == pytest.approx(
        float(got[("method_cost", "ours")]["value"]) / ce, rel=1e-3)
    assert 0 < float(got[("memory", "data_uint8")]["value"]) < 0.01  # 340 tiny images
    assert 0 <= float(got[("target", "refine_overhead")]["value"]) <= 1
    # The profile's shares cover every profiled op once; convolutions are among them.
    shares = {r["name"]: float(r["value"]) for r in rows if r["section"] == "profile"}
    assert sum(shares.values()) == pytest.approx(1.0) and shares.get("convolution", 0) > 0
    assert 0 <= float(got[("peer", "main_process_waiting")]["value"]) <= 1
    assert float(got[("target", "simclr_vs_peer_bound")]["value"]) == pytest.approx(
        float(got[("throughput", "limit_simclr")]["value"]) / float(got[("throughput", "peer_simclr")]["value"]),
        rel=1e-3)
    marks = [float(r["value"]) for r in rows if r["name"].startswith("peak_rss_after_")]
    assert len(marks) == 5 and marks == sorted(marks)  # a high-water mark never falls
    assert "## Where the SimCLR step's time goes" in md
    assert "speed:" in (out / "config.yaml").read_text() and "code 0." in md


def test_bench_speed_rejects_suite_flags_and_bad_options(tmp_path, capsys):
    for extra in (["--dry-run"], ["--seeds", "2"], ["--set", "speed.sizes=[100]"], ["--set", "speed.nope=1"],
                  ["--set", "speed.epochs=0"], ["--methods", "ce,nosuch"]):
        assert main(["bench", "speed", "--out", str(tmp_path / "o"), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("labelrefine: error:"), err
    assert not (tmp_path / "o").exists()
    assert main(["bench", "--list"]) == 0
    assert "speed" in capsys.readouterr().out


def test_speed_config_is_the_cpu_profile_and_takes_overrides():
    cfg, opts = speed_config([])
    assert (cfg.model.backbone, cfg.model.width, cfg.optim.batch_size, cfg.threads) == ("resnet18_cifar", 8, 128, 2)
    assert cfg.data.train_subset == 3000 and cfg.data.val_fraction == 0 and cfg.device == "cpu"
    assert "cifar10" in cfg.data.spec and opts.sizes == [5000, 10000, 20000, 40000] and opts.workers == 2
    cfg, opts = speed_config(["device=cuda", "model.width=64", "optim.batch_size=256", "speed.epochs=3"])
    assert (cfg.device, cfg.model.width, cfg.optim.batch_size, opts.epochs) == ("cuda", 64, 256, 3)
    with pytest.raises(UserError):
        speed_config(["model.nope=1"])


def test_linear_fit():
    a, b, r2 = linear_fit([1, 2, 3, 4], [3, 5, 7, 9])
    assert (a, b, r2) == pytest.approx((1.0, 2.0, 1.0))
    assert linear_fit([1, 2, 3], [1, 3, 2])[2] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        linear_fit([2, 2], [1, 2])


# ---------------------------------------------------------------------------------------------
# The GPU-path flags, on the CPU


def _context(cfg, tmp_path) -> Context:
    prep = prepare_data(cfg, str(tmp_path / "cache"))
    return Context(cfg, prep.train.images, prep.train.labels, len(prep.classes), device=torch.device("cpu"),
                   ssl_images=prep.ssl_images)


@pytest.mark.parametrize("overrides", [["amp=bf16", "channels_last=true"], ["amp=bf16", "channels_last=false"],
                                       ["amp=off", "channels_last=true"], ["amp=off", "channels_last=false"]])
def test_amp_and_channels_last_run_on_cpu(tiny_config, tmp_path, overrides):
    cfg = tiny_config("method=ce", *overrides)
    ctx = _context(cfg, tmp_path)
    bf16 = "amp=bf16" in overrides
    assert ctx.amp is (torch.bfloat16 if bf16 else None)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    sup = Learner(ctx, 1)
    conv = next(p for p in sup.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=fmt)
    x = ctx.augment(torch.arange(16))
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=fmt)
    with ctx.autocast():
        assert sup.model(x).dtype == (torch.bfloat16 if bf16 else torch.float32)
    logs = Trainer(ctx, None).run_pass(supervised_pass(ctx, sup, torch.arange(ctx.n), ctx.y))
    assert math.isfinite(logs["loss"]) and logs["samples"] > 0
    sim = SimCLR(ctx, ctx.new_model())
    assert math.isfinite(Trainer(ctx, None).run_pass(sim.pass_())["loss"])
    logits = ctx.logits_all(sup.model)
    assert logits.dtype == torch.float32 and logits.shape == (ctx.n, ctx.num_classes)
    assert bool(torch.isfinite(logits).all())


def test_compile_runs_on_cpu(tiny_config, tmp_path):
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler (none on PATH)")
    cfg = tiny_config("method=ce", "compile=true", "optim.batch_size=64")
    ctx = _context(cfg, tmp_path)
    model = ctx.new_model()
    assert getattr(model, "_compiled_call_impl", None) is not None  # nn.Module.compile(): in place
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())  # checkpoints keep their keys
    sup = Learner(ctx, 1, model=model)
    try:
        # two full batches: one graph
        logs = Trainer(ctx, None).run_pass(supervised_pass(ctx, sup, torch.arange(128), ctx.y[:128]))
    except Exception as e:  # the toolchain is there but cannot build (headers, OpenMP, ...)
        if "compil" in f"{type(e).__name__} {e}".lower():
            pytest.skip(f"torch.compile toolchain unusable here: {type(e).__name__}: {str(e).splitlines()[0]}")
        raise
    assert math.isfinite(logs["loss"]) and logs["samples"] == 128


class _HostTensor:
    """A stand-in for a CPU tensor that records how it is moved (CUDA need not exist)."""

    device = torch.device("cpu")

    def __init__(self, calls: list, pinned: bool = False):
        self.calls, self.pinned = calls, pinned

    def is_pinned(self) -> bool:
        return self.pinned

    def pin_memory(self):
        self.calls.append("pin_memory")
        return _HostTensor(self.calls, pinned=True)

    def to(self, device, non_blocking=False):
        self.calls.append(("to", str(device), non_blocking, self.pinned))
        return "moved"


def test_to_device_pins_and_copies_non_blocking_for_cuda():
    calls: list = []
    assert to_device(_HostTensor(calls), torch.device("cuda")) == "moved"
    assert calls == ["pin_memory", ("to", "cuda", True, True)]  # pinned first, then an async copy
    calls.clear()
    to_device(_HostTensor(calls, pinned=True), torch.device("cuda:0"))
    assert calls == [("to", "cuda:0", True, True)]  # already pinned: no second staging copy
    calls.clear()
    to_device(_HostTensor(calls), torch.device("cpu"))
    assert calls == [("to", "cpu", False, False)]  # CPU: a plain .to (a no-op for a CPU tensor)
    t = torch.arange(6, dtype=torch.uint8)
    assert to_device(t, torch.device("cpu")) is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_cuda_real():
    t = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    moved = to_device(t, torch.device("cuda"))
    torch.cuda.synchronize()
    assert moved.is_cuda and torch.equal(moved.cpu(), t)


def test_uint8_store_and_ssl_images_move_through_to_device(tiny_config, tmp_path, monkeypatch):
    moved = []

    def record(t, device):
        moved.append((t.dtype, tuple(t.shape)))
        return to_device(t, device)

    monkeypatch.setattr("labelrefine.engine.context.to_device", record)
    monkeypatch.setattr("labelrefine.methods.simclr.to_device", record)
    ctx = _context(tiny_config("method=ce"), tmp_path)
    assert (torch.uint8, tuple(ctx.x.shape)) in moved and (torch.int64, (ctx.n,)) in moved
    SimCLR(ctx, ctx.new_model())
    assert (torch.uint8, tuple(ctx.ssl_images.shape)) in moved


def test_every_method_plan_times_a_phase_the_method_declares():
    for m in list_methods():
        plan = method_plan(m.name, 2)
        assert plan.phase is None or plan.phase in m.phases, (m.name, plan)
        assert f"`{plan.phase}`" in plan.what if plan.phase else True
