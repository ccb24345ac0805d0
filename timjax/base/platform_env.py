"""Which JAX platforms the ``timjax`` command asks for before JAX starts.

The ``test`` extra installs jax's CUDA plugin (without CUDA libraries) so that kernels compile for an H100
offline. On a machine without an NVIDIA driver, jax then prints the plugin's failed version check (a
30-line traceback) on every run before it falls back to the CPU. When nothing but CUDA plugins is
installed and no driver is present, the CPU is what jax would use anyway: the CLI asks for it, and the
traceback is not printed. A user's own ``JAX_PLATFORMS`` always wins.

``prepare_process`` is what every entry point (the CLI, the benchmarks) calls first: that platform choice,
plus silencing transformers' advisory notices ("PyTorch was not found..."): timjax uses transformers only
for tokenizers and needs no torch, so the notice names nothing a user should act on.

``cli_compile_cache`` is the ``timjax`` command's alone (the benchmarks time compiles, so they do not call
it): JAX's persistent compilation cache in ``~/.cache/timjax/xla``, so a second run reads its compiled
steps back instead of compiling them again (``timjax demo`` on the 2-core CPU: 10.9 s, then 4.7 s).
"""

from __future__ import annotations

import ctypes.util
import os
import pkgutil
import sys
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path

DRIVER_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version")


def installed_jax_plugins() -> list[str]:
    try:
        import jax_plugins
    except ImportError:
        return []
    return [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]


def nvidia_driver_present() -> bool:
    return any(os.path.exists(p) for p in DRIVER_PATHS) or ctypes.util.find_library("cuda") is not None


def cpu_when_cuda_cannot_start(
    environ: MutableMapping[str, str] | None = None,
    plugins: Callable[[], Iterable[str]] = installed_jax_plugins,
    driver: Callable[[], bool] = nvidia_driver_present,
) -> bool:
    """Set ``JAX_PLATFORMS=cpu`` in ``environ`` (default ``os.environ``) when JAX has not started, the user
    chose no platform, only CUDA plugins are installed and no NVIDIA driver is present. True if it did."""
    environ = os.environ if environ is None else environ
    if "jax" in sys.modules or environ.get("JAX_PLATFORMS"):
        return False
    names = list(plugins())
    if not names or not all(n.startswith("xla_cuda") for n in names) or driver():
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    return True


def prepare_process(environ: MutableMapping[str, str] | None = None) -> None:
    """Call before JAX or transformers start: the CPU where CUDA cannot start (above), and no transformers
    advisory notices unless the user set ``TRANSFORMERS_NO_ADVISORY_WARNINGS`` themselves."""
    environ = os.environ if environ is None else environ
    cpu_when_cuda_cannot_start(environ)
    environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def cli_compile_cache(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Point JAX's persistent compilation cache at ``TIMJAX_COMPILE_CACHE`` (a directory, or ``off``), by
    default ``$XDG_CACHE_HOME/timjax/xla`` (``~/.cache/timjax/xla``), before JAX starts. A user's own
    ``JAX_COMPILATION_CACHE_DIR`` wins; a directory that cannot be created or written is skipped silently
    (the run then compiles as before). Every compile is kept: on the CPU nearly all take under JAX's default
    threshold of a second. Returns the directory used, or None."""
    environ = os.environ if environ is None else environ
    if "jax" in sys.modules or environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    choice = environ.get("TIMJAX_COMPILE_CACHE", "").strip()
    if choice.lower() in ("off", "0", "false", "no", "none"):
        return None
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(choice).expanduser() if choice else Path(base) / "timjax" / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK | os.X_OK):
        return None
    environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return str(path)
