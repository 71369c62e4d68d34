"""DivideMix and ours + DivideMix: the GMM split, co-divide, co-refinement/co-guessing targets,
the λu schedule, the composition with ``ours`` and exact state round trips."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from labelrefine.config import config_to_dict, load_config
from labelrefine.data.splits import prepare_data
from labelrefine.engine import Context, EpochSpec, Trainer
from labelrefine.losses import sharpen
from labelrefine.methods import get_method
from labelrefine.methods.dividemix import (
    DivideMix,
    co_divide,
    co_guess,
    co_refine,
    default_lambda_u,
    dividemix_specs,
    gmm_clean_prob,
    lambda_u_at,
    uniform_prior_penalty,
)
from labelrefine.pipeline import default_cache_dir
from labelrefine.store import check_plain

# -- pure pieces --------------------------------------------------------------------------------


def test_gmm_separates_bimodal_losses():
    g = torch.Generator().manual_seed(0)
    low = 0.1 + 0.05 * torch.randn(800, generator=g)
    high = 0.8 + 0.1 * torch.randn(200, generator=g)
    losses = torch.cat([low, high])
    losses = (losses - losses.min()) / (losses.max() - losses.min())
    prob = gmm_clean_prob(losses, random_state=0)
    assert prob.shape == (1000,) and prob.dtype == torch.float32
    assert float((prob[:800] > 0.5).double().mean()) >= 0.95
    assert float((prob[800:] < 0.5).double().mean()) >= 0.95
    # Min-max normalisation inside: a shift and a scale of the losses change nothing.
    assert torch.allclose(gmm_clean_prob(3.0 * losses + 7.0, random_state=0), prob, atol=1e-5)


def test_gmm_degenerate_inputs_label_everything_clean():
    assert torch.equal(gmm_clean_prob(torch.full((50,), 0.3)), torch.ones(50))
    assert torch.equal(gmm_clean_prob(torch.tensor([1.0])), torch.ones(1))
    with pytest.raises(FloatingPointError):
        gmm_clean_prob(torch.tensor([0.1, float("nan"), 0.3]))


def test_co_divide_hands_each_split_to_the_other_net():
    prob = torch.tensor([[0.9, 0.1, 0.8],    # net 1's GMM
                         [0.2, 0.7, 0.6]])   # net 2's GMM
    (lab1, w1), (lab2, w2) = co_divide(prob, 0.5)
    # Net 1 trains on net 2's split, net 2 on net 1's.
    assert lab1.tolist() == [False, True, True] and torch.equal(w1, prob[1])
    assert lab2.tolist() == [True, False, True] and torch.equal(w2, prob[0])


def test_co_refine_matches_hand_computation():
    y = F.one_hot(torch.tensor([0, 2]), 3).float()
    w = torch.tensor([0.8, 0.3])
    p1 = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    p2 = torch.tensor([[0.7, 0.1, 0.2], [0.3, 0.4, 0.3]])
    out = co_refine(y, w, [p1, p2], 0.5)
    # Row 0: 0.8·[1,0,0] + 0.2·[0.6,0.2,0.2] = [0.92, 0.04, 0.04]; squared and normalised.
    # Row 1: 0.3·[0,0,1] + 0.7·[0.2,0.5,0.3] = [0.14, 0.35, 0.51].
    mixed = torch.tensor([[0.92, 0.04, 0.04], [0.14, 0.35, 0.51]])
    hand = mixed ** 2 / (mixed ** 2).sum(1, keepdim=True)
    assert torch.allclose(out, hand, atol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(2))


def test_co_guess_is_sharpened_mean_of_four():
    g = torch.Generator().manual_seed(1)
    probs = [F.softmax(torch.randn(5, 4, generator=g), dim=1) for _ in range(4)]
    mean = (probs[0] + probs[1] + probs[2] + probs[3]) / 4
    hand = mean ** 2 / (mean ** 2).sum(1, keepdim=True)
    out = co_guess(probs, 0.5)
    assert torch.allclose(out, hand, atol=1e-6)
    assert torch.allclose(out, sharpen(mean, 0.5), atol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(5))


def test_uniform_prior_penalty():
    assert float(uniform_prior_penalty(torch.zeros(8, 5))) == pytest.approx(0.0, abs=1e-6)
    # All mass on one class for every sample: KL(uniform || mean) grows large.
    collapsed = torch.tensor([[20.0, 0, 0, 0]]).repeat(8, 1)
    assert float(uniform_prior_penalty(collapsed)) > 5.0


def test_lambda_u_schedule():
    assert default_lambda_u(0.2) == 0.0
    assert default_lambda_u(0.5) == 25.0
    assert default_lambda_u(0.9) == 150.0
    assert default_lambda_u(0.4, "pairflip") == 0.0
    assert [default_lambda_u(r) for r in (0.34, 0.35, 0.69, 0.7)] == [0.0, 25.0, 25.0, 150.0]
    assert lambda_u_at(25.0, 0.0, 16) == 0.0
    assert lambda_u_at(25.0, 4.0, 16) == pytest.approx(6.25)
    assert lambda_u_at(25.0, 16.0, 16) == 25.0
    assert lambda_u_at(25.0, 40.0, 16) == 25.0
    assert lambda_u_at(25.0, 0.0, 0) == 25.0


def test_schedule_keeps_one_train_epoch(tiny_config):
    cfg = tiny_config("method=dividemix", "epochs=3", "dividemix.warmup_epochs=5")
    phases = [s.phase for s in dividemix_specs(cfg)]
    assert phases == ["warmup"] * 5 + ["train"]
    cfg = tiny_config("method=dividemix", "epochs=4", "dividemix.warmup_epochs=1")
    assert [s.phase for s in dividemix_specs(cfg)] == ["warmup"] + ["train"] * 3


# -- end to end, driving the method by hand ---------------------------------------------------


def _context(cfg) -> Context:
    prep = prepare_data(cfg, default_cache_dir(cfg))
    torch.manual_seed(cfg.seed)
    return Context(cfg, prep.train.images, prep.train.labels, len(prep.classes), device=torch.device("cpu"),
                   ssl_images=prep.ssl_images, cache_dir=default_cache_dir(cfg), noise_rate=cfg.data.noise_rate)


def _drive(method, specs, started: bool = False) -> list[dict]:
    """Run ``specs`` as the engine does (``on_supervised_start`` before the first supervised one)."""
    logs = []
    for spec in specs:
        if spec.supervised and not started:
            method.on_supervised_start()
            started = True
        logs.append(Trainer(method.ctx, method).run_epoch(spec))
    return logs


def _roundtrip(state: dict) -> dict:
    """Through bytes as a checkpoint goes: plain values only, loaded with ``weights_only``."""
    check_plain(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _first_conv(model: torch.nn.Module) -> torch.Tensor:
    name = next(n for n, p in model.named_parameters() if p.dim() == 4)
    return dict(model.named_parameters())[name].detach().clone()


def test_dividemix_trains_logs_and_resumes_exactly(tiny_config):
    cfg = tiny_config("method=dividemix", "epochs=2", "dividemix.warmup_epochs=0", "dividemix.lambda_u=25",
                      "dividemix.rampup_epochs=2")
    ctx = _context(cfg)
    m = DivideMix(ctx)
    specs = m.schedule()
    assert [s.phase for s in specs] == ["train", "train"]  # the warmup is tested end to end in test_run
    (train,) = _drive(m, specs[:1])
    for key in ("loss", "lr", "lambda_u", "labelled_net1", "labelled_net2", "lx_net1", "lu_net2", "penalty_net1"):
        assert key in train, key
    assert train["lambda_u"] == pytest.approx(12.5)  # one of two ramp-up epochs done
    assert 0 < train["labelled_net1"] <= ctx.n
    # Net 1 trained on net 2's split.
    assert train["labelled_net1"] == int((m.prob[1] > 0.5).sum())
    assert train["labelled_net2"] == int((m.prob[0] > 0.5).sum())

    m2 = DivideMix(ctx)
    m2.load_state_dict(_roundtrip(m.state_dict()))
    assert torch.equal(m.predict_logits(ctx.x), m2.predict_logits(ctx.x))
    for key, value in m.label_report().as_dict().items():
        assert torch.equal(value, m2.label_report().as_dict()[key]), key
    # The next epoch from the restored state (and RNG) is the same epoch, bit for bit.
    rng = (torch.get_rng_state(), ctx.generator.get_state())
    Trainer(m.ctx, m).run_epoch(specs[1])
    torch.set_rng_state(rng[0])
    ctx.generator.set_state(rng[1])
    Trainer(m2.ctx, m2).run_epoch(specs[1])
    assert torch.equal(m.predict_logits(ctx.x), m2.predict_logits(ctx.x))

    rep = m.label_report()
    assert torch.equal(rep.is_label_issue, rep.label_quality < 0.5)
    assert torch.equal(rep.label_quality, m.prob.mean(0))


def test_dividemix_edge_cases_empty_splits(tiny_config):
    ctx = _context(tiny_config("method=dividemix", "dividemix.lambda_u=25", "dividemix.rampup_epochs=0"))
    m = DivideMix(ctx)
    # Net 2's GMM calls everything clean (net 1 trains on all of it, labelled), net 1's nothing.
    m.prob = torch.stack([torch.zeros(ctx.n), torch.ones(ctx.n)])
    trainer = Trainer(ctx, m)
    parts = [trainer.run_pass(p) for p in m.passes(EpochSpec("train", 0, 1))]
    logs = m.on_epoch_end(EpochSpec("train", 0, 1), parts)
    assert logs["labelled_net1"] == ctx.n and logs["lu_net1"] == 0.0
    assert logs["labelled_net2"] == 0 and logs["lx_net2"] == 0.0
    assert logs["steps_net2"] == -(-ctx.n // ctx.cfg.optim.batch_size)  # one pass over the set


def test_dividemix_refuses_refined_without_ours(tiny_config):
    from labelrefine.errors import UserError

    ctx = _context(tiny_config("method=dividemix", "dividemix.labels=refined"))
    with pytest.raises(UserError, match="ours_dividemix"):
        DivideMix(ctx)


def test_ours_dividemix_composes_and_starts_from_the_encoder(tiny_config, monkeypatch):
    cfg = tiny_config("method=ours_dividemix", "epochs=2")
    ctx = _context(cfg)
    m = get_method("ours_dividemix")(ctx)
    specs = m.schedule()
    assert [s.phase for s in specs] == ["ssl", "warmup"] + ["refine"] * 4 + ["dm_warmup", "dm_train"]

    _drive(m, specs[:1])
    after_ssl = _first_conv(m.ours.sup.model)
    _drive(m, specs[1:6])
    assert not torch.equal(_first_conv(m.ours.sup.model), after_ssl)  # ours trained on from there
    refined = m.ours.labels.clone()

    seen = {}
    original = DivideMix.on_epoch_start

    def spy(self, spec):
        if not seen:  # before the first DivideMix step
            seen.update({k: _first_conv(s.model) for k, s in enumerate(self.sups)})
            seen["labels"] = self.labels.clone()
            seen["fc"] = [s.model.fc.weight.detach().clone() for s in self.sups]
        return original(self, spec)

    monkeypatch.setattr(DivideMix, "on_epoch_start", spy)
    state = _roundtrip(m.state_dict())  # before DivideMix starts: the encoder snapshot is in it
    rng = (torch.get_rng_state(), ctx.generator.get_state())
    _drive(m, specs[6:7], started=True)
    assert torch.equal(seen[0], after_ssl) and torch.equal(seen[1], after_ssl)
    assert not torch.equal(seen["fc"][0], seen["fc"][1])  # each net has its own classifier
    assert torch.equal(seen["labels"], refined)
    assert m.training_labels() is m.dm.labels

    # Resume from before DivideMix started: the same DivideMix epoch, bit for bit.
    seen.clear()
    m2 = get_method("ours_dividemix")(ctx)
    m2.load_state_dict(state)
    torch.set_rng_state(rng[0])
    ctx.generator.set_state(rng[1])
    _drive(m2, specs[6:7], started=True)
    assert torch.equal(m.predict_logits(ctx.x), m2.predict_logits(ctx.x))

    # And a round trip inside the DivideMix phase.
    _drive(m, specs[7:], started=True)
    m3 = get_method("ours_dividemix")(ctx)
    m3.load_state_dict(_roundtrip(m.state_dict()))
    assert torch.equal(m.predict_logits(ctx.x), m3.predict_logits(ctx.x))
    rep = m.label_report()
    assert set(rep.as_dict()) == {"refined_label", "label_quality", "is_label_issue", "n_stages_selected"}
    changed = m.dm.labels != m.given
    assert bool((rep.label_quality[changed] == 0).all()) and bool(rep.is_label_issue[changed].all())
    assert torch.equal(rep.n_stages_selected, m.ours.n_stages)


@pytest.mark.parametrize("init", ["random", "refined"])
def test_ours_dividemix_init_options(tiny_config, init):
    cfg = tiny_config("method=ours_dividemix", "epochs=1", "dividemix.warmup_epochs=0", f"dividemix.init={init}",
                      "dividemix.labels=noisy", "refine.iterations=1", "ssl.epochs=0")
    ctx = _context(cfg)
    m = get_method("ours_dividemix")(ctx)
    specs = m.schedule()
    _drive(m, specs[:-1])
    ours_model = m.ours.sup.model.state_dict()
    m.dm = m._new_dividemix(fresh=True)
    nets = [s.model.state_dict() for s in m.dm.sups]
    same = [all(torch.equal(net[k], ours_model[k]) for k in ours_model) for net in nets]
    assert same == ([True, True] if init == "refined" else [False, False])
    assert torch.equal(m.dm.labels, m.given)
    _drive(m, specs[-1:], started=True)


@pytest.mark.parametrize("rate", ["0.4", "0.5"])
def test_asymmetric_alias_gets_exactly_the_pairflip_settings(tiny_config, rate):
    """data.noise=asymmetric once took lambda_u 25 at 50% noise and no warmup penalty: DivideMix
    compared the name with "pairflip" itself. The Context resolves the alias; the method sees pairflip."""
    methods = {}
    for noise in ("asymmetric", "pairflip"):
        cfg = tiny_config("method=dividemix", "epochs=3", "dividemix.warmup_epochs=1", f"data.noise={noise}",
                          f"data.noise_rate={rate}")
        methods[noise] = DivideMix(_context(cfg))
    a, p = methods["asymmetric"], methods["pairflip"]
    assert a.cfg.data.noise == "pairflip" and config_to_dict(a.cfg) == config_to_dict(p.cfg)
    assert (a.lambda_max, a.warmup_penalty) == (p.lambda_max, p.warmup_penalty) == (0.0, True)
    assert [(s.phase, s.epoch) for s in a.schedule()] == [(s.phase, s.epoch) for s in p.schedule()]
    assert torch.equal(a.ctx.y, p.ctx.y)  # the same noisy labels too


@pytest.mark.parametrize("micro", [0, 100])  # 100: every forward of 128 or 256 rows in parts
def test_a_mixmatch_epoch_does_the_references_work_and_no_more(tiny_config, micro):
    """The images each net sees in a MixMatch epoch, counted by forward hooks: per step of net k
    (nl labelled, nu unlabelled), with grad the mixed batch 2nl + 2nu; without grad net k's
    targets on all four views (2nu + 2nl) and the other net's co-guess on 2nu; plus one GMM
    scoring pass per net over the training set. (In CE-epoch units, fwd+bwd = 3 forwards, that
    is 2 x 6f + 2/3 at labelled fraction f: about 10 at f = 0.8, see docs/research/dividemix-cost.md.)"""
    cfg = tiny_config("method=dividemix", "ssl.epochs=0", "dividemix.warmup_epochs=1", "epochs=2",
                      f"dividemix.micro_batch={micro}")
    method = get_method("dividemix")(_context(cfg))
    seen = [{"grad": 0, "nograd": 0} for _ in method.sups]

    def counter(k):
        def hook(module, args, output):
            seen[k]["grad" if torch.is_grad_enabled() else "nograd"] += args[0].shape[0]
        return hook

    for k, sup in enumerate(method.sups):
        sup.model.register_forward_hook(counter(k))
    warmup, train = method.schedule()
    _drive(method, [warmup])
    for s in seen:
        s.update(grad=0, nograd=0)
    logs = _drive(method, [train], started=True)[0]
    n, bs = method.ctx.n, cfg.optim.batch_size
    for k in range(2):
        other = 1 - k
        nl, steps = logs[f"labelled_net{k + 1}"], logs[f"steps_net{k + 1}"]
        nu = bs * steps  # the unlabelled set is cycled, a full batch a step
        assert steps == -(-nl // bs)
        assert seen[k]["grad"] == 2 * nl + 2 * nu
        # net k: its own targets (2nu + 2nl) and its GMM pass (n); as the other net: co-guesses for the
        # other net's unlabelled batches
        nl_o, steps_o = logs[f"labelled_net{other + 1}"], logs[f"steps_net{other + 1}"]
        assert seen[k]["nograd"] == (2 * nu + 2 * nl) + n + 2 * bs * steps_o
        assert 0 < nl_o <= n


@pytest.mark.parametrize("penalty", ["linear", "real"])
def test_a_mixmatch_step_in_parts_matches_the_whole_batch(tiny_config, monkeypatch, penalty):
    """``dividemix.micro_batch`` below the mixed batch's rows: the guesses and the mixed batch run in
    interleaved parts and the gradients accumulate. With a net whose outputs do not depend on the
    batch (GroupNorm, no BatchNorm) the parts' ``lx`` and ``lu`` add up to the whole batch's, and
    with a prior penalty that is a mean over rows one optimizer step ends at the weights of the
    whole-batch step. The real penalty is taken per part (each part's mean prediction, weighted by
    its rows): interleaved parts hold rows of all four view sets, so it stays close to the whole's."""
    import labelrefine.methods.dividemix as dm

    if penalty == "linear":
        monkeypatch.setattr(dm, "uniform_prior_penalty", lambda logits: logits.float().mean())
    end = {}
    for micro in (0, 100):  # a batch of 64: 256 mixed rows, 3 parts of at most 100
        cfg = tiny_config("method=dividemix", "ssl.epochs=0", "model.backbone=tiny_gn", "epochs=1",
                          "dividemix.warmup_epochs=0", "dividemix.lambda_u=25", "dividemix.rampup_epochs=0",
                          f"dividemix.micro_batch={micro}")
        ctx = _context(cfg)
        m = DivideMix(ctx)
        (train,) = m.schedule()
        m.on_supervised_start()
        handler = m.handler(train)
        handler.on_epoch_start(train)
        p = next(iter(handler.passes(train)))
        step = p.step(p.batches[0])
        assert (micro == 0) == isinstance(step, dm.Step)
        if micro:
            step.close()  # only the type was checked; the step runs for real below
        torch.manual_seed(1)
        ctx.generator.manual_seed(1)
        logs = Trainer(ctx, m).run_pass(dm.Pass(p.batches[:1], p.learners, p.step))
        end[micro] = (logs, [q.detach().clone() for q in p.learners[0].model.parameters()])
    (logs0, w0), (logs1, w1) = end[0], end[100]
    for key in ("lx", "lu"):
        assert logs1[key] == pytest.approx(logs0[key], rel=1e-5, abs=1e-7), key
    if penalty == "linear":
        assert logs1["penalty"] == pytest.approx(logs0["penalty"], rel=1e-5, abs=1e-7)
        for a, b in zip(w0, w1, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    else:
        assert logs1["penalty"] >= logs0["penalty"] - 1e-6  # Jensen: the mean of the parts' KL terms
        assert logs1["penalty"] == pytest.approx(logs0["penalty"], abs=0.02)


def test_micro_batch_parts():
    """``ceil(rows / micro_batch)`` parts; none at or below the limit, none when it is 0."""
    holder = type("H", (), {})()
    for limit, rows, parts in ((4, 10, 3), (4, 4, 1), (1024, 4096, 4), (1024, 4097, 5), (0, 10_000, 1)):
        holder.cfg = load_config(None, [f"dividemix.micro_batch={limit}"])
        assert DivideMix._parts(holder, rows) == parts
