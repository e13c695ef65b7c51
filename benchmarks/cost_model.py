"""Cost model of one optimizer step of MuonBP, Muon and AdamW on a tensor-parallel mesh.

For a Llama-shaped model (d, ffn, layers, heads, kv heads, vocab) on a (tp, fsdp, dp) mesh it
counts, per device, the Newton–Schulz FLOPs, the bytes read from memory and the bytes received
over the links of:

* a **block step**: every device orthogonalizes its own tile of every matrix, no communication;
* a **full step**, by strategy:
  - ``gather``: all-gather each matrix, orthogonalize it on every device (redundant work);
  - ``all_to_all``: same-shape matrices are spread over the tp·fsdp devices that share them, so
    each orthogonalizes whole matrices for 1/(tp·fsdp) of the group (no redundant work);
* an **AdamW update** of every parameter (memory bound).

Times come from a matmul rate, an HBM bandwidth and a link bandwidth (`Hardware`); MuonBP with
period P costs ((P − 1)·block + full)/P per step on average. `main` prints the tables for the
Llama 3 1B/8B/70B shapes at TP 8 on an H100 (NVLink) and a TPU v5p (ICI) and writes them to
``--out``; ``validate`` measures the same steps on the machine at hand (8 fake CPU devices with a
real tensor-parallel mesh, or one GPU with `block_grid` emulating TP 8) and prints predicted
against measured times.

The layouts, the exchange groups of full steps and the Newton–Schulz FLOP count are muonbp_jax's
own (`_layout.plan` and `_exchange.groups` on abstract shapes, `newton_schulz_flops`), so the
model follows the library; only memory traffic, link bandwidth and time are modelled here.

Run ``python benchmarks/cost_model.py --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: an A/B copy of the package there wins

FULL_STRATEGIES = ("gather", "all_to_all", "auto")
MESH_AXES = ("dp", "fsdp", "tp")
TABULATED = ("gather", "all_to_all")  # "auto" equals "all_to_all" when every layer has a twin
NS_STEPS = 5
TOLERANCE = 0.05  # "within 5% of AdamW"

# ----------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Matrix:
    """`count` matrices of shape rows (fan-in) × cols (fan-out). Megatron tensor parallelism
    splits a `column`-parallel matrix on cols and a `row`-parallel one on rows; FSDP splits the
    other dimension."""

    name: str
    rows: int
    cols: int
    count: int
    parallel: str  # "column" or "row"

    @property
    def size(self) -> int:
        return self.rows * self.cols


@dataclasses.dataclass(frozen=True)
class Model:
    """A Llama-shaped decoder: grouped-query attention, gated MLP, embedding and output head
    (one shared matrix when `tied`)."""

    name: str
    d: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.d // self.heads

    def matrices(self) -> list[Matrix]:
        """The hidden-layer matrices (trained by Muon)."""
        kv = self.kv_heads * self.head_dim
        n = self.layers
        return [
            Matrix("q", self.d, self.d, n, "column"),
            Matrix("k", self.d, kv, n, "column"),
            Matrix("v", self.d, kv, n, "column"),
            Matrix("o", self.d, self.d, n, "row"),
            Matrix("gate", self.d, self.ffn, n, "column"),
            Matrix("up", self.d, self.ffn, n, "column"),
            Matrix("down", self.ffn, self.d, n, "row"),
        ]

    def embedding_params(self) -> int:
        """Embedding and output head (AdamW, vocab-parallel)."""
        return (1 if self.tied else 2) * self.vocab * self.d

    def norm_params(self) -> int:
        """RMSNorm scales (AdamW, replicated)."""
        return (2 * self.layers + 1) * self.d

    def matrix_params(self) -> int:
        return sum(m.size * m.count for m in self.matrices())

    def params(self) -> int:
        return self.matrix_params() + self.embedding_params() + self.norm_params()


# Llama 3 shapes (Llama 3 herd, arXiv 2407.21783, Table 3; 1B: Llama 3.2 1B model card), and the
# 1.2 B tree that benchmarks/bench_step.py times (full multi-head attention, 32000 tokens).
MODELS = {
    "1b": Model("Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, tied=True),
    "8b": Model("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256),
    "70b": Model("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256),
    "bench1.2b": Model("bench-1.2B", 2048, 8192, 16, 16, 16, 32000),
    # bench1.2b cut to 4 layers: the same matrix shapes, a quarter of the compile time.
    "bench4l": Model("bench-1.2B-4-layers", 2048, 8192, 4, 16, 16, 32000),
    "tiny": Model("tiny", 256, 1024, 2, 4, 4, 512),  # for 8 fake CPU devices
}


@dataclasses.dataclass(frozen=True)
class MeshShape:
    tp: int = 8
    fsdp: int = 1
    dp: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.fsdp * self.dp

    @property
    def shards(self) -> int:
        """How many devices share (hold a tile of) each matrix."""
        return self.tp * self.fsdp

    def tile(self, m: Matrix) -> tuple[int, int]:
        """The device-local tile of m: P('fsdp', 'tp') for column-parallel, P('tp', 'fsdp') for
        row-parallel matrices (muonbp_jax's layout of that spec)."""
        mesh, (layout,), _ = plan([m], self)
        return layout.block_shape(mesh)


def _library():
    """muonbp_jax's planner, imported on first use: `validate` sets up fake devices before jax
    is imported."""
    import jax
    from optax.contrib import MuonDimensionNumbers

    from muonbp_jax import _exchange, _layout, _newton_schulz, _steps

    return jax, MuonDimensionNumbers, _exchange, _layout, _newton_schulz, _steps


def plan(matrices: Sequence[Matrix], mesh: MeshShape, tp_blocks: int = 1):
    """muonbp_jax's layouts of `matrices` on `mesh`, from abstract shapes: one float32 leaf
    (count, rows, cols) per kind, its batch axis unsharded, split Megatron-style (mesh axes of
    size 1 left out of the specs). `tp_blocks` > 1 adds the `block_grid` that emulates that
    tensor-parallel degree on one device. Returns (abstract mesh, layouts, leaves)."""
    jax, dims, _, layout, _, _ = _library()
    P = jax.sharding.PartitionSpec
    amesh = jax.sharding.AbstractMesh((mesh.dp, mesh.fsdp, mesh.tp), MESH_AXES)
    fsdp, tp = ("fsdp" if mesh.fsdp > 1 else None), ("tp" if mesh.tp > 1 else None)
    leaves = {m.name: jax.ShapeDtypeStruct((m.count, m.rows, m.cols), "float32") for m in matrices}
    specs, grids = {}, {}
    for m in matrices:
        column = m.parallel == "column"
        specs[m.name] = P(None, fsdp, tp) if column else P(None, tp, fsdp)
        grids[m.name] = (1, tp_blocks) if column else (tp_blocks, 1)
    the_mesh, layouts = layout.plan(
        leaves, specs=specs, mesh=amesh, dimension_numbers=dims(1, 2), block_grid=grids
    )
    return the_mesh, layouts, jax.tree.leaves(leaves)


# ----------------------------------------------------------------------------- counting


def ns_flops(rows: int, cols: int, steps: int = NS_STEPS, method: str = "newton_schulz") -> int:
    """Matmul FLOPs of `steps` Newton–Schulz iterations on one rows×cols matrix: muonbp_jax's
    `newton_schulz_flops` (5·(4a²b + 2a³) for a ≤ b and five plain steps)."""
    return _library()[4].newton_schulz_flops(rows, cols, steps, method)


def ns_hbm_bytes(rows: int, cols: int, steps: int = NS_STEPS, itemsize: int = 2) -> int:
    """Bytes one Newton–Schulz call reads and writes from memory (unfused kernels, operands in
    `itemsize`-byte floats): per iteration X is read three times and written once, the a×a
    products A, A² and bA + cA² are written and read back; the float32 normalization reads the
    input and writes the `itemsize` copy."""
    a, b = sorted((rows, cols))
    per_step = (4 * a * b + 2 * a * b + 8 * a * a) * itemsize
    return steps * per_step + (4 + itemsize) * a * b


@dataclasses.dataclass(frozen=True)
class Group:
    """`count` same-shape matrices orthogonalized in one batched call per device (`short` ×
    `long`: the shape in wide form; m×n and n×m matrices are separate calls)."""

    short: int
    long: int
    count: int


@dataclasses.dataclass
class StepCost:
    """Per-device work of one optimizer step."""

    kind: str
    groups: list[Group]
    ns_flops: int = 0
    ns_bytes: int = 0
    elementwise_bytes: int = 0
    link_bytes: int = 0  # received per device
    collectives: int = 0

    def add_groups(self, groups: Iterable[Group], steps: int, itemsize: int) -> None:
        for g in groups:
            self.groups.append(g)
            self.ns_flops += g.count * ns_flops(g.short, g.long, steps)
            self.ns_bytes += g.count * ns_hbm_bytes(g.short, g.long, steps, itemsize)


def _grouped(shapes: Iterable[tuple[int, int, int]]) -> list[Group]:
    """Groups (rows, cols, count) by shape, as muonbp_jax batches same-shape matrices (an m×n
    and an n×m are iterated apart, each as it is)."""
    counts: dict[tuple[int, int], int] = {}
    for rows, cols, count in shapes:
        counts[(rows, cols)] = counts.get((rows, cols), 0) + count
    return [Group(*sorted(key), n) for key, n in counts.items()]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a step moves besides Newton–Schulz; defaults: float32 parameters and states."""

    ns_steps: int = NS_STEPS
    ns_itemsize: int = 2  # bf16 Newton–Schulz
    comm_itemsize: int = 4  # the momentum travels in its dtype (float32)
    # AdamW reads g, m, v, p and writes m, v, update: 7 float32 arrays.
    adam_bytes_per_param: int = 28
    # Muon's elementwise work: read g, mu (8), write mu (4), read mu twice more for Nesterov and
    # the normalization (8), write the bf16 copy (2), read the result (2), write the update (4).
    muon_bytes_per_param: int = 28


def local_params(model: Model, mesh: MeshShape) -> tuple[int, int]:
    """(matrix, other) parameters held by one device."""
    matrix = model.matrix_params() // mesh.shards
    other = model.embedding_params() // mesh.shards + model.norm_params()
    return matrix, other


def block_step(
    model: Model, mesh: MeshShape, s: Settings = Settings(), tp_blocks: int = 1
) -> StepCost:
    """Every device orthogonalizes its own tiles (the layouts' block shape, times the batch of
    matrices it holds and the block_grid tiles); nothing is sent."""
    cost = StepCost("block", [])
    amesh, layouts, _ = plan(model.matrices(), mesh, tp_blocks)
    tiles = []
    for lay in layouts:
        local = lay.local_shape(amesh)
        count = math.prod(local[a] for a in lay.batch_axes) * lay.grid[0] * lay.grid[1]
        tiles.append((*lay.block_shape(amesh), count))
    cost.add_groups(_grouped(tiles), s.ns_steps, s.ns_itemsize)
    return _with_elementwise(cost, model, mesh, s)


def full_step(model: Model, mesh: MeshShape, strategy: str, s: Settings = Settings()) -> StepCost:
    """A full step, grouped by muonbp_jax's own `_exchange.groups` with the strategy's split
    threshold: a gathered group all-gathers each cut matrix axis and orthogonalizes all its
    matrices on every device; a split one is zero-padded to a multiple of the K devices that
    share it, sent with one all-to-all there and one back per set of mesh axes, and each device
    orthogonalizes ceil(count/K) whole matrices."""
    if strategy not in FULL_STRATEGIES:
        raise ValueError(f"strategy must be one of {FULL_STRATEGIES}, got {strategy!r}")
    _, _, exchange, _, _, steps = _library()
    amesh, layouts, leaves = plan(model.matrices(), mesh)
    cost = StepCost(f"full_{strategy}", [])
    exchanged = set()
    for g in exchange.groups(leaves, layouts, amesh, steps._MIN_SPLIT[strategy]):
        rows, cols = layouts[g.members[0]].matrix_shape
        k = g.parts
        if g.split:
            cost.add_groups([Group(*sorted((rows, cols)), g.per_device)], s.ns_steps, s.ns_itemsize)
            cost.link_bytes += 2 * g.per_device * (k - 1) * (rows * cols // k) * s.comm_itemsize
            exchanged.add(g.axes)
        else:
            cost.add_groups([Group(*sorted((rows, cols)), g.count)], s.ns_steps, s.ns_itemsize)
            cost.link_bytes += g.count * rows * cols * (k - 1) // k * s.comm_itemsize
            cost.collectives += sum(1 for cut in g.cuts if cut)
    cost.collectives += 2 * len(exchanged)
    return _with_elementwise(cost, model, mesh, s)


def step_cost(kind: str, model: Model, mesh: MeshShape, s: Settings = Settings()) -> StepCost:
    """`kind` is "block", "adamw" or "full_<strategy>"."""
    if kind == "block":
        return block_step(model, mesh, s)
    if kind == "adamw":
        return adamw_step(model, mesh, s)
    return full_step(model, mesh, kind.removeprefix("full_"), s)


def _with_elementwise(cost: StepCost, model: Model, mesh: MeshShape, s: Settings) -> StepCost:
    matrix, other = local_params(model, mesh)
    cost.elementwise_bytes = matrix * s.muon_bytes_per_param + other * s.adam_bytes_per_param
    return cost


def adamw_step(model: Model, mesh: MeshShape, s: Settings = Settings()) -> StepCost:
    matrix, other = local_params(model, mesh)
    return StepCost("adamw", [], elementwise_bytes=(matrix + other) * s.adam_bytes_per_param)


# ----------------------------------------------------------------------------- time


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Rates of one device. `matmul` is what a large bf16 matmul achieves (measured where we
    could), `peak` the datasheet's dense bf16 figure; `link` is the bandwidth one device
    receives at in a collective (one direction); `overhead` a fixed cost per optimizer call."""

    name: str
    matmul: float  # FLOP/s
    peak: float  # FLOP/s
    hbm: float  # bytes/s
    link: float  # bytes/s
    latency: float = 1e-5  # seconds per collective
    overhead: float = 0.0  # seconds per step
    source: str = ""


HARDWARE = {
    "h100": Hardware(
        "H100 SXM (NVLink 4)",
        matmul=649e12,
        peak=989e12,
        hbm=3.0e12,
        link=380e9,
        source=(
            "peak 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 900 GB/s NVLink total (450 GB/s each "
            "way): NVIDIA H100 datasheet (https://www.nvidia.com/en-us/data-center/h100/). Used: "
            "649 TFLOP/s bf16 8192³ matmul measured through JAX 0.11.2 on an H100 (this project's measurement), "
            "3.0 TB/s device copy measured on the lent H100 (device KINDS.md), 380 GB/s one-way "
            "NVLink p2p measured by NVIDIA's p2pBandwidthLatencyTest "
            "(https://github.com/NVIDIA/nccl/issues/1264)."
        ),
    ),
    "v5p": Hardware(
        "TPU v5p (ICI)",
        matmul=459e12,
        peak=459e12,
        hbm=2765e9,
        link=600e9,
        source=(
            "459 TFLOP/s bf16, 2765 GB/s HBM2e, 4800 Gbps (600 GB/s) inter-chip interconnect per "
            "chip, 1200 GB/s bidirectional: Cloud TPU v5p documentation "
            "(https://cloud.google.com/tpu/docs/v5p-training). No measured figures: datasheet "
            "rates, so TPU times are lower bounds."
        ),
    ),
}


def ns_time(cost: StepCost, hw: Hardware, s: Settings = Settings()) -> float:
    """Each batched call is bound by compute or by memory, whichever is slower."""
    return sum(
        g.count
        * max(
            ns_flops(g.short, g.long, s.ns_steps) / hw.matmul,
            ns_hbm_bytes(g.short, g.long, s.ns_steps, s.ns_itemsize) / hw.hbm,
        )
        for g in cost.groups
    )


def step_time(cost: StepCost, hw: Hardware, s: Settings = Settings()) -> dict[str, float]:
    """Predicted seconds, split into parts; no overlap of communication and compute assumed."""
    parts = {
        "ns": ns_time(cost, hw, s),
        "elementwise": cost.elementwise_bytes / hw.hbm,
        "comm": cost.link_bytes / hw.link + cost.collectives * hw.latency,
        "overhead": hw.overhead,
    }
    parts["total"] = sum(parts.values())
    return parts


def amortized(block: float, full: float, period: int | None) -> float:
    """Mean time per step of MuonBP with a full step every `period` steps (None: never)."""
    if period is None:
        return block
    return ((period - 1) * block + full) / period


def break_even_period(block: float, full: float, target: float, max_period: int = 10**6):
    """The smallest P with amortized(block, full, P) <= target, or None when no P reaches it
    (block > target)."""
    if full <= target:
        return 1
    if block >= target:
        return None
    # ((P-1)·block + full)/P <= target  <=>  P >= (full - block) / (target - block)
    p = max(1, math.ceil((full - block) / (target - block) - 1e-12))
    return p if p <= max_period else None


def train_flops_per_device(model: Model, mesh: MeshShape, group_tokens: float, seq: int) -> float:
    """Forward + backward FLOPs per device when each tensor-parallel group processes
    `group_tokens` tokens per step: 6 per parameter per token plus causal attention
    6·layers·seq·d per token, split over the tp devices of the group."""
    per_token = 6 * model.params() + 6 * model.layers * seq * model.d
    return per_token * group_tokens / mesh.tp


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class Scenario:
    model: Model
    mesh: MeshShape
    hw: Hardware
    group_tokens: int  # tokens per optimizer step processed by one tensor-parallel group
    seq: int
    # Forward/backward rate as a fraction of hw.peak; Llama 3 training reports 38-43% BF16 MFU on
    # H100s (arXiv 2407.21783, Table 4).
    mfu: float


PERIODS = (1, 2, 4, 5, 8, 16, None)


def analyze(sc: Scenario, s: Settings = Settings()) -> dict:
    m, mesh, hw = sc.model, sc.mesh, sc.hw
    kinds = ["block", "adamw"] + [f"full_{strat}" for strat in TABULATED]
    costs = {k: step_cost(k, m, mesh, s) for k in kinds}
    times = {k: step_time(c, hw, s) for k, c in costs.items()}
    adam = times["adamw"]["total"]
    fwd_bwd = train_flops_per_device(m, mesh, sc.group_tokens, sc.seq) / (sc.mfu * hw.peak)
    out = {
        "model": dataclasses.asdict(m),
        "params": m.params(),
        "matrix_params": m.matrix_params(),
        "mesh": dataclasses.asdict(mesh),
        "hardware": dataclasses.asdict(hw),
        "group_tokens_per_step": sc.group_tokens,
        "seq": sc.seq,
        "mfu": sc.mfu,
        "fwd_bwd_s": fwd_bwd,
        "steps": {
            k: {
                "ns_flops": c.ns_flops,
                "ns_bytes": c.ns_bytes,
                "elementwise_bytes": c.elementwise_bytes,
                "link_bytes": c.link_bytes,
                "collectives": c.collectives,
                "time_s": times[k],
            }
            for k, c in costs.items()
        },
        "strategies": {},
    }
    block = times["block"]["total"]
    for strat in TABULATED:
        full = times[f"full_{strat}"]["total"]
        opt_p = break_even_period(block, full, (1 + TOLERANCE) * adam)
        # Training step: fwd_bwd + optimizer; within 5% of AdamW's training step.
        train_target = (1 + TOLERANCE) * (fwd_bwd + adam) - fwd_bwd
        train_p = break_even_period(block, full, train_target)
        rate = train_flops_per_device(m, mesh, 1, sc.seq) / (sc.mfu * hw.peak)  # s per token
        min_tokens = {
            str(p): max(0.0, (amortized(block, full, p) - (1 + TOLERANCE) * adam))
            / (TOLERANCE * rate)
            for p in PERIODS
        }
        out["strategies"][strat] = {
            "amortized_s": {str(p): amortized(block, full, p) for p in PERIODS},
            "optimizer_ratio_to_adamw": {str(p): amortized(block, full, p) / adam for p in PERIODS},
            "train_step_ratio_to_adamw": {
                str(p): (fwd_bwd + amortized(block, full, p)) / (fwd_bwd + adam) for p in PERIODS
            },
            "break_even_period_optimizer": opt_p,
            "break_even_period_train": train_p,
            "min_group_tokens_within_5pct": min_tokens,
        }
    return out


def _fmt_time(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t >= 1e-3 else f"{t * 1e6:.0f} µs"


def _fmt_p(p: int | None) -> str:
    return "never" if p is None else str(p)


def _fmt_tokens(t: float) -> str:
    return f"{t / 1e6:.2f}M" if t >= 1e5 else f"{t / 1e3:.1f}k"


def tables(results: Sequence[dict]) -> str:
    """Markdown tables: per-device work, predicted times, break-even periods."""
    lines = [
        (
            "| model | hardware | mesh (tp,fsdp,dp) | step | NS TFLOP/dev | link GB/dev | "
            "elementwise GB/dev | NS | comm | total |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mesh = "({tp},{fsdp},{dp})".format(**r["mesh"])
        for k, st in r["steps"].items():
            t = st["time_s"]
            lines.append(
                f"| {r['model']['name']} | {r['hardware']['name']} | {mesh} | {k} | "
                f"{st['ns_flops'] / 1e12:.2f} | {st['link_bytes'] / 1e9:.2f} | "
                f"{st['elementwise_bytes'] / 1e9:.2f} | {_fmt_time(t['ns'])} | "
                f"{_fmt_time(t['comm'])} | {_fmt_time(t['total'])} |"
            )
    lines += [
        "",
        (
            "Optimizer step relative to AdamW's, and the whole training step (forward + "
            "backward + optimizer) relative to AdamW's, for MuonBP at period P (P=1: Muon; ∞: "
            "BlockMuon):"
        ),
        "",
        (
            "| model | hardware | full step | opt P=1 | opt P=5 | opt P=∞ | P within 5% (opt) | "
            "train P=1 | train P=5 | train P=∞ | P within 5% (train) | tokens per TP group per "
            "step for 5%: P=1 / P=5 / P=∞ |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for strat, st in r["strategies"].items():
            o, t, mt = (
                st["optimizer_ratio_to_adamw"],
                st["train_step_ratio_to_adamw"],
                st["min_group_tokens_within_5pct"],
            )
            lines.append(
                f"| {r['model']['name']} | {r['hardware']['name']} | {strat} | "
                f"{o['1']:.1f}× | {o['5']:.1f}× | {o['None']:.1f}× | "
                f"{_fmt_p(st['break_even_period_optimizer'])} | "
                f"{t['1']:.3f} | {t['5']:.3f} | {t['None']:.3f} | "
                f"{_fmt_p(st['break_even_period_train'])} | "
                f"{_fmt_tokens(mt['1'])} / {_fmt_tokens(mt['5'])} / {_fmt_tokens(mt['None'])} |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _model_from_args(args) -> list[Model]:
    custom = (args.d, args.ffn, args.layers, args.heads, args.kv_heads, args.vocab)
    if any(v is not None for v in custom):
        if any(v is None for v in custom):
            raise SystemExit(
                "error: a custom model needs all of --d --ffn --layers --heads --kv-heads --vocab"
            )
        return [Model("custom", *custom)]
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"error: unknown model {unknown}; choose from {sorted(MODELS)}")
    return [MODELS[n] for n in names]


def predict_main(args) -> None:
    hws = []
    for name in args.hardware.split(","):
        if name not in HARDWARE:
            raise SystemExit(f"error: unknown hardware {name!r}; choose from {sorted(HARDWARE)}")
        hws.append(HARDWARE[name])
    mesh = MeshShape(args.tp, args.fsdp, args.dp)
    s = Settings(
        ns_steps=args.ns_steps,
        comm_itemsize=args.comm_bytes,
        adam_bytes_per_param=args.adam_bytes,
        muon_bytes_per_param=args.muon_bytes,
    )
    results = []
    for model in _model_from_args(args):
        for hw in hws:
            sc = Scenario(model, mesh, hw, args.group_tokens, args.seq, args.mfu)
            results.append(analyze(sc, s))
    text = tables(results)
    print(text)
    print()
    for hw in hws:
        print(f"{hw.name}: {hw.source}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost_model.json").write_text(json.dumps(results, indent=1))
        (out / "cost_model.md").write_text(text + "\n")
        print(f"\nwrote {out / 'cost_model.json'} and {out / 'cost_model.md'}")


# ----------------------------------------------------------------------------- validation


def _setup_cpu_devices() -> None:
    """8 fake CPU devices before jax is imported, by the examples' helper (which also sets
    PJRT_NPROC against the XLA:CPU collective deadlock described in tests/conftest.py)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from lm import devices

    devices.use_cpu_devices(8, force=True)


def _median_time(fn, *args, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn(*args), one call in flight (benchmarks/_timing.py)."""
    from _timing import median_ms  # imports jax: only after the devices are set up

    return median_ms(fn, *args, iters=repeats, warmup=warmup) / 1e3


def calibrate(mesh, shape, dtype, repeats: int, elems: int, chunk: int) -> dict[str, float]:
    """Rates of primitive operations, per device, with every device busy at once (fake CPU
    devices share the cores): a batched X·Xᵀ matmul and one Newton–Schulz call on (b, m, n),
    an elementwise a·x + y over `elems` floats, an all-gather of `chunk` floats per device, and
    the cost of launching one sharded call."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from muonbp_jax import orthogonalize

    n_dev = 1 if mesh is None else mesh.size
    axis = None if mesh is None else mesh.axis_names
    spec = P(axis)

    def put(shape_, dtype_=jnp.float32, scale=1.0):
        x = jnp.full(shape_, scale, dtype_)
        return x if mesh is None else jax.device_put(x, NamedSharding(mesh, spec))

    b, m, n = shape
    x = put((n_dev * b, m, n), dtype, 0.01)
    t_mm = _median_time(jax.jit(lambda x: x @ jnp.swapaxes(x, -1, -2)), x, repeats=repeats)
    orth = jax.jit(lambda x: orthogonalize(x, dtype=dtype))
    t_ns = _median_time(orth, x, repeats=repeats)
    overhead = _median_time(jax.jit(lambda a: a + 1), put((n_dev * 8,)), repeats=repeats)
    # Two distinct arrays: passing one buffer twice lets caches serve the second read.
    y, z = put((n_dev * elems,)), put((n_dev * elems,), scale=2.0)
    t_ew = _median_time(jax.jit(lambda a, c: a * 1.0001 + c), y, z, repeats=repeats)
    out = {
        "matmul": 2 * b * m * m * n / t_mm,
        "ns": b * ns_flops(m, n) / t_ns,
        "hbm": 3 * 4 * elems / max(t_ew - overhead, 1e-9),
        "overhead": overhead,
        "link": float("inf"),
        "latency": 0.0,
    }
    if mesh is not None:

        def gather(a):
            return jax.lax.all_gather(a, axis, tiled=True)

        ag = jax.jit(
            jax.shard_map(gather, mesh=mesh, in_specs=spec, out_specs=P(), check_vma=False)
        )
        latency = _median_time(ag, put((n_dev * 8,)), repeats=repeats) - overhead
        t_ag = _median_time(ag, put((n_dev * chunk,)), repeats=repeats) - overhead
        out["latency"] = max(latency, 0.0)
        out["link"] = 4 * chunk * (n_dev - 1) / max(t_ag - latency, 1e-9)
    return out


def _param_tree(model: Model, dtype):
    """Per-layer parameters of the model (plain dicts), and their Megatron PartitionSpecs on a
    ('data', 'model') mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    key = jax.random.key(0)
    params, specs = {}, {}
    col, row = P(None, "model"), P("model", None)
    for i in range(model.layers):
        layer, layer_specs = {}, {}
        for m in model.matrices():
            key, sub = jax.random.split(key)
            layer[m.name] = jax.random.normal(sub, (m.rows, m.cols), dtype)
            layer_specs[m.name] = col if m.parallel == "column" else row
        layer["norm1"] = jnp.ones((model.d,), dtype)
        layer["norm2"] = jnp.ones((model.d,), dtype)
        layer_specs["norm1"] = layer_specs["norm2"] = P()
        params[f"layer{i}"], specs[f"layer{i}"] = layer, layer_specs
    key, k1, k2 = jax.random.split(key, 3)
    params["embed"] = jax.random.normal(k1, (model.vocab, model.d), dtype)
    params["norm"] = jnp.ones((model.d,), dtype)
    specs.update(embed=row, norm=P())
    if not model.tied:
        params["head"] = jax.random.normal(k2, (model.d, model.vocab), dtype)
        specs["head"] = col
    return params, specs


def _single_device_cost(kind: str, model: Model, tp: int, s: Settings) -> StepCost:
    """On one device (block_grid emulation) the device does all tp tiles of every matrix, holds
    all parameters and moves nothing over links."""
    one = MeshShape(1, 1, 1)
    if kind == "adamw":
        return adamw_step(model, one, s)
    if kind == "block":
        return block_step(model, one, s, tp_blocks=tp)
    return full_step(model, one, "gather", s)


def _measure_steps(tx, params, grads, mesh, repeats: int, period_steps: int = 0):
    """Median time of one jitted update; with `period_steps` > 0, the mean time per update over
    that many consecutive updates (the state threaded through, full and block steps mixed)."""
    import contextlib

    import jax

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        state = jax.jit(tx.init)(params)
        update = jax.jit(tx.update)
        if not period_steps:
            return _median_time(update, grads, state, params, repeats=repeats)
        for _ in range(period_steps):  # compile and warm up both branches
            _, state = jax.block_until_ready(update(grads, state, params))
        t0 = time.perf_counter()
        for _ in range(period_steps):
            _, state = jax.block_until_ready(update(grads, state, params))
        return (time.perf_counter() - t0) / period_steps


def validate_main(args) -> None:
    """Measures block, full and AdamW update times and compares them with the model."""
    if args.platform == "cpu":
        _setup_cpu_devices()
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding

    import muonbp_jax

    model = MODELS.get(args.model)
    if model is None:
        raise SystemExit(f"error: unknown model {args.model!r}; choose from {sorted(MODELS)}")
    n_dev, tp = jax.device_count(), args.tp
    on_mesh = n_dev > 1
    if on_mesh and n_dev % tp:
        raise SystemExit(f"error: {n_dev} devices do not split into tp={tp}")
    ns_dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[args.ns_dtype]
    params, specs = _param_tree(model, jnp.float32)
    mesh_shape = MeshShape(tp=tp, fsdp=1, dp=n_dev // tp if on_mesh else 1)
    if on_mesh:
        mesh = jax.make_mesh(
            (n_dev // tp, tp), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
        )
        params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
        grid = None
    else:
        # One device: block_grid gives the tiles of tp-way Megatron sharding.
        mesh, specs = None, None
        tiles = {m.name: (1, tp) if m.parallel == "column" else (tp, 1) for m in model.matrices()}
        grid = {f"layer{i}": tiles for i in range(model.layers)}
    grads = jax.tree.map(lambda x: x * 1e-3, params)
    # On one device every strategy orthogonalizes the same whole matrices locally.
    strategies = [s for s in FULL_STRATEGIES if s in muonbp_jax.FULL_STRATEGIES]
    strategies = strategies if on_mesh else strategies[:1]

    def make(period, strategy="gather"):
        return muonbp_jax.muonbp(
            1e-3,
            period=period,
            specs=specs,
            mesh=mesh,
            block_grid=grid,
            ns_dtype=ns_dtype,
            full_strategy=strategy,
        )

    s = Settings(ns_itemsize=jnp.dtype(ns_dtype).itemsize)
    local_matrix, local_other = local_params(model, mesh_shape if on_mesh else MeshShape(1))
    mean_shard = model.matrix_params() // sum(m.count for m in model.matrices()) // tp
    shape = tuple(int(v) for v in args.calibrate_shape.split(","))
    rates = calibrate(mesh, shape, ns_dtype, args.repeats, local_matrix + local_other, mean_shard)
    hw_kw = {k: rates[k] for k in ("hbm", "link", "latency", "overhead")}
    hw_kw["peak"] = rates["matmul"]
    hws = {
        "matmul": Hardware("calibrated matmul", matmul=rates["matmul"], **hw_kw),
        "ns": Hardware("calibrated NS", matmul=rates["ns"], **hw_kw),
    }

    measured = {"block": _measure_steps(make(None), params, grads, mesh, args.repeats)}
    for strat in strategies:
        measured[f"full_{strat}"] = _measure_steps(
            make(1, strat), params, grads, mesh, args.repeats
        )
    measured["adamw"] = _measure_steps(optax.adamw(1e-3), params, grads, mesh, args.repeats)
    measured["muonbp_p5"] = _measure_steps(make(5), params, grads, mesh, 0, period_steps=10)
    for k, v in measured.items():
        print(f"measured {k}: {_fmt_time(v)}", flush=True)

    rows = []
    preds: dict[str, dict[str, dict[str, float]]] = {h: {} for h in hws}
    for name in [k for k in measured if k != "muonbp_p5"]:
        if on_mesh:
            cost = step_cost(name, model, mesh_shape, s)
        else:
            cost = _single_device_cost(name, model, tp, s)
        for h, hw in hws.items():
            preds[h][name] = step_time(cost, hw, s)
    for h in hws:
        preds[h]["muonbp_p5"] = {
            "total": amortized(preds[h]["block"]["total"], preds[h]["full_gather"]["total"], 5)
        }
    for name, meas in measured.items():
        rows.append((name, {h: preds[h][name] for h in hws}, meas))

    device = jax.devices()[0].device_kind + (f" ×{n_dev} (fake devices)" if on_mesh else "")
    header = (
        f"Validation on {device}, jax {jax.__version__}, optax {optax.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; model {model.name} {dataclasses.astuple(model)[1:]}, "
        f"tp={tp}, NS in {args.ns_dtype}, "
        f"{'shard_map on a (data, model) mesh' if on_mesh else 'block_grid emulation'}.\n"
        f"Calibrated per device in this run: matmul {rates['matmul'] / 1e9:.1f} GFLOP/s and one "
        f"NS call {rates['ns'] / 1e9:.1f} GFLOP/s on {shape}, elementwise "
        f"{rates['hbm'] / 1e9:.1f} GB/s, all-gather {rates['link'] / 1e9:.2f} GB/s + "
        f"{_fmt_time(rates['latency'])} each, call overhead {_fmt_time(rates['overhead'])}.\n"
    )
    table = [
        (
            "| step | NS (matmul rate) | elementwise | comm | predicted (matmul rate) | "
            "predicted (NS rate) | measured | error (matmul) | error (NS) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, pred, meas in rows:
        pm, pn = pred["matmul"], pred["ns"]
        parts = [_fmt_time(pm[k]) if k in pm else "" for k in ("ns", "elementwise", "comm")]
        table.append(
            f"| {name} | {' | '.join(parts)} | {_fmt_time(pm['total'])} | "
            f"{_fmt_time(pn['total'])} | {_fmt_time(meas)} | {pm['total'] / meas - 1:+.0%} | "
            f"{pn['total'] / meas - 1:+.0%} |"
        )
    text = header + "\n" + "\n".join(table)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"validate_{args.platform}.md").write_text(text + "\n")
        record = {
            "device": device,
            "jax": jax.__version__,
            "optax": optax.__version__,
            "model": dataclasses.asdict(model),
            "tp": tp,
            "calibration": rates,
            "rows": [{"step": n, "predicted": p, "measured_s": m} for n, p, m in rows],
        }
        (out / f"validate_{args.platform}.json").write_text(json.dumps(record, indent=1))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    pred = sub.add_parser(
        "predict",
        help="tables for models on hardware (the default command)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    val = sub.add_parser(
        "validate",
        help="measure block/full/AdamW updates here and compare with the model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for p in (parser, pred):
        p.add_argument("--models", default="1b,8b,70b", help=f"comma list of {sorted(MODELS)}")
        for flag in ("--d", "--ffn", "--layers", "--heads", "--kv-heads", "--vocab"):
            p.add_argument(flag, type=int, default=None, help="custom model (give all six)")
        p.add_argument("--tp", type=int, default=8)
        p.add_argument("--fsdp", type=int, default=1)
        p.add_argument("--dp", type=int, default=1)
        p.add_argument("--hardware", default="h100,v5p", help=f"comma list of {sorted(HARDWARE)}")
        p.add_argument("--ns-steps", type=int, default=NS_STEPS)
        p.add_argument("--comm-bytes", type=int, default=4, help="bytes per momentum element sent")
        p.add_argument(
            "--adam-bytes",
            type=int,
            default=Settings.adam_bytes_per_param,
            help="memory traffic of an AdamW update, bytes per parameter",
        )
        p.add_argument(
            "--muon-bytes",
            type=int,
            default=Settings.muon_bytes_per_param,
            help="memory traffic of Muon's elementwise work, bytes per matrix parameter",
        )
        p.add_argument(
            "--group-tokens",
            type=int,
            default=2**17,
            help="tokens per optimizer step processed by each tensor-parallel group",
        )
        p.add_argument("--seq", type=int, default=4096, help="sequence length")
        p.add_argument(
            "--mfu", type=float, default=0.4, help="forward/backward rate as a fraction of peak"
        )
        p.add_argument("--out", default=None, help="folder for cost_model.json/.md")
    val.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    val.add_argument("--model", default="tiny", help="a preset or 'tiny' (CPU scale)")
    val.add_argument("--tp", type=int, default=8)
    val.add_argument("--ns-dtype", choices=("bf16", "f32"), default="f32")
    val.add_argument("--repeats", type=int, default=5)
    val.add_argument(
        "--calibrate-shape", default="8,128,512", help="b,m,n of the calibration matmul and NS"
    )
    val.add_argument("--out", default=None, help="folder for validate_<platform>.json/.md")
    args = parser.parse_args(argv)
    if args.command == "validate":
        validate_main(args)
    else:
        predict_main(args)


if __name__ == "__main__":
    sys.exit(main())
