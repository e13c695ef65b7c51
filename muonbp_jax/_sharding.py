"""Everything muonbp_jax knows about meshes: per-leaf layouts, local tiles, `shard_map`,
collectives and the strategies for full steps.

A *layout* says, for one matrix leaf, which axes form the matrix (optax's
`MuonDimensionNumbers`), how the leaf is split across the mesh (its `PartitionSpec`) and how each
device-local block is split further (`block_grid`). From it:

* `block_step` orthogonalizes every device-local tile on its own (no communication);
* `full_step` orthogonalizes whole matrices and hands each device back its own part.

`Layout.matrix_shape` and `Layout.block_shape` give the caller the shape of what each kind of
step orthogonalized, so it can scale each update accordingly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from optax.contrib import MuonDimensionNumbers

from muonbp_jax._newton_schulz import orthogonalize_many

P = PartitionSpec
Mesh = jax.sharding.Mesh | jax.sharding.AbstractMesh
Path = tuple[str, ...]
Grid = tuple[int, int]

FULL_STRATEGIES = ("gather", "all_to_all", "auto")

_SPECS_HELP = (
    "Pass specs= (a tree of PartitionSpec matched to the parameters by key path, or a callable "
    "params -> such a tree). Get it from your model with nnx.get_partition_spec(nnx.state(model))"
    " (flax nnx), nn.get_partition_spec(variables) (flax linen) or "
    "muonbp_jax.partition_specs(params) (concrete jax.Arrays); or build the mesh with "
    "jax.make_mesh(..., axis_types=(AxisType.Explicit, ...)) so shardings are part of the types."
)


# ----------------------------------------------------------------------------- key paths


def path_names(path: Sequence[Any]) -> Path:
    """A key path as plain names; flax's trailing `.value` is dropped, so a spec tree read from
    `nnx.Param` nodes matches the plain arrays `nnx.Optimizer.update` passes in."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    while names and names[-1] == "value":
        names.pop()
    return tuple(names)


def path_str(path: Path) -> str:
    return "/".join(path) or "<root>"


def leaves_with_paths(tree: Any) -> tuple[list[Path], list[Any], Any]:
    """Flattens `tree` (flax Variables are looked through) into paths, leaves and treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_names(p) for p, _ in flat], [x for _, x in flat], treedef


def per_leaf(
    option: Any,
    tree: Any,
    *,
    name: str,
    is_value: Callable[[Any], bool],
    default: Any = None,
    required: bool = False,
) -> list[Any]:
    """Resolves a per-leaf option for every leaf of `tree`, by key path.

    `option` is one value for all leaves, a callable tree -> option tree, or a tree (or prefix
    of a tree) of values whose leaves are found by `is_value`; a leaf takes the value at the
    longest matching prefix of its path. Without a match the leaf gets `default`, or, if
    `required`, a ValueError names the leaf.
    """
    paths, _, _ = leaves_with_paths(tree)
    if option is None or is_value(option):
        return [default if option is None else option for _ in paths]
    if callable(option):
        option = option(tree)
        if option is None or is_value(option):
            return [default if option is None else option for _ in paths]
    flat, _ = jax.tree_util.tree_flatten_with_path(
        option, is_leaf=lambda x: x is None or is_value(x)
    )
    table: dict[Path, Any] = {}
    for p, v in flat:
        if v is not None and not is_value(v):
            raise TypeError(f"{name}: entry {path_str(path_names(p))!r} is {v!r}, not a {name}.")
        table[path_names(p)] = v
    values = []
    for path in paths:
        for k in range(len(path), -1, -1):
            if path[:k] in table:
                values.append(table[path[:k]])
                break
        else:
            if required:
                known = ", ".join(sorted(map(path_str, table))[:8])
                raise ValueError(
                    f"{name} has no entry for parameter {path_str(path)!r} (entries: {known}"
                    f"{', ...' if len(table) > 8 else ''}). The {name} tree must follow the "
                    "parameter tree's key paths."
                )
            values.append(default)
    return values


def check_paths_cover(option: Any, params: Any, *, name: str, is_value) -> None:
    """Raises if a tree-valued option names a path that matches no parameter (a typo)."""
    if option is None or is_value(option) or callable(option):
        return
    param_paths = set(leaves_with_paths(params)[0])
    prefixes = {p[:k] for p in param_paths for k in range(len(p) + 1)}
    flat, _ = jax.tree_util.tree_flatten_with_path(
        option, is_leaf=lambda x: x is None or is_value(x)
    )
    entries = {path_names(p) for p, _ in flat}
    for path in sorted(entries - prefixes):
        # A misspelled key usually leaves a parameter without an entry: name it too.
        uncovered = [
            path_str(q)
            for q in sorted(param_paths)
            if not any(q[:k] in entries for k in range(len(q) + 1))
        ]
        hint = (
            f"parameters without an entry: {', '.join(map(repr, uncovered[:8]))}"
            if uncovered
            else f"parameter paths look like {path_str(min(param_paths))!r}"
        )
        raise ValueError(
            f"{name} has an entry {path_str(path)!r} that matches no parameter; {hint}."
        )


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one leaf becomes matrices and tiles (all static)."""

    path: Path
    shape: tuple[int, ...]  # global shape
    batch_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    output_axes: tuple[int, ...]
    spec: tuple[Any, ...] | None  # one entry per axis; None: not on a mesh
    grid: Grid

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (
            math.prod(self.shape[a] for a in self.reduction_axes),
            math.prod(self.shape[a] for a in self.output_axes),
        )

    def local_shape(self, mesh: Mesh | None) -> tuple[int, ...]:
        if self.spec is None:
            return self.shape
        return tuple(n // _axes_size(mesh, e) for n, e in zip(self.shape, self.spec))

    def block_shape(self, mesh: Mesh | None) -> tuple[int, int]:
        local = self.local_shape(mesh)
        rows = math.prod(local[a] for a in self.reduction_axes)
        cols = math.prod(local[a] for a in self.output_axes)
        return rows // self.grid[0], cols // self.grid[1]


def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _axes_size(mesh: Mesh | None, entry: Any) -> int:
    return math.prod(mesh.shape[a] for a in _entry_axes(entry)) if mesh is not None else 1


def _normalize_axes(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(a % ndim for a in axes)


def _type_sharding(x: Any) -> tuple[Mesh, tuple[Any, ...]] | None:
    """The (mesh, spec) carried by x's type in Explicit mode, else None."""
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    if not all(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    return mesh, tuple(sharding.spec)


def _concrete_sharding_is_split(x: Any) -> bool:
    """True for a concrete array laid out over several devices without being replicated."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
        return False
    sharding = x.sharding
    return len(sharding.device_set) > 1 and not sharding.is_fully_replicated


def _check_dtype(path: Path, x: Any) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"Parameter {path_str(path)!r} has dtype {dtype}, but Muon orthogonalizes real "
            "floating-point matrices (an integer one cannot take its updates; a complex one "
            "would need conjugate transposes). Keep it away from Muon: None for that leaf in "
            "muon_weight_dimension_numbers, or optax.partition/optax.masked around the optimizer."
        )


def _check_declared_spec(path: Path, x: Any, spec: tuple[Any, ...]) -> None:
    """A concrete leaf split over several devices must be split as `specs` says: shard_map
    would otherwise reshard it silently and orthogonalize blocks that no device holds."""
    if not _concrete_sharding_is_split(x) or not isinstance(x.sharding, NamedSharding):
        return
    try:
        same = x.sharding.is_equivalent_to(NamedSharding(x.sharding.mesh, P(*spec)), x.ndim)
    except ValueError:  # the array's mesh lacks an axis that the spec names
        same = False
    if not same:
        raise ValueError(
            f"specs gives {path_str(path)!r} the sharding {P(*spec)}, but the array is sharded "
            f"as {x.sharding.spec}. Block steps orthogonalize the blocks the spec describes, so "
            "the two must agree: pass the spec the parameter has (muonbp_jax.partition_specs("
            "params) reads them off concrete arrays) or reshard the parameter."
        )


def _context_mesh() -> Mesh | None:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def plan(
    tree: Any,
    *,
    specs: Any,
    mesh: Mesh | None,
    dimension_numbers: Any,
    block_grid: Any,
) -> tuple[Mesh | None, list[Layout]]:
    """Builds the layout of every leaf of `tree` (the matrix leaves of the model).

    Spec resolution order: `specs=` (matched by key path), else the leaf's type in Explicit
    mode, else the leaf is treated as unsharded; a concrete leaf that is in fact split over
    several devices raises a ValueError instead.
    """
    paths, leaves, _ = leaves_with_paths(tree)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    user_specs = per_leaf(specs, tree, name="specs", is_value=is_spec, required=True)
    dims = per_leaf(
        dimension_numbers,
        tree,
        name="weight_dimension_numbers",
        is_value=lambda x: isinstance(x, MuonDimensionNumbers),
        default=MuonDimensionNumbers(),
    )
    grids = per_leaf(
        block_grid,
        tree,
        name="block_grid",
        is_value=lambda x: (
            isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, int) for v in x)
        ),
        default=(1, 1),
    )
    meshes: set[Mesh] = set()
    resolved: list[tuple[Any, ...] | None] = []
    for path, x, spec in zip(paths, leaves, user_specs):
        _check_dtype(path, x)
        typed = _type_sharding(x)
        if spec is not None:
            resolved.append(tuple(spec))
            leaf_mesh = mesh or (typed[0] if typed else None) or _context_mesh()
            if leaf_mesh is None and any(e is not None for e in spec):
                raise ValueError(
                    f"specs gives {path_str(path)!r} the sharding {spec} but no mesh is known: "
                    "pass mesh= or call the optimizer inside `with jax.set_mesh(mesh):`."
                )
            if leaf_mesh is not None:
                meshes.add(leaf_mesh)
        elif typed is not None:
            resolved.append(typed[1])
            meshes.add(mesh or typed[0])
        else:
            if _concrete_sharding_is_split(x):
                raise ValueError(
                    f"Parameter {path_str(path)!r} is sharded as {x.sharding.spec} over "
                    f"{len(x.sharding.device_set)} devices, but its PartitionSpec cannot be "
                    "read inside jit on a mesh with Auto axes. " + _SPECS_HELP
                )
            context = _context_mesh()
            if isinstance(x, jax.core.Tracer) and context is not None and context.size > 1:
                # Treating it as unsharded would quietly turn every block step into a full one.
                raise ValueError(
                    f"Parameter {path_str(path)!r} is traced under a mesh of {context.size} "
                    "devices with Auto axes, where its PartitionSpec cannot be read (use P() "
                    "for replicated parameters). " + _SPECS_HELP
                )
            resolved.append(None)
    if len(meshes) > 1:
        raise ValueError(
            f"Matrix parameters live on {len(meshes)} different meshes; muonbp_jax needs one "
            "mesh for all of them (pass mesh=)."
        )
    the_mesh = next(iter(meshes)) if meshes else None

    layouts = []
    for path, x, spec, dim, grid in zip(paths, leaves, resolved, dims, grids):
        layouts.append(_layout(path, tuple(x.shape), dim, spec, grid, the_mesh))
        if specs is not None and spec is not None:
            _check_declared_spec(path, x, spec)
    return the_mesh, layouts


def _layout(path, shape, dim, spec, grid, mesh) -> Layout:
    where = path_str(path)
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"Parameter {where!r} has shape {shape}: Muon needs matrices (rank >= 2). Route it "
            "to AdamW with muon_weight_dimension_numbers=None for that leaf."
        )
    reduction = _normalize_axes(dim.reduction_axis, ndim)
    output = _normalize_axes(dim.output_axis, ndim)
    if set(reduction) & set(output) or not reduction or not output:
        raise ValueError(f"{where!r}: dimension numbers {dim} must name disjoint, non-empty axes.")
    batch = tuple(a for a in range(ndim) if a not in reduction + output)
    if not (isinstance(grid, tuple) and len(grid) == 2 and min(grid) >= 1):
        raise ValueError(f"block_grid for {where!r} must be a pair of ints >= 1, got {grid!r}.")
    if spec is not None:
        if len(spec) > ndim:
            raise ValueError(
                f"PartitionSpec {P(*spec)} for {where!r} has more entries than "
                f"the parameter's rank {ndim} (shape {shape})."
            )
        spec = tuple(spec) + (None,) * (ndim - len(spec))
        for axis, (size, entry) in enumerate(zip(shape, spec)):
            for name in _entry_axes(entry):
                if name not in mesh.axis_names:
                    raise ValueError(
                        f"PartitionSpec {P(*spec)} for {where!r} names mesh axis {name!r}, but "
                        f"the mesh has axes {tuple(mesh.axis_names)}."
                    )
            parts = _axes_size(mesh, entry)
            if size % parts:
                raise ValueError(
                    f"Dimension {axis} of {where!r} (size {size}) is not divisible by mesh "
                    f"axes {entry} of total size {parts}; pad the parameter or shard it "
                    "differently."
                )
    layout = Layout(path, shape, batch, reduction, output, spec, grid)
    local = layout.local_shape(mesh)
    rows = math.prod(local[a] for a in reduction)
    cols = math.prod(local[a] for a in output)
    if rows % grid[0] or cols % grid[1]:
        raise ValueError(
            f"block_grid {grid} does not divide the device-local {rows}x{cols} matrices of "
            f"{where!r}."
        )
    return layout


# ----------------------------------------------------------------------------- reshapes


def _to_matrices(x: jax.Array, lay: Layout) -> jax.Array:
    """(..., shape) -> (batch, rows, cols), following the dimension numbers."""
    order = lay.batch_axes + lay.reduction_axes + lay.output_axes
    take = lambda axes: math.prod(x.shape[a] for a in axes)
    return x.transpose(order).reshape(
        take(lay.batch_axes), take(lay.reduction_axes), take(lay.output_axes)
    )


def _from_matrices(y: jax.Array, lay: Layout, shape: tuple[int, ...]) -> jax.Array:
    order = lay.batch_axes + lay.reduction_axes + lay.output_axes
    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
    return y.reshape(tuple(shape[a] for a in order)).transpose(inverse)


def _to_tiles(m: jax.Array, grid: Grid) -> jax.Array:
    """(b, rows, cols) -> (b·r·c, rows/r, cols/c): the r×c grid of tiles of each matrix."""
    (r, c), (b, rows, cols) = grid, m.shape
    tiles = m.reshape(b, r, rows // r, c, cols // c).transpose(0, 1, 3, 2, 4)
    return tiles.reshape(b * r * c, rows // r, cols // c)


def _from_tiles(t: jax.Array, grid: Grid, rows: int, cols: int) -> jax.Array:
    r, c = grid
    b = t.shape[0] // (r * c)
    return t.reshape(b, r, c, rows // r, cols // c).transpose(0, 1, 3, 2, 4).reshape(b, rows, cols)


# ----------------------------------------------------------------------------- steps

Orthogonalizer = Callable[[jax.Array], jax.Array]


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
    leaves: list[jax.Array], layouts: list[Layout], mesh: Mesh | None, orth: Orthogonalizer
) -> list[jax.Array]:
    """Orthogonalizes each device-local block (split further by block_grid) independently."""

    def local(xs):
        tiles = [_to_tiles(_to_matrices(x, lay), lay.grid) for x, lay in zip(xs, layouts)]
        tiles = orthogonalize_many(tiles, orth)
        outs = []
        for x, t, lay in zip(xs, tiles, layouts):
            rows, cols = (t.shape[1] * lay.grid[0], t.shape[2] * lay.grid[1])
            outs.append(_from_matrices(_from_tiles(t, lay.grid, rows, cols), lay, x.shape))
        return outs

    return _on_mesh(local, mesh, layouts, leaves)


def _gather(x: jax.Array, spec: tuple[Any, ...]) -> jax.Array:
    for axis, entry in enumerate(spec):
        if entry is not None:
            x = jax.lax.all_gather(x, _entry_axes(entry), axis=axis, tiled=True)
    return x


def _local_part(x: jax.Array, spec: tuple[Any, ...], mesh: Mesh) -> jax.Array:
    for axis, entry in enumerate(spec):
        if entry is not None:
            size = x.shape[axis] // _axes_size(mesh, entry)
            index = jax.lax.axis_index(_entry_axes(entry))
            x = jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)
    return x


def _full_step_gather(leaves, layouts, mesh, orth):
    """The paper's full step: all-gather each matrix, orthogonalize it on every device, keep
    the local part. Communication: one all-gather per sharded leaf."""

    def local(xs):
        whole = [_gather(x, lay.spec) if lay.spec else x for x, lay in zip(xs, layouts)]
        mats = orthogonalize_many([_to_matrices(w, lay) for w, lay in zip(whole, layouts)], orth)
        outs = [_from_matrices(m, lay, lay.shape) for m, lay in zip(mats, layouts)]
        return [_local_part(o, lay.spec, mesh) if lay.spec else o for o, lay in zip(outs, layouts)]

    return _on_mesh(local, mesh, layouts, leaves)


# ----------------------------------------------------------------------------- full step by
# all-to-all: whole matrices spread over the devices that share them, no redundant work.


def _matrix_axes(lay: Layout) -> tuple[int, ...]:
    return lay.reduction_axes + lay.output_axes


def _cuts(lay: Layout) -> tuple[tuple[str, ...], ...]:
    """Per matrix axis, the mesh axes that cut it (batch-axis sharding needs no exchange)."""
    if lay.spec is None:
        return tuple(() for _ in _matrix_axes(lay))
    return tuple(_entry_axes(lay.spec[a]) for a in _matrix_axes(lay))


@dataclasses.dataclass(frozen=True)
class _Exchange:
    """Same-shape matrices of leaves cut the same way: one all-to-all gives each of the K
    devices that share them whole matrices for 1/K of the group (zero-padded: NS(0) = 0)."""

    members: tuple[int, ...]  # leaf indices
    cuts: tuple[tuple[str, ...], ...]
    count: int  # matrices in the group, per device before the exchange
    parts: int  # K

    @property
    def axes(self) -> tuple[str, ...]:  # the all-to-all's axes; device order = tuple order
        return tuple(a for c in self.cuts for a in c)

    @property
    def per_device(self) -> int:
        return -(-self.count // self.parts)


def _exchanges(leaves, layouts, mesh: Mesh, min_count: int) -> list[_Exchange]:
    groups: dict[tuple, list[int]] = {}
    for i, (x, lay) in enumerate(zip(leaves, layouts)):
        if any(_cuts(lay)):
            mx = _matrix_axes(lay)
            key = (_cuts(lay), tuple(lay.shape[a] for a in mx), len(lay.reduction_axes), x.dtype)
            groups.setdefault(key, []).append(i)
    found = []
    for (cuts, *_), members in groups.items():
        count = sum(
            math.prod(layouts[i].local_shape(mesh)[a] for a in layouts[i].batch_axes)
            for i in members
        )
        if count >= min_count:
            parts = math.prod(_axes_size(mesh, c) for c in cuts)
            found.append(_Exchange(tuple(members), cuts, count, parts))
    return found


def _pieces(x: jax.Array, lay: Layout) -> jax.Array:
    """Local leaf -> (local batch, *local matrix axes), batch axes first."""
    order = lay.batch_axes + _matrix_axes(lay)
    return x.transpose(order).reshape(-1, *(x.shape[a] for a in _matrix_axes(lay)))


def _from_pieces(p: jax.Array, lay: Layout, shape: tuple[int, ...]) -> jax.Array:
    order = lay.batch_axes + _matrix_axes(lay)
    return p.reshape(tuple(shape[a] for a in order)).transpose(np.argsort(order))


def _cut_order(whole: Sequence[int], cuts, mesh: Mesh) -> tuple[list[int], list[int]]:
    """For (g, *whole) split into (g, [cut sizes..., tile] per axis): that split shape, and the
    permutation that brings it to (cut sizes of all axes..., g, *tile)."""
    shape, cut_dims, tile_dims = [whole[0]], [], []
    for size, c in zip(whole[1:], cuts):
        cut_dims += range(len(shape), len(shape) + len(c))
        shape += [mesh.shape[a] for a in c]
        tile_dims.append(len(shape))
        shape.append(size // _axes_size(mesh, c))
    return shape, cut_dims + [0] + tile_dims


def _to_parts(whole: jax.Array, cuts, mesh: Mesh) -> jax.Array:
    """(g, *whole) -> (K, g, *tile): part k is what device k of the exchange holds."""
    shape, perm = _cut_order(whole.shape, cuts, mesh)
    x = whole.reshape(shape).transpose(perm)
    return x.reshape(-1, *x.shape[len(perm) - len(whole.shape) :])


def _from_parts(parts: jax.Array, cuts, mesh: Mesh) -> jax.Array:
    """(K, g, *tile) -> (g, *whole), the inverse of `_to_parts`."""
    whole = (parts.shape[1],) + tuple(
        t * _axes_size(mesh, c) for t, c in zip(parts.shape[2:], cuts)
    )
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


def _full_step_exchange(leaves, layouts, mesh, orth, min_count: int):
    """Full step where groups of at least `min_count` same-shape matrices are spread by
    all-to-all; other leaves gather their matrix axes only (batch axes stay sharded)."""
    exchanges = _exchanges(leaves, layouts, mesh, min_count)
    exchanged = {i for e in exchanges for i in e.members}
    kept = [i for i in range(len(layouts)) if i not in exchanged]
    matrix_spec = [
        tuple(e if a in _matrix_axes(lay) else None for a, e in enumerate(lay.spec))
        if lay.spec is not None
        else None
        for lay in layouts
    ]

    def local(xs):
        sends = []
        for e in exchanges:
            pieces = jnp.concatenate([_pieces(xs[i], layouts[i]) for i in e.members])
            padding = e.per_device * e.parts - e.count
            pieces = jnp.pad(pieces, [(0, padding)] + [(0, 0)] * (pieces.ndim - 1))
            sends.append(pieces.reshape(e.parts, e.per_device, *pieces.shape[1:]))
        received = _all_to_all_many(sends, [e.axes for e in exchanges])
        whole = [_from_parts(r, e.cuts, mesh) for r, e in zip(received, exchanges)]
        mats = [_as_matrices(w, layouts[e.members[0]]) for w, e in zip(whole, exchanges)]
        gathered = [_gather(xs[i], matrix_spec[i]) if matrix_spec[i] else xs[i] for i in kept]
        mats += [_to_matrices(g, layouts[i]) for g, i in zip(gathered, kept)]
        mats = orthogonalize_many(mats, orth)

        outs: list[jax.Array | None] = [None] * len(xs)
        back = [
            _to_parts(m.reshape(w.shape), e.cuts, mesh) for m, w, e in zip(mats, whole, exchanges)
        ]
        for r, e in zip(_all_to_all_many(back, [e.axes for e in exchanges]), exchanges):
            pieces = r.reshape(-1, *r.shape[2:])[: e.count]
            offset = 0
            for i in e.members:
                n = math.prod(xs[i].shape[a] for a in layouts[i].batch_axes)
                outs[i] = _from_pieces(pieces[offset : offset + n], layouts[i], xs[i].shape)
                offset += n
        for m, g, i in zip(mats[len(exchanges) :], gathered, kept):
            o = _from_matrices(m, layouts[i], g.shape)
            outs[i] = _local_part(o, matrix_spec[i], mesh) if matrix_spec[i] else o
        return outs

    return _on_mesh(local, mesh, layouts, leaves)


def _as_matrices(whole: jax.Array, lay: Layout) -> jax.Array:
    """(g, *whole matrix axes) -> (g, rows, cols)."""
    rows = math.prod(whole.shape[1 : 1 + len(lay.reduction_axes)])
    return whole.reshape(whole.shape[0], rows, -1)


# "auto": a group of G same-shape matrices shared by K devices costs per device, by gather,
# G orthogonalizations and (K-1)/K·G matrices received; by all-to-all, ceil(G/K) and
# 2·(K-1)/K·ceil(G/K) matrices moved. For G >= 2 the all-to-all is no worse on both counts;
# for a lone matrix it moves twice the bytes for the same work, so it is gathered
# (benchmarks/bench_sharded.py measures both; figures in benchmarks/RESULTS.md).
_FULL_STEPS = {
    "gather": _full_step_gather,
    "all_to_all": functools.partial(_full_step_exchange, min_count=1),
    "auto": functools.partial(_full_step_exchange, min_count=2),
}


def full_step(
    leaves: list[jax.Array],
    layouts: list[Layout],
    mesh: Mesh | None,
    orth: Orthogonalizer,
    strategy: str = "gather",
) -> list[jax.Array]:
    """Orthogonalizes every whole matrix; each device keeps its own part."""
    if mesh is None or all(lay.spec is None for lay in layouts):
        mats = orthogonalize_many([_to_matrices(x, lay) for x, lay in zip(leaves, layouts)], orth)
        outs = [_from_matrices(m, lay, lay.shape) for m, lay in zip(mats, layouts)]
    else:
        outs = _FULL_STEPS[strategy](leaves, layouts, mesh, orth)
    return outs


# ----------------------------------------------------------------------------- state placement


def _sharding_for(mesh: Mesh, spec: tuple[Any, ...]):
    # Without trailing Nones, as jit returns specs: P('x', None) and P('x') are the same
    # layout but different cache keys, so state placed as P('x', None) recompiled the step.
    spec = tuple(spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    if isinstance(mesh, jax.sharding.Mesh):
        return NamedSharding(mesh, P(*spec))
    return P(*spec)  # abstract mesh: resolved against the context mesh


def place_like(tree: Any, mesh: Mesh | None, layouts: list[Layout]) -> Any:
    """Constrains each leaf of `tree` (shaped like the planned leaves) to its layout's sharding,
    so that state built under `jax.jit(tx.init)` is not left replicated."""
    if mesh is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    placed = [
        jax.lax.with_sharding_constraint(x, _sharding_for(mesh, lay.spec))
        if lay.spec is not None and _type_sharding(x) is None
        else x
        for x, lay in zip(leaves, layouts)
    ]
    return jax.tree.unflatten(treedef, placed)


def place_state_like_params(state: Any, params: Any, specs: Any, mesh: Mesh | None) -> Any:
    """Gives every state leaf that mirrors a parameter (same key-path suffix and shape) the
    parameter's sharding: AdamW moments and Muon momentum alike."""
    if specs is None:
        return state
    mesh = mesh or _context_mesh()
    if mesh is None:
        return state
    paths, leaves, _ = leaves_with_paths(params)
    spec_list = per_leaf(
        specs, params, name="specs", is_value=lambda x: isinstance(x, PartitionSpec)
    )
    table = {p: (tuple(x.shape), s) for p, x, s in zip(paths, leaves, spec_list) if s is not None}

    def place(path, x):
        names = path_names(path)
        for k in range(len(names)):
            hit = table.get(names[k:])
            if hit is not None and hit[0] == tuple(getattr(x, "shape", ())):
                if _type_sharding(x) is None:
                    return jax.lax.with_sharding_constraint(x, _sharding_for(mesh, tuple(hit[1])))
                return x
        # Counts and other leaves that mirror no parameter go replicated on the mesh, as the
        # jitted step returns them: left on one device by an eager init, they made the step
        # compile again at its second call, and a checkpoint target built from this state
        # restored them committed to that one device, which the step then refused.
        if isinstance(x, jax.Array) and _type_sharding(x) is None:
            return jax.lax.with_sharding_constraint(x, _sharding_for(mesh, ()))
        return x

    return jax.tree_util.tree_map_with_path(place, state)


def partition_specs(params: Any) -> Any:
    """Reads the PartitionSpec of every concrete array in `params` (P() when it has none).

    Inside jit only Explicit-mode types carry specs; call it outside jit otherwise and pass
    the resulting tree as `specs=`.
    """

    def spec(x):
        if isinstance(x, jax.core.Tracer):
            typed = _type_sharding(x)
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
