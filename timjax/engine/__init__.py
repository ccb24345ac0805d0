"""The serving engine, split by concern:

- ``protocol``: the controller protocol (``Action``, ``PruneOp``, ``Controller``, ``PlainController``,
  ``Request``) and the host state of a sequence (``SeqState``);
- ``params``: ``RequestParams``, one request's parameters, validated at the door;
- ``scheduler``: admission by free pages and a batch cap, the per-step token budget, preemption, parking;
- ``runner``: device state, packing a ragged step, pruning edits, the dispatches and the one sync;
- ``loop``: the state across steps and one iteration (scheduler + runner + controllers + outputs);
- ``controllers``: ``RequestParams`` -> a ``Request`` with its controller (plain or TIM, tools opened);
- ``tim_controller``: the TIM controller (grammar + tree tracker + pruning for one sequence). It and
  ``controllers`` plug into the loop through the protocol: ``loop``, ``scheduler``, ``runner``,
  ``protocol``, ``handle`` and ``outputs`` never import them, nor ``timjax.tim`` or ``timjax.tools`` (an
  import-linter contract in pyproject.toml);
- ``handle`` / ``outputs``: ``RequestHandle`` (streams of events, cancel, result), the events, ``EngineStats``;
- ``core``: ``Engine``: ``add_request``, ``abort``, ``step``, ``start`` / ``stop``, ``stats``, ``run``.
"""

from timjax.base.errors import EngineFull, EngineStopped
from timjax.engine.core import Engine
from timjax.engine.handle import RequestHandle
from timjax.engine.outputs import EngineStats, FinishedEvent, TokenEvent, TreeEvent
from timjax.engine.params import RequestParams
from timjax.engine.protocol import (
    Action,
    Controller,
    PlainController,
    PruneOp,
    Request,
    SeqState,
)

__all__ = [
    "Action",
    "Controller",
    "Engine",
    "EngineFull",
    "EngineStats",
    "EngineStopped",
    "FinishedEvent",
    "PlainController",
    "PruneOp",
    "Request",
    "RequestHandle",
    "RequestParams",
    "SeqState",
    "TokenEvent",
    "TreeEvent",
]
