"""A float64 NumPy reference for several MuonBP updates of one matrix leaf.

It follows the algorithm as written in the paper and the README (heavy-ball EMA momentum with
optax's Nesterov bias correction, a full step iff t % period == 0, else a block step on the
row_parts × col_parts grid of device tiles) and imports nothing from muonbp_jax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tests import _reference as ref


def nesterov(mu: np.ndarray, g: np.ndarray, t: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """One momentum step at 0-based update index t: (new momentum, what gets orthogonalized)."""
    mu = beta * mu + (1 - beta) * g
    count = t + 1
    mu_hat = beta * mu / (1 - beta ** (count + 1)) + (1 - beta) * g / (1 - beta**count)
    return mu, mu_hat


def updates(
    grads: Sequence[np.ndarray],
    parts: tuple[int, int],
    period: int | None,
    *,
    learning_rate: float = 1.0,
    beta: float = 0.95,
    mu: np.ndarray | None = None,
    start: int = 0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """The updates for `grads` applied at update indices start, start+1, ..., from momentum
    `mu` (zeros if None); returns them and the final momentum."""
    mu = np.zeros_like(grads[0], np.float64) if mu is None else np.asarray(mu, np.float64)
    out = []
    for t, g in enumerate(grads, start):
        mu, mu_hat = nesterov(mu, np.asarray(g, np.float64), t, beta)
        full = period is not None and t % period == 0
        out.append(-learning_rate * ref.block_update(mu_hat, *((1, 1) if full else parts)))
    return out, mu
