"""examples/minimal_tp.py runs as written: its main() trains the sharded nnx MLP on the 2x4 mesh
that 8 devices give, keeps the Megatron layout, and prints one loss per step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_PATH = Path(__file__).resolve().parents[1] / "examples" / "minimal_tp.py"


def _load():
    spec = importlib.util.spec_from_file_location("minimal_tp", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minimal_tp_trains_on_a_2x4_mesh(capsys):
    losses, model = _load().main(steps=10)
    assert len(losses) == 10 and all(np.isfinite(losses)), losses
    assert losses[-1] < 0.5 * losses[0], losses
    up, down = model.up.kernel[...], model.down.kernel[...]
    assert up.sharding.mesh.shape == {"data": 2, "model": 4}
    assert up.sharding.is_equivalent_to(NamedSharding(up.sharding.mesh, P(None, "model")), 2)
    assert down.sharding.is_equivalent_to(NamedSharding(up.sharding.mesh, P("model", None)), 2)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == [f"step {i}" for i in range(10)]
