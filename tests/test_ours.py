"""The ``ours`` method's options that change what an iteration trains on: which samples get an
augmented copy (``refine.copies``) and the lr schedule across iterations (``refine.lr_schedule``)."""

from __future__ import annotations

import pytest
import torch

from labelrefine.data.splits import prepare_data
from labelrefine.engine import Context, Trainer
from labelrefine.methods import get_method
from labelrefine.methods import ours as ours_module
from labelrefine.methods.schedule import iteration_length
from labelrefine.pipeline import default_cache_dir


def _ours(tiny_config, *overrides: str):
    cfg = tiny_config("method=ours", "ssl.epochs=0", *overrides)
    prep = prepare_data(cfg, default_cache_dir(cfg))
    torch.manual_seed(cfg.seed)
    ctx = Context(cfg, prep.train.images, prep.train.labels, len(prep.classes), device=torch.device("cpu"),
                  ssl_images=prep.ssl_images, cache_dir=None, noise_rate=cfg.data.noise_rate)
    return get_method("ours")(ctx)


@pytest.mark.parametrize(("copies", "keep_previous", "expect"), [
    ("pseudo_labelled", "true", "union"), ("latest", "true", "second"), ("pseudo_labelled", "false", "second"),
    ("changed", "true", "changed"), ("changed", "false", "changed")])
def test_copies_follow_the_samples_that_carry_a_pseudo_label(tiny_config, monkeypatch, copies, keep_previous,
                                                             expect):
    m = _ours(tiny_config, f"refine.copies={copies}", f"refine.keep_previous={keep_previous}")
    n = m.ctx.n
    first, second = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    first[:10], second[5:20] = True, True
    masks = iter([first, second])
    # Each iteration's consensus selects a fixed set and relabels it to class 0.
    monkeypatch.setattr(ours_module, "consensus", lambda *a, **k: (next(masks), torch.zeros(n, dtype=torch.long)))
    trainer = Trainer(m.ctx, m)
    for spec in [s for s in m.schedule() if s.phase in ("warmup", "refine")]:
        trainer.run_epoch(spec)
    # changed: only the samples whose training label is now not the given one (a confirmed label gets no copy)
    want = {"union": first | second, "second": second, "changed": m.labels != m.given}[expect]
    if expect == "changed":
        carried = (first | second) if keep_previous == "true" else second
        assert torch.equal(want, carried & (m.given != 0)) and bool(want.any()) and not torch.equal(want, carried)
    assert torch.equal(m.copies, want)
    idx, targets, strong = m._train_rows()
    assert torch.equal(idx[n:], want.nonzero().flatten()) and bool(strong[n:].all()) and not bool(strong[:n].any())
    assert torch.equal(targets, m.labels[idx])
    if keep_previous == "true":  # the first iteration's pseudo-labels survived the second iteration
        assert bool((m.labels[first] == 0).all())


def test_lr_restart_gives_the_warmup_and_every_iteration_its_own_cosine(tiny_config):
    cont = _ours(tiny_config, "refine.lr_schedule=continuous")
    rest = _ours(tiny_config, "refine.lr_schedule=restart")
    assert cont.sup.total_epochs == cont.main_epochs and rest.sup.total_epochs == rest.cfg.refine.warmup_epochs
    lrs = {}
    for name, m in (("continuous", cont), ("restart", rest)):
        trainer = Trainer(m.ctx, m)
        lrs[name] = [(s.phase, s.iteration, s.epoch, trainer.run_epoch(s)["lr"]) for s in m.schedule()
                     if s.phase in ("warmup", "refine")]
    # The logged lr is the epoch's last step's. Restart: every iteration's first epoch sits at the same
    # point of a fresh cosine; continuous: one cosine, so each iteration starts lower than the last.
    firsts = [lr for phase, _, ep, lr in lrs["restart"] if phase == "refine" and ep == 1]
    assert len(firsts) == rest.cfg.refine.iterations and firsts == pytest.approx([firsts[0]] * len(firsts))
    cfirsts = [lr for phase, _, ep, lr in lrs["continuous"] if phase == "refine" and ep == 1]
    assert cfirsts[-1] < cfirsts[0] and cfirsts[-1] < firsts[-1]
    assert rest.sup.total_epochs == iteration_length(rest.cfg, rest.cfg.refine.iterations)
