"""What each matrix leaf looks like on the mesh, and the reshapes that take it apart.

A *layout* says, for one matrix leaf, which axes form the matrix (optax's
`MuonDimensionNumbers`; the other axes are batch axes), how the leaf is split across the mesh
(its `PartitionSpec`) and how each device-local block is split further (`block_grid`).
`Layout.matrix_shape` and `Layout.block_shape` give the shape of what a full and a block step
orthogonalize, so the caller can scale each update accordingly.

Three reshapes, each defined once with its inverse (`to_x` / `from_x`), take a leaf apart:

    leaf  ⇄  stack (n, *matrix axes)  ⇄  matrices (n, rows, cols)  ⇄  tiles (n·r·c, rows/r, cols/c)

where n counts the leaf's matrices (its batch axes, flattened). Full steps exchange stacks,
whose matrix axes the mesh may cut; Newton–Schulz sees matrices; block steps cut tiles.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from optax.contrib import MuonDimensionNumbers

from muonbp_jax._options import Path, PerLeaf, PyTree, leaves_with_paths, path_str, per_leaf

P = PartitionSpec
Mesh = jax.sharding.Mesh | jax.sharding.AbstractMesh
Grid = tuple[int, int]  # (r, c): each device-local matrix cut into r×c tiles on block steps

# The per-leaf options of `scale_by_muonbp` and `muonbp` (see `_options.PerLeaf`).
Specs = PerLeaf[PartitionSpec]
BlockGrid = PerLeaf[Grid]
DimensionNumbers = PerLeaf[MuonDimensionNumbers]

_SPECS_HELP = (
    "Pass specs= (a tree of PartitionSpec matched to the parameters by key path, or a callable "
    "params -> such a tree). Get it from your model with nnx.get_partition_spec(nnx.state(model))"
    " (flax nnx), nn.logical_to_mesh(nn.get_partition_spec(variables)['params'], rules) (flax "
    "linen with logical axis names) or "
    "muonbp_jax.partition_specs(params) (concrete jax.Arrays); or build the mesh with "
    "jax.make_mesh(..., axis_types=(AxisType.Explicit, ...)) so shardings are part of the types."
)


def is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def is_spec_or_sharding(x: Any) -> bool:
    """A `specs` value: a PartitionSpec, or a NamedSharding (its `.spec`, on its `.mesh`)."""
    return isinstance(x, (PartitionSpec, NamedSharding))


SPECS_EXPECTED = (
    "a PartitionSpec or a NamedSharding per leaf (or None for a subtree: unsharded), e.g. "
    "nnx.get_partition_spec(nnx.state(model)), "
    "nn.logical_to_mesh(nn.get_partition_spec(variables)['params'], rules) (linen), "
    "muonbp_jax.partition_specs(params) or jax.tree.map(lambda x: x.sharding, params)"
)


def resolve_specs(specs: Specs, tree: PyTree, mesh: Mesh | None) -> tuple[list[Any], Mesh | None]:
    """Per leaf of `tree`, the `specs` entry as a PartitionSpec (or None), and the mesh: `mesh`,
    else that of the NamedSharding entries (which must then share one mesh)."""
    values = per_leaf(
        specs,
        tree,
        name="specs",
        is_value=is_spec_or_sharding,
        required=True,
        expected=SPECS_EXPECTED,
    )
    meshes = {v.mesh for v in values if isinstance(v, NamedSharding)}
    if mesh is None and len(meshes) > 1:
        raise ValueError(
            f"specs holds NamedShardings on {len(meshes)} different meshes; muonbp_jax needs one "
            "mesh for all matrix parameters (pass mesh=)."
        )
    if mesh is None and meshes:
        mesh = next(iter(meshes))
    return [v.spec if isinstance(v, NamedSharding) else v for v in values], mesh


def is_dimension_numbers(x: Any) -> bool:
    return isinstance(x, MuonDimensionNumbers)


def is_grid(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, int) for v in x)


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
    def matrix_axes(self) -> tuple[int, ...]:
        return self.reduction_axes + self.output_axes

    @property
    def cuts(self) -> tuple[tuple[str, ...], ...]:
        """Per matrix axis, the mesh axes that cut it (sharded batch axes cut no matrix)."""
        if self.spec is None:
            return tuple(() for _ in self.matrix_axes)
        return tuple(entry_axes(self.spec[a]) for a in self.matrix_axes)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (
            math.prod(self.shape[a] for a in self.reduction_axes),
            math.prod(self.shape[a] for a in self.output_axes),
        )

    def local_shape(self, mesh: Mesh | None) -> tuple[int, ...]:
        if self.spec is None:
            return self.shape
        return tuple(n // axes_size(mesh, e) for n, e in zip(self.shape, self.spec))

    def block_shape(self, mesh: Mesh | None) -> tuple[int, int]:
        local = self.local_shape(mesh)
        rows = math.prod(local[a] for a in self.reduction_axes)
        cols = math.prod(local[a] for a in self.output_axes)
        return rows // self.grid[0], cols // self.grid[1]


def entry_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes named by one PartitionSpec entry."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def axes_size(mesh: Mesh | None, entry: Any) -> int:
    return math.prod(mesh.shape[a] for a in entry_axes(entry)) if mesh is not None else 1


def _normalize_axes(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(a % ndim for a in axes)


def type_sharding(x: Any) -> tuple[Mesh, tuple[Any, ...]] | None:
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


def context_mesh() -> Mesh | None:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _traced_mesh(x: Any) -> Mesh | None:
    """For a tracer, the multi-device mesh it is traced under: the context mesh
    (`jax.set_mesh`), else the one its type names. Inside jit, jax 0.10 types an argument
    placed on an Auto-axis mesh with that (abstract) mesh but the spec P(None, ...), whatever
    the array's real sharding, so a multi-device mesh here means the spec is unknown."""
    if not isinstance(x, jax.core.Tracer):
        return None
    for mesh in (context_mesh(), getattr(_type_sharding_or_none(x), "mesh", None)):
        if mesh is not None and not mesh.empty and mesh.size > 1:
            return mesh
    return None


def _type_sharding_or_none(x: Any) -> Any:
    try:
        return jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None


def _concrete_sharding_is_split(x: Any) -> bool:
    """True for a concrete array laid out over several devices without being replicated."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
        return False
    sharding = x.sharding
    return len(sharding.device_set) > 1 and not sharding.is_fully_replicated


def _check_dtype(path: Path, x: Any) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"Parameter {path_str(path)!r} has dtype {dtype}, but Muon orthogonalizes "
            "floating-point (real or complex) matrices: an integer or boolean one cannot take "
            "its updates. Keep it away from Muon: None for that leaf in "
            "muon_weight_dimension_numbers, or optax.partition/optax.masked around the optimizer."
        )


def _check_declared_spec(path: Path, x: Any, spec: tuple[Any, ...]) -> None:
    """A concrete leaf split over several devices must be split as `specs` says: shard_map
    would otherwise reshard it silently and orthogonalize blocks that no device holds.

    Seen on concrete arrays and, inside jit, on Explicit-mode types; inside jit on an Auto-axis
    mesh the real sharding is not visible and `specs` is trusted."""
    typed = type_sharding(x)
    if typed is not None:
        padded = lambda sp: tuple(entry_axes(e) for e in sp) + ((),) * (x.ndim - len(sp))
        same, actual = padded(typed[1]) == padded(spec), P(*typed[1])
    elif _concrete_sharding_is_split(x) and isinstance(x.sharding, NamedSharding):
        actual = x.sharding.spec
        try:
            same = x.sharding.is_equivalent_to(NamedSharding(x.sharding.mesh, P(*spec)), x.ndim)
        except ValueError:  # the array's mesh lacks an axis that the spec names
            same = False
    else:
        return
    if not same:
        raise ValueError(
            f"specs gives {path_str(path)!r} the sharding {P(*spec)}, but the array is sharded "
            f"as {actual}. Block steps orthogonalize the blocks the spec describes, so "
            "the two must agree: pass the spec the parameter has (muonbp_jax.partition_specs("
            "params) reads them off concrete arrays) or reshard the parameter."
        )


def plan(
    tree: PyTree,
    *,
    specs: Specs,
    mesh: Mesh | None,
    dimension_numbers: DimensionNumbers,
    block_grid: BlockGrid,
) -> tuple[Mesh | None, list[Layout]]:
    """Builds the layout of every leaf of `tree` (the matrix leaves of the model).

    Spec resolution order: `specs=` (matched by key path), else the leaf's type in Explicit
    mode, else the leaf is treated as unsharded; a concrete leaf that is in fact split over
    several devices raises a ValueError instead.
    """
    paths, leaves, _ = leaves_with_paths(tree)
    user_specs, mesh = resolve_specs(specs, tree, mesh)
    dims = per_leaf(
        dimension_numbers,
        tree,
        name="weight_dimension_numbers",
        is_value=is_dimension_numbers,
        default=MuonDimensionNumbers(),
    )
    grids = per_leaf(block_grid, tree, name="block_grid", is_value=is_grid, default=(1, 1))
    meshes: set[Mesh] = set()
    resolved: list[tuple[Any, ...] | None] = []
    for path, x, spec in zip(paths, leaves, user_specs):
        _check_dtype(path, x)
        typed = type_sharding(x)
        if spec is not None:
            resolved.append(tuple(spec))
            leaf_mesh = mesh or (typed[0] if typed else None) or context_mesh()
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
            context = _traced_mesh(x)
            if context is not None:
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
            for name in entry_axes(entry):
                if name not in mesh.axis_names:
                    raise ValueError(
                        f"PartitionSpec {P(*spec)} for {where!r} names mesh axis {name!r}, but "
                        f"the mesh has axes {tuple(mesh.axis_names)}."
                    )
            parts = axes_size(mesh, entry)
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


def to_stack(x: jax.Array, lay: Layout) -> jax.Array:
    """Leaf (whole or local) -> (n, *matrix axes): its batch axes flattened in front."""
    order = lay.batch_axes + lay.matrix_axes
    return x.transpose(order).reshape(-1, *(x.shape[a] for a in lay.matrix_axes))


def from_stack(s: jax.Array, lay: Layout, shape: tuple[int, ...]) -> jax.Array:
    """(n, *matrix axes) -> the leaf of `shape`, the inverse of `to_stack`."""
    order = lay.batch_axes + lay.matrix_axes
    return s.reshape(tuple(shape[a] for a in order)).transpose(np.argsort(order))


def to_matrices(s: jax.Array, lay: Layout) -> jax.Array:
    """(n, *matrix axes) -> (n, rows, cols): reduction axes make the rows, output axes the
    columns."""
    rows = math.prod(s.shape[1 : 1 + len(lay.reduction_axes)])
    return s.reshape(s.shape[0], rows, -1)


def from_matrices(m: jax.Array, stack_shape: tuple[int, ...]) -> jax.Array:
    """(n, rows, cols) -> (n, *matrix axes), the inverse of `to_matrices`."""
    return m.reshape(stack_shape)


def to_tiles(m: jax.Array, grid: Grid) -> jax.Array:
    """(n, rows, cols) -> (n·r·c, rows/r, cols/c): the r×c grid of tiles of each matrix."""
    (r, c), (n, rows, cols) = grid, m.shape
    tiles = m.reshape(n, r, rows // r, c, cols // c).transpose(0, 1, 3, 2, 4)
    return tiles.reshape(n * r * c, rows // r, cols // c)


def from_tiles(t: jax.Array, grid: Grid) -> jax.Array:
    """(n·r·c, rows/r, cols/c) -> (n, rows, cols), the inverse of `to_tiles`."""
    (r, c), (count, height, width) = grid, t.shape
    n = count // (r * c)
    tiles = t.reshape(n, r, c, height, width).transpose(0, 1, 3, 2, 4)
    return tiles.reshape(n, r * height, c * width)
