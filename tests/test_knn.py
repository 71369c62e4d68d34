"""labelrefine.knn against a slow per-query reference, and the SimCLR kNN diagnostic of a run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from labelrefine import knn
from labelrefine.knn import knn_accuracy, knn_votes


def _reference(bank, labels, query, c, k, t, exclude_self=False):
    out = []
    for i, q in enumerate(query):
        sims = [(float(torch.dot(q, b) / (q.norm() * b.norm())), j) for j, b in enumerate(bank)
                if not (exclude_self and i == j)]
        top = sorted(sims, reverse=True)[:k]
        v = [0.0] * c
        for s, j in top:
            v[int(labels[j])] += math.exp(s / t)
        out.append([x / sum(v) for x in v])
    return torch.tensor(out)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_votes_match_a_slow_reference_across_chunks(exclude_self, monkeypatch):
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(37, 5, generator=g), torch.randint(0, 4, (37,), generator=g)
    query = bank if exclude_self else torch.randn(23, 5, generator=g)
    monkeypatch.setattr(knn, "CHUNK_ELEMENTS", 37 * 4)  # 4 queries a chunk: the chunk seams are crossed
    got = knn_votes(bank, labels, query, 4, k=7, temperature=0.3, exclude_self=exclude_self)
    assert torch.allclose(got, _reference(bank, labels, query, 4, 7, 0.3, exclude_self), atol=1e-5)
    # k larger than the bank: every row votes
    assert torch.allclose(knn_votes(bank, labels, query, 4, k=500, temperature=0.3, exclude_self=exclude_self),
                          _reference(bank, labels, query, 4, 500, 0.3, exclude_self), atol=1e-5)


def test_accuracy_of_separated_clusters_and_a_tiny_temperature():
    centres = torch.eye(3) * 10
    bank = torch.cat([centres + 0.1 * torch.randn(3, 3) for _ in range(5)])
    labels = torch.arange(3).repeat(5)
    assert knn_accuracy(bank, labels, centres, torch.arange(3), 3, k=5, temperature=1e-3) == 1.0
    assert knn_accuracy(bank, labels, centres, torch.tensor([1, 2, 0]), 3, k=5) == 0.0


def test_simclr_methods_report_the_encoders_knn_accuracy(tiny_config, tmp_path):
    from labelrefine.pipeline import run

    res = run(tiny_config("method=ce_ssl", "ssl.epochs=1"), tmp_path / "ssl")
    acc = res.summary["ssl_knn_test_acc"]
    assert 0.0 <= acc <= 1.0
    first = json.loads((tmp_path / "ssl" / "metrics.jsonl").read_text().splitlines()[1])  # after 1 SSL epoch
    assert first["phase"] == "train" and first["ssl_knn_test_acc"] == acc
    assert "ssl_knn_test_acc" not in run(tiny_config("method=ce"), tmp_path / "ce").summary
