"""Which block step size should MuonBP use by default? A study of `block_lr_rule`.

Trains the flagship example's byte-level GPT (examples/lm) and compares, for each mesh and
full-step period P, MuonBP under every block step-size rule of `muonbp_jax.BLOCK_LR_RULES`
(each at every full learning rate of --muonbp-lrs) against Muon, BlockMuon and AdamW, each at
the best of its own learning-rate grid. Every run of one seed sees the same initialization and
batches, so differences are paired by seed.

On fake CPU devices the blocks are real `shard_map` tiles of each --meshes mesh (DATAxMODEL);
on one GPU, `block_grid` cuts every matrix into --tp-blocks blocks (mesh 1x1).

    python benchmarks/block_lr_study.py --preset cpu --out runs/block_lr_cpu
    python benchmarks/block_lr_study.py --preset gpu --out runs/block_lr_gpu
    # split one plan over several processes, then merge:
    python benchmarks/block_lr_study.py --preset cpu --shard 0/3 --out runs/block_lr_cpu &
    ...
    python benchmarks/block_lr_study.py --preset cpu --report-only --out runs/block_lr_cpu

Writes study-<i>-<n>.json (updated after every run; --resume skips finished runs) and, from all
the JSON files in --out, study.md: per (mesh, P) and rule, the final validation loss at the best
full rate and its paired difference from tuned Muon.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from lm import devices

PRESETS = {
    # 8 fake CPU devices; heads=8 so that 8-way tensor parallelism keeps whole heads.
    "cpu": {
        "model": {"steps": 300, "batch": 16, "seq": 128, "d_model": 128, "layers": 2, "heads": 8},
        "meshes": "2x4,1x8",
        "tp_blocks": None,  # the mesh's model axis
        "periods": "2,4,8",
        "tune_period": 4,
        "muon_lrs": "5e-3,1e-2,2e-2",
        "muonbp_lrs": "1e-2,2e-2",
        "blockmuon_lrs": "1e-2,2e-2",
        "adamw_lrs": "2.5e-3,5e-3,1e-2",
    },
    # The flagship example's default run (examples/train_lm.py), 3 seeds.
    "flagship": {
        "model": {"steps": 300, "batch": 16, "seq": 128, "d_model": 128, "layers": 2, "heads": 4},
        "meshes": "2x4",
        "tp_blocks": None,
        "periods": "5",
        "tune_period": 5,
        "muon_lrs": "1e-2,2e-2",
        "muonbp_lrs": "1e-2,2e-2",
        "blockmuon_lrs": "1e-2,2e-2",
        "adamw_lrs": "5e-3",
    },
    # One GPU: 25.6 M parameters, 1000 steps of 16 x 256 bytes (about half an epoch of the
    # default corpus, so validation loss does not measure memorization).
    "gpu": {
        "model": {
            "steps": 1000,
            "batch": 16,
            "seq": 256,
            "d_model": 512,
            "layers": 8,
            "heads": 8,
            "eval_every": 100,
        },
        "meshes": "1x1",
        "tp_blocks": 8,
        "periods": "5",
        "tune_period": 5,
        "muon_lrs": "1.25e-3,2.5e-3,5e-3",
        "muonbp_lrs": "2.5e-3,5e-3",
        "blockmuon_lrs": "2.5e-3,5e-3",
        "adamw_lrs": "1e-3,2e-3",
    },
}
RULES = "spectral,sqrt_blocks,quarter,none"


@dataclasses.dataclass(frozen=True)
class Run:
    optimizer: str  # muonbp, muon, blockmuon, adamw
    mesh: str  # DATAxMODEL
    period: int | None
    rule: str | None  # block_lr_rule (MuonBP, BlockMuon); None: not applicable
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return (
            f"{self.optimizer}|{self.mesh}|P={self.period}|{self.rule}|lr={self.lr:g}|s{self.seed}"
        )


def plan(args, preset: dict) -> list[Run]:
    floats = lambda text: [float(v) for v in text.split(",") if v]
    meshes = args.meshes.split(",")
    periods = [int(p) for p in args.periods.split(",")]
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        runs += [Run("muon", meshes[0], 1, None, lr, seed) for lr in floats(args.muon_lrs)]
        runs += [Run("adamw", meshes[0], None, None, lr, seed) for lr in floats(args.adamw_lrs)]
        for mesh in meshes:
            runs += [
                Run("blockmuon", mesh, None, "spectral", lr, seed)
                for lr in floats(args.blockmuon_lrs)
            ]
            for p in periods:
                # The full rate is tuned at --tune-period; other periods take the grid's first.
                lrs = floats(args.muonbp_lrs)[: None if p == args.tune_period else 1]
                for rule in args.rules.split(","):
                    runs += [Run("muonbp", mesh, p, rule, lr, seed) for lr in lrs]
    return runs


def run_one(run: Run, shape: dict, tp_blocks: int | None, corpus) -> dict:
    from lm import train as train_lib

    data, model = (int(v) for v in run.mesh.split("x"))
    config = train_lib.Config(
        optimizer=run.optimizer,
        period=run.period or 1,
        mesh=(data, model),
        tp_blocks=tp_blocks or model,
        block_lr_rule=run.rule,
        lr=run.lr,
        seed=run.seed,
        eval_batches=4,
        **shape,
    )
    began = time.perf_counter()
    m = train_lib.train(config, corpus=corpus, progress=False)
    return {
        **dataclasses.asdict(run),
        "val": m["final_val_loss"],
        "train": m["final_train_loss"],
        "evals": m["evals"],
        "wall_s": time.perf_counter() - began,
    }


# ----------------------------------------------------------------------------- report


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _spread(xs: Sequence[float]) -> float:
    return (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0


def _by_seed(results, **where) -> dict[float, dict[int, float]]:
    """{lr: {seed: val loss}} of the runs matching `where`."""
    out: dict[float, dict[int, float]] = {}
    for r in results:
        if all(r[k] == v for k, v in where.items()):
            out.setdefault(r["lr"], {})[r["seed"]] = r["val"]
    return out


def best(results, **where) -> tuple[float, dict[int, float]] | None:
    """The learning rate with the lowest mean loss over seeds (among those with all seeds)."""
    grid = _by_seed(results, **where)
    if not grid:
        return None
    most = max(len(v) for v in grid.values())
    full = {lr: v for lr, v in grid.items() if len(v) == most}
    lr = min(full, key=lambda k: _mean(list(full[k].values())))
    return lr, full[lr]


def report(results: list[dict], meta: dict) -> str:
    seeds = sorted({r["seed"] for r in results})
    lines = [
        (
            f"{meta.get('device', '?')}, jax {meta.get('jax', '?')}, optax {meta.get('optax', '?')}, "
            f"{meta.get('date', '?')}; model {meta.get('shape', '?')}; seeds {seeds}."
        ),
        "",
        "Baselines, final validation loss (nats/byte) per learning rate, mean ± half-range:",
        "",
        "| optimizer | mesh | lr | val loss |",
        "|---|---|---|---|",
    ]
    for opt in ("muon", "blockmuon", "adamw"):
        for mesh in sorted({r["mesh"] for r in results if r["optimizer"] == opt}):
            for lr, vals in sorted(_by_seed(results, optimizer=opt, mesh=mesh).items()):
                v = list(vals.values())
                lines.append(f"| {opt} | {mesh} | {lr:g} | {_mean(v):.4f} ± {_spread(v):.4f} |")
    muon = best(results, optimizer="muon")
    if muon is None:
        return "\n".join(lines)
    muon_lr, muon_val = muon
    lines += [
        "",
        (
            f"Tuned Muon: lr {muon_lr:g}, val {_mean(list(muon_val.values())):.4f}. MuonBP per rule at "
            "its best full rate (of the grid); Δ = MuonBP − tuned Muon, paired by seed, mean ± "
            "half-range, and as % of Muon's loss. BlockMuon and AdamW at their own best rate."
        ),
        "",
        "| mesh | P | rule | lr | val loss | Δ vs Muon | Δ % |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(mesh, p, label, found) -> str:
        lr, vals = found
        d = [vals[s] - muon_val[s] for s in vals if s in muon_val]
        pct = [100 * (vals[s] / muon_val[s] - 1) for s in vals if s in muon_val]
        return (
            f"| {mesh} | {p} | {label} | {lr:g} | {_mean(list(vals.values())):.4f} | "
            f"{_mean(d):+.4f} ± {_spread(d):.4f} | {_mean(pct):+.2f}% |"
        )

    meshes = sorted({r["mesh"] for r in results if r["optimizer"] == "muonbp"})
    periods = sorted({r["period"] for r in results if r["optimizer"] == "muonbp"})
    rules = [x for x in RULES.split(",") if any(r["rule"] == x for r in results)]
    for mesh in meshes:
        for p in periods:
            for rule in rules:
                found = best(results, optimizer="muonbp", mesh=mesh, period=p, rule=rule)
                if found:
                    lines.append(row(mesh, p, rule, found))
        found = best(results, optimizer="blockmuon", mesh=mesh)
        if found:
            lines.append(row(mesh, "∞", "BlockMuon", found))
    found = best(results, optimizer="adamw")
    if found:
        lines.append(row("-", "-", "AdamW", found))
    return "\n".join(lines)


def load(out: Path) -> tuple[list[dict], dict]:
    results, meta = [], {}
    for path in sorted(out.glob("study-*.json")):
        saved = json.loads(path.read_text())
        results += saved["runs"]
        meta = meta or saved["meta"]
    return results, meta


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for name in ("meshes", "periods", "muon_lrs", "muonbp_lrs", "blockmuon_lrs", "adamw_lrs"):
        p.add_argument("--" + name.replace("_", "-"), default=None, help="overrides the preset")
    p.add_argument("--tune-period", type=int, default=None, help="period of the full-rate grid")
    p.add_argument("--tp-blocks", type=int, default=None, help="blocks per matrix (GPU)")
    for name in ("steps", "batch", "seq", "d-model", "layers", "heads"):
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    p.add_argument("--rules", default=RULES)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th run of the plan from i")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", default="runs/block_lr_study")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for name in ("meshes", "periods", "muon_lrs", "muonbp_lrs", "blockmuon_lrs", "adamw_lrs"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.tune_period is None:
        args.tune_period = preset["tune_period"]
    shape = dict(preset["model"])
    for name in ("steps", "batch", "seq", "d_model", "layers", "heads"):
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    tp_blocks = args.tp_blocks or preset["tp_blocks"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        index, count = (int(v) for v in args.shard.split("/"))
        store = out / f"study-{index}-{count}.json"
        results = json.loads(store.read_text())["runs"] if args.resume and store.exists() else []
        # Runs finished by any process writing to --out count as done.
        done = {Run(**{k: r[k] for k in Run.__dataclass_fields__}).key for r in load(out)[0]}
        done = done if args.resume else set()
        todo = [r for r in plan(args, preset)[index::count] if r.key not in done]
        devices.use_cpu_devices(8)
        import jax
        import optax
        from lm import data as data_lib

        corpus = data_lib.load_corpus()
        meta = {
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "jax": jax.__version__,
            "optax": optax.__version__,
            "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d"),
            "shape": {**shape, "tp_blocks": tp_blocks},
            "command": " ".join(sys.argv),
        }
        print(f"shard {args.shard}: {len(todo)} runs on {meta['device']}", flush=True)
        began = time.perf_counter()
        for i, run in enumerate(todo):
            result = run_one(run, shape, tp_blocks, corpus)
            results.append(result)
            store.write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
            print(
                f"[{i + 1}/{len(todo)} {time.perf_counter() - began:5.0f}s] {run.key}: "
                f"val {result['val']:.4f} ({result['wall_s']:.0f} s)",
                flush=True,
            )
    results, meta = load(out)
    text = report(results, meta)
    (out / "study.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
