"""``timjax serve`` as a subprocess: SIGTERM stops taking requests, finishes the running one, exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import requests

from tests._serve_helpers import free_port


def test_sigterm_drains_running_requests_and_exits(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "timjax.cli", "serve", "--port", str(port), "--max-seq-len", "512", "--warmup", "off", "--grace", "60"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() - t0 < 120
            time.sleep(0.2)
        out = {}

        def ask():
            body = {"model": "timjax-tiny-tim", "messages": [{"role": "user", "content": "Calculate 3 * (4 - 9)."}]}
            out["r"] = requests.post(url + "/v1/chat/completions", json=body, timeout=120)

        th = threading.Thread(target=ask)
        th.start()
        while requests.get(url + "/health").json()["running"] == 0:  # in the engine (compiling its steps)
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        th.join(120)
        assert out["r"].status_code == 200 and out["r"].json()["choices"][0]["message"]["content"] == "-15"
        assert proc.wait(60) == 0
        try:
            requests.get(url + "/health", timeout=1)
            raise AssertionError("the server still answers after SIGTERM")
        except requests.ConnectionError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
