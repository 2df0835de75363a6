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


def partition_dirichlet(labels: Sequence[int | str], n_clients: int, alpha: float, seed: int = 0) -> list[list[int]]:
    """Indices per client, label proportions drawn from Dirichlet(alpha) per label (non-IID).

    Every index is assigned exactly once. Smaller ``alpha`` gives more skew.
    """
    rng = np.random.default_rng(seed)
    labels = list(labels)
    out: list[list[int]] = [[] for _ in range(n_clients)]
    for lab in sorted(set(map(str, labels))):
        idx = [i for i, l in enumerate(labels) if str(l) == lab]
        rng.shuffle(idx)
        props = rng.dirichlet([alpha] * n_clients)
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for c, part in enumerate(np.split(np.array(idx, dtype=int), cuts)):
            out[c].extend(int(i) for i in part)
    return out
