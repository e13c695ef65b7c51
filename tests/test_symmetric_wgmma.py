"""The Hopper lower-tile kernel (`muonbp_jax._symmetric_wgmma`) where no GPU is: its tile
schedule against a hand enumeration, its lowering for CUDA (which checks the kernel against
the installed jax's Mosaic GPU API), and when `ns_product="auto"` picks it. Its numbers are
checked on a GPU against float64 by `benchmarks/bench_symmetric.py`."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import muonbp_jax
from muonbp_jax import _symmetric, _symmetric_wgmma
from muonbp_jax._newton_schulz import NewtonSchulz


@pytest.mark.parametrize("t", [2, 4, 6, 16])
def test_the_tile_schedule_visits_every_lower_tile_once(t):
    i, j = _symmetric_wgmma._lower_tile(jnp.arange(t * (t + 1) // 2, dtype=jnp.int32), t)
    visited = list(zip(np.asarray(i).tolist(), np.asarray(j).tolist()))
    expected = [(r, c) for r in range(t) for c in range(r + 1)]
    assert sorted(visited) == expected  # each lower tile once, nothing above the diagonal


@pytest.mark.parametrize(
    "shape, dtype",
    [((2, 256, 512), jnp.float16), ((3, 512, 256), jnp.bfloat16), ((2, 2, 256, 128), jnp.float16)],
)
def test_the_kernel_lowers_for_cuda(shape, dtype):
    a = jax.ShapeDtypeStruct(shape, dtype)
    fn = jax.jit(functools.partial(_symmetric_wgmma.lower_tile_product, num_sms=132))
    lowered = fn.trace(a, a).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()  # the kernel, not a fallback
    assert lowered.out_info.shape == (*shape[:-1], shape[-2])
    assert lowered.out_info.dtype == dtype


@pytest.mark.parametrize(
    "shape, dtype", [((2, 512, 256), jnp.float16), ((3, 2048, 1024), jnp.bfloat16)]
)
def test_the_transposed_kernel_lowers_for_cuda(shape, dtype):
    # Xᵀ·X of tall (k, m) matrices, read as column panels: no transpose before the kernel
    a = jax.ShapeDtypeStruct(shape, dtype)
    fn = functools.partial(_symmetric_wgmma.lower_tile_product, num_sms=132, transposed=True)
    lowered = jax.jit(fn).trace(a, a).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "mosaic_gpu" in text and "stablehlo.transpose" not in text
    assert lowered.out_info.shape == (*shape[:-2], shape[-1], shape[-1])


def _lowered(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def test_vmap_is_one_launch_with_the_mapped_axis_as_a_batch():
    a = jax.ShapeDtypeStruct((5, 2, 256, 512), jnp.float16)
    product = functools.partial(_symmetric_wgmma.lower_tile_product, num_sms=132)
    lowered = _lowered(jax.vmap(lambda x: product(x, x)), a)
    text = lowered.as_text()
    assert "stablehlo.while" not in text  # no loop over the mapped axis
    kernel_launches = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert len(kernel_launches) == 1
    assert "tensor<10x256x512xf16>" in kernel_launches[0]  # 5 × 2 folded into the batch
    assert lowered.out_info.shape == (5, 2, 256, 256)


def test_the_kernel_has_a_derivative_made_of_xla_matmuls():
    a = jax.ShapeDtypeStruct((2, 256, 512), jnp.float16)
    product = functools.partial(_symmetric_wgmma.lower_tile_product, num_sms=132)
    loss = lambda x: jnp.sum(product(x, x).astype(jnp.float32))
    text = _lowered(jax.value_and_grad(loss), a).as_text()
    assert "mosaic_gpu" in text and "dot_general" in text
    # Forward-mode too, as jax.jvp and jax.linearize use it.
    text = _lowered(lambda x: jax.jvp(lambda v: product(v, v), (x,), (x,)), a).as_text()
    assert "mosaic_gpu" in text and "dot_general" in text


@pytest.mark.parametrize(
    "shape, dtype", [((2, 256, 512), jnp.float32), ((2, 128, 512), jnp.float16)]
)
def test_the_kernel_refuses_what_it_does_not_take(shape, dtype):
    a = jnp.zeros(shape, dtype)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        _symmetric_wgmma.lower_tile_product(a, a, num_sms=132)


def _device(platform, capability=None):
    return SimpleNamespace(
        platform=platform, compute_capability=capability, device_kind=f"{platform} {capability}"
    )


@pytest.mark.parametrize(
    "device, expected",
    [
        (_device("gpu", "9.0"), "wgmma"),
        (_device("gpu", "8.0"), "dense"),
        (_device("gpu", "10.0"), "dense"),
        (_device("cpu"), "dense"),
        (_device("tpu"), "dense"),
    ],
)
def test_auto_product_is_the_kernel_on_hopper_only(device, expected):
    assert _symmetric.resolve_product("auto", device) == expected
    assert NewtonSchulz.create(device=device).product == expected


def test_asking_for_the_kernel_off_hopper_is_an_error():
    for product in ("wgmma", "wgmma-unfused"):
        with pytest.raises(ValueError, match="Hopper"):
            _symmetric.resolve_product(product, _device("gpu", "8.0"))
        with pytest.raises(ValueError, match="Hopper"):
            NewtonSchulz.create(product=product, device=_device("cpu"))


def test_a_non_gpu_platform_keeps_xla_matmuls_whatever_the_default_device():
    assert NewtonSchulz.create(platform="tpu").product == "dense"
    assert NewtonSchulz.create(device=_device("cpu")).product == "dense"


def test_a_jax_without_the_mosaic_calls_falls_back_to_xla(monkeypatch):
    monkeypatch.setattr(_symmetric_wgmma, "api_available", lambda: False)
    assert _symmetric.resolve_product("auto", _device("gpu", "9.0")) == "dense"
    with pytest.raises(ValueError, match="Mosaic GPU"):
        _symmetric.resolve_product("wgmma", _device("gpu", "9.0"))


def test_this_jax_has_the_mosaic_calls():
    assert _symmetric_wgmma.api_available()  # else "auto" would never pick the kernel


def test_empty_batches_are_not_sent_to_the_kernel():
    assert not _symmetric_wgmma.supported(jnp.zeros((0, 256, 256), jnp.float16))


def test_an_unknown_ns_product_is_rejected_at_construction():
    with pytest.raises(ValueError, match="ns_product"):
        muonbp_jax.muonbp(0.01, ns_product="cublas")


@pytest.mark.parametrize("own_tile", ["tma", "direct"])
@pytest.mark.parametrize("alpha", [0.0, 3.4445])
def test_the_polynomial_kernel_lowers_for_cuda(own_tile, alpha):
    r = jax.ShapeDtypeStruct((3, 512, 512), jnp.float16)
    fn = functools.partial(
        _symmetric_wgmma.square_polynomial,
        alpha=alpha,
        beta=-4.775,
        gamma=2.0315,
        tiling=_symmetric_wgmma.Tiling(own_tile=own_tile),
        num_sms=132,
    )
    lowered = _lowered(fn, r)
    launches = [line for line in lowered.as_text().splitlines() if "stablehlo.custom_call" in line]
    assert len(launches) == 1 and "mosaic_gpu" in launches[0]  # no XLA pass around it
    assert lowered.out_info.shape == r.shape


def test_the_polynomial_kernel_refuses_non_square_matrices():
    with pytest.raises(ValueError, match="square"):
        _lowered(
            lambda r: _symmetric_wgmma.square_polynomial(r, 1.0, 1.0, 1.0, num_sms=8),
            jax.ShapeDtypeStruct((2, 256, 512), jnp.float16),
        )


def test_the_xla_polynomial_matches_float64():
    x = np.random.default_rng(0).standard_normal((2, 96, 96))
    r = (x + np.swapaxes(x, -1, -2)) / 20
    alpha, beta, gamma = 3.4445, -4.775, 2.0315
    want = alpha * np.eye(96) + beta * r + gamma * r @ r
    got = _symmetric.square_polynomial(jnp.asarray(r, jnp.float32), alpha, beta, gamma)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max())
    got = _symmetric.square_polynomial(jnp.asarray(r, jnp.float32), 0.0, beta, gamma)
    np.testing.assert_allclose(
        np.asarray(got), want - alpha * np.eye(96), atol=1e-4 * np.abs(want).max()
    )


def test_newton_schulz_on_hopper_forms_its_polynomials_in_the_kernel():
    hopper = SimpleNamespace(platform="gpu", compute_capability="9.0", device_kind="H200")
    x = jax.ShapeDtypeStruct((4, 512, 2048), jnp.float32)  # Gram form: R 512 × 512
    counts = {}
    for product in ("wgmma", "wgmma-unfused", "dense"):
        ns = NewtonSchulz.create(device=hopper, product=product, dtype=jnp.float16)
        assert ns.product == product
        lines = _lowered(ns, x).as_text().splitlines()
        launches = sum("stablehlo.custom_call" in line for line in lines)
        # XLA additions on R-sized matrices: the polynomials' sums, when not in the kernel
        sums = sum("stablehlo.add" in line and "4x512x512xf16" in line for line in lines)
        counts[product] = launches, sums
    assert counts["dense"][0] == 0 and counts["dense"][1] > 0
    assert counts["wgmma-unfused"] == (counts["wgmma"][0], counts["dense"][1])
    assert counts["wgmma"][0] > 0 and counts["wgmma"][1] == 0


def test_tall_matrices_are_iterated_without_a_transposed_copy():
    # A tall X is iterated on XᵀX (the kernel's column panels) and X·Q: no transpose of X in
    # the program, and the same number of kernel launches as for its wide transpose.
    hopper = SimpleNamespace(platform="gpu", compute_capability="9.0", device_kind="H200")
    ns = NewtonSchulz.create(device=hopper, dtype=jnp.float16)
    texts = {
        shape: _lowered(ns, jax.ShapeDtypeStruct(shape, jnp.float32)).as_text()
        for shape in ((4, 2048, 512), (4, 512, 2048))
    }
    for shape, text in texts.items():
        assert f"tensor<{shape[0]}x{shape[1]}x{shape[2]}xf16>" in text
        assert not any(
            "stablehlo.transpose" in line and "2048" in line for line in text.splitlines()
        )
    launches = [text.count("stablehlo.custom_call") for text in texts.values()]
    assert launches[0] == launches[1] > 0


def _dense_run(a, b, tiling, num_sms, poly, transposed):
    # A stand-in for the kernel, to check the rules around it on the CPU: float32 products.
    spec = "...ki,...kj->...ij" if transposed else "...ik,...jk->...ij"
    out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    if poly is not None:
        alpha, beta, gamma = poly
        out = alpha * jnp.eye(a.shape[-1]) + beta * a.astype(jnp.float32) + gamma * out
    return out.astype(a.dtype)


def test_the_vmap_and_derivative_rules_match_float64(monkeypatch):
    monkeypatch.setattr(_symmetric_wgmma, "_run", _dense_run)
    _symmetric_wgmma._batchable.cache_clear()
    rng = np.random.default_rng(1)
    x64 = rng.standard_normal((3, 2, 256, 512)) / 16
    s64 = rng.standard_normal((3, 256, 256)) / 16
    s64 = s64 + np.swapaxes(s64, -1, -2)
    w64 = rng.standard_normal((3, 2, 256, 256))
    t = lambda v: np.swapaxes(v, -1, -2)
    x, s, w = (jnp.asarray(v, jnp.float32) for v in (x64, s64, w64))
    fn = _symmetric_wgmma.lower_tile_product
    poly = functools.partial(_symmetric_wgmma.square_polynomial, alpha=3.0, beta=-4.0, gamma=2.0)
    loss = lambda v, w: jnp.sum(w * fn(v, v))
    xt = jnp.swapaxes(x, -1, -2)  # (3, 2, 512, 256): tall
    tfn = functools.partial(fn, transposed=True)
    tloss = lambda v, w: jnp.sum(w * tfn(v, v))
    cases = [
        (jax.vmap(lambda v: fn(v, v))(x), x64 @ t(x64)),
        (jax.vmap(lambda v: fn(v, x[0]), in_axes=0)(x), x64 @ t(x64[0])),  # b not mapped
        (jax.vmap(lambda v: fn(x[0], v))(x), x64[0] @ t(x64)),  # a not mapped
        (jax.grad(loss)(x, w), (w64 + t(w64)) @ x64),
        (jax.vmap(jax.grad(loss))(x, w), (w64 + t(w64)) @ x64),
        # d(αI + βS + γS²)[dS] = β·dS + γ(dS·S + S·dS), with dS = S (symmetric)
        (jax.jvp(poly, (s,), (s,))[1], -4.0 * s64 + 2.0 * 2 * s64 @ s64),
        (jax.vmap(poly)(s), 3.0 * np.eye(256) - 4.0 * s64 + 2.0 * s64 @ s64),
        # the transposed form: Xᵀ·X of tall (k, m) operands, mapped and differentiated
        (jax.vmap(lambda v: tfn(v, v))(xt), x64 @ t(x64)),
        (jax.grad(tloss)(xt, w), t(x64) @ (w64 + t(w64))),
    ]
    for got, want in cases:
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.abs(want).max())
    _symmetric_wgmma._batchable.cache_clear()
