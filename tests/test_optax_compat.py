"""muonbp(period=1, ns_dtype=float32) against optax.contrib.muon itself, and the default routing
of embeddings, heads and non-matrix leaves to optax.adamw."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import muonbp_jax
from muonbp_jax import MuonDimensionNumbers
from tests import _fixtures as fx
from tests import _reference as ref

SHAPES = {"w1": (16, 32), "w2": (32, 16), "b": (32,), "stack": (2, 16, 32)}
DIMS = {
    "w1": MuonDimensionNumbers(),
    "w2": MuonDimensionNumbers(),
    "b": None,
    "stack": MuonDimensionNumbers(reduction_axis=1, output_axis=2),
}
STEPS = 3
LR = 0.05


def _tree(seed: int) -> dict[str, np.ndarray]:
    return fx.normal_tree(seed, SHAPES)


def _run(tx, params, put=lambda t: t):
    """Updates of `STEPS` steps on a noisy quadratic: each optimizer follows its own path."""
    target = _tree(100)
    params = put(params)
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    out = []
    for step in range(STEPS):
        noise = _tree(200 + step)
        grads = put({k: np.asarray(params[k]) - target[k] + noise[k] for k in params})
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(jax.block_until_ready(updates))
    return out


def _assert_same_updates(ours, theirs, tolerance=1e-4):
    # Measured differences are ~1e-6 (float32 rounding in a different order of operations).
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for name in b:
            err = ref.relative_error(a[name], b[name])
            assert err < tolerance, f"step {step}, {name}: relative error {err:.2e}"


KWARGS = {
    "defaults": {},
    "no_nesterov_rms_decay": {"nesterov": False, "consistent_rms": 0.2, "weight_decay": 0.1},
    "weight_decay_mask": {
        "weight_decay": 0.1,
        "weight_decay_mask": {"w1": True, "w2": False, "b": False, "stack": True},
    },
    "adaptive": {"adaptive": True},
    "dion": {"ns_coeffs": "dion", "consistent_rms": 0.2},
    "aol_callable_dims": {
        "preconditioning": "aol",
        "muon_weight_dimension_numbers": lambda params: DIMS,
    },
    "schatten": {"preconditioning": "schatten", "consistent_rms": 0.2},
    "adam_options": {
        "adam_b1": 0.8,
        "adam_b2": 0.99,
        "adam_weight_decay": 0.01,
        "adam_learning_rate": 0.01,
        "beta": 0.9,
    },
    "ns_steps_eps_mu_dtype": {"ns_steps": 4, "eps": 1e-6, "mu_dtype": jnp.bfloat16},
}


@pytest.mark.parametrize("kw", KWARGS.values(), ids=KWARGS.keys())
def test_period_one_is_optax_muon(kw):
    kw = {"muon_weight_dimension_numbers": DIMS, "consistent_rms": None} | kw
    # optax's default coefficients are Jordan's ("standard"); ours are Polar Express.
    ours = muonbp_jax.muonbp(LR, period=1, ns_dtype=jnp.float32, **({"ns_coeffs": "standard"} | kw))
    theirs = optax.contrib.muon(LR, **kw)
    params = _tree(0)
    _assert_same_updates(_run(ours, params), _run(theirs, params))


def test_period_one_is_optax_muon_on_a_sharded_explicit_mesh():
    mesh = fx.make_mesh(AxisType.Explicit)
    specs = {
        "w1": P(None, "model"),
        "w2": P("data", "model"),
        "b": P("model"),
        "stack": P(None, None, "model"),
    }
    put = lambda tree: fx.put(tree, mesh, specs)
    kw = {"muon_weight_dimension_numbers": DIMS, "consistent_rms": 0.2}
    params = _tree(0)
    with jax.set_mesh(mesh):
        ours = _run(
            muonbp_jax.muonbp(LR, period=1, ns_dtype=jnp.float32, ns_coeffs="standard", **kw),
            params,
            put,
        )
    theirs = _run(optax.contrib.muon(LR, **kw), params)
    _assert_same_updates(ours, theirs)


ROUTED = {
    "embed": {"embedding": (64, 16)},
    "wte": (64, 16),
    "lm_head": {"kernel": (16, 64)},
    "norm": {"scale": (16,)},
    "layer": {"kernel": (16, 32), "bias": (32,)},
    "stack": (2, 16, 32),
}
ADAM_LEAVES = [
    ("embed", "embedding"),
    ("wte",),
    ("lm_head", "kernel"),
    ("norm", "scale"),
    ("layer", "bias"),
    ("stack",),
]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_default_routing_sends_embeddings_heads_and_vectors_to_adamw():
    rng = np.random.default_rng(3)
    params = jax.tree.map(
        lambda s: rng.standard_normal(s).astype(np.float32),
        ROUTED,
        is_leaf=lambda s: isinstance(s, tuple),
    )
    labels = muonbp_jax.default_muon_labels(params)
    assert [p for p in ADAM_LEAVES if _get(labels, p) != "adam"] == []
    assert labels["layer"]["kernel"] == "muon"

    tx = muonbp_jax.muonbp(LR, ns_dtype=jnp.float32, weight_decay=0.0)
    adam_params = {"/".join(p): _get(params, p) for p in ADAM_LEAVES}
    # optax.contrib.muon gives its AdamW branch eps=1e-8, Nesterov and no weight decay.
    adamw = optax.adamw(LR, eps=1e-8, nesterov=True, weight_decay=0.0)
    state, adam_state = tx.init(params), adamw.init(adam_params)
    update = jax.jit(tx.update)
    for step in range(2):
        grads = jax.tree.map(lambda x, s=step: x * (s + 1) + 0.5, params)
        updates, state = update(grads, state, params)
        adam_grads = {"/".join(p): _get(grads, p) for p in ADAM_LEAVES}
        adam_updates, adam_state = adamw.update(adam_grads, adam_state, adam_params)
        for p in ADAM_LEAVES:
            np.testing.assert_allclose(
                _get(updates, p), adam_updates["/".join(p)], rtol=1e-5, err_msg=f"step {step}, {p}"
            )
        # The one Muon leaf: a full step of its momentum (the gradient at the first step).
        if step == 0:
            expected = -LR * ref.full_update(np.asarray(grads["layer"]["kernel"]))
            assert ref.relative_error(updates["layer"]["kernel"], expected) < 1e-4

    def moments(tree):
        (found,) = [
            s
            for s in jax.tree.leaves(tree, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)
        ]
        return found

    ours, theirs = moments(state), moments(adam_state)
    for p in ADAM_LEAVES:
        for field in ("mu", "nu"):
            np.testing.assert_allclose(
                _get(getattr(ours, field), p), getattr(theirs, field)["/".join(p)], rtol=1e-5
            )
