"""MuonBP: Muon with block-periodic orthogonalization, as optax transformations.

One update, as in the paper (Khaled et al. 2025, arXiv 2510.16981):

    momentum  →  orthogonalize (full if t % period == 0, else per device block)
              →  scale by the shape of what was orthogonalized
              →  weight decay  →  step size (full or block learning rate)

The step kind is decided in one place, `is_full_step`. The mesh machinery lives in modules by
concept: `_options` (per-leaf options by key path), `_layout` (specs, layouts, reshapes),
`_steps` and `_exchange` (block and full steps), `_placement` (where state lives); the
Newton–Schulz math in `_newton_schulz`.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import DTypeLike
from optax.contrib import MuonDimensionNumbers

from muonbp_jax import _diagnostics, _layout, _options, _placement, _steps
from muonbp_jax._diagnostics import DiagnosticsOption
from muonbp_jax._layout import BlockGrid, DimensionNumbers, Mesh, Specs
from muonbp_jax._newton_schulz import (
    NS_METHODS,
    PRECONDITIONINGS,
    Coeffs,
    Method,
    NewtonSchulz,
    Preconditioning,
    coefficient_schedule,
)
from muonbp_jax._steps import FullStrategy
from muonbp_jax._symmetric import Product
from muonbp_jax._symmetric import check_product as _check_product

DEFAULT_NS_STEPS = 5
DEFAULT_PERIOD = 5
Period = int | None


class MuonBPState(NamedTuple):
    """State of `scale_by_muonbp`."""

    count: jax.Array  # int32 scalar: number of updates so far (t of the next update)
    mu: optax.Updates  # momentum, sharded like the parameters
    # The last update's `MuonBPDiagnostics` with `diagnostics=` on; None (no leaves) when off.
    diagnostics: Any = None


def _check_period(period: Any) -> None:
    if period is None or isinstance(period, jax.core.Tracer):
        return
    value = np.asarray(period)
    if isinstance(period, bool) or value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"period must be an int >= 1 or None (never a full step), got {period!r}.")
    if int(value) < 1:
        raise ValueError(
            f"period must be >= 1 (1 is Muon) or None (BlockMuon, never a full step), got "
            f"{int(value)}."
        )


def is_full_step(count: jax.Array, period: Period) -> jax.Array | bool:
    """Whether the update with 0-based index `count` orthogonalizes whole matrices.

    The only place where the step kind is decided: full iff `count % period == 0`, so the first
    update is full; never for `period=None`; always for `period=1`. A Python int `count` (a
    host-side step number, e.g. for the `full_step` argument of the update) gives a Python
    bool.
    """
    if period is None:
        return False
    if not isinstance(period, jax.core.Tracer) and int(period) == 1:
        return True
    if isinstance(count, (int, np.integer)) and not isinstance(period, jax.core.Tracer):
        return int(count) % int(period) == 0  # a host-side step number: a Python bool
    return jnp.asarray(count) % period == 0


def _step_kind(count: jax.Array, period: Period, full_step: Any) -> tuple[Any, Any]:
    """(the kind this update runs, a traced flag that it differs from the counter's or None).

    `full_step=None` follows the counter (`is_full_step`). A Python bool chooses the kind at
    trace time, so the update compiles without the conditional; the counter still decides what
    is right, and an update whose counter disagrees returns NaN (it is traced once per kind and
    cannot raise at run time).
    """
    scheduled = is_full_step(count, period)
    if full_step is None:
        return scheduled, None
    if isinstance(full_step, np.bool_):
        full_step = bool(full_step)
    if not isinstance(full_step, bool):
        raise TypeError(
            "full_step must be a Python bool known at trace time (pass it as a static argument "
            f"of jax.jit, e.g. static_argnames='full_step'), got {type(full_step).__name__}. "
            "Leave it unset to let the step counter choose with a lax.cond."
        )
    if isinstance(scheduled, bool):
        if scheduled != full_step:
            fixed = period is None or (not isinstance(period, jax.core.Tracer) and period == 1)
            reason = (
                f"period={period!r} makes every update a {'full' if scheduled else 'block'} step"
                if fixed
                else f"update {int(count)} with period={period!r} is a "
                f"{'full' if scheduled else 'block'} step"
            )
            raise ValueError(f"full_step={full_step}, but {reason}.")
        return scheduled, None
    return full_step, scheduled != full_step


def _device(mesh: Mesh | None) -> jax.Device | None:
    """A concrete mesh's first device of this process (of any process if it has none; None
    for no mesh or an abstract one): what `ns_method` and `ns_product` are resolved for."""
    devices = getattr(mesh, "devices", None) if isinstance(mesh, jax.sharding.Mesh) else None
    if devices is None or not devices.size:
        return None
    here = jax.process_index()
    return next((d for d in devices.flat if d.process_index == here), devices.flat[0])


def shape_scale(rows: int, cols: int, consistent_rms: float | None) -> float:
    """Update multiplier for an orthogonalized rows×cols matrix (rows = fan-in).

    `consistent_rms·sqrt(max(rows, cols))` gives every matrix update RMS ≈ consistent_rms
    (Liu et al. 2025, arXiv 2502.16982); `None` gives optax's width rule
    `sqrt(max(1, cols/rows))`.
    """
    if consistent_rms is None:
        return math.sqrt(max(1.0, cols / rows))
    return consistent_rms * math.sqrt(max(rows, cols))


BlockLrRule = Literal["spectral", "sqrt_blocks", "quarter", "none"]
BLOCK_LR_RULES: tuple[str, ...] = ("spectral", "sqrt_blocks", "quarter", "none")
DEFAULT_BLOCK_LR_RULE = "spectral"


def block_lr_factor(
    matrix_shape: tuple[int, int],
    block_shape: tuple[int, int],
    rule: BlockLrRule = DEFAULT_BLOCK_LR_RULE,
    consistent_rms: float | None = 0.2,
) -> float:
    """The factor ρ by which a block step's rate differs from a full step's, for one leaf.

    A leaf whose m×n matrices are cut into k = (m/a)·(n/b) blocks of a×b on block steps (mesh
    tiles × `block_grid`) takes, on block steps, `block_learning_rate · ρ` with

    * `"spectral"` (default): ρ = s(m, n) / (s(a, b)·√k), where s is `shape_scale`. Each block
      update is s(a, b) times an orthogonal matrix; k such blocks side by side and stacked have
      spectral norm at most s(a, b)·√k (attained when the blocks share singular vectors, as
      those of a low-rank gradient do), the full update exactly s(m, n). ρ makes the block
      update's worst-case spectral norm equal the full update's; with RMS matching it lies in
      [1/√k, 1], the range the paper's analysis gives for η_block/η_full (Khaled et al. 2025).
    * `"sqrt_blocks"`: ρ = 1/√k;  `"quarter"`: ρ = k^(-1/4), the geometric middle of that range;
    * `"none"`: ρ = 1 (block steps at the full rate).

    A leaf with a single block (replicated, or split only on batch axes) gets ρ = 1 exactly.
    """
    (m, n), (a, b) = matrix_shape, block_shape
    blocks = (m // a) * (n // b)
    if blocks == 1 or rule == "none":
        return 1.0
    if rule == "sqrt_blocks":
        return blocks**-0.5
    if rule == "quarter":
        return blocks**-0.25
    if rule == "spectral":
        return shape_scale(m, n, consistent_rms) / shape_scale(a, b, consistent_rms) / blocks**0.5
    raise ValueError(f"block_lr_rule must be one of {BLOCK_LR_RULES}, got {rule!r}.")


def _check_block_lr_rule(rule: Any) -> None:
    if rule not in BLOCK_LR_RULES:
        raise ValueError(
            f'block_lr_rule must be one of {BLOCK_LR_RULES} ("none": block steps at the full '
            f"rate), got {rule!r}."
        )


def _static_ns_steps(ns_steps: Any) -> int:
    if ns_steps is None:
        return DEFAULT_NS_STEPS
    if isinstance(ns_steps, jax.core.Tracer):
        raise TypeError(
            "ns_steps is traced (optax.inject_hyperparams turns ints into arrays); keep it "
            "static with optax.inject_hyperparams(muonbp, static_args=('ns_steps',))."
        )
    return int(ns_steps)


def _static_dtype(dtype: Any, name: str) -> Any:
    if dtype is None:
        return None
    if isinstance(dtype, (jax.Array, np.ndarray)):
        # optax.inject_hyperparams calls any callable argument as a schedule, and jnp.float32
        # is callable: what arrives is an array, the dtype itself is lost.
        raise TypeError(
            f"{name} arrived as an array ({dtype!r}), as happens when "
            f"optax.inject_hyperparams mistakes a dtype such as jnp.float32 for a schedule; "
            f"pass it as a string ({name}='float32') or keep it static with "
            f"static_args=('{name}',)."
        )
    return jnp.dtype(dtype)


def _check_option_keys(params, dimension_numbers, dimension_numbers_name, block_grid) -> None:
    """A tree-valued option whose key matches no parameter (a typo) is refused."""
    _options.check_paths_cover(
        dimension_numbers,
        params,
        name=dimension_numbers_name,
        is_value=_layout.is_dimension_numbers,
        expected="a MuonDimensionNumbers (or None: AdamW)",
    )
    _options.check_paths_cover(
        block_grid,
        params,
        name="block_grid",
        is_value=_layout.is_grid,
        expected="a pair of ints (r, c)",
    )


def _dual_pairing(m: jax.Array, o: jax.Array) -> jax.Array:
    """⟨m, o⟩ = Re Σ conj(m)·o over the whole leaf: the real inner product, also for complex
    leaves. optax.contrib.muon's adaptive scale keeps the complex Σ conj(m)·o; its imaginary
    part is rounding noise (for o = U·f(S)·Vᴴ of m = U·S·Vᴴ the sum is tr(S·f(S)), real, block
    by block too), so dropping it keeps each update a positive multiple of o."""
    return jnp.real(jnp.sum(jnp.conj(m) * o))


def _check_mu_dtype(params, mu_dtype) -> None:
    """A real mu_dtype would drop the imaginary part of a complex parameter's momentum."""
    if mu_dtype is None or jnp.issubdtype(mu_dtype, jnp.complexfloating):
        return
    paths, leaves, _ = _options.leaves_with_paths(params)
    for path, x in zip(paths, leaves):
        if jnp.iscomplexobj(x):
            raise TypeError(
                f"mu_dtype={jnp.dtype(mu_dtype)} would store the momentum of the complex "
                f"parameter {_options.path_str(path)!r} ({jnp.dtype(x.dtype)}) without its "
                "imaginary part. Use mu_dtype=None (the parameter's dtype), or keep complex "
                "parameters in a separate optimizer (optax.partition)."
            )


def scale_by_muonbp(
    ns_coeffs: Coeffs = "polar_express",
    ns_steps: int | None = None,
    beta: float = 0.95,
    eps: float = 1e-8,
    mu_dtype: DTypeLike | None = None,
    *,
    period: Period = DEFAULT_PERIOD,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: Preconditioning = "frobenius",
    consistent_rms: float | None = 0.2,
    ns_dtype: DTypeLike | None = "bfloat16",
    weight_dimension_numbers: DimensionNumbers = None,
    specs: Specs = None,
    mesh: Mesh | None = None,
    block_grid: BlockGrid = None,
    full_strategy: FullStrategy = "auto",
    ns_method: Method = "auto",
    block_lr_rule: BlockLrRule = DEFAULT_BLOCK_LR_RULE,
    diagnostics: DiagnosticsOption = False,
    ns_product: Product = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Momentum, block-periodic orthogonalization and shape scaling (no learning rate).

    Every leaf it sees is a matrix leaf (use `muonbp` for routing other leaves to AdamW).

    Args:
      ns_coeffs: Newton–Schulz coefficients: a preset (`"polar_express"`, the default;
        `"jordan"` = `"standard"`, optax's default; `"dion"`), one (a, b, c) triple, or a
        (steps, 3) table.
      ns_steps: Newton–Schulz iterations (default 5); static.
      beta: momentum decay (EMA with bias correction, as in optax).
      eps: added to the Newton–Schulz normalizer.
      mu_dtype: dtype of the momentum (e.g. `jnp.bfloat16` halves its memory). A real dtype
        with complex parameters is a TypeError at init (it would drop the imaginary part).
      period: the update with 0-based index t is a full step iff `t % period == 0`; `1` is
        Muon, `None` never takes a full step (BlockMuon).
      nesterov: Nesterov momentum, as in optax.
      adaptive: scale each update by ⟨momentum, orthogonalized momentum⟩ (Bernstein et al.);
        for complex leaves the real part Re Σ conj(m)·o.
      preconditioning: `"frobenius"`, `"spectral"`, `"aol"` or `"schatten"`, as in optax.
      consistent_rms: RMS matching factor; `None` uses optax's width rule.
      ns_dtype: dtype of the Newton–Schulz matmuls (normalization is in float32). Complex
        matrices have no half-precision type: they iterate in complex64 for bfloat16, float16
        or float32 (complex128 for float64), with conjugate transposes.
      weight_dimension_numbers: `MuonDimensionNumbers`, a tree of them (matched by key path) or
        a callable updates -> tree; default: 2-D (reduction=0, output=1).
      specs: PartitionSpec per leaf, as a tree matched by key path (flax's `.value` ignored) or
        a callable params -> tree. Default: read from the leaf types (Explicit meshes).
      mesh: the mesh the specs refer to (default: the leaf types' or the context mesh).
      block_grid: `(r, c)`, or a tree/callable of them: split each device-local block into
        r×c tiles orthogonalized independently on block steps.
      full_strategy: how full steps orthogonalize sharded matrices: `"gather"` (all-gather
        each matrix, orthogonalize it on every device: the paper's), `"all_to_all"` (spread
        whole same-shape matrices over the devices that share them, no redundant work) or
        `"auto"` (all-to-all for groups of 2 or more, gather for a lone matrix).
      ns_method: `"newton_schulz"` iterates on each matrix X; `"gram"` computes the same
        polynomial on the smaller XXᵀ (float16 in place of bfloat16), fewer FLOPs for matrices
        at least twice as wide as tall (see `muonbp_jax.orthogonalize`); `"auto"` (default):
        `"gram"` on GPUs, `"newton_schulz"` on TPUs and CPUs, for the platform of the mesh's
        devices (jax's default backend without a concrete mesh), decided at trace time.
      ns_product: how Newton–Schulz computes its Gram products X·Xᵀ and its step
        polynomials α·I + β·A + γ·A² of a Gram matrix A (A² as A·Aᵀ): `"auto"`
        (default): on NVIDIA Hopper GPUs (H100, H200) a Mosaic GPU kernel that computes
        their lower tiles only (`"wgmma"`, about half the FLOPs) for float16/bfloat16
        iterations, XLA's matmul (`"dense"`) on every other device; decided at trace time for
        the mesh's devices like `ns_method`. The kernel is differentiable (its derivative is
        XLA matmuls) and vmaps into one launch. `"dense"` keeps XLA's matmul everywhere;
        `"wgmma-unfused"` (the kernel without the polynomial in its epilogue),
        `"triangular"` (a Triton kernel) and `"panels:K"` are slower alternatives kept for
        measurement (`muonbp_jax._symmetric`). An explicit kernel product where the kernel
        does not run is a ValueError when the update is first traced; shapes or dtypes it
        does not take (float32 iterations, complex matrices, sides not a multiple of 256)
        use XLA's matmul silently.
      block_lr_rule: how block updates are scaled relative to full ones, per leaf, from the
        number and shape of its blocks (see `block_lr_factor`); `"none"` scales both alike.
      diagnostics: record in the state's `diagnostics` field (a `MuonBPDiagnostics`; read it
        with `optax.tree.get(state, "diagnostics")` or `read_diagnostics`) each update's kind,
        and measurements of a sample of updates (`Diagnostics.every`: by default the first
        full and block step of every 100 updates): `True`, `"per_leaf"` (also every leaf's
        values) or a `Diagnostics`; off by default. See `muonbp_jax._diagnostics` for what is
        measured and what it communicates.

    Returns:
      An `optax.GradientTransformationExtraArgs` with state `MuonBPState`; its update takes
      the optional `full_step` (see `muonbp`).

    References:
      Khaled et al., `MuonBP: Faster Muon via Block-Periodic Orthogonalization
      <https://arxiv.org/abs/2510.16981>`_, 2025
    """
    _check_period(period)
    _check_block_lr_rule(block_lr_rule)
    diag = _diagnostics.resolve(diagnostics)
    if full_strategy not in _steps.FULL_STRATEGIES:
        raise ValueError(
            f"full_strategy must be one of {_steps.FULL_STRATEGIES}, got {full_strategy!r}."
        )
    if ns_method not in NS_METHODS:
        raise ValueError(f"ns_method must be one of {NS_METHODS}, got {ns_method!r}.")
    _check_product(ns_product)
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(
            f"preconditioning must be one of {PRECONDITIONINGS}, got {preconditioning!r}."
        )
    ns_dtype = _static_dtype(ns_dtype, "ns_dtype")
    mu_dtype = _static_dtype(mu_dtype, "mu_dtype")
    mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype) if mu_dtype is not None else None
    plan = functools.partial(
        _layout.plan,
        specs=specs,
        mesh=mesh,
        dimension_numbers=weight_dimension_numbers,
        block_grid=block_grid,
    )

    def init_fn(params):
        steps = _static_ns_steps(ns_steps)
        coefficient_schedule(ns_coeffs, steps)  # validate early
        _check_option_keys(params, weight_dimension_numbers, "weight_dimension_numbers", block_grid)
        _check_mu_dtype(params, mu_dtype)
        the_mesh, layouts = plan(params)
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        return MuonBPState(
            count=jnp.zeros([], jnp.int32),
            mu=_placement.place_like(mu, the_mesh, layouts),
            diagnostics=None
            if diag is None
            else _diagnostics.initial(diag, jax.tree.structure(mu), len(layouts)),
        )

    def update_fn(updates, state, params=None, *, full_step=None, **extra_args):
        del params, extra_args
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count_inc = optax.safe_increment(state.count)
        mu_leaves, treedef = jax.tree.flatten(mu)
        grad_leaves = treedef.flatten_up_to(updates)

        def direction(mus, grads):
            """The momentum direction that is orthogonalized (Nesterov or bias-corrected)."""
            if not nesterov:
                return jax.tree.leaves(
                    optax.tree.bias_correction(jax.tree.unflatten(treedef, mus), beta, count_inc)
                )
            # The scalar factors are combined first: dividing g by 1 - beta**t before multiplying
            # by 1 - beta (optax's order) overflows for |g| above ~1e37.
            t = count_inc.astype(jnp.float32)
            mu_coef, g_coef = beta / (1 - beta ** (t + 1)), (1 - beta) / (1 - beta**t)
            return [
                (mu_coef * m + g_coef * g).astype(jnp.result_type(m, g)) for m, g in zip(mus, grads)
            ]

        out_dtypes = [
            jnp.result_type(m, g) if nesterov else m.dtype for m, g in zip(mu_leaves, grad_leaves)
        ]
        the_mesh, layouts = plan(jax.tree.unflatten(treedef, mu_leaves))
        ns = NewtonSchulz.create(
            ns_coeffs,
            _static_ns_steps(ns_steps),
            eps=eps,
            preconditioning=preconditioning,
            dtype=ns_dtype,
            method=ns_method,
            product=ns_product,
            device=_device(the_mesh),
        )

        # Each branch forms the direction from (momentum, gradient) itself and returns the
        # Newton–Schulz output in its own (half-precision) dtype: what crosses the conditional
        # is what exists anyway, and the casts and scalings below fuse with what follows.
        def full(operands):
            xs = direction(*operands)
            return _steps.full_step(xs, layouts, the_mesh, ns, strategy=full_strategy)

        def block(operands):
            return _steps.block_step(direction(*operands), layouts, the_mesh, ns)

        # Static per leaf: the shape scale of what each kind of step orthogonalizes and, on block
        # steps, the leaf's block step-size factor.
        full_scales = [shape_scale(*lay.matrix_shape, consistent_rms) for lay in layouts]
        block_shapes = [lay.block_shape(the_mesh) for lay in layouts]
        block_factors = [
            block_lr_factor(lay.matrix_shape, b, block_lr_rule, consistent_rms)
            for lay, b in zip(layouts, block_shapes)
        ]
        block_shape_scales = [shape_scale(*b, consistent_rms) for b in block_shapes]
        block_scales = [s * f for s, f in zip(block_shape_scales, block_factors)]

        def diag_statics(coefs=None):
            """Per kind, the diagnostics' per-leaf constants: shape scales (times |⟨M, O⟩|
            with `adaptive`: `coefs`) and block factors ρ."""
            statics = (
                _diagnostics.Statics(full_scales, [1.0] * len(layouts)),
                _diagnostics.Statics(block_shape_scales, block_factors),
            )
            if coefs is None:
                return statics
            return tuple(
                st._replace(scales=[c * x for c, x in zip(coefs, st.scales)]) for st in statics
            )

        def measure(kind_full, ns_out, ops):
            """The record of this update (of kind `kind_full`), measured."""
            coefs = None
            if adaptive:
                outs = [o.astype(d) for o, d in zip(ns_out, out_dtypes)]
                coefs = [
                    jnp.abs(_dual_pairing(m, o)).astype(jnp.float32)
                    for m, o in zip(direction(*ops), outs)
                ]
            statics = diag_statics(coefs)[0 if kind_full else 1]
            return _diagnostics.measure(
                diag, kind_full, state.count, ns_out, ops[0], statics, layouts, the_mesh, treedef
            )

        operands = (mu_leaves, grad_leaves)
        is_full, wrong_kind = _step_kind(state.count, period, full_step)
        if diag is None:
            if isinstance(is_full, bool):
                orthogonal = (full if is_full else block)(operands)
            else:
                orthogonal = jax.lax.cond(is_full, full, block, operands)
            diagnostics = None
        else:
            # Without adaptive's pairing a measurement reads no gradient.
            orthogonal, diagnostics = _diagnostics.step_and_measure(
                diag,
                state.diagnostics,
                state.count,
                is_full,
                {True: full, False: block},
                operands,
                measure,
                diag_statics(),
                reads_gradient=adaptive,
            )
        if isinstance(is_full, bool):
            scales = full_scales if is_full else block_scales
        else:
            scales = [jnp.where(is_full, f, b) for f, b in zip(full_scales, block_scales)]
        orthogonal = [o.astype(d) for o, d in zip(orthogonal, out_dtypes)]

        if adaptive:
            orthogonal = [
                _dual_pairing(m, o) * o
                for m, o in zip(direction(mu_leaves, grad_leaves), orthogonal)
            ]
        new_updates = [(o * s).astype(o.dtype) for o, s in zip(orthogonal, scales)]
        if wrong_kind is not None:  # a host-chosen kind that the counter contradicts
            new_updates = [jnp.where(wrong_kind, jnp.nan, u).astype(u.dtype) for u in new_updates]
        return jax.tree.unflatten(treedef, new_updates), MuonBPState(
            # The momentum keeps the dtype it was created with: a hyperparameter injected as a
            # float32 array (optax.inject_hyperparams) would otherwise promote bfloat16 momenta
            # to float32 after the first update, and the next call would compile again.
            count=count_inc,
            mu=jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu),
            diagnostics=diagnostics,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaleByStepLearningRateState(NamedTuple):
    count: jax.Array  # int32 scalar
    learning_rate: Any = None  # with diagnostics=True: the float32 rate of the last update


def scale_by_step_learning_rate(
    learning_rate: optax.ScalarOrSchedule,
    block_learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    period: Period = DEFAULT_PERIOD,
    diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Multiplies updates by −learning_rate on full steps and −block_learning_rate on block
    steps (schedules are evaluated at the update's 0-based index). With `diagnostics=True` the
    state's `learning_rate` field records the rate applied by the last update."""
    _check_period(period)
    if block_learning_rate is None:
        block_learning_rate = learning_rate

    def value(rate, count):
        return rate(count) if callable(rate) else rate

    def init_fn(params):
        del params
        rate = jnp.zeros([], jnp.float32) if diagnostics else None
        return ScaleByStepLearningRateState(count=jnp.zeros([], jnp.int32), learning_rate=rate)

    def update_fn(updates, state, params=None, *, full_step=None, **extra_args):
        del params, extra_args
        full, _ = _step_kind(state.count, period, full_step)  # scale_by_muonbp flags a mismatch
        rate = jnp.where(
            full, value(learning_rate, state.count), value(block_learning_rate, state.count)
        )
        updates = jax.tree.map(lambda u: (-rate * u).astype(u.dtype), updates)
        return updates, ScaleByStepLearningRateState(
            count=optax.safe_increment(state.count),
            learning_rate=jnp.asarray(rate, jnp.float32) if diagnostics else None,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# Key-path components that mark an embedding or an output head (kept on AdamW by default).
_ADAM_BY_NAME = re.compile(r"(embed|^wte$|^wpe$|head$|^logits$)", re.IGNORECASE)


def default_muon_labels(params: Any) -> Any:
    """The default routing rule: 'muon' for 2-D leaves whose key path has no component that
    contains 'embed' or ends with 'head' (also 'wte', 'wpe', 'logits'); 'adam' otherwise."""

    def label(path, x):
        names = _options.path_names(path)
        if jnp.ndim(x) == 2 and not any(_ADAM_BY_NAME.search(n) for n in names):
            return "muon"
        return "adam"

    return jax.tree_util.tree_map_with_path(label, params)


def muonbp(
    learning_rate: optax.ScalarOrSchedule,
    ns_coeffs: Coeffs = "polar_express",
    ns_steps: int | None = None,
    beta: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    mu_dtype: DTypeLike | None = None,
    *,
    period: Period = DEFAULT_PERIOD,
    block_learning_rate: optax.ScalarOrSchedule | None = None,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: Preconditioning = "frobenius",
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps_root: float = 0.0,
    adam_weight_decay: float = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    muon_weight_dimension_numbers: DimensionNumbers = None,
    consistent_rms: float | None = 0.2,
    ns_dtype: DTypeLike | None = "bfloat16",
    specs: Specs = None,
    mesh: Mesh | None = None,
    block_grid: BlockGrid = None,
    full_strategy: FullStrategy = "auto",
    ns_method: Method = "auto",
    block_lr_rule: BlockLrRule = DEFAULT_BLOCK_LR_RULE,
    diagnostics: DiagnosticsOption = False,
    ns_product: Product = "auto",
) -> optax.GradientTransformationExtraArgs:
    """MuonBP: Muon with block-periodic orthogonalization, AdamW for the other parameters.

    Takes every keyword of `optax.contrib.muon` with the same meaning; with `period=1`,
    `ns_dtype=jnp.float32`, `ns_coeffs="standard"` and the same routing and `consistent_rms`
    it gives optax's updates. Defaults that differ from optax: `consistent_rms=0.2` (RMS
    matching, as in the paper), `ns_dtype=bfloat16`, `ns_coeffs="polar_express"`,
    `ns_method="auto"` (the Gram form on GPUs), and embeddings/output heads go to AdamW
    (`default_muon_labels`).

    Args:
      learning_rate: step size of full steps (and of AdamW unless `adam_learning_rate`).
      period: full step iff `t % period == 0` (t = 0-based update index); 1 is Muon, None is
        BlockMuon (never a full step).
      block_learning_rate: base step size of block steps (default: `learning_rate`; float or
        schedule). A leaf's block updates move by `block_learning_rate · ρ(leaf)`: the rule
        multiplies it, so `block_lr_rule="none"` gives block steps at exactly this rate.
      block_lr_rule: ρ per leaf from the number and shape of the blocks its block step
        orthogonalizes (mesh tiles × `block_grid`); default `"spectral"`:
        ρ = s(m, n) / (s(a, b)·√k) for m×n matrices cut into k blocks of a×b, s the shape
        scale (`consistent_rms·sqrt(max(rows, cols))`), which equalizes the worst-case spectral
        norm of block and full updates; 1 for a leaf with one block. See `block_lr_factor`.
      muon_weight_dimension_numbers: as in optax: a tree (or prefix tree, or callable) of
        `MuonDimensionNumbers`, None marking AdamW leaves; overrides the default routing.
      diagnostics: `True`, `"per_leaf"` or a `Diagnostics`: the Muon state records each
        update's kind and measurements of a sample of updates (`Diagnostics.every`; see
        `scale_by_muonbp`) under `optax.tree.get(state, "diagnostics")`, and the step-size
        state the rate it applied; `read_diagnostics(state)` returns both as a dict.
      specs, mesh, block_grid, full_strategy, ns_method, ns_product, ns_dtype, ns_coeffs, ...: see
        `scale_by_muonbp`. Other arguments as in `optax.contrib.muon`.

    Returns:
      An `optax.GradientTransformationExtraArgs`, as `optax.contrib.muon`.

    Choosing the step kind on the host: the update takes an optional keyword argument
    `full_step` (an optax extra argument, forwarded by `optax.chain`/`optax.partition`/
    `inject_hyperparams`, and by `nnx.Optimizer.update`). Left unset, a `lax.cond` on the
    counter picks the kind inside one compiled program. A Python bool instead traces only that
    kind: jit the training step with `full_step` static and pass
    `muonbp_jax.is_full_step(step, period)` from a host-side step number — two compiled
    programs, no conditional (on GPUs the conditional costs a device-to-host read of its
    predicate and fusion across it; benchmarks/RESULTS.md). The counter stays the authority:
    an update whose counter disagrees with `full_step` returns NaN. Under `optax.MultiSteps`
    the counter counts applied updates, so pass `is_full_step(step // k, period)` for k
    mini-steps. With diagnostics and `every > 1`, the choice to measure still takes a
    `lax.cond` of its own.

    References:
      Khaled et al., `MuonBP: Faster Muon via Block-Periodic Orthogonalization
      <https://arxiv.org/abs/2510.16981>`_, 2025
    """
    _check_period(period)
    if adam_learning_rate is None:
        adam_learning_rate = learning_rate
    is_dim = lambda x: isinstance(x, MuonDimensionNumbers)

    if muon_weight_dimension_numbers is None:
        param_labels = default_muon_labels
    else:

        def param_labels(params):
            dims = _options.per_leaf(
                muon_weight_dimension_numbers,
                params,
                name="muon_weight_dimension_numbers",
                is_value=is_dim,
            )
            _, _, treedef = _options.leaves_with_paths(params)
            return jax.tree.unflatten(treedef, ["adam" if d is None else "muon" for d in dims])

    muon_branch = optax.chain(
        scale_by_muonbp(
            ns_coeffs=ns_coeffs,
            ns_steps=ns_steps,
            beta=beta,
            eps=eps,
            mu_dtype=mu_dtype,
            period=period,
            nesterov=nesterov,
            adaptive=adaptive,
            preconditioning=preconditioning,
            consistent_rms=consistent_rms,
            ns_dtype=ns_dtype,
            weight_dimension_numbers=muon_weight_dimension_numbers,
            specs=specs,
            mesh=mesh,
            block_grid=block_grid,
            full_strategy=full_strategy,
            ns_method=ns_method,
            block_lr_rule=block_lr_rule,
            diagnostics=diagnostics,
            ns_product=ns_product,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        scale_by_step_learning_rate(
            learning_rate,
            block_learning_rate,
            period=period,
            diagnostics=_diagnostics.resolve(diagnostics) is not None,
        ),
    )
    adam_branch = optax.adamw(
        learning_rate=adam_learning_rate,
        b1=adam_b1,
        b2=adam_b2,
        eps=eps,
        eps_root=adam_eps_root,
        weight_decay=adam_weight_decay,
        mu_dtype=mu_dtype,
        nesterov=nesterov,
    )
    inner = optax.partition({"muon": muon_branch, "adam": adam_branch}, param_labels)

    def init_fn(params):
        _options.check_paths_cover(
            specs,
            params,
            name="specs",
            is_value=_layout.is_spec_or_sharding,
            expected=_layout.SPECS_EXPECTED,
        )
        _check_option_keys(
            params, muon_weight_dimension_numbers, "muon_weight_dimension_numbers", block_grid
        )
        # Also the AdamW leaves: optax.adamw would cast their complex moments to mu_dtype.
        _check_mu_dtype(params, _static_dtype(mu_dtype, "mu_dtype"))
        state = inner.init(params)
        return _placement.place_state_like_params(state, params, specs, mesh)

    # As optax.contrib.muon: a GradientTransformationExtraArgs (extra keyword arguments that
    # optax.chain passes along, such as value=, are accepted).
    if isinstance(inner, optax.GradientTransformationExtraArgs):
        return optax.GradientTransformationExtraArgs(init_fn, inner.update)
    return optax.with_extra_args_support(optax.GradientTransformation(init_fn, inner.update))
