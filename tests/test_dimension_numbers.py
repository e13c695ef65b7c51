"""Dimension numbers from logical axis names (issue 12, item 7): 3-D DenseGeneral kernels and
stacked layers trained with Muon, block steps on such kernels sharded on their heads or
head_dim axes against blocks cut by hand, and the flax linen recipe of the README."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax
from muonbp_jax import MuonDimensionNumbers as Dims
from tests import _reference as ref

LOGICAL = {
    "q": P("embed", "heads", "kv"),
    "out": P("heads", "kv", "embed"),
    "wi": P("embed", "mlp"),
    "wo": P("mlp", "embed"),
    "scanned_q": P("embed", "layers", "heads", "kv"),  # nn.scan's axis in the middle
    "scanned_wo": P("layers", "mlp", "embed"),
    "q_bias": P("heads", "kv"),
    "norm": P("embed"),
    "embedding": P("vocab", "embed"),
    "logits": P("embed", "vocab"),
    "unnamed": P(),
    "named_by_hand": ("embed", None),
}


def test_the_default_rule_on_transformer_kernels():
    dims = muonbp_jax.dimension_numbers_from_logical(LOGICAL)
    assert dims == {
        "q": Dims(0, (1, 2)),
        "out": Dims((0, 1), 2),
        "wi": Dims(0, 1),
        "wo": Dims(0, 1),
        "scanned_q": Dims(0, (2, 3)),
        "scanned_wo": Dims(1, 2),
        "q_bias": None,
        "norm": None,
        "embedding": None,
        "logits": None,
        "unnamed": None,
        "named_by_hand": Dims(0, 1),
    }


def test_other_names_and_a_rule():
    maxtext_moe = {"wi": P("exp", "embed_no_exp", "mlp"), "wo": P("exp", "mlp", "embed_no_exp")}
    dims = muonbp_jax.dimension_numbers_from_logical(
        maxtext_moe, model_axes=("embed", "embed_no_exp"), batch_axes=("layers", "exp")
    )
    assert dims == {"wi": Dims(1, 2), "wo": Dims(1, 2)}
    by_rule = muonbp_jax.dimension_numbers_from_logical(
        maxtext_moe, rule=lambda names: Dims(1, 2) if names[0] == "exp" else None
    )
    assert by_rule == {"wi": Dims(1, 2), "wo": Dims(1, 2)}


def test_bad_input_names_the_parameter_and_the_fix():
    with pytest.raises(ValueError, match=r"'layer/w' has logical axes .* between .* batch_axes="):
        muonbp_jax.dimension_numbers_from_logical({"layer": {"w": P("stage", "embed", "mlp")}})
    # Mesh specs (the output of nn.logical_to_mesh) in place of logical ones.
    with pytest.raises(ValueError, match=r"no parameter has a model axis.*not mesh specs"):
        muonbp_jax.dimension_numbers_from_logical({"w": P(None, "model"), "b": P("model")})
    with pytest.raises(TypeError, match=r"entry 'w' is ArrayImpl, not a PartitionSpec"):
        muonbp_jax.dimension_numbers_from_logical({"w": jnp.ones((2, 2))})
    with pytest.raises(TypeError, match=r"rule returned \(0, 1\) for 'w'"):
        muonbp_jax.dimension_numbers_from_logical({"w": P("embed", "mlp")}, rule=lambda n: (0, 1))


# ------------------------------------------------ sharded block steps on multi-axis kernels

EMBED, LAYERS, HEADS, KV = 16, 2, 4, 8
# name: (shape, logical names, mesh spec on the 2x4 ('data', 'model') mesh)
KERNELS = {
    # heads sharded: each device holds whole heads, a contiguous run of the matrix's columns
    "q": ((EMBED, HEADS, KV), P("embed", "heads", "kv"), P("data", "model", None)),
    # head_dim sharded: each device holds a quarter of every head, columns that are not
    # contiguous in the (embed, heads·kv) matrix
    "k": ((EMBED, HEADS, KV), P("embed", "heads", "kv"), P(None, None, "model")),
    "v": ((EMBED, HEADS, KV), P("embed", "heads", "kv"), P(None, None, "model")),
    "out": ((HEADS, KV, EMBED), P("heads", "kv", "embed"), P("model", None, "data")),
    "scanned": (
        (EMBED, LAYERS, HEADS, KV),
        P("embed", "layers", "heads", "kv"),
        P(None, "data", "model", None),
    ),
}
MESH_AXES = {"data": 2, "model": 4}


def _device_slices(shape, spec, coords):
    """The index of the part of an array of `shape` that the device at mesh `coords` holds."""
    index = []
    for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            index.append(slice(None))
        else:
            part = size // MESH_AXES[entry]
            index.append(slice(coords[entry] * part, (coords[entry] + 1) * part))
    return tuple(index)


def _orthogonalize_block(block, dims, matrix_shape, grid):
    """−(block update) of one device's block: its matrices (batch axes first, reduction axes
    make the rows, output axes the columns), Jordan NS in float64, scaled by the block's shape and
    the leaf's block factor (`grid`: how many parts the rows and the columns are cut into)."""
    red = (dims.reduction_axis,) if isinstance(dims.reduction_axis, int) else dims.reduction_axis
    outp = (dims.output_axis,) if isinstance(dims.output_axis, int) else dims.output_axis
    batch = tuple(a for a in range(block.ndim) if a not in red + outp)
    order = batch + red + outp
    rows = int(np.prod([block.shape[a] for a in red]))
    cols = int(np.prod([block.shape[a] for a in outp]))
    mats = block.transpose(order).reshape(-1, rows, cols)
    factor = ref.block_factor(matrix_shape, *grid)
    done = np.stack([-ref.full_update(m, coeffs=ref.JORDAN, steps=5) * factor for m in mats])
    return done.reshape([block.shape[a] for a in order]).transpose(np.argsort(order))


def _block_reference(g, dims, spec):
    red = (dims.reduction_axis,) if isinstance(dims.reduction_axis, int) else dims.reduction_axis
    outp = (dims.output_axis,) if isinstance(dims.output_axis, int) else dims.output_axis
    spec = tuple(spec) + (None,) * (g.ndim - len(spec))
    parts = lambda axes: int(np.prod([MESH_AXES[spec[a]] if spec[a] else 1 for a in axes]))
    matrix_shape = (
        int(np.prod([g.shape[a] for a in red])),
        int(np.prod([g.shape[a] for a in outp])),
    )
    out = np.empty_like(g)
    for i in range(2):
        for j in range(4):
            index = _device_slices(g.shape, spec, {"data": i, "model": j})
            out[index] = _orthogonalize_block(
                g[index], dims, matrix_shape, (parts(red), parts(outp))
            )
    return out


def _full_reference(g, dims):
    return _orthogonalize_block(g, dims, (1, 1), (1, 1))


def test_block_and_full_steps_on_sharded_multi_axis_kernels():
    dims = muonbp_jax.dimension_numbers_from_logical({n: k[1] for n, k in KERNELS.items()})
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    rng = np.random.default_rng(0)
    grads = [
        {n: rng.standard_normal(k[0]).astype(np.float32) for n, k in KERNELS.items()}
        for _ in range(2)
    ]
    tx = muonbp_jax.muonbp(
        1.0,
        beta=0.0,
        nesterov=False,
        period=2,
        ns_coeffs="jordan",
        ns_steps=5,
        ns_dtype=jnp.float32,
        ns_method="newton_schulz",
        muon_weight_dimension_numbers=dims,
    )
    put = lambda t: {n: jax.device_put(v, NamedSharding(mesh, KERNELS[n][2])) for n, v in t.items()}
    with jax.set_mesh(mesh):
        params = put({n: np.zeros_like(v) for n, v in grads[0].items()})
        state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
        full, state = update(put(grads[0]), state, params)
        block, _ = update(put(grads[1]), state, params)
    for name, (_, _, spec) in KERNELS.items():
        expected_full = _full_reference(grads[0][name], dims[name])
        expected_block = _block_reference(grads[1][name], dims[name], spec)
        assert ref.relative_error(full[name], expected_full) < 1e-4, name
        assert ref.relative_error(block[name], expected_block) < 1e-4, name
        # The block reference is not the full one: the test sees the cut.
        assert ref.relative_error(expected_block, _full_reference(grads[1][name], dims[name])) > 0.1


# --------------------------------------------------------------- the flax linen recipe

RULES = (("embed", "data"), ("heads", "model"), ("kv", None), ("vocab", None))


def _linen_model():
    nn = pytest.importorskip("flax.linen")

    class Attention(nn.Module):
        """Logical axis names throughout: embedding, q projection with bias, output."""

        @nn.compact
        def __call__(self, tokens):
            init = nn.initializers.normal(0.5)
            x = nn.Embed(
                32, EMBED, embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed"))
            )(tokens)
            q = nn.DenseGeneral(
                (HEADS, KV),
                kernel_init=nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
                bias_init=nn.with_logical_partitioning(init, ("heads", "kv")),
                name="query",
            )(x)
            return nn.DenseGeneral(
                EMBED,
                axis=(-2, -1),
                use_bias=False,
                kernel_init=nn.with_logical_partitioning(init, ("heads", "kv", "embed")),
                name="out",
            )(jnp.tanh(q))

    return nn, Attention()


def test_linen_logical_partitioning_recipe():
    nn, model = _linen_model()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    tokens = jnp.arange(8).reshape(2, 4)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), tokens)

    # The README's recipe, exactly.
    logical = nn.get_partition_spec(variables)["params"]
    tx = muonbp_jax.muonbp(
        0.1,
        period=2,
        ns_coeffs="jordan",
        ns_dtype="float32",
        ns_method="newton_schulz",
        muon_weight_dimension_numbers=muonbp_jax.dimension_numbers_from_logical(logical),
        specs=nn.logical_to_mesh(logical, RULES),
        mesh=mesh,
    )

    params = nn.unbox(variables["params"])
    kernel_sharding = NamedSharding(mesh, P("data", "model", None))
    assert params["query"]["kernel"].sharding.is_equivalent_to(kernel_sharding, 3)
    loss = lambda p: jnp.sum(model.apply({"params": p}, tokens) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    state = jax.jit(tx.init)(params)
    updates, state = jax.jit(tx.update)(grads, state, params)

    # The first update is a full step: the 3-D kernels are orthogonalized as (embed, heads·kv)
    # and (heads·kv, embed) matrices (of a multiple of the gradient: NS is scale-free).
    for name, dims in [("query", Dims(0, (1, 2))), ("out", Dims((0, 1), 2))]:
        g = np.asarray(grads[name]["kernel"])
        expected = 0.1 * _full_reference(g, dims)
        assert ref.relative_error(updates[name]["kernel"], expected) < 1e-4, name
        assert updates[name]["kernel"].sharding.is_equivalent_to(
            params[name]["kernel"].sharding, g.ndim
        )
    # The embedding and the bias went to AdamW (optax.contrib.muon's settings of it).
    adamw = optax.adamw(0.1, eps=1e-8, nesterov=True, weight_decay=0.0)
    adam_params = {"embedding": params["Embed_0"]["embedding"], "bias": params["query"]["bias"]}
    adam_grads = {"embedding": grads["Embed_0"]["embedding"], "bias": grads["query"]["bias"]}
    expected, _ = adamw.update(adam_grads, adamw.init(adam_params), adam_params)
    np.testing.assert_allclose(updates["Embed_0"]["embedding"], expected["embedding"], rtol=1e-5)
    np.testing.assert_allclose(updates["query"]["bias"], expected["bias"], rtol=1e-5)
