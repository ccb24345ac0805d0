"""When the loop keeps a step's sample in flight (``timjax.engine.loop``): overlap hides the host's work
behind the device's, but a row whose sample the controller answers with more than that token (forced
tokens, a prune, a tool call, the end) loses the step launched on it. Per token, with host time ``h`` and
device time ``T`` per iteration and a share ``m`` of such answers:

    synchronous:  T + h            overlapped:  max(T, h) / (1 - m)

so overlap pays when ``(1 - m) (T + h) > max(T, h)``: a big batch or a fast device (``h`` near ``T``), few
forced runs. A grammar that forces a run after most samples at batch 1 (``h`` << ``T``) is better served
synchronously. ``"auto"`` measures the three and decides each iteration; the tokens are the same either way.
"""

from __future__ import annotations

import time

ALPHA = 0.05  # EMA weight of one iteration: a few dozen iterations of memory


class OverlapPolicy:
    def __init__(self, mode: bool | str = "auto"):
        self.mode = mode
        self.host_s = 0.0  # EMA of the host's time per iteration, waits for the device excluded
        self.device_s = 0.0  # EMA of the device's time per step (an upper bound when the host was slower)
        self.miss = 0.0  # EMA of the share of samples the controller answered with more than that token
        self._ready = 0.0  # when the last synced step was ready

    def overlap(self) -> bool:
        if self.mode != "auto":
            return bool(self.mode)
        T, h, m = self.device_s, self.host_s, self.miss
        return (1 - m) * (T + h) >= max(T, h)

    def synced(self, dispatched_s: float) -> None:
        """A step dispatched at ``dispatched_s`` was just read."""
        now = time.perf_counter()
        step = now - max(dispatched_s, self._ready)  # it ran from its dispatch or the end of the step before
        self._ready = now
        self.device_s += ALPHA * (step - self.device_s)

    def iteration(self, host_s: float) -> None:
        self.host_s += ALPHA * (host_s - self.host_s)

    def answered(self, plain: bool) -> None:
        """A sample's answer: ``plain`` when the controller wrote just that token (what overlap assumes)."""
        self.miss += ALPHA * ((0.0 if plain else 1.0) - self.miss)
