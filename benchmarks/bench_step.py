"""One optimizer update on a 1.2B-parameter Llama-shaped tree, on one device.

Measures, in one run and with the same routing for every optimizer (embedding and head to
AdamW through `muon_weight_dimension_numbers`, norms to AdamW):

* the update time of `optax.contrib.muon`, `optax.adamw` and `muonbp_jax.muonbp` (period=1 in
  several Newton–Schulz configurations; block steps with block_grid (1, 8) and (8, 1)), median
  of `--iters` after warm-up, with the compiled executable's peak memory and the state size;
* the full step of each `full_strategy` on a one-device mesh (time and memory);
* Newton–Schulz alone on the tree's matrices batched by shape (loop forms, methods,
  coefficients) and on single 4096-wide matrices, in TFLOP/s against the best of several large
  batched bf16 matmuls measured the same way in the same run (`matmul_ceiling`);
* orthogonality of the result (singular values, ‖UUᵀ − I‖, distance to the exact polar
  factor) for optax's Newton–Schulz and ours, on matrices with three kinds of spectrum.

The tree (the shapes of a 1.2B Llama): d=2048, ffn=8192, 16 layers of q, k, v, o (d×d), up, gate (d×ffn),
down (ffn×d) and a norm (d); embedding 32000×d and head d×32000; float32.

    python benchmarks/bench_step.py --out bench_step.json   # on a GPU
    python benchmarks/bench_step.py --small                 # tiny shapes, to try it on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

# Appended, not prepended: a copy of the package earlier on PYTHONPATH (an A/B variant) must
# be the one imported, by this script and by every benchmark that imports it.
if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import muonbp_jax
from benchmarks import _timing
from muonbp_jax import MuonDimensionNumbers, _symmetric
from muonbp_jax._newton_schulz import (
    _newton_schulz_step,
    _precondition,
    coefficient_schedule,
    newton_schulz_flops,
    resolve_method,
)

MATRICES = ("q", "k", "v", "o", "up", "gate", "down")
LR = 1e-3
NS_STEPS = 5
GB = 2**30


@dataclasses.dataclass(frozen=True)
class Model:
    d: int
    ffn: int
    layers: int
    vocab: int

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        d, f = self.d, self.ffn
        square = {k: (d, d) for k in ("q", "k", "v", "o")}
        return {**square, "up": (d, f), "gate": (d, f), "down": (f, d), "norm": (d,)}

    def shapes(self) -> dict[str, Any]:
        layers = {str(i): self.layer_shapes() for i in range(self.layers)}
        return {"embed": (self.vocab, self.d), "head": (self.d, self.vocab), "layers": layers}

    def matrix_shapes(self) -> list[tuple[int, int]]:
        """Every Muon matrix, as (rows, cols)."""
        one = [s for k, s in self.layer_shapes().items() if k in MATRICES]
        return one * self.layers


FULL = Model(d=2048, ffn=8192, layers=16, vocab=32000)
SMALL = Model(d=128, ffn=512, layers=2, vocab=1000)


def is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(v, int) for v in x)


def routing(model: Model) -> Any:
    """Muon for the layer matrices, AdamW (None) for everything else."""
    dims = lambda path, s: (
        MuonDimensionNumbers() if path[-1].key in MATRICES and len(s) == 2 else None
    )
    return jax.tree_util.tree_map_with_path(dims, model.shapes(), is_leaf=is_shape)


def random_tree(model: Model, seed: int, scale: float) -> Any:
    shapes, treedef = jax.tree.flatten(model.shapes(), is_leaf=is_shape)
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    make = jax.jit(lambda k, s: scale * jax.random.normal(k, s), static_argnums=1)
    return jax.tree.unflatten(treedef, [make(k, s) for k, s in zip(keys, shapes)])


def ns_flops(shapes: list[tuple[int, int]], method: str) -> float:
    """Matmul FLOPs of orthogonalizing `shapes` as the library does: the Gram method falls back
    to the plain iteration on matrices where it would not save FLOPs."""
    method = resolve_method(method)

    def one(r: int, c: int) -> int:
        plain = newton_schulz_flops(r, c, NS_STEPS)
        return (
            min(plain, newton_schulz_flops(r, c, NS_STEPS, "gram")) if method == "gram" else plain
        )

    return float(sum(one(r, c) for r, c in shapes))


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


# ----------------------------------------------------------------------------- matmul ceiling


CEILING_SHAPES = ((8, 4096, 4096, 4096), (4, 8192, 8192, 8192), (2, 8192, 16384, 8192))


def matmul_ceiling(shapes, iters: int) -> dict[str, Any]:
    """The best TFLOP/s of several large batched matmuls (batch, m, k, n), in bf16 and in float16
    (the Gram method's dtype), timed as the Newton–Schulz figures are (`_timing.median_ms`, one
    call in flight). Each call holds several matmuls so that the dispatch and the wait, which
    cost a fixed fraction of a millisecond per call, do not count against the hardware."""
    out: dict[str, Any] = {"shapes": {}}
    for name, dtype in (("bf16", jnp.bfloat16), ("f16", jnp.float16)):
        best = 0.0
        for batch, m, k, n in shapes:
            a = jax.random.normal(jax.random.key(1), (batch, m, k), dtype)
            b = jax.random.normal(jax.random.key(2), (batch, k, n), dtype)
            ms = _timing.median_ms(jax.jit(jnp.matmul), a, b, iters=iters)
            tflops = 2 * batch * m * k * n / ms / 1e9
            out["shapes"][f"{name} {batch}x{m}x{k}x{n}"] = tflops
            best = max(best, tflops)
        out[name] = best
    return out


# ----------------------------------------------------------------------------- NS engines


def rolled_newton_schulz(x: jax.Array, coeffs: str, form: str) -> jax.Array:
    """`orthogonalize`'s plain bf16 iteration with a rolled loop (`fori_loop` or `scan`) over
    a coefficient table, to compare loop forms; the library unrolls."""
    table = jnp.asarray(coefficient_schedule(coeffs, NS_STEPS), jnp.bfloat16)
    y = _precondition(x.astype(jnp.float32), "frobenius", 1e-8).astype(jnp.bfloat16)
    step = lambda y, abc: _newton_schulz_step(y, abc[0], abc[1], abc[2])
    if form == "fori_loop":
        y = jax.lax.fori_loop(0, NS_STEPS, lambda i, y: step(y, table[i]), y)
    else:
        y, _ = jax.lax.scan(lambda y, abc: (step(y, abc), None), y, table)
    return y.astype(x.dtype)


ENGINES = {
    # name: (method, coefficients, loop form); "auto" resolves per backend (resolve_method)
    "defaults (auto polar_express)": ("auto", "polar_express", "unrolled"),
    "plain jordan unrolled": ("newton_schulz", "jordan", "unrolled"),
    "plain jordan fori_loop": ("newton_schulz", "jordan", "fori_loop"),
    "plain jordan scan": ("newton_schulz", "jordan", "scan"),
    "plain polar_express unrolled": ("newton_schulz", "polar_express", "unrolled"),
    "plain polar_express scan": ("newton_schulz", "polar_express", "scan"),
    "gram jordan": ("gram", "jordan", "unrolled"),
    "gram polar_express": ("gram", "polar_express", "unrolled"),
}


BLOCK_ENGINES = ("plain jordan unrolled", "plain polar_express unrolled", "gram polar_express")


def engine(method: str, coeffs: str, form: str):
    if form == "unrolled":
        return functools.partial(muonbp_jax.orthogonalize, ns_coeffs=coeffs, method=method)
    return functools.partial(rolled_newton_schulz, coeffs=coeffs, form=form)


def engine_inputs(shapes: list[tuple[int, int]]) -> tuple[list[jax.Array], list[tuple[int, int]]]:
    """One float32 (count, m, n) batch per distinct wide shape of `shapes`."""
    groups: dict[tuple[int, int], int] = {}
    for r, c in shapes:
        key = (min(r, c), max(r, c))
        groups[key] = groups.get(key, 0) + 1
    inputs = [
        jax.random.normal(jax.random.key(i), (n, *shape), jnp.float32)
        for i, (shape, n) in enumerate(groups.items())
    ]
    return inputs, list(groups)


def bench_engines(
    shapes: list[tuple[int, int]], iters: int, ceiling: dict[str, float], engines=None
) -> list[dict[str, Any]]:
    """Newton–Schulz alone on `shapes`, one batched call per shape (wide form). The Gram
    engines iterate in float16 and are compared with the float16 ceiling."""
    inputs, _ = engine_inputs(shapes)
    rows = []
    for name in _timing.progress(list(engines or ENGINES), "NS engines"):
        method, coeffs, form = ENGINES[name]
        orth = engine(method, coeffs, form)
        fn = jax.jit(lambda xs, orth=orth: [orth(x) for x in xs])
        ms = _timing.median_ms(fn, inputs, iters=iters)
        flops = ns_flops(shapes, method)
        plain = ns_flops(shapes, "newton_schulz")
        top = ceiling["f16" if resolve_method(method) == "gram" else "bf16"]
        rows.append(
            {
                "engine": name,
                "ms": ms,
                "TFLOP/s": flops / ms / 1e9,
                "% of ceiling": 100 * flops / ms / 1e9 / top,
                "floor ms": flops / top / 1e9,
                "plain-equivalent TFLOP/s": plain / ms / 1e9,
            }
        )
    return rows


def block_tiles(model: Model, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """The tiles a block step with `block_grid=grid` orthogonalizes on one device."""
    r, c = grid
    return [(rows // r, cols // c) for rows, cols in model.matrix_shapes()] * (r * c)


def bench_wide(
    sizes: list[tuple[int, int]], iters: int, ceiling: dict[str, float]
) -> list[dict[str, Any]]:
    """Single large matrices (the sizes of a 4096-wide Llama layer)."""
    rows = []
    for m, n in sizes:
        x = jax.random.normal(jax.random.key(m + n), (m, n), jnp.float32)
        for method in ("newton_schulz", "gram"):
            fn = jax.jit(functools.partial(muonbp_jax.orthogonalize, method=method))
            ms = _timing.median_ms(fn, x, iters=iters)
            flops = newton_schulz_flops(m, n, NS_STEPS, method)
            used = method == "newton_schulz" or flops < newton_schulz_flops(m, n, NS_STEPS)
            rows.append(
                {
                    "matrix": f"{m}x{n}",
                    "method": method if used else f"{method} (falls back to plain)",
                    "ms": ms,
                    "TFLOP/s": flops / ms / 1e9 if used else None,
                    "% of ceiling": (
                        100 * flops / ms / 1e9 / ceiling["f16" if method == "gram" else "bf16"]
                        if used
                        else None
                    ),
                }
            )
    return rows


# ----------------------------------------------------------------------------- quality


def spectrum_matrix(kind: str, m: int, n: int, seed: int) -> jax.Array:
    """An m×n float32 matrix: Gaussian entries, or singular values 1/i ('power'), or 16 large
    and the rest small ('spiked': a low-rank momentum plus noise)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    if kind == "gaussian":
        return jax.random.normal(k1, (m, n), jnp.float32)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (m, m), jnp.float32))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, m), jnp.float32))
    if kind == "power":
        s = 1.0 / jnp.arange(1, m + 1, dtype=jnp.float32)
    else:
        s = jnp.where(jnp.arange(m) < 16, 1.0, 0.02) * jnp.exp(0.1 * jax.random.normal(k3, (m,)))
    return (u * s) @ v.T


def optax_orthogonalize(x: jax.Array) -> jax.Array:
    """optax.contrib's Newton–Schulz as its Muon applies it (momentum off): Jordan
    coefficients, five steps, in the input's dtype (float32)."""
    dims = {"w": MuonDimensionNumbers()}
    tx = optax.contrib.scale_by_muon(beta=0.0, nesterov=False, weight_dimension_numbers=dims)
    out, _ = tx.update({"w": x}, tx.init({"w": x}))
    return out["w"]


QUALITY_METHODS = {
    "optax.contrib.muon NS (f32)": optax_orthogonalize,
    "defaults (polar_express, auto)": muonbp_jax.orthogonalize,
    "defaults, product=dense (XLA matmuls only)": functools.partial(
        muonbp_jax.orthogonalize, product="dense"
    ),
    "plain jordan bf16": functools.partial(
        muonbp_jax.orthogonalize, ns_coeffs="jordan", method="newton_schulz"
    ),
    "plain polar_express bf16": functools.partial(
        muonbp_jax.orthogonalize, ns_coeffs="polar_express", method="newton_schulz"
    ),
    "gram jordan f16": functools.partial(
        muonbp_jax.orthogonalize, ns_coeffs="jordan", method="gram"
    ),
    "gram polar_express f16": functools.partial(
        muonbp_jax.orthogonalize, ns_coeffs="polar_express", method="gram"
    ),
}


@jax.jit
def orthogonality(u: jax.Array, polar: jax.Array) -> dict[str, jax.Array]:
    hi = jax.lax.Precision.HIGHEST
    u = u.astype(jnp.float32)
    uut = jnp.matmul(u, u.T, precision=hi)
    sv = jnp.sqrt(jnp.clip(jnp.linalg.eigvalsh(uut), 0.0))
    m = u.shape[0]
    return {
        "sigma_min": sv.min(),
        "sigma_p1": jnp.percentile(sv, 1),
        "sigma_max": sv.max(),
        "|UU^T-I|_F/sqrt(m)": jnp.linalg.norm(uut - jnp.eye(m)) / math.sqrt(m),
        "|U-polar|/|polar|": jnp.linalg.norm(u - polar) / jnp.linalg.norm(polar),
    }


def bench_quality(m: int, n: int) -> list[dict[str, Any]]:
    rows = []
    for kind in _timing.progress(["gaussian", "power", "spiked"], "quality"):
        x = spectrum_matrix(kind, m, n, seed=len(kind))
        u, _, vt = jnp.linalg.svd(x, full_matrices=False)
        polar = u @ vt
        for name, fn in QUALITY_METHODS.items():
            got = orthogonality(jax.jit(fn)(x), polar)
            rows.append({"spectrum": kind, "method": name, **{k: float(v) for k, v in got.items()}})
        # The same matrix transposed (tall): iterated as it is, on its Gram matrix XᵀX.
        got = orthogonality(jax.jit(muonbp_jax.orthogonalize)(x.T).T, polar)
        rows.append(
            {
                "spectrum": kind,
                "method": "defaults on its transpose (tall)",
                **{k: float(v) for k, v in got.items()},
            }
        )
    return rows


# ----------------------------------------------------------------------------- updates


@dataclasses.dataclass(frozen=True)
class Run:
    """One optimizer to time, built by `make`; `kind` says how to count its NS FLOPs."""

    make: Callable[[], optax.GradientTransformation]
    kind: str = ""  # 'auto', 'plain', 'gram', 'f32' (optax), 'block[-plain]:r,c', '' (none)
    prime: bool = False  # time the update after one update (count 1), not the first


def optimizers(model: Model) -> dict[str, Run]:
    dims = routing(model)
    mb = functools.partial(muonbp_jax.muonbp, LR, muon_weight_dimension_numbers=dims)
    old = {"ns_coeffs": "jordan", "ns_method": "newton_schulz"}  # the defaults before 0.3
    runs = {
        "optax.contrib.muon": Run(
            lambda: optax.contrib.muon(LR, muon_weight_dimension_numbers=dims), "f32"
        ),
        "optax.adamw": Run(lambda: optax.adamw(LR)),
        "momentum SGD + AdamW (the elementwise passes, no Newton-Schulz)": Run(
            lambda: elementwise_floor(dims)
        ),
        "muonbp P=1 defaults": Run(lambda: mb(period=1), "auto"),
        "muonbp P=1 ns_product=dense (XLA matmuls only)": Run(
            lambda: mb(period=1, ns_product="dense"), "auto"
        ),
        "muonbp P=1 plain jordan (0.2 defaults)": Run(lambda: mb(period=1, **old), "plain"),
        "muonbp P=1 plain polar_express": Run(
            lambda: mb(period=1, ns_coeffs="polar_express", ns_method="newton_schulz"), "plain"
        ),
        "muonbp P=1 defaults mu=bf16": Run(lambda: mb(period=1, mu_dtype=jnp.bfloat16), "auto"),
        "muonbp block (1,8) defaults": Run(lambda: mb(period=None, block_grid=(1, 8)), "block:1,8"),
        "muonbp block (1,8) ns_product=dense": Run(
            lambda: mb(period=None, block_grid=(1, 8), ns_product="dense"), "block:1,8"
        ),
        "muonbp block (1,8) plain jordan (0.2 defaults)": Run(
            lambda: mb(period=None, block_grid=(1, 8), **old), "block-plain:1,8"
        ),
        "muonbp block (8,1) defaults": Run(lambda: mb(period=None, block_grid=(8, 1)), "block:8,1"),
        # The kernel without the polynomial in its epilogue: only where the kernel runs.
        **(
            {
                "muonbp P=1 ns_product=wgmma-unfused": Run(
                    lambda: mb(period=1, ns_product="wgmma-unfused"), "auto"
                ),
                "muonbp block (1,8) ns_product=wgmma-unfused": Run(
                    lambda: mb(period=None, block_grid=(1, 8), ns_product="wgmma-unfused"),
                    "block:1,8",
                ),
            }
            if _symmetric.resolve_product("auto") == "wgmma"
            else {}
        ),
    }
    return runs


def elementwise_floor(dims: Any) -> optax.GradientTransformation:
    """Nesterov momentum SGD on the Muon matrices (AdamW on the rest): the same passes over
    memory as a muonbp update without its Newton–Schulz; a yardstick built from optax alone."""
    labels = lambda params: jax.tree.map(
        lambda d: "muon" if d is not None else "adam",
        dims,
        is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers),
    )
    muon_like = optax.chain(
        optax.trace(0.95, nesterov=True), optax.add_decayed_weights(0.0), optax.scale(-LR)
    )
    return optax.partition({"muon": muon_like, "adam": optax.adamw(LR)}, labels)


EVERY = muonbp_jax.Diagnostics().every  # the default sampling interval


def diagnostics_runs(model: Model) -> dict[str, Run]:
    """The cost of `diagnostics=`, in one run: each configuration off; with every update
    measured (`every=1`); and at the defaults on an update that is not measured (the one
    after the first: in the first window, whose step of this kind was measured)."""
    dims = routing(model)
    mb = functools.partial(muonbp_jax.muonbp, LR, muon_weight_dimension_numbers=dims)
    runs = {}
    for config, kw, kind in (
        ("P=1", {"period": 1}, "auto"),
        ("block (1,8)", {"period": None, "block_grid": (1, 8)}, "block:1,8"),
    ):
        runs[f"muonbp {config} off"] = Run(functools.partial(mb, **kw), kind)
        runs[f"muonbp {config} measured (every=1)"] = Run(
            functools.partial(mb, diagnostics=muonbp_jax.Diagnostics(every=1), **kw), kind
        )
        runs[f"muonbp {config} measured, iterations=2"] = Run(
            functools.partial(mb, diagnostics=muonbp_jax.Diagnostics(every=1, iterations=2), **kw),
            kind,
        )
        runs[f"muonbp {config} not measured (diagnostics=True)"] = Run(
            functools.partial(mb, diagnostics=True, **kw), kind, prime=True
        )
    return runs


def diagnostics_cost(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: the cost of a measured and of an unmeasured update over the update
    without diagnostics, and the mean over `EVERY` updates at the defaults (one measured: a
    run of one kind of step measures one update per window)."""
    ms = {r["update"]: r["ms"] for r in rows}
    out = []
    for config in ("P=1", "block (1,8)"):
        off = ms[f"muonbp {config} off"]
        measured = ms[f"muonbp {config} measured (every=1)"]
        skipped = ms[f"muonbp {config} not measured (diagnostics=True)"]
        mean = skipped + (measured - skipped) / EVERY
        out.append(
            {
                "config": config,
                "off ms": off,
                "measured ms": measured,
                "not measured ms": skipped,
                f"mean over {EVERY} ms": mean,
                "measured %": 100 * (measured / off - 1),
                "not measured %": 100 * (skipped / off - 1),
                f"mean over {EVERY} %": 100 * (mean / off - 1),
            }
        )
    return out


def strategies(model: Model) -> dict[str, Run]:
    """Full steps through each strategy's shard_map code on a one-device mesh."""
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    specs = jax.tree.map(
        lambda s: P(None, "model") if len(s) == 2 else P(), model.shapes(), is_leaf=is_shape
    )
    kw = {"specs": specs, "mesh": mesh}
    dims = routing(model)
    return {
        f"muonbp P=1 full_strategy={s} (1-device mesh)": Run(
            functools.partial(
                muonbp_jax.muonbp,
                LR,
                period=1,
                muon_weight_dimension_numbers=dims,
                full_strategy=s,
                **kw,
            ),
            "auto",
        )
        for s in muonbp_jax.FULL_STRATEGIES
    }


def update_flops(model: Model, kind: str) -> float | None:
    """Newton–Schulz FLOPs of one update (`auto`: the method the defaults pick here)."""
    if kind == "auto":
        kind = "gram" if resolve_method("auto") == "gram" else "plain"
    if kind in ("plain", "f32"):
        return ns_flops(model.matrix_shapes(), "newton_schulz")
    if kind == "gram":
        return ns_flops(model.matrix_shapes(), "gram")
    if kind.startswith("block"):
        grid = tuple(int(v) for v in kind.split(":")[1].split(","))
        plain = kind.startswith("block-plain") or resolve_method("auto") != "gram"
        return ns_flops(block_tiles(model, grid), "newton_schulz" if plain else "gram")
    return None


def bench_updates(
    model: Model, runs: dict[str, Run], iters: int, warmup: int
) -> list[dict[str, Any]]:
    params = random_tree(model, seed=0, scale=0.02)
    grads = random_tree(model, seed=1, scale=1e-3)
    rows = []
    for name in _timing.progress(list(runs), "updates"):
        run = runs[name]
        tx = run.make()
        state = jax.jit(tx.init)(params)
        if run.prime:
            state = jax.jit(tx.update)(grads, state, params)[1]
        compiled = jax.jit(tx.update).lower(grads, state, params).compile()
        ms = _timing.median_ms(compiled, grads, state, params, iters=iters, warmup=warmup)
        memory = _timing.compiled_memory(compiled)
        flops = update_flops(model, run.kind)
        rows.append(
            {
                "update": name,
                "ms": ms,
                "NS TFLOP/s": flops / ms / 1e9 if flops else None,
                "peak GB": memory["peak"] / GB if memory else None,
                "temp GB": memory["temporaries"] / GB if memory else None,
                "state GB": tree_bytes(state) / GB,
            }
        )
        del state, compiled
    return rows


def period_section(small: bool) -> list[dict[str, Any]]:
    """bench_period's loop at the defaults (block steps emulated with block_grid (1, 8))."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_period

    return bench_period.measure(small=small)["rows"]


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU try-out)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--out", default=None, help="write all figures to this JSON file")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated sections to skip: "
        "engines,block_engines,wide,quality,updates,strategies,diagnostics,period",
    )
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    model = SMALL if args.small else FULL
    ceiling_shapes = ((2, 256, 256, 256), (1, 512, 512, 512)) if args.small else CEILING_SHAPES
    wide = [(128, 128), (128, 448)] if args.small else [(4096, 4096), (4096, 14336)]
    quality_shape = (128, 512) if args.small else (2048, 8192)

    env = _timing.environment()
    print(f"{env}  model={model}")
    results: dict[str, Any] = {"environment": env, "model": dataclasses.asdict(model)}
    ceiling = matmul_ceiling(ceiling_shapes, args.iters)
    results["matmul_ceiling_tflops"] = ceiling
    for shape, tflops in ceiling["shapes"].items():
        print(f"matmul {shape}: {tflops:.0f} TFLOP/s")
    print(f"ceiling (best of the above): bf16 {ceiling['bf16']:.0f}, f16 {ceiling['f16']:.0f}")
    sections = {
        "engines": lambda: bench_engines(model.matrix_shapes(), args.iters, ceiling),
        # What a block step with block_grid (1, 8) orthogonalizes: its Newton-Schulz floor.
        "block_engines": lambda: bench_engines(
            block_tiles(model, (1, 8)), args.iters, ceiling, BLOCK_ENGINES
        ),
        "wide": lambda: bench_wide(wide, 2 * args.iters, ceiling),
        "quality": lambda: bench_quality(*quality_shape),
        "updates": lambda: bench_updates(model, optimizers(model), args.iters, args.warmup),
        "strategies": lambda: bench_updates(model, strategies(model), args.iters, args.warmup),
        "diagnostics": lambda: bench_updates(
            model, diagnostics_runs(model), args.iters, args.warmup
        ),
        "period": lambda: period_section(args.small),
    }
    for name, run in sections.items():
        if name not in skip:
            print(f"-- {name}", flush=True)
            results[name] = run()
            _timing.write_json(args.out, results)  # keep what is done if a later part fails

    if "updates" in results:
        by_name = {r["update"]: r for r in results["updates"]}
        base = by_name["optax.contrib.muon"]["ms"]
        for r in [
            *results["updates"],
            *results.get("strategies", []),
            *results.get("diagnostics", []),
        ]:
            r["speedup vs optax muon"] = base / r["ms"]
    if "diagnostics" in results:
        results["diagnostics_cost"] = diagnostics_cost(results["diagnostics"])
    stats = jax.devices()[0].memory_stats() or {}
    results["process_peak_GB"] = stats.get("peak_bytes_in_use", 0) / GB or None
    _timing.write_json(args.out, results)

    columns = {
        "engines": [
            "engine",
            "ms",
            "floor ms",
            "TFLOP/s",
            "% of ceiling",
            "plain-equivalent TFLOP/s",
        ],
        "wide": ["matrix", "method", "ms", "TFLOP/s", "% of ceiling"],
        "quality": [
            "spectrum",
            "method",
            "sigma_min",
            "sigma_p1",
            "sigma_max",
            "|UU^T-I|_F/sqrt(m)",
            "|U-polar|/|polar|",
        ],
        "updates": ["update", "ms", "speedup vs optax muon", "NS TFLOP/s", "peak GB", "state GB"],
    }
    columns["block_engines"] = columns["engines"]
    columns["strategies"] = columns["diagnostics"] = columns["updates"]
    columns["period"] = ["update", "alone ms", "in P loop ms", "overhead ms"]
    columns["diagnostics_cost"] = list(results.get("diagnostics_cost", [{}])[0])
    print()
    for name, cols in columns.items():
        if name in results:
            print(_timing.table(results[name], cols, title=f"== {name}"))
            print()
    product = _symmetric.resolve_product("auto")
    if product != "dense":
        print(
            f"Note: ns_product='auto' is {product!r} here: the symmetric products compute their "
            "lower tiles only, so TFLOP/s and '% of ceiling' count dense-equivalent FLOPs "
            "(above 100% of the matmul ceiling by up to 2× for the symmetric products), not "
            "executed ones."
        )
    return results


if __name__ == "__main__":
    main()
