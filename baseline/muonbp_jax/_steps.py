"""The two kinds of step, on the layouts of `_layout.plan`:

* `block_step` orthogonalizes every device-local tile on its own (no communication);
* `full_step` orthogonalizes whole matrices and hands each device back its own part; how the
  matrices are made whole, gathered or split over the devices that share them, is `_exchange`.

Both run per device inside `jax.shard_map` and feed `orthogonalize_many` the same way; both
return the orthogonalized leaves in the Newton–Schulz iteration's dtype (the caller casts).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from muonbp_jax import _exchange
from muonbp_jax._layout import (
    Layout,
    Mesh,
    from_matrices,
    from_stack,
    from_tiles,
    to_matrices,
    to_stack,
    to_tiles,
)
from muonbp_jax._newton_schulz import NewtonSchulz, orthogonalize_many

FullStrategy = Literal["gather", "all_to_all", "auto"]
FULL_STRATEGIES: tuple[str, ...] = get_args(FullStrategy)

# The smallest group of same-shape matrices that each strategy splits (smaller ones are
# gathered). "auto": a group of G matrices shared by K devices costs per device, gathered,
# G orthogonalizations and (K-1)/K·G matrices received; split, ceil(G/K) and
# 2·(K-1)/K·ceil(G/K) matrices moved. For G >= 2 splitting is no worse on both counts; for a
# lone matrix it moves twice the bytes for the same work, so it is gathered
# (benchmarks/bench_sharded.py measures both; figures in benchmarks/RESULTS.md).
_MIN_SPLIT: dict[str, float] = {"gather": math.inf, "all_to_all": 1, "auto": 2}


def _on_mesh(fn, mesh: Mesh | None, layouts: list[Layout], leaves: list[jax.Array]):
    """Runs fn(leaves) per device on its local tiles (or directly, without a mesh)."""
    if mesh is None:
        return fn(leaves)
    specs = [P(*lay.spec) if lay.spec is not None else P() for lay in layouts]
    # orthogonalize_many concatenates same-shape blocks of leaves with different specs, which
    # marks every output as varying over the union of their axes although each keeps the
    # replication of its own input; the VMA check would reject those outputs.
    return jax.shard_map(fn, mesh=mesh, in_specs=(specs,), out_specs=specs, check_vma=False)(leaves)


def block_step(
    leaves: list[jax.Array], layouts: list[Layout], mesh: Mesh | None, ns: NewtonSchulz
) -> list[jax.Array]:
    """Orthogonalizes each device-local block (split further by block_grid) independently."""

    def local(xs):
        stacks = [to_stack(x, lay) for x, lay in zip(xs, layouts)]
        tiles = [to_tiles(to_matrices(s, lay), lay.grid) for s, lay in zip(stacks, layouts)]
        tiles = orthogonalize_many(tiles, ns)
        return [
            from_stack(from_matrices(from_tiles(t, lay.grid), s.shape), lay, x.shape)
            for x, s, t, lay in zip(xs, stacks, tiles, layouts)
        ]

    return _on_mesh(local, mesh, layouts, leaves)


def full_step(
    leaves: list[jax.Array],
    layouts: list[Layout],
    mesh: Mesh | None,
    ns: NewtonSchulz,
    strategy: FullStrategy,
) -> list[jax.Array]:
    """Orthogonalizes every whole matrix; each device keeps its own part.

    `strategy` (one of `FULL_STRATEGIES`) decides which groups of same-shape matrices are split
    over the devices that share them and which are gathered (see `_exchange`).
    """
    if all(lay.spec is None for lay in layouts):
        mesh = None  # nothing to exchange: no shard_map
    groups = _exchange.groups(leaves, layouts, mesh, _MIN_SPLIT[strategy])

    def local(xs):
        members = [[to_stack(xs[i], layouts[i]) for i in g.members] for g in groups]
        stacks = [jnp.concatenate(m) if len(m) > 1 else m[0] for m in members]
        wholes = _exchange.to_whole(stacks, groups, mesh)
        mats = [to_matrices(w, layouts[g.members[0]]) for w, g in zip(wholes, groups)]
        mats = orthogonalize_many(mats, ns)
        done = _exchange.to_local(
            [from_matrices(m, w.shape) for m, w in zip(mats, wholes)], groups, mesh
        )
        outs: list[jax.Array | None] = [None] * len(xs)
        for stack, parts, g in zip(done, members, groups):
            offsets = np.cumsum([0] + [p.shape[0] for p in parts])
            for i, lo, hi in zip(g.members, offsets[:-1], offsets[1:]):
                part = stack if len(parts) == 1 else stack[lo:hi]
                outs[i] = from_stack(part, layouts[i], xs[i].shape)
        return outs

    return _on_mesh(local, mesh, layouts, leaves)
