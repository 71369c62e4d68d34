"""Batched augmentation: exact normalisation, crops are translations, per-sample randomness, seeding."""

from __future__ import annotations

import pytest
import torch

from labelrefine.data.augment import blur_kernel_size, channel_stats, make_augment
from labelrefine.errors import UserError

MEAN3, STD3 = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _images(n: int, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def _unnormalize(y: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((y * s + m) * 255).round().to(torch.int64)


def test_channel_stats_matches_torch():
    x = _images(7, h=5, w=6)
    mean, std = channel_stats(x, chunk_elems=100)  # several chunks, one a partial
    xf = x.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), xf.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), xf.std(dim=(0, 2, 3), correction=0))
    with pytest.raises(UserError, match="uint8"):
        channel_stats(xf)


@pytest.mark.parametrize("kind", ["none", "weak", "strong"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 32])
def test_output_dtype_and_shape(kind, channels, size):
    mean, std = MEAN3[:channels], STD3[:channels]
    aug = make_augment(kind, image_size=(size, size), channels=channels, mean=mean, std=std)
    y = aug(_images(5, channels, size, size))
    assert y.dtype == torch.float32 and y.shape == (5, channels, size, size)
    assert torch.isfinite(y).all()
    # Every output pixel is a normalised value in [0, 1] pixel units.
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    raw = y * s + m
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_none_is_exact_normalisation():
    x = _images(4)
    aug = make_augment("none", image_size=(32, 32), channels=3, mean=MEAN3, std=STD3)
    expected = (x.float() / 255 - torch.tensor(MEAN3).view(1, 3, 1, 1)) / torch.tensor(STD3).view(1, 3, 1, 1)
    assert torch.equal(aug(x), expected)


def test_weak_without_pad_and_flip_is_identity():
    x = _images(6)
    none = make_augment("none", image_size=(32, 32), channels=3, mean=MEAN3, std=STD3)
    weak = make_augment("weak", image_size=(32, 32), channels=3, mean=MEAN3, std=STD3, pad=0, flip=False)
    assert torch.equal(weak(x), none(x))


def _pattern(n: int, c: int, h: int, w: int) -> torch.Tensor:
    """Images whose every pixel value encodes (sample, row, col) uniquely within a sample."""
    rows = torch.arange(h).view(1, 1, h, 1)
    cols = torch.arange(w).view(1, 1, 1, w)
    base = (rows * w + cols) % 251  # distinct for h·w <= 251
    ch = torch.arange(c).view(1, c, 1, 1)
    sample = torch.arange(n).view(n, 1, 1, 1)
    return ((base + 3 * ch + 5 * sample) % 256).to(torch.uint8).expand(n, c, h, w).contiguous()


@pytest.mark.parametrize("padding_mode", ["reflect", "zero"])
@pytest.mark.parametrize("flip", [False, True])
def test_weak_is_a_translated_copy(padding_mode, flip):
    n, c, h, w, pad = 64, 3, 12, 12, 3
    x = _pattern(n, c, h, w)
    mean, std = (0.0,) * c, (1.0,) * c
    torch.manual_seed(0)
    aug = make_augment(
        "weak", image_size=(h, w), channels=c, mean=mean, std=std, pad=pad, flip=flip, padding_mode=padding_mode
    )
    y = _unnormalize(aug(x), mean, std)
    shifts, flips = set(), set()
    for i in range(n):
        found = False
        for f in (False, True) if flip else (False,):
            src = x[i].flip(-1) if f else x[i]
            for dy in range(-pad, pad + 1):
                for dx in range(-pad, pad + 1):
                    # Output (r, q) reads source (r + dy, q + dx); compare where that is in range.
                    r0, r1 = max(0, -dy), min(h, h - dy)
                    q0, q1 = max(0, -dx), min(w, w - dx)
                    if torch.equal(y[i, :, r0:r1, q0:q1], src[:, r0 + dy : r1 + dy, q0 + dx : q1 + dx].long()):
                        found = True
                        shifts.add((dy, dx))
                        flips.add(f)
                        if padding_mode == "zero":
                            border = torch.ones(h, w, dtype=torch.bool)
                            border[r0:r1, q0:q1] = False
                            assert torch.all(y[i][:, border] == 0)
                        break
                if found:
                    break
            if found:
                break
        assert found, f"sample {i} is not a translated copy of its source"
    # Per-sample randomness: 64 samples see many different shifts (and both flip states).
    assert len(shifts) > 10
    if flip:
        assert flips == {False, True}


def test_weak_reflect_border_mirrors_the_image():
    x = _pattern(1, 1, 8, 8)
    aug = make_augment("weak", image_size=(8, 8), channels=1, mean=(0.0,), std=(1.0,), pad=2, flip=False)
    # Force the extreme shift by sampling until the top-left corner is out of range.
    torch.manual_seed(0)
    for _ in range(200):
        y = _unnormalize(aug(x), (0.0,), (1.0,))[0, 0]
        if torch.equal(y[2:, 2:], x[0, 0, :6, :6].long()):  # shift (-2, -2)
            # Reflect without edge repeat: padded row -1 is row 1, row -2 is row 2.
            assert torch.equal(y[0, 2:], x[0, 0, 2, :6].long())
            assert torch.equal(y[1, 2:], x[0, 0, 1, :6].long())
            return
    pytest.fail("shift (-2, -2) never drawn in 200 tries")


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_seeded_reproducibility_and_per_sample_randomness(kind):
    aug = make_augment(kind, image_size=(16, 16), channels=3, mean=MEAN3, std=STD3)
    # The same image repeated: different outputs can only come from per-sample randomness.
    x = _images(1, h=16, w=16).expand(32, 3, 16, 16).contiguous()
    torch.manual_seed(123)
    a = aug(x)
    torch.manual_seed(123)
    b = aug(x)
    assert torch.equal(a, b)
    c = aug(x)
    assert not torch.equal(a, c)
    distinct = {tuple(row.tolist()) for row in a.flatten(1)[:, ::7].round(decimals=4)}
    assert len(distinct) > 16


def test_strong_grayscale_keeps_one_channel_and_varies():
    aug = make_augment("strong", image_size=(8, 8), channels=1, mean=(0.5,), std=(0.25,))
    x = _images(1, c=1, h=8, w=8).expand(16, 1, 8, 8).contiguous()
    torch.manual_seed(0)
    y = aug(x)
    assert y.shape == (16, 1, 8, 8)
    assert not torch.allclose(y[0], y[1])


def test_strong_crop_scale_min_one_is_a_full_view():
    # Scale 1 with the aspect ratio range still crops/stretches a little; without colour ops
    # (1 channel, blur off) a flat image must stay flat whatever the crop.
    aug = make_augment("strong", image_size=(8, 8), channels=1, mean=(0.0,), std=(1.0,), crop_scale_min=1.0, blur=False)
    x = torch.full((4, 1, 8, 8), 128, dtype=torch.uint8)
    y = aug(x)
    assert torch.allclose(y, y[:, :, :1, :1].expand_as(y))


def test_strong_resizes_any_input_to_image_size():
    aug = make_augment("strong", image_size=(16, 16), channels=3, mean=MEAN3, std=STD3)
    assert aug(_images(3, h=40, w=24)).shape == (3, 3, 16, 16)


def test_channels_last_and_buffers_follow_device():
    aug = make_augment("weak", image_size=(8, 8), channels=3, mean=MEAN3, std=STD3, channels_last=True)
    y = aug(_images(4, h=8, w=8))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert aug.mean.device == y.device


def test_blur_kernel_size():
    assert blur_kernel_size((8, 8)) == 3
    assert blur_kernel_size((32, 32)) == 3
    assert blur_kernel_size((64, 96)) == 7
    assert blur_kernel_size((224, 224)) == 23


def test_errors():
    kw = dict(image_size=(8, 8), channels=3, mean=MEAN3, std=STD3)
    with pytest.raises(UserError, match="known: none, weak, strong"):
        make_augment("medium", **kw)
    with pytest.raises(UserError, match="mean"):
        make_augment("none", image_size=(8, 8), channels=3, mean=(0.5,), std=STD3)
    with pytest.raises(UserError, match="std"):
        make_augment("none", image_size=(8, 8), channels=3, mean=MEAN3, std=(0.1, 0.0, 0.1))
    with pytest.raises(UserError, match="blur"):
        make_augment("weak", blur=False, **kw)
    with pytest.raises(UserError, match="pad"):
        make_augment("weak", pad=8, **kw)
    with pytest.raises(UserError, match="crop_scale_min"):
        make_augment("strong", crop_scale_min=0.0, **kw)
    with pytest.raises(UserError, match="channels"):
        make_augment("strong", image_size=(8, 8), channels=4, mean=(0.5,) * 4, std=(0.2,) * 4)
    aug = make_augment("none", **kw)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="built for"):
        aug(_images(2, h=9, w=8))


# ---------------------------------------------------------------------------------------------
# ResizedCropFlip: the strong set's crop + flip as one batched resample


def test_resized_crop_flip_full_box_is_identity_or_mirror():
    from labelrefine.data.augment import ResizedCropFlip

    x = torch.rand(64, 3, 12, 12)
    same = ResizedCropFlip((12, 12), scale=(1, 1), ratio=(1, 1), flip=False)
    torch.testing.assert_close(same(x), x, rtol=0, atol=1e-6)  # pixel centres land on pixel centres
    torch.manual_seed(0)
    y = ResizedCropFlip((12, 12), scale=(1, 1), ratio=(1, 1), flip=True)(x)
    plain = (y - x).abs().amax(dim=(1, 2, 3)) < 1e-6
    mirrored = (y - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert bool((plain | mirrored).all()) and 10 < int(mirrored.sum()) < 54


def test_resized_crop_flip_resamples_its_box_like_torchvision(monkeypatch):
    # The slow reference: crop the box out, resize it bilinearly (no antialias) with torchvision.
    from torchvision.transforms.v2 import functional as TF

    from labelrefine.data.augment import ResizedCropFlip

    x = torch.rand(3, 3, 20, 24, dtype=torch.float64)
    fixed = torch.tensor([[2.0, 5.0, 11.0, 9.0], [0.0, 0.0, 20.0, 24.0], [7.0, 3.0, 6.0, 17.0]])
    op = ResizedCropFlip((16, 16), flip=False)
    monkeypatch.setattr(op, "boxes", lambda n, h, w: fixed)
    y = op(x)
    for k, (top, left, h, w) in enumerate(fixed.int().tolist()):
        want = TF.resized_crop(x[k], top, left, h, w, [16, 16], antialias=False)
        torch.testing.assert_close(y[k], want)


def test_resized_crop_flip_boxes_follow_torchvision_get_params():
    from torchvision.transforms import RandomResizedCrop

    from labelrefine.data.augment import ResizedCropFlip

    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    for height, width in ((32, 32), (8, 40)):  # 8x40: many draws do not fit; the fallback is used
        torch.manual_seed(0)
        ours = ResizedCropFlip((32, 32), scale=scale, ratio=ratio).boxes(20000, height, width)
        top, left, h, w = ours.unbind(1)
        assert bool((top >= 0).all() and (left >= 0).all()), (height, width)
        assert bool((top + h <= height).all() and (left + w <= width).all()), (height, width)
        assert torch.equal(ours, ours.round())  # integer boxes, like torchvision's
        img = torch.zeros(1, height, width)
        ref = torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(20000)],
                           dtype=torch.float32)
        for col in range(4):  # the same distribution: means and spreads agree
            a, b = ours[:, col], ref[:, col]
            assert abs(float(a.mean() - b.mean())) < 0.02 * max(height, width), (height, width, col)
            assert abs(float(a.std() - b.std())) < 0.03 * max(height, width), (height, width, col)
        if height == width:  # every draw of a square image fits within 10 attempts
            frac = h * w / (height * width)
            assert float(frac.min()) > 0.17 and float(frac.max()) <= 1.0
            r = w / h
            assert float(r.min()) > 0.7 and float(r.max()) < 1.43


def test_strong_augment_refuses_images_too_small_for_its_blur():
    """1×1 images once failed inside kornia (ValueError); now a one-line UserError naming the size."""
    aug = make_augment("strong", image_size=(1, 1), channels=1, mean=[0.5], std=[0.25])
    with pytest.raises(UserError, match=r"^images are 1x1 pixels, too small for the strong \(SimCLR\) augmentation, "
                                        r"which needs at least 2x2: resize them with size=HxW in the data spec$"):
        aug(torch.zeros((4, 1, 1, 1), dtype=torch.uint8))
    ok = make_augment("strong", image_size=(2, 2), channels=1, mean=[0.5], std=[0.25])
    assert ok(torch.zeros((4, 1, 2, 2), dtype=torch.uint8)).shape == (4, 1, 2, 2)
    assert make_augment("strong", image_size=(1, 1), channels=1, mean=[0.5], std=[0.25], blur=False)(
        torch.zeros((2, 1, 1, 1), dtype=torch.uint8)).shape == (2, 1, 1, 1)
