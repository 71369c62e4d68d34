"""The airbench backbone and its patch-whitening initialisation (labelrefine/models/airbench.py).

Default size: ``airbench`` with ``width=64`` (airbench94's 64/256/256 conv groups), 3 input
channels and 10 classes has 1,971,362 trainable parameters (the whitening filters, 288 values,
are a buffer, not a parameter).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labelrefine.data.augment import channel_stats
from labelrefine.errors import UserError
from labelrefine.models import AirbenchNet, create_backbone, encoder_state, whiten_init
from labelrefine.models.airbench import PatchWhitening, patch_covariance

DEFAULT_PARAMS = 1_971_362


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _structured_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 images whose neighbouring pixels and channels are strongly correlated (blurred noise,
    mixed across channels, plus a per-image brightness): patch covariance far from identity."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size + 4, size + 4, generator=g)
    blur = torch.ones(channels, 1, 3, 3) / 9
    x = F.conv2d(x, blur, groups=channels)[:, :, : size, : size]
    if channels > 1:
        mix = torch.eye(channels) + 0.6 * torch.rand(channels, channels, generator=g)
        x = torch.einsum("dc,nchw->ndhw", mix, x)
    x = x + 0.5 * torch.randn(n, 1, 1, 1, generator=g)
    x = (x - x.mean()) / x.std()
    return (x * 40 + 128).clamp(0, 255).round().to(torch.uint8)


def _whitened_patch_cov(layer: PatchWhitening, images: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance, over every position of the sample, of the positive half of ``layer``'s outputs."""
    c = images.shape[1]
    x = (images.double() / 255 - torch.tensor(mean).double().view(1, c, 1, 1)) / torch.tensor(std).double().view(
        1, c, 1, 1)
    d = layer.out_channels // 2
    out = F.conv2d(x, layer.weight[:d].double(), layer.bias[:d].detach().double())
    flat = out.permute(0, 2, 3, 1).reshape(-1, d)
    mu = flat.mean(0)
    return mu, (flat - mu).T @ (flat - mu) / flat.shape[0]


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 32])
def test_forward_shapes(in_channels, size):
    torch.manual_seed(0)
    m = create_backbone("airbench", in_channels=in_channels, num_classes=7, width=8)
    assert isinstance(m, AirbenchNet) and m.width == 8 and m.feat_dim == 32
    x = torch.randn(4, in_channels, size, size)
    feats = m.features(x)
    assert feats.shape == (4, 32) and feats.dtype == torch.float32
    out = m(x)
    assert out.shape == (4, 7)
    torch.testing.assert_close(out, m.fc(feats))


def test_pools_adapt_to_the_input_size():
    sizes: list[tuple[int, int]] = []
    m = create_backbone("airbench", in_channels=1, num_classes=2, width=4)
    hooks = [g.register_forward_hook(lambda _m, _i, o: sizes.append(tuple(o.shape[-2:]))) for g in m.groups]
    with torch.no_grad():
        for hw in [(32, 32), (28, 28), (8, 8), (40, 9)]:
            sizes.clear()
            assert m(torch.randn(2, 1, *hw)).shape == (2, 2)
            want = {(32, 32): [(15, 15), (7, 7), (3, 3)], (28, 28): [(13, 13), (6, 6), (3, 3)],
                    (8, 8): [(3, 3), (1, 1), (1, 1)], (40, 9): [(19, 4), (9, 2), (4, 1)]}[hw]
            assert sizes == want, (hw, sizes)
    for h in hooks:
        h.remove()


def test_default_parameter_count_and_layout():
    m = create_backbone("airbench", in_channels=3, num_classes=10)
    assert m.width == 64 and m.feat_dim == 256
    assert [g.conv2.out_channels for g in m.groups] == [64, 256, 256]
    assert _n_params(m) == DEFAULT_PARAMS
    assert all(p.requires_grad for p in m.parameters())
    names = dict(m.named_parameters())
    assert "whiten.weight" not in names and "whiten.bias" in names  # the filters are a buffer
    assert m.whiten.weight.shape == (24, 3, 2, 2)
    assert not any(n.endswith("norm1.weight") or n.endswith("norm2.weight") for n in names)  # BN scale fixed
    # airbench93's shape: 64/128/128
    assert create_backbone("airbench", in_channels=3, num_classes=10, expand=2).feat_dim == 128


def test_identity_initialisation():
    m = create_backbone("airbench", in_channels=3, num_classes=10, width=32)  # 24 -> 32 -> 128 -> 128 channels
    wider = 0
    for g in m.groups:
        w1, w2 = g.conv1.weight, g.conv2.weight
        eye2 = torch.nn.init.dirac_(torch.empty_like(w2))
        torch.testing.assert_close(w2, eye2)  # square: the whole conv is the identity
        cin = w1.shape[1]
        torch.testing.assert_close(w1[:cin], torch.nn.init.dirac_(torch.empty_like(w1[:cin])))
        if w1.shape[0] > cin:  # a widening conv: the rest keeps PyTorch's random init
            assert w1[cin:].abs().sum() > 0
            wider += 1
    assert wider == 2  # 24 -> 32 and 32 -> 128; 128 -> 128 starts as the identity
    # before whiten_init the whitening layer is a lossless ± copy of each patch pixel
    d = m.whiten.out_channels // 2
    torch.testing.assert_close(m.whiten.weight[:d].reshape(d, d), torch.eye(d))
    torch.testing.assert_close(m.whiten.weight[d:], -m.whiten.weight[:d])


@pytest.mark.parametrize(("channels", "kernel"), [(3, 2), (1, 2), (1, 3)])
def test_whitening_filters_whiten_the_sample(channels, kernel):
    images = _structured_images(96, channels, 16)
    mean, std = channel_stats(images)
    m = create_backbone("airbench", in_channels=channels, num_classes=3, width=4, whiten_kernel=kernel)
    d = channels * kernel * kernel
    _, raw = patch_covariance(images, mean, std, kernel)
    raw_corr = raw / torch.sqrt(torch.outer(raw.diag(), raw.diag()))
    off = ~torch.eye(d, dtype=torch.bool)
    assert raw_corr[off].abs().max() > 0.5  # the raw patches are far from white

    eps = 1e-6
    evals = whiten_init(m, images, mean, std, eps=eps)
    assert evals.shape == (d,) and bool((evals[:-1] >= evals[1:]).all()) and evals[-1] > 1e-3
    mu, cov = _whitened_patch_cov(m.whiten, images, mean, std)
    torch.testing.assert_close(cov, torch.eye(d, dtype=cov.dtype), atol=1e-3, rtol=0)
    assert mu.abs().max() < 1e-4  # the bias centres the outputs
    # with airbench's eps (5e-4) the covariance is diag(λ / (λ + eps)): the weakest directions shrink a bit
    evals = whiten_init(m, images, mean, std)
    _, cov = _whitened_patch_cov(m.whiten, images, mean, std)
    torch.testing.assert_close(cov, torch.diag(evals / (evals + 5e-4)), atol=1e-4, rtol=0)
    assert cov.diag().min() > 0.9
    half = m.whiten.out_channels // 2
    torch.testing.assert_close(m.whiten.weight[half:], -m.whiten.weight[:half])


def test_whitening_is_independent_of_the_chunking_and_keeps_the_layout():
    images = _structured_images(40, 3, 12, seed=1)
    mean, std = channel_stats(images)
    a = create_backbone("airbench", in_channels=3, num_classes=3, width=4).to(memory_format=torch.channels_last)
    b = create_backbone("airbench", in_channels=3, num_classes=3, width=4)
    whiten_init(a, images, mean, std, chunk=7)
    whiten_init(b.whiten, images, mean, std)  # the layer itself works too
    torch.testing.assert_close(a.whiten.weight.contiguous(), b.whiten.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.whiten.bias, b.whiten.bias, atol=1e-5, rtol=1e-5)
    assert a.whiten.weight.is_contiguous(memory_format=torch.channels_last)
    assert a.whiten.weight.dtype == torch.float32 and not a.whiten.weight.requires_grad


def test_whiten_init_rejects_bad_input():
    m = create_backbone("airbench", in_channels=3, num_classes=3, width=4)
    images = _structured_images(4, 3, 8)
    mean, std = channel_stats(images)
    with pytest.raises(UserError, match="uint8"):
        whiten_init(m, images.float(), mean, std)
    with pytest.raises(UserError, match="channels"):
        whiten_init(m, images[:, :1], mean[:1], std[:1])
    with pytest.raises(UserError, match="mean and std"):
        whiten_init(m, images, mean[:2], std[:2])
    with pytest.raises(UserError, match="eps"):
        whiten_init(m, images, mean, std, eps=0.0)
    with pytest.raises(TypeError, match="airbench"):
        whiten_init(create_backbone("tiny", in_channels=3, num_classes=3), images, mean, std)
    with pytest.raises(UserError, match="expand"):
        create_backbone("airbench", in_channels=3, num_classes=3, expand=0)
    with pytest.raises(UserError, match="width"):
        create_backbone("airbench", in_channels=3, num_classes=3, width=0)


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    images = _structured_images(12, 3, 16)
    mean, std = channel_stats(images)
    m = create_backbone("airbench", in_channels=3, num_classes=4, width=8)
    whiten_init(m, images, mean, std)
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.arange(12) % 4
    F.cross_entropy(m(x.contiguous(memory_format=torch.channels_last)), y, label_smoothing=0.2).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert m.whiten.weight.grad is None
    biases = list(m.norm_biases())
    assert len(biases) == 6 and all(b.dim() == 1 for b in biases)
    others = [p for p in m.parameters() if all(p is not b for b in biases)]
    assert len(biases) + len(others) == len(list(m.parameters()))


def test_state_dict_round_trip():
    torch.manual_seed(0)
    images = _structured_images(16, 3, 16)
    mean, std = channel_stats(images)
    m = create_backbone("airbench", in_channels=3, num_classes=5, width=8)
    whiten_init(m, images, mean, std)
    x = torch.randn(16, 3, 16, 16)
    F.cross_entropy(m(x), torch.arange(16) % 5).backward()  # moves the BN running statistics
    state = m.state_dict()
    assert "whiten.weight" in state and "groups.0.norm1.running_mean" in state
    fresh = create_backbone("airbench", in_channels=3, num_classes=5, width=8)
    fresh.load_state_dict(state)
    m.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m(x))
    assert not torch.equal(fresh.whiten.weight, create_backbone("airbench", in_channels=3, num_classes=5,
                                                                width=8).whiten.weight)


def test_encoder_state_drops_only_the_classifier():
    m = create_backbone("airbench", in_channels=1, num_classes=3, width=4)
    state = m.state_dict()
    enc = encoder_state(state)
    assert set(state) - set(enc) == {"fc.weight", "fc.bias"}
    assert list(enc) == [k for k in state if not k.startswith("fc.")]
    assert "whiten.weight" in enc  # the fitted whitening travels with a cached SimCLR encoder


def test_config_width_reaches_the_backbone(tiny_config):
    from labelrefine.engine import backbone_kwargs

    cfg = tiny_config("model.backbone=airbench", "model.width=16")
    m = create_backbone(cfg.model.backbone, in_channels=1, num_classes=10, **backbone_kwargs(cfg))
    assert m.width == 16 and m.feat_dim == 64
