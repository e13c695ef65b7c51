"""The Gram Newton–Schulz method against a float64 NumPy iteration on the matrix itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import muonbp_jax
from tests import _reference as ref

_PE = ref.POLAR_EXPRESS
RNG = np.random.default_rng(0)


def _power_law(m: int, n: int, alpha: float) -> np.ndarray:
    """An m×n matrix with singular values 1/i^alpha: a heavy tail, like momentum matrices."""
    u, _ = np.linalg.qr(RNG.standard_normal((m, m)))
    v, _ = np.linalg.qr(RNG.standard_normal((n, m)))
    return ((u / np.arange(1, m + 1) ** alpha) @ v.T).astype(np.float32)


def _expected(x: np.ndarray, coeffs) -> np.ndarray:
    mats = x.reshape(-1, *x.shape[-2:])
    return np.stack([ref.newton_schulz(m, coeffs) for m in mats]).reshape(x.shape)


@pytest.mark.parametrize("coeffs", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (3, 16, 48)], ids=["wide", "tall", "batch"])
def test_gram_in_float32_equals_the_plain_iteration(shape, coeffs):
    x = RNG.standard_normal(shape).astype(np.float32)
    out = muonbp_jax.orthogonalize(jnp.asarray(x), coeffs, dtype=jnp.float32, method="gram")
    table = ref.JORDAN if coeffs == "jordan" else _PE
    assert out.dtype == jnp.float32 and out.shape == x.shape
    assert ref.relative_error(out, _expected(x, table)) < 1e-4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_gram_in_half_precision_stays_close(dtype):
    x = RNG.standard_normal((2, 32, 128)).astype(np.float32)
    out = muonbp_jax.orthogonalize(jnp.asarray(x), "polar_express", dtype=dtype, method="gram")
    assert ref.relative_error(out, _expected(x, _PE)) < 0.03


def test_gram_restarts_keep_heavy_tailed_spectra_in_band():
    # Without its restart, the half-precision Gram recursion sends singular values of this
    # matrix above 100 (seen while building it); the plain float64 iteration keeps them <= 1.13.
    x = _power_law(32, 128, alpha=1.5)
    out = muonbp_jax.orthogonalize(jnp.asarray(x), "polar_express", method="gram")
    got = np.linalg.svd(np.asarray(out, np.float64), compute_uv=False)
    want = np.linalg.svd(ref.newton_schulz(x, _PE), compute_uv=False)
    assert np.abs(got - want).max() < 0.05, (got.max(), want.max())


@pytest.mark.parametrize("method", ["newton_schulz", "gram"])
def test_zero_matrices_stay_zero(method):
    # The all-to-all full step pads groups with zero matrices and relies on NS(0) = 0.
    out = muonbp_jax.orthogonalize(jnp.zeros((2, 16, 64)), "polar_express", method=method)
    assert not np.any(np.asarray(out))


def _flops(method: str, shape: tuple[int, int]) -> float:
    fn = jax.jit(lambda x: muonbp_jax.orthogonalize(x, dtype=jnp.float32, method=method))
    return fn.lower(jnp.ones(shape)).compile().cost_analysis()["flops"]


def test_gram_saves_flops_on_wide_matrices_only():
    # Compiled cost: 5 plain steps on 64×256 are 5·(4·64²·256 + 2·64³) ≈ 23.6 MFLOP; the Gram
    # form needs ≈ 15.7. A square matrix gains nothing, so the plain iteration runs.
    assert _flops("gram", (64, 256)) < 0.75 * _flops("newton_schulz", (64, 256))
    assert _flops("gram", (64, 64)) == _flops("newton_schulz", (64, 64))


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        muonbp_jax.orthogonalize(jnp.ones((4, 8)), method="svd")


@pytest.mark.parametrize("product", ["triangular", "panels:2", "panels:3"])
def test_hermitian_products_from_the_lower_triangle_against_float64(product):
    """The Pallas lower-tile kernel (interpreted on CPU) and the XLA block panels give X·Xᵀ and
    the product of two commuting symmetric matrices, their mirrored blocks exactly symmetric."""
    from muonbp_jax import _symmetric

    x = RNG.standard_normal((2, 384, 192)).astype(np.float32)
    xxt = np.einsum("bik,bjk->bij", x.astype(np.float64), x.astype(np.float64))
    g = (xxt / 192).astype(np.float32)
    # a polynomial of g commutes with g: their product is symmetric without a being b.
    h = (0.5 * g + 0.1 * (g @ g) + np.eye(384, dtype=np.float32)).astype(np.float32)
    cases = [(x, x, xxt), (g, h, g.astype(np.float64) @ h.astype(np.float64))]
    for i, (a, b, want) in enumerate(cases):
        if product == "triangular":
            got = _symmetric.triangular_product(jnp.asarray(a), jnp.asarray(b), interpret=True)
        elif i == 0:
            got = _symmetric.gram(jnp.asarray(a), product)
        else:
            got = _symmetric.hermitian_product(jnp.asarray(a), jnp.asarray(b), product)
        got = np.asarray(got, np.float64)
        assert ref.relative_error(got, want) < 1e-5
        block = 128 if product == "triangular" else 384 // int(product.split(":")[1])
        idx = np.arange(384) // block
        off_diagonal = idx[:, None] != idx[None, :]  # the mirrored blocks
        np.testing.assert_array_equal(
            got[:, off_diagonal], np.swapaxes(got, -1, -2)[:, off_diagonal]
        )


@pytest.mark.parametrize("product", ["sparse", "panels:0", "panels:x", None])
def test_unknown_product_is_rejected(product):
    from muonbp_jax._newton_schulz import NewtonSchulz

    with pytest.raises(ValueError, match="Hermitian product"):
        NewtonSchulz.create(product=product)


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1.0, 1e20, 3.4e38])
def test_frobenius_normalization_at_any_scale(scale):
    from muonbp_jax._newton_schulz import _precondition

    x = RNG.standard_normal((3, 16, 40))
    x /= np.abs(x).max()
    v = (x * scale).astype(np.float32)
    got = _precondition(jnp.asarray(v), "frobenius", 1e-8)
    got = np.asarray(got, np.float64)
    norm = np.sqrt(np.square(v.astype(np.float64)).sum(axis=(-2, -1), keepdims=True))
    assert ref.relative_error(got, v / (norm + 1e-8)) < 1e-5


@pytest.mark.parametrize(
    "magnitudes",
    [(1e30, 1.0, 1e-30), (1e-12, 9e-13, 9e-13), (1e-20, 1e-30, 1e-35), (3e38, 1e20, 1e-3)],
    ids=["big-mid-small", "small-dominates-mid", "all-small", "near-max"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.complex64])
def test_frobenius_normalization_of_mixed_magnitudes(magnitudes, dtype):
    """Entries of very different sizes in one matrix: the norm's three partial sums (large,
    medium, small entries) combine as float64 says, whichever dominates."""
    from muonbp_jax._newton_schulz import _precondition

    x = RNG.standard_normal((2, 16, 40))
    if dtype == np.complex64:
        x = x + 1j * RNG.standard_normal(x.shape)
    x /= np.abs(x).max()
    # One entry per matrix at the first magnitude, the rest split between the other two.
    scale = np.where(RNG.random(x.shape) < 0.5, magnitudes[1], magnitudes[2])
    scale[:, 0, 0] = magnitudes[0]
    v = (x * scale).astype(dtype)
    got = np.asarray(_precondition(jnp.asarray(v), "frobenius", 1e-8), np.complex128)
    w = v.astype(np.complex128)
    norm = np.sqrt(np.square(np.abs(w)).sum(axis=(-2, -1), keepdims=True))
    assert np.isfinite(got).all()
    want = w / (norm + 1e-8)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_frobenius_normalization_has_the_plain_formulas_gradient():
    """The one-pass norm differentiates like x / (‖x‖_F + eps) written out directly, zero
    matrices included (where the unused magnitude cases must not turn the gradient NaN)."""
    from muonbp_jax._newton_schulz import _precondition

    x = RNG.standard_normal((5, 8, 16)).astype(np.float32)
    x[1] *= 1e-30  # all entries in the small case
    x[2] = 0.0
    x[3] *= 1e20  # all in the large case: scaled up for the small sum they would overflow
    x[4, 0, 0] = 3e38  # one huge entry among unit ones
    w = jnp.asarray(RNG.standard_normal(x.shape), jnp.float32)
    plain = lambda v: v / (jnp.sqrt(jnp.sum(v * v, axis=(-2, -1), keepdims=True)) + 1e-8)
    got = jax.grad(lambda v: jnp.sum(w * _precondition(v, "frobenius", 1e-8)))(jnp.asarray(x))
    want = jax.grad(lambda v: jnp.sum(w[:1] * plain(v)))(jnp.asarray(x[:1]))
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got[:1]), np.asarray(want), rtol=1e-4, atol=1e-6)
    # At 1e20 the plain formula's squares overflow; scaled by 1e-20 it is exact, and the
    # derivative of a scale-free map scales by 1e-20.
    want3 = jax.grad(lambda v: jnp.sum(w[3:4] * plain(v)))(jnp.asarray(x[3:4] * 1e-20))
    np.testing.assert_allclose(np.asarray(got[3:4]) * 1e20, np.asarray(want3), rtol=1e-4, atol=1e-6)
    # A zero matrix: d(x / eps)/dx = 1/eps.
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(w[2]) / 1e-8, rtol=1e-5)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_frobenius_normalization_makes_a_non_finite_matrix_nan(value):
    """A NaN or inf entry turns its whole matrix NaN, whatever the others' magnitudes (here
    all small: NaN must not fall through to the small-entry case), and no other matrix."""
    from muonbp_jax._newton_schulz import _precondition

    x = (RNG.standard_normal((3, 8, 16)) * 1e-20).astype(np.float32)
    x[0, 2, 3] = value
    got = np.asarray(_precondition(jnp.asarray(x), "frobenius", 1e-8))
    assert np.isnan(got[0]).all()
    assert np.isfinite(got[1:]).all()


def test_same_shape_matrices_are_stacked_in_place_and_kept_apart():
    """orthogonalize_many batches same-shape arrays into one iteration by writing each into its
    slice of one buffer (no concatenate in the program), and every result matches the array
    orthogonalized on its own (float64 Newton–Schulz)."""
    from muonbp_jax._newton_schulz import NewtonSchulz, orthogonalize_many

    ns = NewtonSchulz.create(dtype=jnp.float32, method="newton_schulz")  # Polar Express
    xs = [RNG.standard_normal((b, 8, 24)).astype(np.float32) for b in (2, 1, 3)]
    xs.append(RNG.standard_normal((2, 24, 8)).astype(np.float32))  # a group of its own
    run = jax.jit(lambda ms: orthogonalize_many(ms, ns))
    text = run.lower([jnp.asarray(x) for x in xs]).as_text()
    assert "concatenate" not in text and "dynamic_update_slice" in text
    for x, got in zip(xs, run([jnp.asarray(x) for x in xs])):
        assert got.shape == x.shape
        for g, m in zip(np.asarray(got), x):
            assert ref.relative_error(g, ref.newton_schulz(m)) < 1e-4
