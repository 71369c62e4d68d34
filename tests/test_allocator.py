"""The glibc allocator settings (labelrefine.allocator): freed tensor memory is reused, not faulted in anew."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource
import torch
from torch import nn
from labelrefine.allocator import tune_allocator
tuned = tune_allocator()
torch.manual_seed(0)
torch.set_num_threads(1)
net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3, padding=1))
opt = torch.optim.SGD(net.parameters(), lr=0.01)
x = torch.randn(32, 3, 128, 128)  # activations of 32 MiB: above glibc's largest mmap threshold
faults, rss = [], []
for _ in range(10):  # training steps
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    rss.append(int(open("/proc/self/statm").read().split()[1]))
print(json.dumps({"tuned": tuned, "again": tune_allocator(), "faults": faults, "rss": rss}))
"""


def _child(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_training_steps_reuse_freed_memory_without_page_faults():
    pages = 32 * 1024 * 1024 // 4096  # one activation
    plain = _child(LABELREFINE_MALLOC="system")
    assert plain["tuned"] is False and plain["again"] is False
    # Without the settings every large activation is a fresh mmap whose pages fault in again.
    assert min(plain["faults"][2:]) > pages
    tuned = _child(LABELREFINE_MALLOC="")
    assert tuned["tuned"] is True and tuned["again"] is True
    # With them the first steps grow the heap; later steps reuse it (the 8 steps after them fault in
    # less than one activation in all, where each step did about 10 before), and it stops growing.
    assert sum(tuned["faults"][2:]) < pages
    assert tuned["rss"][-1] - tuned["rss"][2] < pages
