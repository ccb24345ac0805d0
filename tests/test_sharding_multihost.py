"""Multi-host in lockstep, tested on one host: two JAX processes (2 CPU devices each) share one tp=4 mesh,
load a checkpoint sharded across them and run the engine's host loop in lockstep (tests/multihost_worker.py).
Every process must see the same tokens, equal to a single-device run's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_in_lockstep_equal_one_device(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")}
    subprocess.run(
        [sys.executable, str(WORKER), "make", str(tmp_path)], env=env, check=True, timeout=600, capture_output=True
    )
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "run", str(tmp_path), str(i), port],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=1200)
            assert p.returncode == 0, err[-4000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [o["process"] for o in outs] == [0, 1]
    assert all(o["processes"] == 2 and o["devices"] == 4 for o in outs)
    assert outs[0]["tokens"] == outs[1]["tokens"] == outs[0]["expected"]
    assert all(len(t) == 8 for t in outs[0]["tokens"])
    for o in outs:  # each process holds about half the weights (its 2 of 4 tp shards; norms replicated)
        assert 0.45 < o["local_share"] < 0.55, o["local_share"]
