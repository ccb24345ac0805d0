"""The serving engine, split by concern:

- ``protocol``: the controller protocol (``Action``, ``PruneOp``, ``Controller``, ``PlainController``,
  ``Request``) and the host state of a sequence (``SeqState``);
- ``scheduler``: admission by free pages and a batch cap, the per-step token budget, preemption, parking;
- ``runner``: device state, packing a ragged step, pruning edits, the dispatches and the one sync;
- ``core``: ``Engine``, the loop that joins them.
"""

from timjax.engine.core import Engine
from timjax.engine.protocol import (
    Action,
    Controller,
    PlainController,
    PruneOp,
    Request,
    SeqState,
)

__all__ = ["Action", "Controller", "Engine", "PlainController", "PruneOp", "Request", "SeqState"]
