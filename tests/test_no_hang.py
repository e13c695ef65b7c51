"""The configuration in tests/conftest.py keeps XLA:CPU collectives from deadlocking.

400 small sharded MuonBP updates dispatched without waiting deadlocked and aborted every time
on 2 cores with jaxlib 0.10 and no `PJRT_NPROC` (tools/soak.py's `control` runs); this
runs them in a fresh process with the thread-pool size this process was given.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_loop_without_waiting_finishes():
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS")}
    nproc = os.environ.get("PJRT_NPROC", "none")
    command = [sys.executable, "tools/soak.py", "--loop-child", "400", "--nproc", nproc]
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
        )
    except subprocess.TimeoutExpired:  # subprocess.run has killed the child
        raise AssertionError("400 sharded steps did not finish in 300 s") from None
    output = (done.stdout + done.stderr)[-2000:]
    assert done.returncode == 0, (
        f"exit {done.returncode} with PJRT_NPROC={nproc} (134/-6: the collective deadlock "
        f"abort; tests/conftest.py must set PJRT_NPROC >= 2 x devices):\n{output}"
    )
    assert "400 steps in" in done.stdout
