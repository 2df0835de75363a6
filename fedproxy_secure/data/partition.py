"""Split training examples across clients: one task per client, IID, or Dirichlet(alpha) over labels."""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

from fedproxy_secure.errors import ConfigError

T = TypeVar("T")


def partition_by_task(tasks: Sequence[str], n_clients: int) -> list[list[str]]:
    """Assign tasks to clients round-robin (one task each when ``len(tasks) == n_clients``)."""
    if n_clients > len(tasks):
        raise ConfigError(
            f"clients.count = {n_clients}: partition 'task' needs at least one task per client, "
            f"only {len(tasks)} tasks given (fix: fewer clients, more tasks, or partition: iid)"
        )
    out: list[list[str]] = [[] for _ in range(n_clients)]
    for i, t in enumerate(tasks):
        out[i % n_clients].append(t)
    return out


def partition_iid(items: Sequence[T], n_clients: int, seed: int = 0) -> list[list[T]]:
    """Shuffle and deal items to clients; sizes differ by at most one."""
    idx = np.random.default_rng(seed).permutation(len(items))
    return [[items[i] for i in idx[c::n_clients]] for c in range(n_clients)]


def partition_dirichlet(labels: Sequence[int | str], n_clients: int, alpha: float, seed: int = 0,
                        min_per_client: int = 0, max_draws: int = 1000) -> list[list[int]]:
    """Indices per client, label proportions drawn from Dirichlet(alpha) per label (non-IID).

    Guarantees: every index is assigned exactly once; the split is a pure function of
    ``(labels, n_clients, alpha, seed, min_per_client)``; every client holds at least
    ``min_per_client`` indices (the whole split is redrawn until it does, as in the usual label-skew
    benchmarks; ConfigError after ``max_draws`` draws). Smaller ``alpha`` gives more skew.
    """
    if n_clients < 1 or not alpha > 0:
        raise ConfigError(f"partition: n_clients={n_clients} and dirichlet_alpha={alpha} must be >= 1 and > 0")
    if min_per_client * n_clients > len(labels):
        raise ConfigError(f"partition: {len(labels)} examples cannot give {n_clients} clients {min_per_client} each "
                          "(fix: fewer clients or more training examples)")
    rng = np.random.default_rng(seed)
    labels = list(labels)
    classes = sorted(set(map(str, labels)))
    by_class = {lab: [i for i, l in enumerate(labels) if str(l) == lab] for lab in classes}
    for _ in range(max_draws):
        out: list[list[int]] = [[] for _ in range(n_clients)]
        for lab in classes:
            idx = list(by_class[lab])
            rng.shuffle(idx)
            props = rng.dirichlet([alpha] * n_clients)
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for c, part in enumerate(np.split(np.array(idx, dtype=int), cuts)):
                out[c].extend(int(i) for i in part)
        if min(len(o) for o in out) >= min_per_client:
            return out
    raise ConfigError(f"partition: no Dirichlet({alpha}) split in {max_draws} draws gave every one of {n_clients} "
                      f"clients {min_per_client} examples (fix: a larger dirichlet_alpha or fewer clients)")
