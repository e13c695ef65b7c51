"""The training loop: `train(Config(...)) -> metrics`, usable from Python and from the CLI.

One jitted step (forward, backward, optimizer update) compiled ahead of time with the
parameters' and optimizer state's shardings pinned on both sides, so it compiles once and
never reshards. Checkpoints (orbax `CheckpointManager`) hold the parameters, the optimizer
state, the metrics so far and the configuration; since batches depend only on (seed, step), a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax
from lm import data as data_lib
from lm import optimizers
from lm.model import DATA, GPT, MODEL, ModelConfig, block_grids

FINAL_TRAIN_WINDOW = 10  # final train loss = mean of the last this-many steps
_MODEL = ModelConfig()  # the default model


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run. Defaults are the README's main command (a few minutes on 2 cores)."""

    optimizer: str = "muonbp"
    steps: int = 600
    batch: int = 16
    seq: int = _MODEL.seq
    d_model: int = _MODEL.d_model
    layers: int = _MODEL.layers
    heads: int = _MODEL.heads
    lr: float | None = None  # None: the optimizer's default (optimizers.DEFAULT_LR)
    period: int = 5  # muonbp's full-step period
    mesh: tuple[int, int] | None = None  # (data, model); None: see default_mesh_shape
    tp_blocks: int = 4  # tensor-parallel blocks per matrix (emulated by block_grid if needed)
    block_lr_rule: str | None = None  # MuonBP's block step-size rule; None: the library's
    block_lr_ratio: float = 1.0  # a study knob: block_learning_rate = ratio × lr (1: none)
    full_strategy: str = "auto"  # how MuonBP orthogonalizes whole matrices on full steps
    diagnostics: bool = False  # True: the MuonBP family records optimizers.DIAGNOSTICS each step
    # How a periodic MuonBP picks each step's kind: "host" compiles a block-step and a full-step
    # program and passes `full_step=` from the host's step number (no conditional on the
    # device; README, "Choosing the step kind on the host"); "cond": one program, a lax.cond on
    # the optimizer's counter (the library's default when no `full_step` is given).
    switch: str = "host"
    weight_decay: float = 0.0
    seed: int = 0
    data: str | None = None  # None: the Python standard library's sources
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    checkpoint_dir: str | None = None  # None: no checkpoints

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(seq=self.seq, d_model=self.d_model, layers=self.layers, heads=self.heads)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else optimizers.DEFAULT_LR[self.optimizer]

    def check(self) -> None:
        """Raises ValueError for settings that cannot run, before anything is built."""
        if self.optimizer not in optimizers.OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; choose from "
                f"{', '.join(optimizers.OPTIMIZERS)}"
            )
        positive = "steps batch seq d_model layers heads period tp_blocks eval_every eval_batches"
        for name in (*positive.split(), "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.switch not in ("host", "cond"):
            raise ValueError(f"--switch must be 'host' or 'cond', got {self.switch!r}")
        self.model.check(self.tp_blocks)
        if (self.d_model * self.model.mlp_ratio) % self.tp_blocks:
            raise ValueError(f"the MLP width is not divisible by --tp-blocks {self.tp_blocks}")


def default_mesh_shape(devices: int, tp_blocks: int) -> tuple[int, int]:
    """(data, model): as much tensor parallelism as divides both counts, the rest data."""
    model = math.gcd(devices, tp_blocks)
    return devices // model, model


def mesh_shape(config: Config) -> tuple[int, int]:
    """The (data, model) mesh of `config` on the devices jax sees; ValueError if it cannot be."""
    devices = jax.devices()
    shape = config.mesh or default_mesh_shape(len(devices), config.tp_blocks)
    if shape[0] * shape[1] != len(devices):
        raise ValueError(
            f"--mesh {shape[0]}x{shape[1]} needs {shape[0] * shape[1]} devices but jax has "
            f"{len(devices)} ({devices[0].platform}); use --mesh DATAxMODEL with "
            f"DATA*MODEL = {len(devices)}"
        )
    if config.batch % shape[0]:
        raise ValueError(f"--batch {config.batch} is not divisible by the data axis {shape[0]}")
    if config.tp_blocks % shape[1]:
        raise ValueError(
            f"--tp-blocks {config.tp_blocks} is not a multiple of the mesh's model axis {shape[1]}"
        )
    return shape


def make_mesh(config: Config) -> jax.sharding.Mesh:
    return jax.make_mesh(
        mesh_shape(config), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto)
    )


def _on_mesh(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Puts every leaf on `mesh`: sharded leaves keep their spec, the rest (step counters
    created on one device) are replicated, so one jit sees one device set."""

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, P()))

    return jax.tree.map(place, tree)


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def _loss(graphdef: nnx.GraphDef, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class _Checkpoints:
    """Orbax checkpoints of {params, opt_state} plus the metrics and config as JSON."""

    def __init__(self, directory: str, every: int):
        path = Path(directory).expanduser().resolve()  # orbax needs absolute paths
        self.manager = ocp.CheckpointManager(
            path, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        )
        self.every = every

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, record: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
            ),
        )

    def record(self, step: int) -> dict:
        """The metrics and config saved at `step` (read before the arrays, so that a changed
        configuration is reported as such rather than as a state-structure mismatch)."""
        out = self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
        return out["record"]

    def restore(self, step: int, like: dict) -> dict:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return out["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_same_config(saved: dict, config: Config) -> None:
    mine = dataclasses.asdict(config)
    # Settings that change neither the trajectory nor the state may differ on a resume.
    ignore = {"checkpoint_dir", "checkpoint_every", "eval_every", "switch"}
    diff = [
        f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}"
        for k in mine
        if k not in ignore and _jsonable(saved.get(k)) != _jsonable(mine[k])
    ]
    if diff:
        raise ValueError("--resume with a different configuration (" + "; ".join(diff) + ")")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclasses.dataclass
class Run:
    """A model, its optimizer and their state, laid out on the mesh."""

    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    params: dict
    tx: optax.GradientTransformation
    opt_state: Any


def build(config: Config) -> Run:
    """Builds the model under the mesh (so parameters are created sharded) and its optimizer,
    with the specs and block grids read off the model's `nnx.with_partitioning` annotations."""
    config.check()
    mesh = make_mesh(config)
    with jax.set_mesh(mesh):
        model = GPT(config.model, nnx.Rngs(config.seed))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    tx = optimizers.build(
        config.optimizer,
        config.learning_rate,
        steps=config.steps,
        params=params,
        period=config.period,
        specs=specs,
        mesh=mesh,
        block_grid=block_grids(specs, config.tp_blocks, mesh.shape[MODEL]),
        weight_decay=config.weight_decay,
        block_lr_rule=config.block_lr_rule,
        block_lr_ratio=config.block_lr_ratio,
        full_strategy=config.full_strategy,
        diagnostics=optimizers.DIAGNOSTICS if config.diagnostics else False,
    )
    return Run(mesh, graphdef, params, tx, _on_mesh(tx.init(params), mesh))


def read_diagnostics(opt_state: Any) -> dict[str, jax.Array]:
    """`muonbp_jax.read_diagnostics` (the aggregates over leaves) of a state that records
    diagnostics (the MuonBP family's, see optimizers.DIAGNOSTICS); {} for any other."""
    is_diag = lambda x: isinstance(x, muonbp_jax.MuonBPDiagnostics)
    if not any(map(is_diag, jax.tree.leaves(opt_state, is_leaf=is_diag))):
        return {}
    return muonbp_jax.read_diagnostics(opt_state, per_leaf=False)


def diagnostic_names(opt_state: Any) -> list[str]:
    """The keys of `read_diagnostics(opt_state)` in its order (traced abstractly, no work)."""
    names: list[str] = []
    jax.eval_shape(lambda state: names.extend(read_diagnostics(state)), opt_state)
    return names


def compile_steps(run: Run, config: Config) -> tuple[dict[str, Any], Any]:
    """The training steps (params, opt_state, x, y) -> (params, opt_state, scalars), compiled
    ahead of time with donated state, by step kind (`optimizers.step_kind`), and the
    evaluation loss (params, x, y) -> loss.

    A periodic MuonBP with `config.switch == "host"` gets two programs, "block" and "full",
    each with its kind passed to the update as `full_step=` (no lax.cond); every other
    optimizer (and `switch="cond"`) gets one program, under each kind it runs.
    `scalars` is one float32 vector: the loss, then the diagnostics in the order of
    `diagnostic_names(run.opt_state)`, so that the host reads them all in one transfer, from
    a buffer the next step does not donate."""
    batch = NamedSharding(run.mesh, P(DATA, None))
    replicated = NamedSharding(run.mesh, P())
    param_sh, opt_sh = _shardings(run.params), _shardings(run.opt_state)
    loss_fn = functools.partial(_loss, run.graphdef)

    def step(params, opt_state, x, y, full_step=None):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        extra = {} if full_step is None else {"full_step": full_step}
        updates, opt_state = run.tx.update(grads, opt_state, params, **extra)
        diagnostics = read_diagnostics(opt_state).values()
        scalars = jnp.stack([v.astype(jnp.float32) for v in (loss, *diagnostics)])
        return optax.apply_updates(params, updates), opt_state, scalars

    tokens = jax.ShapeDtypeStruct((config.batch, config.seq), jnp.int32, sharding=batch)

    def compiled(full_step):
        fn = jax.jit(
            functools.partial(step, full_step=full_step),
            in_shardings=(param_sh, opt_sh, batch, batch),
            out_shardings=(param_sh, opt_sh, replicated),
            donate_argnums=(0, 1),
        )
        return fn.lower(run.params, run.opt_state, tokens, tokens).compile()

    kinds = {
        optimizers.step_kind(config.optimizer, config.period, t) for t in range(2 * config.period)
    }
    if kinds == {"block", "full"} and config.switch == "host":
        steps = {"block": compiled(False), "full": compiled(True)}
    else:
        one = compiled(None)
        steps = dict.fromkeys(kinds, one)
    eval_fn = jax.jit(loss_fn, in_shardings=(param_sh, batch, batch), out_shardings=replicated)
    return steps, eval_fn


def train(
    config: Config,
    *,
    corpus: data_lib.Corpus | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    return_params: bool = False,
) -> dict[str, Any]:
    """Trains one model with one optimizer and returns its metrics.

    Args:
      config: the run.
      corpus: tokens to train on (default: `data.load_corpus(config.data)`); pass one to share
        it between runs.
      resume: continue from the latest checkpoint in `config.checkpoint_dir`, if any.
      progress: show a tqdm progress bar.
      stop_at: stop after this many steps, as if interrupted (the schedule still spans
        `config.steps`); for testing `resume`.
      return_params: add the final parameters (a dict of arrays) under "params".

    Returns:
      A dict: "config", "lr", "final_train_loss" (mean of the last 10 steps),
      "final_val_loss", "tokens_per_s", "mean_step_ms", "mean_block_step_ms",
      "mean_full_step_ms" (None where there is no such step; the first run of each
      compiled step program in a process is not timed), "compile_s", "steps" and "evals"
      (per-step and per-evaluation records; a MuonBP-family step's record also holds its
      diagnostics, `read_diagnostics`),
      "devices", "mesh".
    """
    corpus = corpus if corpus is not None else data_lib.load_corpus(config.data)
    data_lib.check_length(corpus, config.seq)
    run = build(config)
    params, opt_state = run.params, run.opt_state
    record: dict[str, Any] = {"config": dataclasses.asdict(config), "steps": [], "evals": []}

    checkpoints = None
    if config.checkpoint_dir is not None:
        checkpoints = _Checkpoints(config.checkpoint_dir, config.checkpoint_every)
    start = 0
    if resume and checkpoints is not None and checkpoints.latest() is not None:
        start = checkpoints.latest()
        saved = checkpoints.record(start)
        _check_same_config(saved["config"], config)
        restored = checkpoints.restore(start, {"params": params, "opt_state": opt_state})
        params, opt_state, record = restored["params"], restored["opt_state"], saved

    began = time.perf_counter()
    step_fns, eval_fn = compile_steps(run, config)
    diagnostics = diagnostic_names(run.opt_state)
    compile_s = time.perf_counter() - began
    to_device = lambda a: jax.device_put(a, NamedSharding(run.mesh, P(DATA, None)))
    val_batches = [
        tuple(map(to_device, b))
        for b in data_lib.validation_batches(
            corpus, config.seed, config.eval_batches, config.batch, config.seq
        )
    ]

    def evaluate() -> float:
        losses = [eval_fn(params, x, y) for x, y in val_batches]
        return float(np.mean(jax.device_get(losses)))

    end = config.steps if stop_at is None else min(stop_at, config.steps)
    tokens_per_step = config.batch * config.seq
    bar = _progress(config.optimizer, start, config.steps, enabled=progress and end > start)
    ran: set[int] = set()  # the step programs run so far (by id)
    for t in range(start, end):
        x, y = map(
            to_device, data_lib.train_batch(corpus, config.seed, t, config.batch, config.seq)
        )
        kind = optimizers.step_kind(config.optimizer, config.period, t)
        t0 = time.perf_counter()
        params, opt_state, scalars = step_fns[kind](params, opt_state, x, y)
        # One step in flight at a time: also what keeps XLA:CPU collectives from deadlocking
        # with many fake devices on few cores (see tests/conftest.py).
        loss, *values = np.asarray(jax.device_get(scalars)).tolist()
        dt = time.perf_counter() - t0
        # The first run of each compiled program in a process also sets up thread pools and
        # buffers: not timed.
        timed = id(step_fns[kind]) in ran
        ran.add(id(step_fns[kind]))
        record["steps"].append(
            {"step": t + 1, "train_loss": loss, "time_s": dt, "kind": kind, "timed": timed}
            | dict(zip(diagnostics, values, strict=True))
        )
        if (t + 1) % config.eval_every == 0 or t + 1 == config.steps:
            record["evals"].append({"step": t + 1, "val_loss": evaluate()})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
        if checkpoints is not None and ((t + 1) % checkpoints.every == 0 or t + 1 == end):
            checkpoints.save(t + 1, {"params": params, "opt_state": opt_state}, record)
    if bar is not None:
        bar.close()
    if checkpoints is not None:
        checkpoints.close()

    metrics = summarize(record, tokens_per_step)
    metrics.update(
        lr=config.learning_rate,
        compile_s=compile_s,
        devices=f"{run.mesh.size} x {run.mesh.devices.flat[0].platform}",
        mesh=dict(run.mesh.shape),
    )
    if return_params:
        metrics["params"] = params
    return metrics


def _progress(name: str, start: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"{name:>10}", unit="step", dynamic_ncols=True)


def summarize(record: dict, tokens_per_step: int) -> dict[str, Any]:
    """The figures of the final table, from the per-step records."""
    steps = record["steps"]
    times = [s["time_s"] for s in steps if s["timed"]]

    def mean_ms(kind: str) -> float | None:
        ts = [s["time_s"] for s in steps if s["kind"] == kind and s["timed"]]
        return 1e3 * float(np.mean(ts)) if ts else None

    last = [s["train_loss"] for s in steps[-FINAL_TRAIN_WINDOW:]]
    return {
        "config": record["config"],
        "final_train_loss": float(np.mean(last)) if last else None,
        "final_val_loss": record["evals"][-1]["val_loss"] if record["evals"] else None,
        "tokens_per_s": tokens_per_step * len(times) / sum(times) if times else None,
        "mean_step_ms": 1e3 * float(np.mean(times)) if times else None,
        "mean_block_step_ms": mean_ms("block"),
        "mean_full_step_ms": mean_ms("full"),
        "steps": steps,
        "evals": record["evals"],
    }
