"""Complex matrices (issue 12, item 5): orthogonalized with conjugate transposes, as optax does.

References: the polar factor U·Vᴴ from a complex128 NumPy SVD (with coefficients that
converge, so Newton–Schulz lands on it), hand-split tiles of it for block steps, and
`optax.contrib.muon` itself at period=1.
"""

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

# Polar Express with all 8 of its steps (the last at the fixed point) converges to U·Vᴴ to
# float32 rounding on these well-conditioned random matrices.
CONVERGING = {"ns_coeffs": "polar_express", "ns_steps": 8}
PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")


def _complex(rng, shape) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _polar(x: np.ndarray) -> np.ndarray:
    """U·Vᴴ of the reduced SVD, in complex128."""
    u, _, vh = np.linalg.svd(np.asarray(x, np.complex128), full_matrices=False)
    return u @ vh


def _aol_polar(x: np.ndarray) -> np.ndarray:
    """AOL rescales row i of the wide matrix by 1/sqrt(Σ_j |XXᴴ|_ij) before iterating, which
    changes the polar factor: U·Vᴴ of D·X (Boissin et al. 2025, arXiv 2512.04632)."""
    x = np.asarray(x, np.complex128)
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / np.sqrt(np.abs(y @ y.conj().T).sum(axis=1))[:, None]
    out = _polar(y)
    return out.T if tall else out


def _rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.complex128), np.asarray(expected, np.complex128)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("method", ["newton_schulz", "gram"])
@pytest.mark.parametrize("preconditioning", PRECONDITIONINGS)
def test_orthogonalize_complex_gives_the_polar_factor(preconditioning, method):
    rng = np.random.default_rng(0)
    # Tall (transposed inside), wide, four times wider than tall (the Gram form), a batch.
    for shape in [(4, 3), (4, 16), (2, 3, 8)]:
        x = _complex(rng, shape)
        out = muonbp_jax.orthogonalize(
            jnp.asarray(x),
            **CONVERGING,
            preconditioning=preconditioning,
            dtype=jnp.float32,
            method=method,
        )
        assert out.dtype == jnp.complex64
        polar = _aol_polar if preconditioning == "aol" else _polar
        expected = np.stack([polar(m) for m in x.reshape(-1, *shape[-2:])]).reshape(shape)
        # Measured: ≤ 3e-6. Dropping the imaginary part (the old behaviour) is 0.6 away.
        assert _rel(out, expected) < 2e-5, shape


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, None, "complex64"])
def test_complex_iterates_in_complex64_for_every_ns_dtype(dtype):
    """Complex has no half-precision type: bfloat16/float16 mean complex64, so the result has
    complex64 accuracy (a bfloat16 iteration would be ~1e-2 away)."""
    x = _complex(np.random.default_rng(1), (8, 12))
    out = muonbp_jax.orthogonalize(jnp.asarray(x), **CONVERGING, dtype=dtype)
    assert out.dtype == jnp.complex64
    assert _rel(out, _polar(x)) < 2e-5


def test_complex_ns_dtype_on_real_input_means_float32():
    x = np.random.default_rng(2).standard_normal((8, 12)).astype(np.float32)
    out = muonbp_jax.orthogonalize(jnp.asarray(x), **CONVERGING, dtype="complex64")
    assert out.dtype == jnp.float32
    assert _rel(out, _polar(x)) < 2e-5


def test_the_gram_method_with_jordan_coefficients_matches_a_complex128_newton_schulz():
    """The Gram form computes the plain iteration's polynomial (not U·Vᴴ: the Jordan
    coefficients stop short of it); reference: the plain iteration in complex128 NumPy."""
    x = _complex(np.random.default_rng(3), (4, 16))
    y = x.astype(np.complex128)
    y = y / np.linalg.norm(y)
    for a, b, c in [ref.JORDAN] * 5:
        gram = y @ y.conj().T
        y = a * y + (b * gram + c * gram @ gram) @ y
    out = muonbp_jax.orthogonalize(jnp.asarray(x), "jordan", 5, dtype=jnp.float32, method="gram")
    assert _rel(out, y) < 1e-4
    assert _rel(out, _polar(x)) > 0.05  # the reference really is a different matrix


# --------------------------------------------------------------------------- against optax

SHAPES = {"w1": (16, 32), "w2": (32, 16), "b": (32,), "stack": (2, 16, 32), "real": (16, 32)}
DIMS = {"w1": Dims(), "w2": Dims(), "b": None, "stack": Dims(1, 2), "real": Dims()}
# Each case also picks the Newton–Schulz dtype and method (the Gram form computes the same
# polynomial); options are combined so that the file compiles few programs.
CASES = {
    "standard": ({}, "float32", "newton_schulz"),
    "adaptive_aol": ({"adaptive": True, "preconditioning": "aol"}, "complex64", "gram"),
    "spectral_dion_rms_decay": (
        {
            "preconditioning": "spectral",
            "ns_coeffs": "dion",
            "consistent_rms": 0.2,
            "nesterov": False,
            "weight_decay": 0.1,
        },
        "float32",
        "gram",
    ),
}


def _tree(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(s).astype(np.float32) if k == "real" else _complex(rng, s)
        for k, s in SHAPES.items()
    }


def _run(tx, params, steps=3):
    state, update, out = tx.init(params), jax.jit(tx.update), []
    for step in range(steps):
        updates, state = update(_tree(10 + step), state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


@pytest.mark.parametrize("case", CASES)
def test_period_one_is_optax_muon_on_complex_parameters(case):
    # optax iterates in the parameter dtype (complex64); its adaptive scale keeps the complex
    # sum whose imaginary part is rounding noise, ours its real part.
    kw, ns_dtype, ns_method = CASES[case]
    base = {"muon_weight_dimension_numbers": DIMS, "consistent_rms": None, "ns_coeffs": "standard"}
    kw = base | kw
    params = _tree(0)
    ours = _run(
        muonbp_jax.muonbp(0.05, period=1, ns_dtype=ns_dtype, ns_method=ns_method, **kw), params
    )
    theirs = _run(optax.contrib.muon(0.05, **kw), params)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for name in SHAPES:
            assert a[name].dtype == b[name].dtype == params[name].dtype, name
            # Measured ≤ 3e-6 (float32 rounding in a different order).
            assert _rel(a[name], b[name]) < 1e-4, (step, name)


def test_real_mu_dtype_with_complex_parameters_is_refused():
    params = {"w": jnp.ones((8, 16), jnp.complex64), "b": jnp.ones((16,), jnp.complex64)}
    tx = muonbp_jax.muonbp(1e-2, mu_dtype=jnp.bfloat16)
    message = r"mu_dtype=bfloat16 .* complex parameter 'b'.*mu_dtype=None"
    with pytest.raises(TypeError, match=message):
        tx.init(params)
    with pytest.raises(TypeError, match=r"complex parameter 'w'"):
        muonbp_jax.scale_by_muonbp(mu_dtype="bfloat16").init({"w": params["w"]})


# --------------------------------------------------------------- sharded block and full steps

# name: (shape, spec, dimension numbers, (row parts, col parts) of a device's block on 2x4)
LAYOUTS = {
    "cols": ((16, 32), P(None, "model"), Dims(), (1, 4)),
    "tiles": ((16, 32), P("data", "model"), Dims(), (2, 4)),
    "rows": ((32, 16), P("model", None), Dims(), (4, 1)),
    "stacked": ((2, 16, 32), P(None, None, "model"), Dims(1, 2), (1, 4)),
    # same shape and cuts as "cols": a group of two complex matrices (split by all_to_all) ...
    "twin": ((16, 32), P(None, "model"), Dims(), (1, 4)),
    # ... next to a real one of the same shape (a group of its own: dtypes never mix)
    "real": ((16, 32), P(None, "model"), Dims(), (1, 4)),
}


def _sharded_updates(strategy: str, adaptive: bool, period, steps: int) -> tuple[list, list]:
    """`steps` updates from zero parameters, one gradient each, on a 2x4 Auto mesh."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = {n: lay[1] for n, lay in LAYOUTS.items()}
    rng = np.random.default_rng(4)
    draw = lambda n, shape: (
        rng.standard_normal(shape).astype(np.float32) if n == "real" else _complex(rng, shape)
    )
    grads = [{n: draw(n, lay[0]) for n, lay in LAYOUTS.items()} for _ in range(steps)]
    # beta=0 without Nesterov: each update orthogonalizes that step's gradient. Default
    # ns_dtype (bfloat16): complex leaves iterate in complex64, the real one in bfloat16.
    tx = muonbp_jax.muonbp(
        1.0,
        beta=0.0,
        nesterov=False,
        period=period,
        adaptive=adaptive,
        full_strategy=strategy,
        specs=specs,
        mesh=mesh,
        muon_weight_dimension_numbers={n: l[2] for n, l in LAYOUTS.items()},
        **CONVERGING,
    )
    put = lambda t: {n: jax.device_put(v, NamedSharding(mesh, specs[n])) for n, v in t.items()}
    params = put({n: np.zeros_like(v) for n, v in grads[0].items()})
    state, update, out = jax.jit(tx.init)(params), jax.jit(tx.update), []
    for g in grads:
        updates, state = update(put(g), state, params)
        for n, u in updates.items():
            assert u.sharding.is_equivalent_to(params[n].sharding, u.ndim), n
        out.append({n: np.asarray(u) for n, u in updates.items()})
    return grads, out


def _expected(g: np.ndarray, parts: tuple[int, int], adaptive: bool) -> np.ndarray:
    """−(update) of each matrix of g cut into `parts` tiles: O, the polar factor of every tile
    (cut by slicing) put back in place, times Re⟨g, O⟩ over the whole leaf if adaptive, times
    the tile's shape scale and the block factor."""
    mats = g.reshape(-1, *g.shape[-2:])
    o = np.stack([np.block([[_polar(t) for t in r] for r in ref.split(m, *parts)]) for m in mats])
    o = o.reshape(g.shape)
    if adaptive:
        o = np.real(np.sum(np.conj(g.astype(np.complex128)) * o)) * o
    rows, cols = g.shape[-2] // parts[0], g.shape[-1] // parts[1]
    return -o * ref.rms_scale(rows, cols) * ref.block_factor(g.shape[-2:], *parts)


def _check(updates, grads, block: bool, adaptive: bool) -> None:
    for name, (_, _, _, parts) in LAYOUTS.items():
        assert updates[name].dtype == grads[name].dtype, name
        # Complex leaves iterate in complex64 (measured ≤ 5e-6), the real one in bfloat16 (~4%);
        # a block update differs from the full one by more than 30%.
        tolerance = 0.1 if name == "real" else 1e-4
        expected = _expected(grads[name], parts if block else (1, 1), adaptive)
        assert _rel(updates[name], expected) < tolerance, (name, block)


def test_complex_full_then_block_step_on_a_sharded_mesh_adaptive():
    """period=2: a full step ("auto": the two-matrix group split, lone matrices gathered), then
    a block step; adaptive sums Re⟨m, o⟩ over the whole sharded leaf on both."""
    grads, (full, block) = _sharded_updates("auto", adaptive=True, period=2, steps=2)
    _check(full, grads[0], block=False, adaptive=True)
    _check(block, grads[1], block=True, adaptive=True)


@pytest.mark.parametrize("strategy", ["gather", "all_to_all"])
def test_complex_full_step_on_a_sharded_mesh(strategy):
    grads, (full,) = _sharded_updates(strategy, adaptive=False, period=1, steps=1)
    _check(full, grads[0], block=False, adaptive=False)
