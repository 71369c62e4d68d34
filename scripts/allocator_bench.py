"""What glibc's allocator settings (labelrefine.allocator) do to one training step on this CPU.

Times a forward + backward (train mode) and a no-grad train-mode forward of the airbench net at
width 32 on random CIFAR-sized batches, and counts the process's minor page faults, once with the
allocator left as it is (LABELREFINE_MALLOC=system) and once with labelrefine's settings, each in
its own process. Give it the machine to itself.

    python scripts/allocator_bench.py [--batches 1024,4096] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from labelrefine.allocator import tune_allocator
from labelrefine.models.backbones import create_backbone

batches, reps, threads = json.loads(sys.argv[1])
tuned = tune_allocator()
torch.set_num_threads(threads)
torch.manual_seed(0)
net = create_backbone("airbench", in_channels=3, num_classes=10, width=32).to(memory_format=torch.channels_last)
net.train()


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn):
    fn()  # warm-up
    t, f = time.perf_counter(), faults()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps, (faults() - f) / reps


rows = []
for b in batches:
    x = torch.randn(b, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (b,))

    def train_step():
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    def guess():
        with torch.no_grad():
            net(x)

    (t1, f1), (t2, f2) = timed(train_step), timed(guess)
    rows.append({"batch": b, "fwd_bwd_s": t1, "fwd_bwd_faults": f1, "nograd_s": t2, "nograd_faults": f2})
print(json.dumps({"tuned": tuned, "rows": rows}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1024,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    arg = json.dumps([[int(b) for b in args.batches.split(",")], args.reps, args.threads])
    print("| allocator | batch | fwd+bwd s | per 1,024 images | page faults "
          "| no-grad fwd s | per 1,024 | page faults |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in ("system", "labelrefine"):
        env = {**os.environ, "LABELREFINE_MALLOC": "system" if mode == "system" else ""}
        out = subprocess.run([sys.executable, "-c", CHILD, arg], env=env, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        label = "glibc as it is" if not res["tuned"] else "labelrefine's settings"
        for r in res["rows"]:
            k = r["batch"] / 1024
            print(f"| {label} | {r['batch']:,} | {r['fwd_bwd_s']:.2f} | {r['fwd_bwd_s'] / k:.2f} | "
                  f"{r['fwd_bwd_faults']:,.0f} | {r['nograd_s']:.2f} | {r['nograd_s'] / k:.2f} | "
                  f"{r['nograd_faults']:,.0f} |")


if __name__ == "__main__":
    main()
