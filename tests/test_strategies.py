"""Full-step strategies: "all_to_all" and "auto" give the same updates as "gather" (and as a
float64 NumPy reference of each whole matrix), on every core layout and on layouts that only
the exchange has to take apart (several cut axes, batch axes sharded, uneven groups); no
strategy gathers a sharded batch axis."""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import muonbp_jax
from muonbp_jax import MuonDimensionNumbers as Dims
from tests import _fixtures as fx
from tests import _reference as ref

# name: Layout(shape, spec, dimension numbers); the 2x4 mesh has data=2, model=4.
LAYOUTS = fx.LAYOUTS | {  # the core suite's layouts, then:
    # three same-shape leaves cut alike: one group of 3 matrices over 4 devices (padded)
    "q": fx.Layout((16, 32), P(None, "model"), Dims()),
    "k": fx.Layout((16, 32), P(None, "model"), Dims()),
    # mesh axes in the opposite order of the mesh's
    "swapped": fx.Layout((16, 32), P("model", "data"), Dims()),
    # layers sharded on 'data', columns on 'model': the exchange runs over 'model' only
    "layers": fx.Layout((4, 16, 32), P("data", None, "model"), Dims(1, 2)),
    # a reduction made of two axes, one of them cut
    "heads": fx.Layout((4, 8, 32), P("data", None, "model"), Dims((0, 1), 2)),
}
# Experts (or stacked layers) sharded on their batch axis: every device holds whole matrices.
EXPERTS = fx.Layout((8, 16, 32), P("model", None, None), Dims(1, 2))
DIMS = {name: layout.dims for name, layout in LAYOUTS.items()}
# An HLO instruction's opcode (not its name): "%all-to-all.3 = (...) all-to-all(%x, ...)".
COLLECTIVE = re.compile(r" (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(")


def _grads(seed: int, names=LAYOUTS) -> dict[str, np.ndarray]:
    return fx.normal_tree(seed, {n: LAYOUTS[n].shape for n in names})


def _reference(g: np.ndarray, dims: Dims) -> np.ndarray:
    """−(full update) of every matrix of g: NS of the whole matrix, scaled by its shape."""
    red = (dims.reduction_axis,) if isinstance(dims.reduction_axis, int) else dims.reduction_axis
    out = (dims.output_axis,) if isinstance(dims.output_axis, int) else dims.output_axis
    batch = tuple(a for a in range(g.ndim) if a not in red + out)
    order = batch + red + out
    rows, cols = np.prod([g.shape[a] for a in red]), np.prod([g.shape[a] for a in out])
    mats = g.transpose(order).reshape(-1, rows, cols)
    done = np.stack([-ref.full_update(m) for m in mats])
    return done.reshape([g.shape[a] for a in order]).transpose(np.argsort(order))


def _updates(
    mode: AxisType, strategy: str, grads, ns_dtype=jnp.float32, hlo: bool = False, layouts=LAYOUTS
):
    mesh = fx.make_mesh(mode)
    names = list(grads)
    specs = {n: layouts[n].spec for n in names}
    auto = {"specs": specs, "mesh": mesh} if mode == AxisType.Auto else {}
    tx = muonbp_jax.muonbp(
        1.0,
        beta=0.0,
        nesterov=False,
        period=1,
        ns_dtype=ns_dtype,
        muon_weight_dimension_numbers={n: layouts[n].dims for n in names},
        full_strategy=strategy,
        **auto,
    )
    with jax.set_mesh(mesh) if mode == AxisType.Explicit else contextlib.nullcontext():
        put = fx.put(grads, mesh, specs)
        state = jax.jit(tx.init)(put)
        compiled = jax.jit(tx.update).lower(put, state, put).compile()
        updates, _ = compiled(put, state, put)
        jax.block_until_ready(updates)
        for n, u in updates.items():
            assert u.sharding.is_equivalent_to(put[n].sharding, u.ndim), n
        updates = {n: np.asarray(u) for n, u in updates.items()}
        return (updates, compiled.as_text()) if hlo else updates


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_strategies_equal_gather_and_reference(mode):
    grads = _grads(0)
    gathered = _updates(mode, "gather", grads)
    for strategy in ("all_to_all", "auto"):
        spread = _updates(mode, strategy, grads)
        for name, g in grads.items():
            expected = _reference(g, DIMS[name])
            assert ref.relative_error(gathered[name], expected) < 1e-4, f"gather, {name}"
            err = ref.relative_error(spread[name], gathered[name])
            assert err < 1e-5, f"{strategy} vs gather, {name}: {err:.1e}"


def test_all_to_all_in_bfloat16_matches_reference():
    grads = _grads(1)
    spread = _updates(AxisType.Auto, "all_to_all", grads, ns_dtype=jnp.bfloat16)
    for name, g in grads.items():
        # bf16 rounding through five iterations: a few % (see test_layouts.TOLERANCE)
        assert ref.relative_error(spread[name], _reference(g, DIMS[name])) < 0.1, name


def test_all_to_all_never_gathers_and_sends_one_exchange_per_axes():
    _, hlo = _updates(AxisType.Auto, "all_to_all", _grads(2), hlo=True)
    found = COLLECTIVE.findall(hlo)
    assert "all-gather" not in found, "all_to_all must not gather the matrices"
    # Leaves cut over the same mesh axes share one all-to-all each way: ('model',),
    # ('data', 'model') and ('model', 'data') give 3 there and 3 back.
    assert found.count("all-to-all") == 6, found


def test_auto_gathers_lone_matrices_and_exchanges_groups():
    names = ["cols", "q", "k", "tiles"]  # cols/q/k: a group of 3; tiles: alone
    _, hlo = _updates(AxisType.Auto, "auto", _grads(3, names), hlo=True)
    found = COLLECTIVE.findall(hlo)
    assert found.count("all-to-all") == 2, found
    assert "all-gather" in found, found


def test_gather_keeps_sharded_batch_axes_local():
    """Each device orthogonalizes its own experts: "gather" gathers matrix axes only, as the
    exchange does, never a sharded batch axis."""
    layouts = {"experts": EXPERTS}
    grads = {"experts": np.random.default_rng(4).standard_normal(EXPERTS.shape).astype(np.float32)}
    updates, hlo = _updates(AxisType.Auto, "gather", grads, hlo=True, layouts=layouts)
    assert "all-gather" not in COLLECTIVE.findall(hlo), "gather all-gathers the experts"
    expected = _reference(grads["experts"], EXPERTS.dims)
    for e, (got, want) in enumerate(zip(updates["experts"], expected)):
        assert ref.relative_error(got, want) < 1e-4, f"expert {e}"


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="full_strategy"):
        muonbp_jax.muonbp(1.0, full_strategy="broadcast")
