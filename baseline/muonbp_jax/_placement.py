"""Where optimizer state lives after `init`: momentum and AdamW moments sharded like the
parameters they mirror, everything else replicated on the mesh; and `partition_specs`, which
reads the specs off concrete parameters."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from muonbp_jax._layout import Layout, Mesh, Specs, context_mesh, resolve_specs, type_sharding
from muonbp_jax._options import PyTree, leaves_with_paths, path_names


def _sharding_for(mesh: Mesh, spec: tuple[Any, ...]):
    # Without trailing Nones, as jit returns specs: P('x', None) and P('x') are the same
    # layout but different cache keys, so state placed as P('x', None) recompiled the step.
    spec = tuple(spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    if isinstance(mesh, jax.sharding.Mesh):
        return NamedSharding(mesh, P(*spec))
    return P(*spec)  # abstract mesh: resolved against the context mesh


def place_like(tree: PyTree, mesh: Mesh | None, layouts: list[Layout]) -> PyTree:
    """Constrains each leaf of `tree` (shaped like the planned leaves) to its layout's sharding,
    so that state built under `jax.jit(tx.init)` is not left replicated."""
    if mesh is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    placed = [
        jax.lax.with_sharding_constraint(x, _sharding_for(mesh, lay.spec))
        if lay.spec is not None and type_sharding(x) is None
        else x
        for x, lay in zip(leaves, layouts)
    ]
    return jax.tree.unflatten(treedef, placed)


def place_state_like_params(
    state: PyTree, params: PyTree, specs: Specs, mesh: Mesh | None
) -> PyTree:
    """Gives every state leaf that mirrors a parameter (same key-path suffix and shape) the
    parameter's sharding: AdamW moments and Muon momentum alike."""
    if specs is None:
        return state
    spec_list, mesh = resolve_specs(specs, params, mesh)
    mesh = mesh or context_mesh()
    if mesh is None:
        return state
    paths, leaves, _ = leaves_with_paths(params)
    table = {p: (tuple(x.shape), s) for p, x, s in zip(paths, leaves, spec_list) if s is not None}

    def place(path, x):
        names = path_names(path)
        for k in range(len(names)):
            hit = table.get(names[k:])
            if hit is not None and hit[0] == tuple(getattr(x, "shape", ())):
                if type_sharding(x) is None:
                    return jax.lax.with_sharding_constraint(x, _sharding_for(mesh, tuple(hit[1])))
                return x
        # Counts and other leaves that mirror no parameter go replicated on the mesh, as the
        # jitted step returns them: left on one device by an eager init, they made the step
        # compile again at its second call, and a checkpoint target built from this state
        # restored them committed to that one device, which the step then refused.
        if isinstance(x, jax.Array) and type_sharding(x) is None:
            return jax.lax.with_sharding_constraint(x, _sharding_for(mesh, ()))
        return x

    return jax.tree_util.tree_map_with_path(place, state)


def partition_specs(params: PyTree) -> PyTree:
    """Reads the PartitionSpec of every concrete array in `params` (P() when it has none).

    Inside jit only Explicit-mode types carry specs; call it outside jit otherwise and pass
    the resulting tree as `specs=`.
    """

    def spec(x):
        if isinstance(x, jax.core.Tracer):
            typed = type_sharding(x)
            if typed is None:
                # Answering P() here would quietly make every block step a full one.
                raise ValueError(
                    "muonbp_jax.partition_specs cannot read the sharding of a traced array "
                    "outside Explicit mode: call it on the concrete parameters, outside jit, "
                    "and pass the tree it returns as specs=."
                )
            return P(*typed[1])
        sharding = getattr(x, "sharding", None)
        return sharding.spec if isinstance(sharding, NamedSharding) else P()

    return jax.tree.map(spec, params)
