"""Per-leaf options by key path: one value for every leaf, a (prefix) tree of values matched to
the parameters by key path, or a callable params -> such a tree.

Specs, block grids and dimension numbers are resolved this way, and so is the routing of
`muonbp` (which leaves go to Muon): nothing here knows about meshes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import optax

Path = tuple[str, ...]
PyTree = Any
T = TypeVar("T")
# One value for every leaf, a tree or prefix tree of values (None: no value for that subtree)
# matched to the parameters by key path, or a callable params -> such a tree; `PerLeaf[X]`.
PerLeaf = T | PyTree | Callable[[PyTree], PyTree] | None


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


def leaves_with_paths(tree: PyTree) -> tuple[list[Path], list[Any], Any]:
    """Flattens `tree` (flax Variables are looked through) into paths, leaves and treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_names(p) for p, _ in flat], [x for _, x in flat], treedef


def per_leaf(
    option: PerLeaf[Any],
    tree: PyTree,
    *,
    name: str,
    is_value: Callable[[Any], bool],
    default: Any = None,
    required: bool = False,
    expected: str | None = None,
) -> list[Any]:
    """Resolves a per-leaf option for every leaf of `tree`, by key path.

    `option` is one value for all leaves, a callable tree -> option tree, or a tree (or prefix
    of a tree) of values whose leaves are found by `is_value`; a leaf takes the value at the
    longest matching prefix of its path. Without a match the leaf gets `default`, or, if
    `required`, a ValueError names the leaf. An entry of another type is a TypeError that
    names `expected` (what a value must be, and how to get one).
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
            raise TypeError(
                f"{name}: entry {path_str(path_names(p))!r} is {v!r}, not "
                f"{expected or 'a ' + name}."
            )
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


def check_paths_cover(
    option: PerLeaf[Any],
    params: PyTree,
    *,
    name: str,
    is_value: Callable[[Any], bool],
    expected: str | None = None,
) -> None:
    """Raises if a tree-valued option names a path that matches no parameter (a typo), or
    holds an entry that is not a value (a TypeError naming `expected`)."""
    if option is None or is_value(option) or callable(option):
        return
    # Leaves that optax.partition/optax.masked hide (MaskedNode) still count as parameters.
    param_paths = {
        path_names(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
        )[0]
    }
    prefixes = {p[:k] for p in param_paths for k in range(len(p) + 1)}
    flat, _ = jax.tree_util.tree_flatten_with_path(
        option, is_leaf=lambda x: x is None or is_value(x)
    )
    for p, v in flat:
        if v is not None and not is_value(v):
            raise TypeError(
                f"{name}: entry {path_str(path_names(p))!r} is {v!r}, not "
                f"{expected or 'a ' + name}."
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
