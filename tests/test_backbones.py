"""Backbone registry: every registered model builds, runs forward/backward at 8-32 px, 1 or 3 channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labelrefine.errors import UserError
from labelrefine.models import BACKBONES, Classifier, create_backbone, list_backbones

# Small widths keep the loop over the registry fast; the paper-size nets are checked separately.
FAST_KWARGS = {"resnet18_cifar": {"width": 8}, "resnet34_cifar": {"width": 8}, "preact_resnet18": {"width": 8},
               "airbench": {"width": 8}}


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_the_expected_names():
    assert {"preact_resnet18", "resnet18_cifar", "resnet34_cifar", "tiny"} <= set(list_backbones())
    assert list_backbones() == sorted(BACKBONES)


@pytest.mark.parametrize("name", list_backbones())
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 32])
def test_forward_shapes(name, in_channels, size):
    torch.manual_seed(0)
    m = create_backbone(name, in_channels=in_channels, num_classes=5, **FAST_KWARGS.get(name, {}))
    assert isinstance(m, Classifier)
    x = torch.randn(4, in_channels, size, size)
    feats = m.features(x)
    assert feats.shape == (4, m.feat_dim) and feats.dtype == torch.float32
    assert m.fc.in_features == m.feat_dim
    out = m(x)
    assert out.shape == (4, 5)
    torch.testing.assert_close(out, m.fc(feats))


@pytest.mark.parametrize("name", list_backbones())
def test_backward_and_channels_last(name):
    torch.manual_seed(0)
    m = create_backbone(name, in_channels=3, num_classes=4, **FAST_KWARGS.get(name, {}))
    x = torch.randn(6, 3, 16, 16)
    y = torch.randint(0, 4, (6,))
    m.eval()  # eval-mode BN so both layouts compute the same function
    ref = m(x)
    m_cl = m.to(memory_format=torch.channels_last)
    out = m_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    m.train()
    F.cross_entropy(m(x.contiguous(memory_format=torch.channels_last)), y).backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_large_input_works():
    m = create_backbone("resnet18_cifar", in_channels=3, num_classes=3, width=8)
    assert m(torch.randn(2, 3, 64, 48)).shape == (2, 3)


def test_param_counts():
    r18 = create_backbone("resnet18_cifar", in_channels=3, num_classes=10, width=16)
    assert 0.6e6 <= _n_params(r18) <= 0.8e6
    pre = create_backbone("preact_resnet18", in_channels=3, num_classes=10)
    assert 11.1e6 <= _n_params(pre) <= 11.3e6
    assert pre.feat_dim == 512
    r34 = create_backbone("resnet34_cifar", in_channels=3, num_classes=10)
    assert 21.0e6 <= _n_params(r34) <= 21.5e6


def test_preact_resnet18_full_width_forward_at_32px():
    m = create_backbone("preact_resnet18", in_channels=3, num_classes=10)
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_initialisation():
    m = create_backbone("resnet18_cifar", in_channels=3, num_classes=10, width=8)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            assert mod.bias is None
        if isinstance(mod, torch.nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)


def test_reset_classifier():
    m = create_backbone("tiny", in_channels=1, num_classes=3)
    m.reset_classifier(7)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    assert m.fc.in_features == m.feat_dim and m.num_classes == 7


def test_errors():
    with pytest.raises(UserError, match="known: .*resnet18_cifar"):
        create_backbone("resnet99", in_channels=3, num_classes=10)
    with pytest.raises(UserError, match="depth"):
        create_backbone("tiny", in_channels=3, num_classes=10, depth=3)
    with pytest.raises(UserError, match="num_classes"):
        create_backbone("tiny", in_channels=3, num_classes=0)
    with pytest.raises(UserError, match="width"):
        create_backbone("resnet18_cifar", in_channels=3, num_classes=10, width=0)


@pytest.mark.parametrize("size", [7, 8, 16, 31])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_strided_pointwise_equals_a_strided_1x1_conv(size, stride):
    from labelrefine.models.backbones import StridedPointwise

    torch.manual_seed(0)
    ours = StridedPointwise(4, 6, stride).double()
    ref = torch.nn.Conv2d(4, 6, kernel_size=1, stride=stride, bias=False).double()
    ref.load_state_dict(ours.state_dict())  # the same parameter under the same key
    x = torch.randn(3, 4, size, size, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, want = ours(x), ref(x2)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


_ODD_BATCH = """
import torch, torch.nn.functional as F
from labelrefine.models import create_backbone, list_backbones
torch.set_num_threads(2)
for name in list_backbones():
    kw = {} if name.startswith("tiny") else {"width": 8}
    m = create_backbone(name, in_channels=3, num_classes=10, **kw).to(memory_format=torch.channels_last)
    for b in (3, 35):
        x = torch.randn(b, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        F.cross_entropy(m(x), torch.zeros(b, dtype=torch.long)).backward()
print("ok")
"""


def test_odd_batches_channels_last_two_threads_do_not_crash():
    # torch 2.14's strided 1x1 conv weight-gradient kernel killed the process here (odd batch,
    # channels_last, 2 threads, 8->16 channels): a crash, so it runs in a child process.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _ODD_BATCH], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def test_encoder_state_is_every_entry_but_the_classifier():
    from labelrefine.models import encoder_state, is_classifier_key

    model = create_backbone("tiny", in_channels=1, num_classes=3)
    state = model.state_dict()
    enc = encoder_state(state)
    assert list(enc) == [k for k in state if k not in ("fc.weight", "fc.bias")]
    assert all(enc[k] is state[k] for k in enc)
    assert is_classifier_key("fc.bias") and not is_classifier_key("fcx.weight") and not is_classifier_key("fc")
