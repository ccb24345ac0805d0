"""Shared helpers for the timjax benchmarks (decode, pruning, ...).

Rules every benchmark follows (see bench/RESULTS.md):
  * every figure carries the machine, date, versions and exact command (``environment()``);
  * warm up first, then report the median of repeats, each timed to ``jax.block_until_ready``;
  * compare against a peer measured in the same run (ratios, never figures from elsewhere);
  * no GPU figure unless it was measured on a GPU.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np


# ---------------------------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:  # noqa: BLE001 - a missing optional package is just "not installed"
        return None


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other processes on a shared machine skew every figure."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def environment() -> dict[str, Any]:
    """Machine, versions, date and the exact command: attach this to every JSON a benchmark writes."""
    import jax

    devices = jax.devices()
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(),
        "cwd": os.getcwd(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": load_average(),
        "jax_backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "timjax")},
        "env_vars": {
            k: os.environ[k] for k in sorted(os.environ) if k.startswith(("XLA_", "JAX_", "OMP_", "MKL_", "TF_CPP"))
        },
    }
    try:
        import subprocess

        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            env["git"] = out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001
        pass
    return env


def on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds per call: median and spread over ``samples``."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "n": len(self.samples)}


def block(x):
    """``jax.block_until_ready`` on anything (pytrees, None, torch tensors pass through)."""
    import jax

    return jax.block_until_ready(x)


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5, sync: Callable[[Any], Any] = block) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed to ``sync(result)``."""
    for _ in range(warmup):
        sync(fn())
    t = Timing()
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        t.samples.append(time.perf_counter() - t0)
    return t


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.s``."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------- memory bandwidth
H100_SXM_GBS = 3350.0  # H100 SXM5 HBM3 spec sheet figure, GB/s (10^9 bytes/s)


def measure_host_bandwidth_gbs(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Host memory bandwidth from a big numpy copy, counting read + write bytes (GB/s, 10^9).

    A quick, single-threaded stand-in for STREAM copy; it underestimates what several cores reach
    together, so a floor derived from it is an upper bound on the true floor.
    """
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


# ---------------------------------------------------------------------------------------------- output
def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:  # nan
            return "-"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None) -> str:
    """A plain-text (Markdown pipe) table; also printed by ``print_table``."""
    rows = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = ([f"**{title}**", ""] if title else []) + [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None) -> str:
    text = table(headers, rows, title=title)
    print(text, flush=True)
    return text


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Timing):
        return x.to_json()
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, float) and x != x:
        return None
    if hasattr(x, "model_dump"):  # pydantic (Qwen3Config)
        return _jsonable(x.model_dump())
    return x


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # then rename: an interrupted run never leaves half a file
    tmp.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", flush=True)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)
