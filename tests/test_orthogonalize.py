"""muonbp_jax.orthogonalize against a float64 NumPy Newton–Schulz, optax and the exact polar factor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muonbp_jax
from tests import _reference as ref

RNG = np.random.default_rng(0)
WIDE = RNG.standard_normal((16, 32)).astype(np.float32)
TALL = RNG.standard_normal((32, 16)).astype(np.float32)


def _polar(x: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    return u @ vt


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(jnp.float32, 1e-5), (jnp.bfloat16, 0.15)], ids=["f32", "bf16"]
)
@pytest.mark.parametrize("x", [WIDE, TALL], ids=["wide", "tall"])
def test_matches_float64_reference(x, dtype, tolerance):
    # The defaults (Polar Express): its first step multiplies by up to 23, which amplifies
    # bfloat16 rounding (measured 0.103 here) more than Jordan's coefficients do (below).
    out = muonbp_jax.orthogonalize(jnp.asarray(x), dtype=dtype, method="newton_schulz")
    assert out.dtype == jnp.float32 and out.shape == x.shape
    assert ref.relative_error(out, ref.newton_schulz(x)) < tolerance


@pytest.mark.parametrize("x", [WIDE, TALL], ids=["wide", "tall"])
def test_jordan_in_bfloat16_matches_float64_reference(x):
    out = muonbp_jax.orthogonalize(jnp.asarray(x), "jordan", dtype=jnp.bfloat16)
    assert ref.relative_error(out, ref.newton_schulz(x, ref.JORDAN)) < 0.1


def test_leading_axes_are_independent_batches():
    x = RNG.standard_normal((2, 3, 16, 32)).astype(np.float32)
    out = np.asarray(muonbp_jax.orthogonalize(jnp.asarray(x), dtype=jnp.float32))
    for i in np.ndindex(2, 3):
        assert ref.relative_error(out[i], ref.newton_schulz(x[i])) < 1e-5, i


@pytest.mark.parametrize("preset", ["jordan", "standard"])
def test_jordan_presets_and_triple_agree_with_reference(preset):
    out = muonbp_jax.orthogonalize(jnp.asarray(WIDE), preset, dtype=jnp.float32)
    triple = muonbp_jax.orthogonalize(jnp.asarray(WIDE), ref.JORDAN, dtype=jnp.float32)
    expected = ref.newton_schulz(WIDE, ref.JORDAN)
    assert ref.relative_error(out, expected) < 1e-5
    assert ref.relative_error(triple, expected) < 1e-5


@pytest.mark.parametrize("preconditioning", ["frobenius", "spectral", "aol", "schatten"])
@pytest.mark.parametrize("coeffs", ["jordan", "dion"])
def test_matches_optax_newton_schulz(coeffs, preconditioning):
    # optax's scale_by_muon with beta=0 and no Nesterov returns the orthogonalized gradient.
    optax_coeffs = {"jordan": ref.JORDAN, "dion": optax.contrib._muon._DION_NS_COEFFS}[coeffs]
    grads = {"wide": jnp.asarray(WIDE), "tall": jnp.asarray(TALL)}
    tx = optax.contrib.scale_by_muon(
        ns_coeffs=optax_coeffs,
        beta=0.0,
        nesterov=False,
        preconditioning=preconditioning,
        weight_dimension_numbers=jax.tree.map(lambda _: muonbp_jax.MuonDimensionNumbers(), grads),
    )
    expected, _ = jax.jit(tx.update)(grads, tx.init(grads))
    for name, g in grads.items():
        out = muonbp_jax.orthogonalize(
            g, coeffs, preconditioning=preconditioning, dtype=jnp.float32
        )
        assert ref.relative_error(out, expected[name]) < 1e-5, name


def test_polar_express_converges_to_the_polar_factor():
    x = jnp.asarray(WIDE)
    steps = len(muonbp_jax.NS_COEFFS_PRESETS["polar_express"])
    full = muonbp_jax.orthogonalize(x, "polar_express", steps, dtype=jnp.float32)
    assert ref.relative_error(full, _polar(WIDE)) < 1e-4
    # With Muon's five steps it is already nearer the polar factor than Jordan's iteration.
    five = muonbp_jax.orthogonalize(x, "polar_express", 5, dtype=jnp.float32)
    jordan = muonbp_jax.orthogonalize(x, "jordan", 5, dtype=jnp.float32)
    assert ref.relative_error(five, _polar(WIDE)) < ref.relative_error(jordan, _polar(WIDE))


def test_zero_matrix_stays_zero_and_dtype_is_kept():
    out = muonbp_jax.orthogonalize(jnp.zeros((8, 16), jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert not np.any(np.asarray(out, np.float32))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="rank"):
        muonbp_jax.orthogonalize(jnp.ones(8))
    with pytest.raises(ValueError, match="preset"):
        muonbp_jax.orthogonalize(jnp.ones((4, 8)), "jordna")
    with pytest.raises(ValueError, match="shape"):
        muonbp_jax.orthogonalize(jnp.ones((4, 8)), (1.0, 2.0))
