"""Data-parallel training over processes: ``torchrun --nproc_per_node=N -m labelrefine run ...``.

Every network a method trains is wrapped in PyTorch's ``DistributedDataParallel`` (:func:`wrap`,
called by :class:`~labelrefine.engine.optim.Learner`): every rank holds the same model, computes
gradients on its own part of each global batch, and DDP averages them over ranks in buckets while
the backward pass is still running, so the communication overlaps the computation and the
weights stay identical on every rank. Methods call the wrapped modules in training forwards
(``learner.nets``) and the plain modules everywhere else (evaluation, state dicts, the SimCLR
encoder cache), so nothing outside the training step sees a ``module.`` prefix.

Sharding: rank ``r`` of ``w`` owns the training samples whose global index ``i`` has
``i % w == r`` and keeps only their images on its device. Everything that decides over the data
set - stage losses, selections, consensus, DivideMix's GMM, the label report - works on logits
gathered from every rank in global order (:func:`gather_rows`), so those decisions are global,
and every rank holds the same (global) label state. BatchNorm running statistics are averaged
over ranks before every whole-set evaluation (:func:`average_buffers`; DDP's own
``broadcast_buffers`` is off, it would overwrite them with rank 0's at every forward).

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(device_type: str) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world() -> int:
    return dist.get_world_size() if enabled() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if enabled():
        dist.barrier()


def shutdown() -> None:
    if enabled():
        dist.barrier()
        dist.destroy_process_group()


def owned(n: int, r: int | None = None, w: int | None = None) -> torch.Tensor:
    """Global indices that rank ``r`` of ``w`` owns among ``n`` samples: ``r, r + w, ...``."""
    r = rank() if r is None else r
    w = world() if w is None else w
    return torch.arange(r, n, w)


def counts(n: int) -> list[int]:
    """How many of ``n`` samples each rank owns."""
    w = world()
    return [len(range(r, n, w)) for r in range(w)]


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of every rank, in global order: ``out[i] = local_of_rank(i % w)[i // w]``.

    ``local`` holds this rank's rows (``len(owned(n))`` of them); the result has ``n`` rows and
    is the same on every rank.
    """
    if not enabled():
        return local
    w = world()
    size = -(-n // w)
    pad = local.new_zeros((size, *local.shape[1:]))
    pad[: local.shape[0]] = local
    parts = [torch.empty_like(pad) for _ in range(w)]
    dist.all_gather(parts, pad.contiguous())
    out = local.new_empty((n, *local.shape[1:]))
    for r, part in enumerate(parts):
        out[r::w] = part[: len(range(r, n, w))]
    return out


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of (possibly) different lengths over ranks, in rank order."""
    if not enabled():
        return t
    sizes = torch.zeros(world(), dtype=torch.long, device=t.device)
    sizes[rank()] = len(t)
    dist.all_reduce(sizes)
    pad = t.new_zeros(int(sizes.max()))
    pad[: len(t)] = t
    parts = [torch.empty_like(pad) for _ in range(world())]
    dist.all_gather(parts, pad)
    return torch.cat([p[: int(k)] for p, k in zip(parts, sizes.tolist(), strict=True)])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if enabled():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _mean_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over ranks of each tensor, flattened, with one all-reduce for all of them."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world()
    return list(torch.split(flat, [t.numel() for t in tensors]))


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` under torchrun (a collective: every rank wraps the
    same modules in the same order); ``module`` itself otherwise, or when nothing in it trains."""
    if not enabled() or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks."""
    if not enabled():
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    for b, mean in zip(bufs, _mean_over_ranks(bufs), strict=True):
        b.copy_(mean.view_as(b))
