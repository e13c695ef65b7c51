"""Helpers shared by the speed benchmarks: timing, the environment line, tables, JSON."""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax


def median_ms(fn: Callable[..., Any], *args: Any, iters: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn(*args) in ms, each call waited for (one call in flight), after
    `warmup` calls that also absorb compilation."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def environment() -> dict[str, Any]:
    import optax

    import muonbp_jax

    device = jax.devices()[0]
    return {
        "device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
        "jax": jax.__version__,
        "optax": optax.__version__,
        "date": datetime.date.today().isoformat(),
        # Which copy of the package ran (an A/B puts a copy first on PYTHONPATH).
        "muonbp_jax": str(Path(muonbp_jax.__file__).resolve().parent),
    }


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """Bytes of one compiled executable per device: arguments, outputs, temporaries, and
    their sum less aliased buffers (what the program needs at its peak)."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError):  # not reported
        return None
    if m is None:
        return None
    sizes = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
    }
    sizes["peak"] = sum(sizes.values()) - m.alias_size_in_bytes
    return sizes


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """A plain-text table of `rows` (dicts) in `columns` order; floats with 3 significant
    digits, missing cells empty."""

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {path}")


def progress(items: Sequence[Any], desc: str):
    """A tqdm bar over items on a terminal (none in logs, or without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False, disable=not sys.stderr.isatty())
