"""k-nearest-neighbour probes: cosine similarity, temperature-weighted votes, as dinov2's k-NN evaluation.

Flow: sweep/run -> **knn**. Features are L2-normalised; each query's ``max(ks)`` most similar
training rows are found in blocks of queries (memory stays at one block of similarities), and
every k is scored from the same neighbours: each neighbour votes for its class with weight
``exp(similarity / T)``.
"""

from __future__ import annotations

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07  # dinov2's k-NN evaluation


def neighbours(train, queries, k: int, block: int = 2048):
    """(similarities, indices), each (n_queries, k), of the ``k`` most similar training rows by cosine."""
    import torch

    train = torch.nn.functional.normalize(train, dim=1)
    sims, idx = [], []
    for start in range(0, len(queries), block):
        q = torch.nn.functional.normalize(queries[start : start + block], dim=1)
        s, i = (q @ train.T).topk(min(k, len(train)), dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def vote(sims, idx, train_labels, k: int, n_classes: int, temperature: float = TEMPERATURE):
    """Class scores (n, n_classes) from the first ``k`` neighbours' temperature-weighted votes."""
    import torch

    weights = (sims[:, :k] / temperature).exp()
    scores = torch.zeros(len(sims), n_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, train_labels[idx[:, :k]], weights)
