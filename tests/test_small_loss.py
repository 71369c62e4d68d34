"""The small-loss baselines: Co-teaching, JoCoR, MentorNet-PD, and their shared pieces."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from labelrefine.config import config_to_dict
from labelrefine.data.splits import prepare_data
from labelrefine.engine import Context, EpochSpec, Trainer, resolve_device
from labelrefine.errors import UserError
from labelrefine.methods import get_method
from labelrefine.methods._small_loss import (
    SelectionCounter,
    forget_rate,
    num_remember,
    peer_selection,
    resolve_tau,
    small_loss_index,
)
from labelrefine.methods.mentornet import pd_weights, update_moving_percentile
from labelrefine.pipeline import default_cache_dir
from labelrefine.store import check_plain

SMALL_LOSS = ("coteaching", "jocor", "mentornet")


def make_method(tiny_config, name: str, *overrides: str):
    """A method on the tiny config's data, built the way ``labelrefine.pipeline.run`` builds it."""
    cfg = tiny_config(f"method={name}", "device=cpu", *overrides)
    prep = prepare_data(cfg, default_cache_dir(cfg))
    torch.manual_seed(cfg.seed)
    ctx = Context(cfg, prep.train.images, prep.train.labels, len(prep.classes), device=resolve_device(cfg.device),
                  ssl_images=prep.ssl_images, cache_dir=default_cache_dir(cfg), noise_rate=cfg.data.noise_rate)
    return get_method(name)(ctx)


# -- the shared pieces ------------------------------------------------------------------------


def test_forget_rate_schedule():
    assert [forget_rate(t, 0.4, 10) for t in (0, 5, 10, 20)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert forget_rate(0, 0.4, 0) == pytest.approx(0.4)  # no ramp


def test_resolve_tau(tiny_config):
    cfg = tiny_config()
    assert resolve_tau(cfg, 0.2, -1.0, key="k") == pytest.approx(0.2)
    assert resolve_tau(cfg, 0.2, 0.3, key="k") == pytest.approx(0.3)
    pair = tiny_config("data.noise=pairflip", "data.noise_rate=0.4")
    assert resolve_tau(pair, 0.4, -1.0, key="k", halve_pairflip=True) == pytest.approx(0.2)
    assert resolve_tau(pair, 0.4, -1.0, key="k") == pytest.approx(0.4)
    assert resolve_tau(pair, 0.4, 0.3, key="k", halve_pairflip=True) == pytest.approx(0.3)  # explicit: as given
    with pytest.raises(UserError, match="coteaching.forget_rate.*noise rate"):
        resolve_tau(tiny_config("data.noise=none"), 0.2, -1.0, key="coteaching.forget_rate")
    for bad in (1.0, -0.5):
        with pytest.raises(UserError, match="'k'"):
            resolve_tau(cfg, 0.2, bad, key="k")


def test_num_remember_is_int_of_kept_fraction():
    assert num_remember(64, 0.2) == int(0.8 * 64) == 51
    assert num_remember(10, 0.0) == 10
    assert num_remember(10, 0.99) == 1  # at least one row


def test_peer_selection_on_hand_made_losses():
    loss1 = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7])
    loss2 = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3])
    assert small_loss_index(loss1, 0.5).tolist() == [0, 2, 4]
    rows1, rows2 = peer_selection(loss1, loss2, 0.5)
    assert rows1.tolist() == [1, 3, 5]  # net 1 is updated on net 2's small-loss rows
    assert rows2.tolist() == [0, 2, 4]  # and net 2 on net 1's
    rows1, rows2 = peer_selection(loss1, loss2, 1 / 3)
    assert len(rows1) == len(rows2) == int((1 - 1 / 3) * 6) == 4
    # Ties keep the earlier position.
    assert small_loss_index(torch.tensor([1.0, 0.5, 0.5, 0.5]), 0.5).tolist() == [1, 2]


def test_selection_counter_counts_on_the_device():
    c = SelectionCounter(5, torch.device("cpu"))
    c.add(torch.tensor([4, 1, 2]), torch.tensor([0, 2]))  # keeps samples 4 and 2
    c.add(torch.tensor([4, 1, 2]), torch.tensor([1]))  # keeps sample 1
    assert c.seen.tolist() == [0, 2, 2, 0, 2]
    assert c.kept.tolist() == [0, 1, 1, 0, 1]
    torch.testing.assert_close(c.frequency(), torch.tensor([1.0, 0.5, 0.5, 1.0, 0.5]))  # unseen: 1
    assert c.epoch_selected().tolist() == [False, True, True, False, True]
    c.start_epoch()
    assert c.epoch_selected() is None


# -- Co-teaching --------------------------------------------------------------------------------


def test_coteaching_updates_each_net_on_its_peers_selection(tiny_config):
    # One full batch, no augmentation, plain SGD: the step is reproducible by hand.
    m = make_method(tiny_config, "coteaching", "augment=none", "optim.batch_size=512", "optim.momentum=0",
                    "optim.weight_decay=0", "optim.nesterov=false", "coteaching.num_gradual=0",
                    "coteaching.forget_rate=0.5")
    ctx = m.ctx
    assert len(m.trainers) == 2 and m.trainers[0].optimizer is not m.trainers[1].optimizer
    assert not torch.equal(next(m.nets[0].parameters()), next(m.nets[1].parameters()))  # different inits
    before = [copy.deepcopy(net) for net in m.nets]
    batch_state = ctx.generator.get_state()
    logs = Trainer(m.ctx, m).run_epoch(EpochSpec("train", 0, 1))
    assert logs["forget_rate"] == pytest.approx(0.5)
    assert logs["kept_fraction"] == pytest.approx(int(0.5 * ctx.n) / ctx.n)

    ctx.generator.set_state(batch_state)
    index = ctx.batches(m.all, 512)[0]
    x, y = ctx.augment(index), m.given[index]
    logits = [net.train()(x).float() for net in before]
    per = [F.cross_entropy(z, y, reduction="none") for z in logits]
    keep = int(0.5 * len(index))
    own = [torch.argsort(p.detach(), stable=True)[:keep] for p in per]
    lr = ctx.cfg.optim.lr

    def stepped(net_before, logits_i, rows):
        grads = torch.autograd.grad(F.cross_entropy(logits_i[rows], y[rows]), list(net_before.parameters()),
                                    retain_graph=True)
        return [p.detach() - lr * g for p, g in zip(net_before.parameters(), grads, strict=True)]

    for i, peer in ((0, 1), (1, 0)):
        expect = stepped(before[i], logits[i], own[peer])
        for got, want in zip(m.nets[i].parameters(), expect, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
        # Its own selection would have given another step: the check above is discriminative.
        wrong = stepped(before[i], logits[i], own[i])
        assert any(not torch.allclose(g.detach(), w, rtol=1e-5, atol=1e-6)
                   for g, w in zip(m.nets[i].parameters(), wrong, strict=True))
    # Each sample took part in two selections; the counter kept what each net picked.
    assert int(m.counter.seen.sum()) == 2 * len(index)
    assert int(m.counter.kept.sum()) == 2 * keep
    expect_kept = torch.zeros(ctx.n, dtype=torch.int64)
    for rows in own:
        expect_kept[index[rows]] += 1
    assert torch.equal(m.counter.kept, expect_kept)


# -- JoCoR ----------------------------------------------------------------------------------------


def test_jocor_keeps_the_smallest_joint_loss_with_one_optimizer(tiny_config):
    m = make_method(tiny_config, "jocor", "jocor.lam=0.7")
    # One optimiser over both networks' parameters.
    assert len(m.trainers) == 1
    opt_params = {id(p) for g in m.trainers[0].optimizer.param_groups for p in g["params"]}
    net_params = {id(p) for net in m.nets for p in net.parameters()}
    assert opt_params == net_params and len(m.nets) == 2

    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    y = torch.randint(0, 4, (10,), generator=g)
    index = torch.arange(10, 20)
    m.rate = 0.3
    (loss,), logs = m.batch_step([l1, l2], y, index)

    lp1, lp2 = F.log_softmax(l1, 1), F.log_softmax(l2, 1)
    kl12 = F.kl_div(lp2, lp1, reduction="none", log_target=True).sum(1)  # KL(p1 || p2)
    kl21 = F.kl_div(lp1, lp2, reduction="none", log_target=True).sum(1)
    ce = F.nll_loss(lp1, y, reduction="none") + F.nll_loss(lp2, y, reduction="none")
    ell = 0.3 * ce + 0.7 * (kl12 + kl21)
    keep = int(0.7 * 10)
    kept = torch.argsort(ell)[:keep]
    torch.testing.assert_close(loss, ell[kept].mean())
    assert logs["kept_fraction"] == pytest.approx(keep / 10)
    expect = torch.zeros(m.ctx.n, dtype=torch.int64)
    expect[index[kept]] = 1
    assert torch.equal(m.counter.kept, expect)


def test_jocor_optimizer_is_the_references_adam_without_weight_decay(tiny_config):
    m = make_method(tiny_config, "jocor", "optim.weight_decay=0.0005")
    (opt,) = [t.optimizer for t in m.trainers]
    assert isinstance(opt, torch.optim.Adam)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0] and m.trainers[0].base_lr == pytest.approx(1e-3)
    shared = make_method(tiny_config, "jocor", "jocor.optimizer=optim", "optim.weight_decay=0.0005")
    assert [g["weight_decay"] for g in shared.trainers[0].optimizer.param_groups] == [0.0005]


def test_jocor_halves_the_noise_rate_for_pairflip(tiny_config):
    m = make_method(tiny_config, "jocor", "data.noise=pairflip", "data.noise_rate=0.4")
    assert m.tau == pytest.approx(0.2)
    assert Trainer(m.ctx, m).run_epoch(EpochSpec("train", 0, 1))["forget_rate"] == 0.0  # r(0) = 0


# -- MentorNet-PD ---------------------------------------------------------------------------------


def test_moving_percentile_and_pd_weights():
    losses = torch.arange(1.0, 9.0)  # 1..8: 75th percentile (linear) = 6.25
    first = update_moving_percentile(None, losses, percentile=75, momentum=0.9)
    assert float(first) == pytest.approx(6.25)
    second = update_moving_percentile(first, losses + 8, percentile=75, momentum=0.9)
    assert float(second) == pytest.approx(0.9 * 6.25 + 0.1 * 14.25)
    assert pd_weights(torch.tensor([1.0, 6.25, 6.3, 0.0]), torch.tensor(6.25)).tolist() == [1, 1, 0, 1]


def test_mentornet_burn_in_is_plain_ce_then_pd_weighting(tiny_config):
    m = make_method(tiny_config, "mentornet", "epochs=10", "mentornet.burn_in=0.2", "mentornet.momentum=0.5")
    assert m.burn_in_epochs == 2
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    per = F.cross_entropy(logits, y, reduction="none")
    index = torch.arange(8)

    m.start_epoch(EpochSpec("train", 0, 2))  # burn-in: plain CE, nothing dropped or counted
    (loss,), logs = m.batch_step([logits], y, index)
    torch.testing.assert_close(loss, per.mean())
    assert logs["kept_fraction"] == 1.0 and int(m.counter.seen.sum()) == 0
    moving = torch.quantile(per, 0.75)
    torch.testing.assert_close(m.moving, moving)  # tracked during burn-in too

    m.start_epoch(EpochSpec("train", 0, 3))
    (loss,), logs = m.batch_step([logits * 2], y, index)
    per2 = F.cross_entropy(logits * 2, y, reduction="none")
    moving = 0.5 * moving + 0.5 * torch.quantile(per2, 0.75)  # updated before weighting
    torch.testing.assert_close(m.moving, moving)
    v = (per2 <= moving).float()
    assert 0 < v.sum() < 8
    torch.testing.assert_close(loss, (v * per2).sum() / 8)
    assert float(logs["kept_fraction"]) == pytest.approx(float(v.mean()))
    seen = torch.zeros(m.ctx.n, dtype=torch.int64)
    seen[:8] = 1
    assert torch.equal(m.counter.seen, seen) and torch.equal(m.counter.kept[:8], v.long())
    quality = m.label_report().label_quality
    torch.testing.assert_close(quality[:8], v)  # 1 - fraction of post-burn-in epochs with weight 0


# -- all three ------------------------------------------------------------------------------------


def _roundtrip(state: dict) -> dict:
    """Through bytes as a checkpoint goes: plain values only, loaded with ``weights_only``."""
    check_plain(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", SMALL_LOSS)
def test_state_round_trip_resumes_exactly(name, tiny_config):
    a = make_method(tiny_config, name, "optim.batch_size=128", "mentornet.burn_in=0.34")
    logs = Trainer(a.ctx, a).run_epoch(EpochSpec("train", 0, 1))
    assert {"loss", "lr", "kept_fraction"} <= set(logs)
    state = _roundtrip(a.state_dict())
    b = get_method(name)(a.ctx)  # a fresh instance: new random weights
    assert not torch.equal(a.predict_logits(a.ctx.x), b.predict_logits(a.ctx.x))
    b.load_state_dict(state)
    assert torch.equal(a.predict_logits(a.ctx.x), b.predict_logits(a.ctx.x))
    for key, value in a.label_report().as_dict().items():
        assert torch.equal(value, b.label_report().as_dict()[key]), key
    # The next epoch is identical too (optimiser state, counters, moving percentile, lr).
    rng = torch.get_rng_state(), a.ctx.generator.get_state()
    logs_a = Trainer(a.ctx, a).run_epoch(EpochSpec("train", 0, 2))
    torch.set_rng_state(rng[0])
    a.ctx.generator.set_state(rng[1])
    logs_b = Trainer(b.ctx, b).run_epoch(EpochSpec("train", 0, 2))
    assert logs_a == logs_b
    assert torch.equal(a.predict_logits(a.ctx.x), b.predict_logits(a.ctx.x))
    assert torch.equal(a.counter.kept, b.counter.kept)
    assert list(a.networks()) == ["model"]  # network 1 alone predicts


@pytest.mark.parametrize("name", SMALL_LOSS)
def test_non_finite_loss_raises(name, tiny_config):
    m = make_method(tiny_config, name)
    with torch.no_grad():
        for p in m.nets[0].parameters():
            p.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        Trainer(m.ctx, m).run_epoch(EpochSpec("train", 0, 1))


@pytest.mark.parametrize("name", ["jocor", "coteaching"])
def test_asymmetric_alias_gets_exactly_the_pairflip_settings(tiny_config, name):
    a = make_method(tiny_config, name, "data.noise=asymmetric", "data.noise_rate=0.4")
    p = make_method(tiny_config, name, "data.noise=pairflip", "data.noise_rate=0.4")
    assert a.cfg.data.noise == "pairflip" and config_to_dict(a.cfg) == config_to_dict(p.cfg)
    assert a.tau == p.tau == pytest.approx(0.2 if name == "jocor" else 0.4)
    assert torch.equal(a.ctx.y, p.ctx.y)
