"""Count the images each DivideMix epoch pushes through the two nets (forward passes with and
without grad), in CE-epoch units (a forward-backward = 3 forwards): the work behind its cost in
``labelrefine bench speed`` (docs/research/dividemix-cost.md).

    .venv/bin/python scripts/dividemix_work.py [--set KEY=VALUE ...]
"""
import argparse
import sys

import torch

from labelrefine.config import load_config
from labelrefine.data.splits import prepare_data
from labelrefine.engine import Context, Trainer
from labelrefine.methods import get_method
from labelrefine.pipeline import default_cache_dir

ap = argparse.ArgumentParser()
ap.add_argument("--set", action="append", default=[])
args = ap.parse_args()
cfg = load_config(None, ["method=dividemix", "data.spec=digits", "data.train_subset=1000", "model.backbone=tiny",
                         "flip=false", "optim.batch_size=64", "ssl.epochs=0", "dividemix.warmup_epochs=1",
                         "epochs=3", *args.set])
prep = prepare_data(cfg, default_cache_dir(cfg))
torch.manual_seed(cfg.seed)
ctx = Context(cfg, prep.train.images, prep.train.labels, len(prep.classes), device=torch.device("cpu"),
              ssl_images=prep.ssl_images, cache_dir=None, noise_rate=cfg.data.noise_rate)
m = get_method("dividemix")(ctx)
counts = {"grad": 0, "nograd": 0}
def hook(mod, inp, out):
    counts["grad" if torch.is_grad_enabled() else "nograd"] += inp[0].shape[0]
for s in m.sups:
    s.model.register_forward_hook(hook)
tr = Trainer(ctx, m)
for spec in m.schedule():
    counts.update(grad=0, nograd=0)
    logs = tr.run_epoch(spec)
    lab = [v for k, v in logs.items() if k.startswith("labelled_net")]
    print(f"{spec.phase} epoch {spec.epoch}: n {ctx.n}, images with grad {counts['grad']}, without "
          f"{counts['nograd']}, labelled sets {lab}; CE-epoch units "
          f"{(3 * counts['grad'] + counts['nograd']) / (3 * ctx.n):.2f}", file=sys.stdout)
