"""Weighted k-nearest-neighbour votes in a feature space, in chunks (no N x N matrix).

The SimCLR diagnostic (kNN accuracy of the test split against the training set in the encoder's
feature space, the way lightly's and InstDisc's benchmarks measure an encoder) and the kNN label
detectors use it. Similarity is cosine; neighbour ``j`` of a query votes for its label with
weight ``exp(sim_j / temperature)`` (Wu et al. 2018; lightly's ``knn_predict``: k = 200, t = 0.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: At most this many similarity entries (queries x bank) in memory at once: 64 MiB of float32.
CHUNK_ELEMENTS = 2 ** 24


@torch.no_grad()
def knn_votes(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, num_classes: int, *,
              k: int = 200, temperature: float = 0.1, exclude_self: bool = False) -> torch.Tensor:
    """Vote mass ``(M, num_classes)`` of each query's ``k`` nearest bank rows (cosine), each row
    sums to 1. ``exclude_self``: the query set *is* the bank (same rows, same order) and a sample
    does not vote for itself."""
    if bank.shape[0] == 0:
        raise ValueError("knn_votes: empty bank")
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    k = min(k, bank.shape[0] - (1 if exclude_self else 0))
    rows = max(1, CHUNK_ELEMENTS // bank.shape[0])
    out = []
    for start in range(0, query.shape[0], rows):
        sim = query[start:start + rows] @ bank.T
        if exclude_self:
            own = torch.arange(start, start + sim.shape[0], device=sim.device)
            sim[torch.arange(sim.shape[0], device=sim.device), own] = float("-inf")
        w, idx = sim.topk(k, dim=1)
        w = ((w - w[:, :1]) / temperature).exp()  # shifted by the row maximum: no overflow
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device).scatter_add_(1, bank_labels[idx], w)
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=bank.device)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, *, k: int = 200, temperature: float = 0.1) -> float:
    """Fraction of queries whose weighted kNN vote (:func:`knn_votes`) is their label."""
    votes = knn_votes(bank, bank_labels.to(bank.device), query, num_classes, k=k, temperature=temperature)
    return float((votes.argmax(1).cpu() == query_labels.cpu()).float().mean())
