"""Optimizers by name, all with the same schedule, routing and AdamW settings.

Every optimizer trains the embeddings, the output head and the norms with the same AdamW (the
default routing of `muonbp_jax.default_muon_labels`), so the comparison is about the matrices:

| name         | matrices                                                         |
|--------------|------------------------------------------------------------------|
| `muonbp`     | MuonBP at the library's defaults: block steps (each leaf's block  |
|              | step size from its blocks), a full step every `period` (5)       |
| `muon`       | MuonBP with period 1: every step full (Muon)                     |
| `blockmuon`  | MuonBP with period None: every step a block step (BlockMuon)     |
| `adamw`      | AdamW                                                            |
| `optax_muon` | `optax.contrib.muon` with the same routing and RMS matching      |

Learning rates are peak values of a linear warm-up and cosine decay to a tenth of the peak.
The default rates are the best of small sweeps (`examples/sweep_lr.py`, then
`benchmarks/block_lr_study.py`): Muon 1e-2 (of 3e-3 ... 4e-2), AdamW 5e-3 (of 1e-3 ... 4e-2) at
300 steps; MuonBP and BlockMuon 1e-2 under the library's block step-size rule (of 1e-2 and
2e-2 at 300 steps: MuonBP 1e-2 was better by 0.009; BlockMuon 2e-2 by 0.001-0.011, within seed
noise, so both stay at Muon's rate); benchmarks/RESULTS.md has the tables.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from optax.contrib import MuonDimensionNumbers

import muonbp_jax
from lm import OPTIMIZERS

DEFAULT_LR = {
    "muonbp": 1e-2,
    "muon": 1e-2,
    "blockmuon": 1e-2,
    "adamw": 5e-3,
    "optax_muon": 1e-2,
}
PERIODS = {"muon": 1, "blockmuon": None, "optax_muon": 1}
ADAM = {"b1": 0.9, "b2": 0.95}  # the usual LM setting, for AdamW and every Muon's AdamW part
WARMUP_FRACTION = 0.05
# What the MuonBP-family optimizers record (muonbp_jax.read_diagnostics reads it): every update
# (the library samples every 100th by default; this short run draws a curve per step), the
# whole update's spectral norm also on block steps (vector all-reduces on sharded leaves), so
# that block and full steps can be compared in one plot, and 3 Lanczos iterations instead of
# the library's 5 (a little cheaper).
DIAGNOSTICS = muonbp_jax.Diagnostics(every=1, iterations=3, whole_norm_on_block_steps=True)


def schedule(lr: float, steps: int) -> optax.Schedule:
    warmup = max(1, int(WARMUP_FRACTION * steps))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)


def period_of(name: str, period: int) -> int | None:
    """The full-step period of a Muon-family optimizer (`period` is muonbp's)."""
    return PERIODS.get(name, period)


def step_kind(name: str, period: int, t: int) -> str:
    """'full' or 'block' for the update with 0-based index t; 'adamw' for AdamW."""
    if name == "adamw":
        return "adamw"
    return "full" if bool(muonbp_jax.is_full_step(t, period_of(name, period))) else "block"


def build(
    name: str,
    lr: float,
    *,
    steps: int,
    params: Any,
    period: int = 5,
    specs: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    block_grid: Any = None,
    weight_decay: float = 0.0,
    block_lr_rule: str | None = None,
    block_lr_ratio: float = 1.0,
    full_strategy: str = "auto",
    diagnostics: muonbp_jax.Diagnostics | bool = DIAGNOSTICS,
) -> optax.GradientTransformation:
    """The optimizer `name` (one of OPTIMIZERS) for `params`.

    Args:
      specs, mesh: the parameters' PartitionSpecs and mesh (MuonBP needs them on a mesh with
        Auto axes to find each device's block).
      block_grid: per-leaf `(r, c)` tiling of the device-local blocks (see model.block_grids).
      block_lr_rule: MuonBP's per-leaf block step-size rule (None: the library's default).
      block_lr_ratio: block_learning_rate as a multiple of `lr` (same schedule; multiplied by
        the rule's per-leaf factor). 1 by default: the library's defaults.
      full_strategy: MuonBP's full-step strategy (one of muonbp_jax.FULL_STRATEGIES).
      diagnostics: `diagnostics=` of the MuonBP-family optimizers (muonbp, muon, blockmuon);
        the others record none.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    rate = schedule(lr, steps)
    if name == "adamw":
        return optax.adamw(rate, b1=ADAM["b1"], b2=ADAM["b2"], weight_decay=weight_decay)
    if name == "optax_muon":
        labels = muonbp_jax.default_muon_labels(params)
        dims = jax.tree.map(lambda lab: MuonDimensionNumbers() if lab == "muon" else None, labels)
        return optax.contrib.muon(
            rate,
            weight_decay=weight_decay,
            adam_b1=ADAM["b1"],
            adam_b2=ADAM["b2"],
            adam_weight_decay=weight_decay,
            muon_weight_dimension_numbers=dims,
            consistent_rms=0.2,
        )
    return muonbp_jax.muonbp(
        rate,
        block_learning_rate=None if block_lr_ratio == 1 else schedule(block_lr_ratio * lr, steps),
        period=period_of(name, period),
        weight_decay=weight_decay,
        adam_b1=ADAM["b1"],
        adam_b2=ADAM["b2"],
        adam_weight_decay=weight_decay,
        specs=specs,
        full_strategy=full_strategy,
        **({} if block_lr_rule is None else {"block_lr_rule": block_lr_rule}),
        mesh=mesh,
        block_grid=block_grid,
        diagnostics=diagnostics,
    )
