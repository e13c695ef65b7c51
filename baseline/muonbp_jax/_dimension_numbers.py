"""Dimension numbers from logical axis names: which axes of an N-D kernel make Muon's matrix.

optax's `MuonDimensionNumbers` say by position which axes of a leaf are the matrix's rows (the
reduction, fan-in side) and columns (the output side); all other axes are batch axes. Models
built with flax's logical partitioning name every axis instead: a linen `DenseGeneral` query
kernel is ('embed', 'heads', 'kv'), its output projection ('heads', 'kv', 'embed'), a scanned
layer adds 'layers'. `dimension_numbers_from_logical` turns such names into dimension numbers,
so 3-D and stacked kernels can be trained with Muon instead of falling to AdamW under the
default routing (which sends only 2-D leaves to Muon).

The rule rests on how `DenseGeneral` lays out its kernel: the contracted input axes first, the
output features last. A kernel that reads from or writes to the residual stream has the model
axis (`embed`) alone on one side, so its position decides the split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec
from optax.contrib import MuonDimensionNumbers

from muonbp_jax._options import PyTree, path_names, path_str

Names = tuple[Any, ...]  # one entry per axis: a logical name, None, or a tuple of names
Rule = Callable[[Names], MuonDimensionNumbers | None]

_EXPECTED = (
    "a PartitionSpec of logical axis names per parameter (or a tuple of names), as "
    "nn.get_partition_spec(variables)['params'] gives for a linen model built with "
    "nn.with_logical_partitioning"
)


def _is_names(x: Any) -> bool:
    """A leaf of names: a PartitionSpec, or a plain tuple of names and Nones (a tuple holding
    other tuples is a container of the tree)."""
    if isinstance(x, PartitionSpec):
        return True
    plain = isinstance(x, tuple) and not hasattr(x, "_fields")
    return plain and all(e is None or isinstance(e, str) for e in x)


def _entry_names(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _as_set(names: str | Sequence[str], what: str) -> frozenset[str]:
    names = (names,) if isinstance(names, str) else tuple(names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be a logical axis name or a sequence of them, got {names!r}.")
    return frozenset(names)


def _one(axes: Sequence[int]) -> int | tuple[int, ...]:
    return axes[0] if len(axes) == 1 else tuple(axes)


def dimension_numbers_from_logical(
    logical_specs: PyTree,
    *,
    model_axes: str | Sequence[str] = "embed",
    batch_axes: str | Sequence[str] = ("layers",),
    adam_axes: str | Sequence[str] = ("vocab",),
    rule: Rule | None = None,
) -> PyTree:
    """`MuonDimensionNumbers` for every parameter, from the logical names of its axes.

    Pass the result as `muon_weight_dimension_numbers=` (of `muonbp`, or of
    `optax.contrib.muon`): leaves that get `None` go to AdamW. With flax linen::

        specs = nn.get_partition_spec(variables)["params"]  # logical names per axis
        tx = muonbp_jax.muonbp(
            lr,
            muon_weight_dimension_numbers=muonbp_jax.dimension_numbers_from_logical(specs),
            specs=nn.logical_to_mesh(specs, rules),  # mesh axes, for block steps
        )

    The default rule, per parameter, with its axes' logical names in order:

    1. a name in `adam_axes` (default `'vocab'`: embedding tables, output heads) → `None`;
    2. axes named in `batch_axes` (default `'layers'`, the axis `nn.scan` adds; add e.g.
       `'exp'` for experts) are batch axes, wherever they are; the rest are matrix axes;
    3. fewer than two matrix axes (norm scales, 1-D biases) → `None`;
    4. the first matrix axis is a model axis (`model_axes`, default `'embed'`) → it is the
       reduction (fan-in) axis and all other matrix axes are outputs: q/k/v (embed, heads, kv)
       → `MuonDimensionNumbers(0, (1, 2))`, an MLP input (embed, mlp) → `(0, 1)`;
    5. else the last one is a model axis → it is the output axis, the others the reduction:
       the attention output (heads, kv, embed) → `((0, 1), 2)`, an MLP output (mlp, embed);
    6. no model axis among the matrix axes → `None` (e.g. a q bias (heads, kv), or a parameter
       created without logical names: `nn.get_partition_spec` gives it `P()`);
    7. a model axis only in the middle → `ValueError` naming the parameter (pass `rule=`).

    For layouts these defaults do not fit, set the names (MaxText-style experts:
    `model_axes=("embed", "embed_no_exp"), batch_axes=("layers", "exp")`) or pass `rule`, a
    function from a parameter's names (a tuple, one entry per axis) to its
    `MuonDimensionNumbers` or `None`, which replaces the rule above.

    Args:
      logical_specs: a tree of `PartitionSpec`s whose entries are logical axis names (or
        tuples of names); plain tuples of names (and Nones) are accepted as leaves too.
      model_axes: logical name(s) of the model (residual-stream) dimension.
      batch_axes: logical names of batch axes (stacked layers, experts).
      adam_axes: logical names that keep a parameter on AdamW.
      rule: replaces the default rule (see above).

    Returns:
      A tree like `logical_specs` with a `MuonDimensionNumbers` or `None` per parameter.

    Raises:
      TypeError: a leaf is not a spec of names (e.g. arrays or flax boxes were passed).
      ValueError: a model axis sits between other matrix axes; or no parameter has a model
        axis at all (mesh specs such as `P(None, 'model')` were passed in place of logical
        ones, or the model names its residual axis differently: set `model_axes`).
    """
    model, batch, adam = (
        _as_set(model_axes, "model_axes"),
        _as_set(batch_axes, "batch_axes"),
        _as_set(adam_axes, "adam_axes"),
    )
    seen_model_axis = False

    def default_rule(where: str, names: Names) -> MuonDimensionNumbers | None:
        nonlocal seen_model_axis
        named = [set(_entry_names(e)) for e in names]
        if any(n & adam for n in named):
            return None
        matrix = [a for a, n in enumerate(named) if not n & batch]
        is_model = [bool(named[a] & model) for a in matrix]
        seen_model_axis |= any(is_model)
        if len(matrix) < 2 or not any(is_model):
            return None
        if is_model[0]:
            return MuonDimensionNumbers(matrix[0], _one(matrix[1:]))
        if is_model[-1]:
            return MuonDimensionNumbers(_one(matrix[:-1]), matrix[-1])
        raise ValueError(
            f"dimension_numbers_from_logical: parameter {where!r} has logical axes {names}, "
            f"with a model axis ({sorted(model)}) between other matrix axes, so which side of "
            "the matrix each axis is on is not clear. Name its batch axes in batch_axes=, or "
            "pass rule=, a function from the names to MuonDimensionNumbers (or None: AdamW)."
        )

    def leaf(path, x):
        where = path_str(path_names(path))
        if not _is_names(x):
            raise TypeError(
                f"dimension_numbers_from_logical: entry {where!r} is {type(x).__name__}, not "
                f"{_EXPECTED}."
            )
        names = tuple(x)
        if rule is None:
            return default_rule(where, names)
        dims = rule(names)
        if dims is not None and not isinstance(dims, MuonDimensionNumbers):
            raise TypeError(
                f"dimension_numbers_from_logical: rule returned {dims!r} for {where!r} "
                f"({names}); it must return a MuonDimensionNumbers or None (AdamW)."
            )
        return dims

    out = jax.tree_util.tree_map_with_path(leaf, logical_specs, is_leaf=_is_names)
    if rule is None and not seen_model_axis:
        raise ValueError(
            f"dimension_numbers_from_logical: no parameter has a model axis {sorted(model)}, so "
            "every one would go to AdamW. Pass logical specs (nn.get_partition_spec(variables)"
            "['params']), not mesh specs (the output of nn.logical_to_mesh), or set model_axes= "
            "to the name your model gives its residual-stream dimension."
        )
    return out
