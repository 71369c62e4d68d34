"""Analytic forward FLOPs per image of the backbones (docs/research/fast-cifar.md).

    PYTHONPATH=. python scripts/backbone_flops.py            # 3×32×32, 10 classes
    PYTHONPATH=. python scripts/backbone_flops.py --size 28 --channels 1

One 1-image forward in eval mode under ``torch.utils.flop_counter.FlopCounterMode``: it counts
convolutions and matrix products (2 FLOPs per multiply-add), not BatchNorm, activations or
pooling. A training step costs about 3× the forward (forward + the two backward products).
Cheap: no timing, a few milliseconds of compute.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from labelrefine.models import create_backbone

ROWS = [
    ("resnet18_cifar", {"width": 16}),
    ("airbench", {"width": 64}),
    ("airbench", {"width": 64, "expand": 2}),
    ("airbench", {"width": 48}),
    ("airbench", {"width": 32}),
    ("airbench", {"width": 24}),
    ("airbench", {"width": 16}),
]


def forward_flops(name: str, kwargs: dict, *, channels: int, size: int) -> tuple[int, int]:
    model = create_backbone(name, in_channels=channels, num_classes=10, **kwargs).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, channels, size, size))
    return counter.get_total_flops(), sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    args = ap.parse_args()
    print(f"| backbone | options | params | forward MFLOP/image ({args.channels}×{args.size}×{args.size}) |")
    print("|---|---|---|---|")
    for name, kwargs in ROWS:
        flops, params = forward_flops(name, kwargs, channels=args.channels, size=args.size)
        opts = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        print(f"| `{name}` | {opts} | {params:,} | {flops / 1e6:.1f} |")


if __name__ == "__main__":
    main()
