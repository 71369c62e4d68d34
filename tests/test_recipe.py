"""The fast-training recipe options of the one loop: lr schedules, parameter groups, Lookahead,
test-time augmentation, evaluation cadence, patch whitening, and cache keys that survive new options."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from labelrefine.config import RunConfig, config_difference, config_to_dict, load_config
from labelrefine.engine import Context, Learner, lr_factor
from labelrefine.engine.context import _tta_logits
from labelrefine.engine.optim import Lookahead, norm_biases, param_groups
from labelrefine.models.airbench import patch_covariance

# -- lr schedules ---------------------------------------------------------------------------------


def test_lr_factor_linear_triangle_matches_airbench():
    # warmup 0.2 -> 1 over 2 of 10 epochs, then linear to 0.07 at epoch 10
    f = lambda p: lr_factor(p, 10, "linear", 2.0, warmup_start=0.2, final=0.07)  # noqa: E731
    assert f(0.0) == pytest.approx(0.2 + 0.8 * 1e-3 / 2)
    assert f(1.0) == pytest.approx(0.2 + 0.8 * (1.001 / 2))
    assert f(2.0) == pytest.approx(1.0)
    assert f(6.0) == pytest.approx(1.0 + (0.07 - 1.0) * 0.5)
    assert f(10.0) == pytest.approx(0.07) and f(12.0) == pytest.approx(0.07)
    # no warmup: linear from the first step
    assert lr_factor(2.5, 10, "linear", 0.0, final=0.0) == pytest.approx(0.75)


def test_lr_factor_defaults_are_unchanged():
    """warmup_start = 0 gives exactly the old ramp, and cosine ignores final (bit-identical runs)."""
    for p in (0.0, 0.3, 0.999):
        assert lr_factor(p, 10, "cosine", 1.0) == (p + 1e-3) / 1.0
    for p in (1.0, 4.2, 10.0):
        assert lr_factor(p, 10, "cosine", 1.0, final=0.5) == 0.5 * (1.0 + math.cos(math.pi * p / 10))


# -- parameter groups -------------------------------------------------------------------------------


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def test_param_groups_scale_norm_biases():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4))
    cfg = load_config(None, ["optim.norm_bias_lr_scale=64"])
    groups = param_groups(net, cfg, 0.01)
    biases = {id(p) for p in norm_biases(net)}
    assert biases == {id(net[1].bias), id(net[2].bias)}
    assert {id(p) for p in groups[1]["params"]} == biases
    assert groups[1]["lr_scale"] == 64 and groups[1]["weight_decay"] == pytest.approx(0.01 / 64)
    assert len(groups[0]["params"]) == 4 and groups[0]["weight_decay"] == 0.01
    assert len(param_groups(net, RunConfig(), 0.01)) == 1  # the default: one group, as before


def test_learner_sets_each_groups_lr(tiny_config):
    cfg = tiny_config("optim.norm_bias_lr_scale=8", "optim.schedule=constant", "model.backbone=resnet18_cifar",
                      "model.width=4")
    ctx = _ctx(cfg)
    learner = Learner(ctx, 2)
    lr = learner.set_lr()
    assert [g["lr"] for g in learner.optimizer.param_groups] == [lr, 8 * lr]


# -- Lookahead ------------------------------------------------------------------------------------


def test_lookahead_against_a_hand_computed_average():
    net = nn.Linear(1, 1, bias=False)
    net.weight.requires_grad_(False).fill_(5.0)
    la = Lookahead(net, every=2, decay=0.5)
    net.weight.data.fill_(0.0)  # changed after construction (SimCLR, a cached encoder): the slow copy starts here
    slow = fast = 0.0
    for step in range(1, 7):
        la.begin()  # the Learner calls it before every optimizer step: the first one snapshots
        net.weight.data += 1.0  # a "training step"
        fast += 1.0
        la.step(step / 6)
        if step % 2 == 0:
            a = 0.5 ** 2 * (step / 6) ** 3
            slow = slow + (1 - a) * (fast - slow)
            fast = slow
        assert net.weight.item() == pytest.approx(fast)
    net.weight.data += 1.0
    la.finish()
    assert net.weight.item() == pytest.approx(slow)
    state = la.state_dict()
    other = Lookahead(nn.Linear(1, 1, bias=False), every=2, decay=0.5)
    other.load_state_dict(state)
    assert other.steps == 6 and float(other.slow["weight"]) == pytest.approx(slow)


# -- test-time augmentation ---------------------------------------------------------------------------


class _Probe(nn.Module):
    """Logits = (pixel (0, 0), pixel (0, W-1)) of channel 0: sees flips and translations."""

    def forward(self, x):
        return torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1]], 1)


def test_tta_views_and_weights():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)
    probe = _Probe()
    assert torch.equal(_tta_logits(probe, x, "none"), probe(x))
    flip = 0.5 * (probe(x) + probe(x.flip(-1)))
    assert torch.allclose(_tta_logits(probe, x, "flip"), flip)
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, pad[..., :3, :4], pad[..., 2:, 2:]]
    pairs = [0.5 * (probe(v) + probe(v.flip(-1))) for v in views]
    assert torch.allclose(_tta_logits(probe, x, "crops"), 0.5 * pairs[0] + 0.25 * pairs[1] + 0.25 * pairs[2])
    assert not torch.allclose(pairs[1], pairs[0])  # the translated views do differ


# -- evaluation cadence, whitening, a run with the whole recipe ----------------------------------------


def _ctx(cfg) -> Context:
    from labelrefine.data.splits import prepare_data
    from labelrefine.pipeline import default_cache_dir

    prep = prepare_data(cfg, default_cache_dir(cfg))
    return Context(cfg, prep.train.images, prep.train.labels, len(prep.classes), device=torch.device("cpu"),
                   ssl_images=prep.ssl_images, cache_dir=default_cache_dir(cfg), noise_rate=cfg.data.noise_rate)


def test_airbench_models_are_whitened_on_the_training_images(tiny_config):
    cfg = tiny_config("model.backbone=airbench", "model.width=8", "data.spec=digits,size=16")
    ctx = _ctx(cfg)
    a, b = ctx.new_model(), ctx.new_model()
    assert torch.equal(a.whiten.weight, b.whiten.weight)  # fitted once, the same for every net
    # the positive half of the whitened patches of the training images: covariance diag(λ / (λ + eps))
    w = a.whiten.weight[: a.whiten.weight.shape[0] // 2].flatten(1).double()
    _, cov = patch_covariance(ctx.ssl_all, ctx.mean, ctx.std, 2)
    evals = torch.linalg.eigvalsh(cov).flip(0)
    assert torch.allclose(w @ cov @ w.T, torch.diag(evals / (evals + 5e-4)), atol=1e-5)


def test_run_with_the_whole_recipe_and_sparse_evaluation(tiny_config, tmp_path):
    from labelrefine.pipeline import run

    cfg = tiny_config("method=ce", "epochs=5", "eval_every=2", "tta=crops", "optim.schedule=linear",
                      "optim.warmup_lr_epochs=1", "optim.warmup_start=0.2", "optim.final_lr=0.07",
                      "optim.norm_bias_lr_scale=16", "optim.lookahead=true", "optim.label_smoothing=0.2",
                      "model.backbone=airbench", "model.width=8", "data.spec=digits,size=16",
                      "optim.lr=1.0")  # airbench's 1/9 logit scale wants a high lr (fast-cifar.md)
    result = run(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("val_acc" in r) for r in records] == [False, True, False, True, True]  # epochs 2, 4, last
    assert result.summary["final_test_acc"] == records[-1]["test_acc"] > 0.2  # chance: 0.1
    lrs = [r["lr"] for r in records]  # the lr of each epoch's last step: warmup, then the linear decay
    steps = 300 * 9 // 10 // 64  # 270 training samples, batch 64, the partial batch dropped: 4 steps an epoch
    last = [e + (steps - 1) / steps for e in range(5)]  # progress at each epoch's last step
    assert lrs == pytest.approx([lr_factor(p, 5, "linear", 1.0, warmup_start=0.2, final=0.07) for p in last])
    assert lrs[0] < lrs[1] and lrs[1:] == sorted(lrs[1:], reverse=True)


# -- cache keys -----------------------------------------------------------------------------------------


def test_config_difference_treats_later_options_at_their_default_as_the_same():
    cfg = load_config(None, ["refine.threshold=0.5"])
    stored = config_to_dict(cfg)
    assert config_difference(stored, cfg) is None
    del stored["optim"]["lookahead"], stored["tta"]  # a run made before these options existed
    assert config_difference(stored, cfg) is None
    assert config_difference(stored, load_config(None, ["refine.threshold=0.5", "tta=flip"])) == "tta"
    assert config_difference(stored, load_config(None, [])) == "refine.threshold"
    assert config_difference(None, cfg) == "<root>"


def test_config_difference_skips_the_ignored_keys_only():
    from labelrefine.detect import POST_HOC_KEYS

    stored = config_to_dict(load_config(None, []))
    other = load_config(None, ["detect.score=self_confidence", "detect.flag=refined", "detect.estimate_from=model"])
    assert config_difference(stored, other) == "detect.estimate_from"
    assert config_difference(stored, other, ignore=POST_HOC_KEYS) is None
    # detect.knn_k changes the scores a run computes: never ignored with them
    assert config_difference(stored, load_config(None, ["detect.knn_k=20"]), ignore=POST_HOC_KEYS) == "detect.knn_k"


def test_model_expand_reaches_airbench_and_only_airbench(tiny_config):
    from labelrefine.errors import UserError

    ctx = _ctx(tiny_config("model.backbone=airbench", "model.width=8", "model.expand=2", "data.spec=digits,size=16"))
    model = ctx.new_model()
    assert model.fc.in_features == 16  # groups 8, 16, 16
    with pytest.raises(UserError, match="model.expand"):
        tiny_config("model.backbone=resnet18_cifar", "model.expand=2")


def test_ours_fine_tune_does_not_repeat_the_runs_lr_warmup(tiny_config):
    from labelrefine.engine import EpochSpec
    from labelrefine.methods import get_method

    cfg = tiny_config("method=ours", "ssl.epochs=0", "optim.schedule=linear", "optim.warmup_lr_epochs=2",
                      "optim.warmup_start=0.2", "optim.final_lr=0.1", "finetune.epochs=1",
                      "finetune.lr_scale=0.5")
    method = get_method("ours")(_ctx(cfg))
    method.on_epoch_start(EpochSpec("finetune", 0, 1))
    ft = method.finetuner
    assert ft.warmup == 0.0 and method.sup.warmup == 2.0  # the main learner keeps the run's ramp
    assert ft.set_lr() == pytest.approx(cfg.optim.lr * 0.5)  # the fine-tune starts at its peak
    ft.progress = 1.0
    assert ft.set_lr() == pytest.approx(cfg.optim.lr * 0.5 * 0.1)


# -- gradient accumulation: a step in parts ----------------------------------------------------------


@pytest.mark.parametrize("lookahead", [False, True])
def test_a_step_in_parts_makes_the_one_pass_update(tiny_config, lookahead):
    """A step function that yields its batch's losses in parts: the Trainer backpropagates each and
    steps once, so the update is that of the summed loss; the returned Step's logs are recorded."""
    from labelrefine.engine import Pass, Step, Trainer

    cfg = tiny_config("optim.schedule=constant", f"optim.lookahead={str(lookahead).lower()}")
    ctx = _ctx(cfg)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(nn.Linear(5, 3))
    start = nets[0].weight.detach().clone()
    one, parts = (Learner(ctx, 10, model=net) for net in nets)  # 10: Lookahead does not finish here

    def whole(batch):
        loss = nn.functional.cross_entropy(nets[0](x), y, reduction="sum") / 12
        return Step([loss], {"loss": loss.detach()}, 1)

    def in_parts(batch):
        total = 0.0
        for rows in (slice(0, 5), slice(5, 12)):
            loss = nn.functional.cross_entropy(nets[1](x[rows]), y[rows], reduction="sum") / 12
            total += float(loss)
            yield [loss]
        return Step([torch.tensor(total)], {"loss": total}, 1)

    trainer = Trainer(ctx, method=None)
    logs = [trainer.run_pass(Pass([0, 1], [learner], step)) for learner, step in ((one, whole), (parts, in_parts))]
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], rel=1e-6)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(nets[0].weight, start)  # it did train

    def non_finite(batch):
        yield [torch.tensor(float("nan"), requires_grad=True)]
        return Step([torch.tensor(0.0)], {}, 1)

    with pytest.raises(FloatingPointError):
        trainer.run_pass(Pass([0], [one], non_finite))
