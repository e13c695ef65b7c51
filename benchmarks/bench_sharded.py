"""MuonBP steps on a tensor-parallel mesh: block step, full step per strategy, AdamW.

A small transformer's matrices in Megatron layout (q, k, v, up, gate split on their output
columns, o and down on their input rows) on a ('data', 'model') mesh. In one run it measures,
side by side, the median time of one optimizer update for

* the block step (`period=None`: each device orthogonalizes its own tiles),
* the full step (`period=1`) with each `full_strategy` (gather, all_to_all, auto),
* `optax.adamw` on the same parameters,

as ratios to AdamW, and reads from each compiled program the collectives it runs (count, and
bytes each device sends or receives) and its memory per device. A second table sweeps the size
of one group of same-shape matrices (gather against all_to_all), the evidence for "auto".

On a CPU it starts 8 fake devices (`--devices`); on GPUs it uses every device there is:

    python benchmarks/bench_sharded.py                      # 8 fake CPU devices, mesh 1x8
    python benchmarks/bench_sharded.py --mesh 2x4 --out bench_sharded.json
    python benchmarks/bench_sharded.py --d 2048 --ffn 8192  # on several GPUs: mesh 1xN
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: an A/B copy of the package there wins
sys.path.insert(0, str(ROOT / "examples"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (CPU only)")
    parser.add_argument(
        "--mesh", default=None, help="DATAxMODEL, e.g. 2x4 (default: 1x<all devices>)"
    )
    parser.add_argument("--d", type=int, default=256, help="model width")
    parser.add_argument("--ffn", type=int, default=1024, help="MLP width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=15, help="timed calls (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-sweep", action="store_true", help="skip the group-size sweep")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    # Run as a script: fake CPU devices must be asked for before jax is imported (nothing
    # happens when a GPU/TPU is there). Imported as a module, nothing is parsed or set.
    from lm import devices

    devices.use_cpu_devices(parse_args().devices)

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax
from benchmarks import _timing
from muonbp_jax import MuonDimensionNumbers

COLUMN, ROW = P(None, "model"), P("model", None)
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}
# "%x = TYPE all-gather(" or the async "all-gather-start(" (GPU); TYPE may be a tuple.
_COLLECTIVE = re.compile(
    r"= (?P<type>\(.*?\)|\S+) (?P<op>all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter)(?:-start)?\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def model_tree(d: int, ffn: int, layers: int) -> tuple[dict, dict]:
    """Shapes and PartitionSpecs of the matrices, per layer, Megatron-style."""
    layer = {
        "q": ((d, d), COLUMN),
        "k": ((d, d), COLUMN),
        "v": ((d, d), COLUMN),
        "o": ((d, d), ROW),
        "up": ((d, ffn), COLUMN),
        "gate": ((d, ffn), COLUMN),
        "down": ((ffn, d), ROW),
    }
    shapes = {str(i): {k: s for k, (s, _) in layer.items()} for i in range(layers)}
    specs = {str(i): {k: p for k, (_, p) in layer.items()} for i in range(layers)}
    return shapes, specs


def put(shapes: Any, specs: Any, mesh, seed: int, scale: float) -> Any:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        jax.jit(
            lambda k, s=s: scale * jax.random.normal(k, s),
            out_shardings=NamedSharding(mesh, p),
        )(k)
        for k, s, p in zip(keys, leaves, spec_leaves)
    ]
    return jax.tree.unflatten(treedef, out)


def collectives(hlo: str) -> dict[str, Any]:
    """Collectives of a compiled program, and the bytes one device sends (all-to-all,
    collective-permute) or receives (all-gather, reduce-scatter; all-reduce counted as a
    ring: 2(K-1)/K of its size)."""
    counts: dict[str, int] = {}
    moved = 0.0
    for line in hlo.splitlines():
        hit = _COLLECTIVE.search(line)
        if not hit:
            continue
        op = hit["op"]
        counts[op] = counts.get(op, 0) + 1
        arrays = _ARRAY.findall(hit["type"])
        if "-start(" in line and op in ("all-gather", "collective-permute") and len(arrays) > 1:
            arrays = arrays[len(arrays) // 2 :]  # async start: (operands..., results...)
        size = sum(DTYPE_BYTES.get(t, 4) * _prod(dims) for t, dims in arrays)
        if op == "collective-permute":
            moved += size
            continue
        k = _group_size(hit["rest"])
        share = {"all-reduce": 2 * (k - 1) / k, "reduce-scatter": k - 1}.get(op, (k - 1) / k)
        moved += share * size
    return {"counts": counts, "MB moved per device": moved / 2**20}


def _prod(dims: str) -> int:
    n = 1
    for v in filter(None, dims.split(",")):
        n *= int(v)
    return n


def _group_size(rest: str) -> int:
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
    if explicit:
        return len(explicit[1].split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)  # [groups,size]<=[devices]
    return int(iota[2]) if iota else jax.device_count()


def measure(tx, params, specs, mesh, iters: int, warmup: int) -> dict[str, Any]:
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(params)
        grads = jax.tree.map(lambda p: p * 0.5 + 1e-3, params)
        compiled = jax.jit(tx.update).lower(grads, state, params).compile()
        ms = _timing.median_ms(compiled, grads, state, params, iters=iters, warmup=warmup)
    memory = _timing.compiled_memory(compiled)
    comm = collectives(compiled.as_text())
    return {
        "ms": ms,
        "collectives": " ".join(f"{k}:{v}" for k, v in sorted(comm["counts"].items())) or "-",
        "MB moved per device": comm["MB moved per device"],
        "peak MB per device": memory["peak"] / 2**20 if memory else None,
    }


def muonbp(specs, mesh, dims, **kw) -> optax.GradientTransformation:
    return muonbp_jax.muonbp(1e-3, specs=specs, mesh=mesh, muon_weight_dimension_numbers=dims, **kw)


def steps_table(args, mesh) -> list[dict[str, Any]]:
    shapes, specs = model_tree(args.d, args.ffn, args.layers)
    params = put(shapes, specs, mesh, seed=0, scale=0.02)
    dims = jax.tree.map(lambda _: MuonDimensionNumbers(), specs, is_leaf=lambda s: isinstance(s, P))
    runs = {"AdamW update": optax.adamw(1e-3), "block step": muonbp(specs, mesh, dims, period=None)}
    for s in muonbp_jax.FULL_STRATEGIES:
        runs[f"full step, {s}"] = muonbp(specs, mesh, dims, period=1, full_strategy=s)
    rows = []
    for name in _timing.progress(list(runs), "steps"):
        rows.append(
            {"step": name, **measure(runs[name], params, specs, mesh, args.iters, args.warmup)}
        )
    adamw = rows[0]["ms"]
    for r in rows:
        r["x AdamW"] = r["ms"] / adamw
    return rows


def sweep_table(args, mesh) -> list[dict[str, Any]]:
    """One stacked leaf of G column-parallel matrices: gather does G orthogonalizations per
    device, all_to_all ceil(G/K), at the price of two exchanges."""
    rows = []
    model = mesh.shape["model"]
    for count in _timing.progress([1, 2, model // 2, model, 2 * model], "sweep"):
        if count < 1 or any(r["matrices"] == count for r in rows):
            continue
        shapes = {"w": (count, args.d, args.ffn)}
        specs = {"w": P(None, None, "model")}
        params = put(shapes, specs, mesh, seed=count, scale=0.02)
        dims = {"w": MuonDimensionNumbers(1, 2)}
        row = {"matrices": count}
        for s in ("gather", "all_to_all"):
            got = measure(
                muonbp(specs, mesh, dims, period=1, full_strategy=s),
                params,
                specs,
                mesh,
                args.iters,
                args.warmup,
            )
            row[f"{s} ms"] = got["ms"]
            row[f"{s} MB"] = got["MB moved per device"]
        row["all_to_all / gather"] = row["all_to_all ms"] / row["gather ms"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    n = jax.device_count()
    data, model = map(int, args.mesh.split("x")) if args.mesh else (1, n)
    if data * model != n:
        raise SystemExit(f"--mesh {args.mesh} needs {data * model} devices, found {n}.")
    mesh = jax.make_mesh((data, model), ("data", "model"))
    env = _timing.environment()
    print(
        f"{env}  mesh data={data} x model={model}  d={args.d} ffn={args.ffn} layers={args.layers}",
        flush=True,
    )
    results: dict[str, Any] = {"environment": env, "args": vars(args), "steps": None}
    results["steps"] = steps_table(args, mesh)
    _timing.write_json(args.out, results)
    if not args.no_sweep:
        results["sweep"] = sweep_table(args, mesh)
    _timing.write_json(args.out, results)

    cols = ["step", "ms", "x AdamW", "collectives", "MB moved per device", "peak MB per device"]
    print()
    print(_timing.table(results["steps"], cols, title="== one optimizer update"))
    if results.get("sweep"):
        cols = [
            "matrices",
            "gather ms",
            "all_to_all ms",
            "all_to_all / gather",
            "gather MB",
            "all_to_all MB",
        ]
        print()
        print(
            _timing.table(
                results["sweep"],
                cols,
                title=f"== full step of one group of {args.d}x{args.ffn} matrices",
            )
        )
    return results


if __name__ == "__main__":
    main()
