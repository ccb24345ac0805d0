"""The CLI asks JAX for the CPU only when CUDA cannot start: CUDA plugins alone, no driver, no user choice."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from timjax.base import platform_env
from timjax.base.platform_env import cli_compile_cache, cpu_when_cuda_cannot_start


@pytest.fixture
def no_jax(monkeypatch):
    monkeypatch.delitem(sys.modules, "jax", raising=False)  # as in a fresh `timjax` process


@pytest.mark.parametrize(
    "env, plugins, driver, chosen",
    [
        ({}, ["xla_cuda12"], False, "cpu"),  # the test extra on a laptop
        ({}, ["xla_cuda12"], True, None),  # a GPU machine
        ({}, [], False, None),  # plain install: nothing to quiet
        ({}, ["xla_cuda12", "xla_rocm7"], False, None),  # another accelerator may start
        ({"JAX_PLATFORMS": "cuda"}, ["xla_cuda12"], False, "cuda"),  # the user's choice wins
    ],
)
def test_cpu_only_when_cuda_cannot_start(no_jax, env, plugins, driver, chosen):
    given = dict(env)
    did = cpu_when_cuda_cannot_start(env, lambda: plugins, lambda: driver)
    assert env.get("JAX_PLATFORMS") == chosen
    assert did == (chosen == "cpu" and not given)


def test_nothing_changes_once_jax_has_started():
    import jax  # noqa: F401

    env: dict = {}
    assert not cpu_when_cuda_cannot_start(env, lambda: ["xla_cuda12"], lambda: False) and env == {}


def test_the_cli_keeps_compiled_steps_in_the_user_cache(no_jax, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert cli_compile_cache(env) == str(tmp_path / "xdg" / "timjax" / "xla")
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "xdg" / "timjax" / "xla")
    assert (tmp_path / "xdg" / "timjax" / "xla").is_dir() and env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
    env = {"TIMJAX_COMPILE_CACHE": str(tmp_path / "mine"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2"}
    assert cli_compile_cache(env) == str(tmp_path / "mine")
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "2"  # the user's threshold stays


@pytest.mark.parametrize(
    "env",
    [
        {"TIMJAX_COMPILE_CACHE": "off"},
        {"TIMJAX_COMPILE_CACHE": "0"},
        {"JAX_COMPILATION_CACHE_DIR": "/their/own"},  # the user's JAX setting wins
    ],
)
def test_the_compile_cache_can_be_turned_off_or_chosen_by_jax_settings(no_jax, env):
    given = dict(env)
    assert cli_compile_cache(env) is None and env == given


def test_an_unusable_compile_cache_is_skipped(no_jax, tmp_path):
    (tmp_path / "file").write_text("")
    env = {"TIMJAX_COMPILE_CACHE": str(tmp_path / "file" / "xla")}  # under a file: cannot be created
    assert cli_compile_cache(env) is None and "JAX_COMPILATION_CACHE_DIR" not in env


def test_the_compile_cache_is_left_alone_once_jax_has_started(tmp_path):
    import jax  # noqa: F401

    env = {"TIMJAX_COMPILE_CACHE": str(tmp_path / "c")}
    assert cli_compile_cache(env) is None and not (tmp_path / "c").exists()


@pytest.mark.skipif(
    platform_env.nvidia_driver_present() or platform_env.installed_jax_plugins() != ["xla_cuda12"],
    reason="needs the CUDA plugin installed on a machine without an NVIDIA driver",
)
def test_cli_on_a_machine_without_a_gpu_prints_no_plugin_traceback():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "from timjax.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    argv = ["generate", "--tim", "Calculate 3 + 4.", "--max-new-tokens", "80"]  # JAX starts: the shipped model
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0 and "answer: 7" in out.stdout, out.stderr[-1500:]
    assert "Traceback" not in out.stderr and "Unable to load CUDA" not in out.stderr, out.stderr[-1500:]
