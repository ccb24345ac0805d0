"""TIM host-side logic (no JAX): output schema, grammar constraint, reasoning-tree tracker, pruning.

Per sequence the engine drives: sample token -> ``TokenGrammar.consume`` -> ``TreeTracker.feed``
(may answer ``Split``: replace the token, see ``tree``) -> ``WorkingMemory.append`` -> on
``ListCompleted``: ``PruneBuffer.push`` -> ``WorkingMemory.prune`` for each returned list -> K/V ops.
"""

from .grammar import GrammarError, LLGuidanceGrammar, TokenGrammar, llg_tokenizer, make_grammar, mask_words
from .pruning import (
    PruneBuffer,
    PruneOp,
    WorkingMemory,
    WorkingMemoryStats,
    full_response,
    kept_bytes,
    pruned_task_paths,
)
from .schema import Response, Task, TimSchema, ToolSpec, ToolUse, dumps, iter_tasks, tim_schema
from .tree import (
    DocumentComplete,
    Event,
    ListCompleted,
    ListInfo,
    ListOpened,
    Split,
    TokenLoc,
    ToolCallReady,
    TreeTracker,
)

__all__ = [
    "DocumentComplete",
    "Event",
    "GrammarError",
    "LLGuidanceGrammar",
    "ListCompleted",
    "ListInfo",
    "ListOpened",
    "PruneBuffer",
    "PruneOp",
    "Response",
    "Split",
    "Task",
    "TimSchema",
    "TokenGrammar",
    "TokenLoc",
    "ToolCallReady",
    "ToolSpec",
    "ToolUse",
    "TreeTracker",
    "WorkingMemory",
    "WorkingMemoryStats",
    "dumps",
    "full_response",
    "iter_tasks",
    "kept_bytes",
    "llg_tokenizer",
    "make_grammar",
    "mask_words",
    "pruned_task_paths",
    "tim_schema",
]
