"""Block and full steps on every supported layout, against hand-split float64 references.

One parameter tree holds every layout (each leaf with its own PartitionSpec), so a mode and
dtype compile once: Auto meshes get `specs=`, Explicit meshes read the specs off the types.
"""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax
from muonbp_jax import MuonDimensionNumbers as Dims
from tests import _fixtures as fx
from tests import _reference as ref

# name: Layout(shape, spec, dimension numbers, (row parts, col parts) of one device's block on
# the 2x4 mesh): the core layouts of tests/_fixtures.py and two with sharded batch axes.
LAYOUTS = fx.LAYOUTS | {
    # Sharded batch axes: whole matrices per device (experts), or layers and columns.
    "experts": fx.Layout((4, 16, 32), P("model", None, None), Dims(1, 2), (1, 1)),
    "stacked_tp": fx.Layout((2, 16, 32), P("data", None, "model"), Dims(1, 2), (1, 4)),
}
SPECS = {name: layout.spec for name, layout in LAYOUTS.items()}
DIMS = {name: layout.dims for name, layout in LAYOUTS.items()}
# Relative Frobenius error allowed against the float64 reference, per Newton–Schulz dtype. bf16
# rounding, amplified by five iterations, gives up to ~7% on these small matrices with Jordan's
# coefficients and up to ~10% with the default Polar Express (its first step multiplies by up to
# 23); a block update differs from the full one by more than 40%, so either bound tells the two
# apart.
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 0.15}
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)")


def _context(mode: AxisType, mesh):
    # Explicit mode needs the mesh set for jit(init); Auto mode gets it through mesh=.
    return jax.set_mesh(mesh) if mode == AxisType.Explicit else contextlib.nullcontext()


def _grads(seed: int) -> dict[str, np.ndarray]:
    return fx.normal_tree(seed, {name: layout.shape for name, layout in LAYOUTS.items()})


def _put(tree: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    return fx.put(tree, mesh, SPECS)


def _matrices(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, *x.shape[-2:])


def _expected(grads, kind: str) -> dict[str, np.ndarray]:
    """Reference update with learning rate 1: −(full or block update) of each matrix."""
    out = {}
    for name, g in grads.items():
        parts = (1, 1) if kind == "full" else LAYOUTS[name].parts
        out[name] = -np.stack([ref.block_update(m, *parts) for m in _matrices(g)]).reshape(g.shape)
    return out


def _tx(mode: AxisType, mesh, ns_dtype, period, **kw):
    # beta=0 and no Nesterov make the momentum equal to the gradient, so each update is the
    # orthogonalized gradient of that step.
    auto = {"specs": SPECS, "mesh": mesh} if mode == AxisType.Auto else {}
    return muonbp_jax.muonbp(
        1.0,
        beta=0.0,
        nesterov=False,
        period=period,
        ns_dtype=ns_dtype,
        muon_weight_dimension_numbers=DIMS,
        **auto,
        **kw,
    )


@pytest.mark.parametrize("ns_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_full_then_block_step_match_reference(mode, ns_dtype):
    mesh = fx.make_mesh(mode)
    tx = _tx(mode, mesh, ns_dtype, period=2)
    with _context(mode, mesh):
        params = _put(_grads(0), mesh)
        state = jax.jit(tx.init)(params)
        for name, mu in fx.muon_state(state).mu.items():
            assert mu.sharding.is_equivalent_to(params[name].sharding, mu.ndim), name
        update = jax.jit(tx.update)
        for step, kind in enumerate(["full", "block"]):
            grads = _grads(step + 1)
            updates, state = update(_put(grads, mesh), state, params)
            jax.block_until_ready(updates)
            expected = _expected(grads, kind)
            for name, u in updates.items():
                err = ref.relative_error(u, expected[name])
                assert err < TOLERANCE[ns_dtype], f"{kind} step, {name}: relative error {err:.2e}"
                assert u.sharding.is_equivalent_to(params[name].sharding, u.ndim), (
                    f"{kind} step, {name}: update sharded as {u.sharding}, parameter as "
                    f"{params[name].sharding}"
                )
        for name, mu in fx.muon_state(state).mu.items():
            assert mu.sharding.is_equivalent_to(params[name].sharding, mu.ndim), name
        assert update._cache_size() == 1


def _computations(hlo: str) -> dict[str, str]:
    """HLO module text → {computation name: body}."""
    found = re.findall(r"^(?:ENTRY )?%(\S+) .*?\{\n(.*?)^\}", hlo, flags=re.MULTILINE | re.DOTALL)
    return dict(found)


def _reachable(comps: dict[str, str], roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += re.findall(
                r"%([\w.\-]+)",
                " ".join(
                    re.findall(
                        r"(?:calls|to_apply|body|condition|branch_computations|"
                        r"true_computation|false_computation)=\{?([^}\s]*(?:, %[^},\s]*)*)",
                        comps[name],
                    )
                ),
            )
    return seen


def _compiled_update(mode: AxisType, period, **kw) -> str:
    mesh = fx.make_mesh(mode)
    tx = _tx(mode, mesh, jnp.bfloat16, period=period, **kw)
    with _context(mode, mesh):
        params = _put(_grads(0), mesh)
        state = jax.jit(tx.init)(params)
        return jax.jit(tx.update).lower(params, state, params).compile().as_text()


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_block_muon_never_communicates_and_muon_gathers(mode):
    never = _compiled_update(mode, period=None)
    assert not COLLECTIVE.findall(never), "period=None must not communicate"
    # The paper's full step gathers; the default strategy may move whole matrices instead.
    gather = _compiled_update(mode, period=1, full_strategy="gather")
    assert "all-gather" in gather, "period=1 must gather the sharded matrices"
    assert COLLECTIVE.search(_compiled_update(mode, period=1)), "period=1 must communicate"


def test_collectives_stay_inside_the_full_step_branch():
    comps = _computations(_compiled_update(AxisType.Auto, period=5))
    (branches,) = re.findall(
        r"conditional\(.*branch_computations=\{([^}]*)\}", "\n".join(comps.values())
    )
    block, full = re.findall(r"%([\w.\-]+)", branches)  # lax.cond: branch 0 is the false one
    with_collectives = {name for name, body in comps.items() if COLLECTIVE.search(body)}
    assert with_collectives, "the full step must gather"
    assert not with_collectives & _reachable(comps, [block]), "block step communicates"
    assert with_collectives <= _reachable(comps, [full]), "collectives outside the full step"


@pytest.mark.parametrize("ns_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_block_grid_on_one_device_equals_eight_device_blocks(ns_dtype):
    rng = np.random.default_rng(7)
    grads = {"cols": rng.standard_normal((16, 32)), "rows": rng.standard_normal((32, 16))}
    grads = {k: v.astype(np.float32) for k, v in grads.items()}
    kw = {"beta": 0.0, "nesterov": False, "period": None, "ns_dtype": ns_dtype}

    one = muonbp_jax.muonbp(1.0, block_grid={"cols": (1, 8), "rows": (8, 1)}, **kw)
    single = {k: jax.device_put(v, jax.devices()[0]) for k, v in grads.items()}
    local, _ = jax.jit(one.update)(single, one.init(single), single)

    mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Explicit,))
    specs = {"cols": P(None, "model"), "rows": P("model", None)}
    eight = muonbp_jax.muonbp(1.0, **kw)
    with jax.set_mesh(mesh):
        sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in grads.items()}
        spread, _ = jax.jit(eight.update)(sharded, jax.jit(eight.init)(sharded), sharded)

    for name, parts in [("cols", (1, 8)), ("rows", (8, 1))]:
        expected = -ref.block_update(grads[name], *parts)
        assert ref.relative_error(spread[name], expected) < TOLERANCE[ns_dtype], name
        # The same arithmetic on other layouts: float32 matmuls may sum in another order.
        np.testing.assert_allclose(local[name], spread[name], rtol=0, atol=1e-5, err_msg=name)
