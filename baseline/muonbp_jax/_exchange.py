"""How a full step makes sharded matrices whole, and gives each device its part back.

Leaves whose matrices have the same shape and dtype and are cut by the same mesh axes form a
*group*: each device stacks its local matrices of the group into one (count, *local matrix
axes) array (`_layout.to_stack`). A group is made whole in one of two ways:

* **gathered**: an all-gather of the cut matrix axes gives every device every matrix of the
  group (the paper's full step); afterwards each device keeps its own slice;
* **split**: one all-to-all gives each of the K devices that share the matrices whole matrices
  for 1/K of the group (zero-padded: NS(0) = 0), and a second one sends the results back.

Batch axes are never gathered: a device stacks only the matrices it holds, so experts or layers
sharded over a mesh axis stay where they are. Leaves whose matrices no mesh axis cuts have
nothing to move; each is a group of its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from muonbp_jax._layout import Layout, Mesh, axes_size

Cuts = tuple[tuple[str, ...], ...]  # per matrix axis, the mesh axes that cut it


@dataclasses.dataclass(frozen=True)
class Group:
    """Leaves made whole together, from one stack of `count` local matrices per device."""

    members: tuple[int, ...]  # leaf indices
    cuts: Cuts
    count: int  # matrices in the group, per device
    parts: int  # K, the devices that share each matrix
    split: bool  # spread over the K devices (all-to-all), else gathered on every one

    @property
    def axes(self) -> tuple[str, ...]:  # the all-to-all's axes; device order = tuple order
        return tuple(a for c in self.cuts for a in c)

    @property
    def per_device(self) -> int:  # whole matrices per device when split
        return -(-self.count // self.parts)


def groups(
    leaves: Sequence[jax.Array], layouts: Sequence[Layout], mesh: Mesh | None, min_split: float
) -> list[Group]:
    """Groups the leaves of a full step; groups of at least `min_split` matrices are split,
    the others gathered."""
    keyed: dict[tuple, list[int]] = {}
    for i, (x, lay) in enumerate(zip(leaves, layouts)):
        shape = tuple(lay.shape[a] for a in lay.matrix_axes)
        key = (lay.cuts, shape, len(lay.reduction_axes), x.dtype) if any(lay.cuts) else (i,)
        keyed.setdefault(key, []).append(i)
    found = []
    for members in keyed.values():
        cuts = layouts[members[0]].cuts
        count = sum(
            math.prod(layouts[i].local_shape(mesh)[a] for a in layouts[i].batch_axes)
            for i in members
        )
        parts = math.prod(axes_size(mesh, c) for c in cuts)
        found.append(Group(tuple(members), cuts, count, parts, any(cuts) and count >= min_split))
    return found


def to_whole(stacks: list[jax.Array], groups: list[Group], mesh: Mesh | None) -> list[jax.Array]:
    """Each group's local stack (count, *local matrix axes) -> whole matrices: (count, *matrix
    axes) if gathered, this device's (per_device, *matrix axes) if split."""
    sends = []
    for s, g in zip(stacks, groups):
        if g.split:
            padded = jnp.pad(s, [(0, g.per_device * g.parts - g.count)] + [(0, 0)] * (s.ndim - 1))
            sends.append(padded.reshape(g.parts, g.per_device, *s.shape[1:]))
    received = iter(_all_to_all_many(sends, [g.axes for g in groups if g.split]))
    return [
        _from_parts(next(received), g.cuts, mesh) if g.split else _gather(s, g.cuts)
        for s, g in zip(stacks, groups)
    ]


def to_local(wholes: list[jax.Array], groups: list[Group], mesh: Mesh | None) -> list[jax.Array]:
    """The inverse of `to_whole`: each group's whole matrices -> this device's local stack."""
    sends = [_to_parts(w, g.cuts, mesh) for w, g in zip(wholes, groups) if g.split]
    received = iter(_all_to_all_many(sends, [g.axes for g in groups if g.split]))
    out = []
    for w, g in zip(wholes, groups):
        if g.split:
            r = next(received)
            out.append(r.reshape(-1, *r.shape[2:])[: g.count])
        else:
            out.append(_local_part(w, g.cuts, mesh))
    return out


def _gather(s: jax.Array, cuts: Cuts) -> jax.Array:
    for axis, names in enumerate(cuts, start=1):
        if names:
            s = jax.lax.all_gather(s, names, axis=axis, tiled=True)
    return s


def _local_part(s: jax.Array, cuts: Cuts, mesh: Mesh | None) -> jax.Array:
    for axis, names in enumerate(cuts, start=1):
        if names:
            size = s.shape[axis] // axes_size(mesh, names)
            index = jax.lax.axis_index(names)
            s = jax.lax.dynamic_slice_in_dim(s, index * size, size, axis=axis)
    return s


def _cut_order(whole: Sequence[int], cuts: Cuts, mesh: Mesh) -> tuple[list[int], list[int]]:
    """For (g, *whole) split into (g, [cut sizes..., tile] per axis): that split shape, and the
    permutation that brings it to (cut sizes of all axes..., g, *tile)."""
    shape, cut_dims, tile_dims = [whole[0]], [], []
    for size, c in zip(whole[1:], cuts):
        cut_dims += range(len(shape), len(shape) + len(c))
        shape += [mesh.shape[a] for a in c]
        tile_dims.append(len(shape))
        shape.append(size // axes_size(mesh, c))
    return shape, cut_dims + [0] + tile_dims


def _to_parts(whole: jax.Array, cuts: Cuts, mesh: Mesh) -> jax.Array:
    """(g, *whole) -> (K, g, *tile): part k is what device k of the exchange holds."""
    shape, perm = _cut_order(whole.shape, cuts, mesh)
    x = whole.reshape(shape).transpose(perm)
    return x.reshape(-1, *x.shape[len(perm) - len(whole.shape) :])


def _from_parts(parts: jax.Array, cuts: Cuts, mesh: Mesh) -> jax.Array:
    """(K, g, *tile) -> (g, *whole), the inverse of `_to_parts`."""
    whole = (parts.shape[1],) + tuple(t * axes_size(mesh, c) for t, c in zip(parts.shape[2:], cuts))
    shape, perm = _cut_order(whole, cuts, mesh)
    split = parts.reshape(tuple(shape[p] for p in perm))
    return split.transpose(np.argsort(perm)).reshape(whole)


def _all_to_all_many(parts: list[jax.Array], axes: list[tuple[str, ...]]) -> list[jax.Array]:
    """Exchanges part k of each (K, ...) array with device k of its axes; arrays with the same
    axes and dtype travel in one all-to-all."""
    buckets: dict[tuple, list[int]] = {}
    for i, (p, ax) in enumerate(zip(parts, axes)):
        buckets.setdefault((ax, p.dtype), []).append(i)
    out: list[jax.Array | None] = [None] * len(parts)
    for (ax, _), members in buckets.items():
        flat = [parts[i].reshape(parts[i].shape[0], -1) for i in members]
        moved = jax.lax.all_to_all(jnp.concatenate(flat, axis=1), ax, 0, 0, tiled=True)
        offsets = np.cumsum([0] + [f.shape[1] for f in flat])
        for i, lo, hi in zip(members, offsets[:-1], offsets[1:]):
            out[i] = moved[:, lo:hi].reshape(parts[i].shape)
    return out
