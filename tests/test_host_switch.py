"""`full_step=` (an optax extra argument): the step kind chosen on the host compiles without
the conditional and gives the counter's updates; a kind the counter contradicts is refused
at trace time where it can be, and poisons the update with NaN where it cannot."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import muonbp_jax

PERIOD = 3


def _setup():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal((16,)), jnp.float32),  # AdamW leaf
    }
    grads = [
        jax.tree.map(lambda p, i=i: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        for i in range(2 * PERIOD)
    ]
    tx = muonbp_jax.muonbp(0.1, period=PERIOD, block_learning_rate=0.05, block_grid=(1, 2))
    return params, grads, tx


def test_host_chosen_kind_matches_the_counter_without_a_conditional():
    params, grads, tx = _setup()
    by_counter = jax.jit(tx.update)
    by_host = jax.jit(tx.update, static_argnames="full_step")
    s_counter = s_host = tx.init(params)
    for t, g in enumerate(grads):
        u_counter, s_counter = by_counter(g, s_counter, params)
        full = muonbp_jax.is_full_step(t, PERIOD)
        assert isinstance(full, bool)
        u_host, s_host = by_host(g, s_host, params, full_step=full)
        for a, b in zip(jax.tree.leaves(u_counter), jax.tree.leaves(u_host)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
    hlo = lambda fn, **kw: fn.lower(grads[0], s_host, params, **kw).as_text()
    assert "conditional" in hlo(by_counter) or "case" in hlo(by_counter)
    for full in (True, False):
        text = hlo(by_host, full_step=full)
        assert "conditional" not in text and "stablehlo.case" not in text


def test_a_kind_the_counter_contradicts():
    params, grads, tx = _setup()
    by_host = jax.jit(tx.update, static_argnames="full_step")
    state = tx.init(params)
    updates, _ = by_host(grads[0], state, params, full_step=False)  # update 0 is a full step
    assert np.all(np.isnan(np.asarray(updates["w"])))
    assert np.all(np.isfinite(np.asarray(updates["bias"])))  # AdamW leaves are not MuonBP's
    with pytest.raises(ValueError, match="every update a block step"):
        blockmuon = muonbp_jax.muonbp(0.1, period=None)
        blockmuon.update(grads[0], blockmuon.init(params), params, full_step=True)
    with pytest.raises(TypeError, match="static"):
        jax.jit(functools.partial(tx.update))(grads[0], state, params, full_step=jnp.bool_(True))


def test_forwarded_by_inject_hyperparams_and_nnx():
    import optax
    from flax import nnx

    params, grads, _ = _setup()
    tx = optax.inject_hyperparams(muonbp_jax.muonbp)(learning_rate=0.1, period=PERIOD)
    state = tx.init(params)
    by_host = jax.jit(tx.update, static_argnames="full_step")
    _, state = by_host(grads[0], state, params, full_step=True)
    bad, _ = by_host(grads[1], state, params, full_step=True)  # update 1 is a block step
    assert np.all(np.isnan(np.asarray(bad["w"])))

    model = nnx.Linear(8, 16, use_bias=False, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, muonbp_jax.muonbp(0.1, period=PERIOD), wrt=nnx.Param)
    before = np.asarray(model.kernel[...])
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 8))) ** 2))(model)
    opt.update(model, grads, full_step=False)  # update 0 is a full step: NaN
    assert np.all(np.isnan(np.asarray(model.kernel[...]))) and np.all(np.isfinite(before))
