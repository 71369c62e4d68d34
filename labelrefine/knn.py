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
def knn_neighbours(bank: torch.Tensor, query: torch.Tensor, *, k: int = 200, temperature: float = 0.1,
                   exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's ``k`` nearest bank rows (cosine) and their vote weights, both ``(M, k)``.

    ``exclude_self``: the query set *is* the bank (same rows, same order) and a sample is not its
    own neighbour. Weights are ``exp((sim - max sim) / temperature)``: the row's shift cancels in
    a normalised vote and keeps the exponential from overflowing.
    """
    if bank.shape[0] == 0:
        raise ValueError("knn_neighbours: empty bank")
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    k = min(k, bank.shape[0] - (1 if exclude_self else 0))
    rows = max(1, CHUNK_ELEMENTS // bank.shape[0])
    idx_out, w_out = [], []
    for start in range(0, query.shape[0], rows):
        sim = query[start:start + rows] @ bank.T
        if exclude_self:
            own = torch.arange(start, start + sim.shape[0], device=sim.device)
            sim[torch.arange(sim.shape[0], device=sim.device), own] = float("-inf")
        w, idx = sim.topk(k, dim=1)
        w_out.append(((w - w[:, :1]) / temperature).exp())
        idx_out.append(idx)
    if not idx_out:
        empty = torch.zeros(0, k, device=bank.device)
        return empty.long(), empty
    return torch.cat(idx_out), torch.cat(w_out)


def neighbour_votes(idx: torch.Tensor, weights: torch.Tensor, bank_labels: torch.Tensor,
                    num_classes: int) -> torch.Tensor:
    """Vote mass ``(M, num_classes)`` of precomputed neighbours (:func:`knn_neighbours`) under the
    bank labelling ``bank_labels``; each row sums to 1. Cheap: the neighbours are found once and
    any number of labellings can be scored."""
    votes = torch.zeros(idx.shape[0], num_classes, device=weights.device)
    votes.scatter_add_(1, bank_labels.to(weights.device)[idx], weights)
    return votes / votes.sum(1, keepdim=True).clamp_min(torch.finfo(votes.dtype).tiny)


@torch.no_grad()
def knn_votes(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, num_classes: int, *,
              k: int = 200, temperature: float = 0.1, exclude_self: bool = False) -> torch.Tensor:
    """Vote mass ``(M, num_classes)`` of each query's ``k`` nearest bank rows (cosine), each row
    sums to 1. ``exclude_self``: the query set *is* the bank (same rows, same order) and a sample
    does not vote for itself."""
    idx, w = knn_neighbours(bank, query, k=k, temperature=temperature, exclude_self=exclude_self)
    return neighbour_votes(idx, w, bank_labels, num_classes)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, *, k: int = 200, temperature: float = 0.1) -> float:
    """Fraction of queries whose weighted kNN vote (:func:`knn_votes`) is their label."""
    votes = knn_votes(bank, bank_labels.to(bank.device), query, num_classes, k=k, temperature=temperature)
    return float((votes.argmax(1).cpu() == query_labels.cpu()).float().mean())
