"""Synthetic TIM documents of chosen depth and breadth, serialised exactly as the grammar lays them out
(``json.dumps`` separators, key order thought, tooluse, subtasks, conclusion). Used to replay long,
deep reasoning trees through the runtime in tests and benchmarks without a trained model."""

from __future__ import annotations

import json
import random

WORDS = (
    "check the earlier step then plan next compute the sum of both parts verify result against "
    "bound split into cases recall definition carry digit prime factor area angle rate solve"
).split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, rng.randint(words // 2, words))))


def synthetic_task(rng: random.Random, depth: int, breadth: int, words: int) -> dict:
    task = {"thought": _text(rng, words)}
    if depth > 1:
        task["subtasks"] = [synthetic_task(rng, depth - 1, breadth, words) for _ in range(breadth)]
    task["conclusion"] = _text(rng, words)
    return task


def synthetic_document(*, depth: int, breadth: int, roots: int = 1, words: int = 12, seed: int = 0) -> dict:
    """A full tree: ``roots`` top-level tasks, each ``depth`` levels deep with ``breadth`` subtasks per list."""
    rng = random.Random(seed)
    return {"reasoning": [synthetic_task(rng, depth, breadth, words) for _ in range(roots)], "answer": _text(rng, 4)}


def serialise(doc: dict) -> str:
    return json.dumps(doc, ensure_ascii=False)


def pruned_view(doc: dict, pruned_paths) -> dict:
    """What the working memory should read after pruning: ``doc`` with the subtask lists of the tasks at
    ``pruned_paths`` emptied (the ``"subtasks": []`` skeleton)."""
    paths = {tuple(p) for p in pruned_paths}

    def walk(task: dict, path: tuple[int, ...]) -> dict:
        out = dict(task)
        if "subtasks" in task:
            out["subtasks"] = [] if path in paths else [walk(c, path + (i,)) for i, c in enumerate(task["subtasks"])]
        return out

    return {**doc, "reasoning": [walk(t, (i,)) for i, t in enumerate(doc["reasoning"])]}
