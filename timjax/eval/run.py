"""``timjax eval``: a TIM's accuracy on held-out problems with pruning off and on, and what pruning saves.

For each setting (pruning off; prune buffers 0, 1, 2 in both repositioning modes) every problem is
generated through ``timjax.generate`` with the schema and the MCP tools on (the same servers the corpus
used), greedy. Per setting and per problem group (kind and depth) it reports accuracy (the verifier:
``corpus.check_answer``), peak working-memory tokens, the share of KV entries pruned, tool calls per
problem, invalid trees (grammar dead end, error, unparsable) and unfinished ones (token budget), and
tokens/s over the whole batch. Any checkpoint works (a converted TIM-8b included); problems come from
the corpus's held-out split, from the ordinary-notation families ``notation-3..8`` (``timjax.eval.notation``,
a generator of its own), from the beyond-context family ``long-K`` (``timjax.eval.long``: trees of at
least K times the context C), or from a JSON-lines file of ``{"question", "answer"}``. Every run has the
working-memory limit C (``context``); a setting may swap the calculator for a variant of its contract
(``timjax.eval.tool_variants``). Beside the groups, accuracy is split by expression depth, and each
problem's outcome is kept (``samples``) for plots such as accuracy against tree length in units of C
(``timjax.eval.plot``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from timjax.eval.diagnose import first_divergence
from timjax.train import corpus
from timjax.train.corpus import CorpusSpec, Problem, problems, solved


@dataclass(frozen=True)
class Setting:
    label: str
    buffer: int | None  # None = pruning off
    reposition: str = "reencode"
    tools: str | None = None  # a calculator of ``timjax.eval.tool_variants`` (None: the package's servers)


SETTINGS: tuple[Setting, ...] = (
    Setting("off", None),
    Setting("buf0", 0),
    Setting("buf1", 1),
    Setting("buf2", 2),
    Setting("buf0-shift", 0, "shift"),
    Setting("buf1-shift", 1, "shift"),
    Setting("buf2-shift", 2, "shift"),
)

# problem kinds whose failures are traced against the rewrite format (timjax.eval.diagnose)
REWRITE_KINDS = ("arith", "notation", "long")

GROUPS = (("arith", 1), ("arith", 2), ("arith", 3), ("lookup", 2), ("lookup", 3))


class GroupStats(BaseModel):
    n: int
    accuracy: float
    peak_working_tokens: float  # mean over problems
    pruned_share: float  # mean share of generated KV entries pruned
    tool_calls: float  # mean per problem
    invalid: int
    unfinished: int
    generated_tokens: float  # mean per problem
    context_limit: int = 0  # runs that stopped because the working memory reached the context C


class SettingReport(BaseModel):
    label: str
    buffer: int | None
    reposition: str
    overall: GroupStats
    groups: dict[str, GroupStats]
    tokens_per_s: float
    wall_s: float
    tools: str | None = None
    by_depth: dict[str, GroupStats] = {}  # by expression depth (kind and depth), beside the groups
    failures: list[dict[str, Any]] = []  # every wrong answer, for inspection
    samples: list[dict[str, Any]] = []  # per problem: group, ok, finish, tokens, peak, pruned, tree_tokens
    # wrong arithmetic answers by where the tree first left the rewrite format's trace (diagnose.KINDS)
    divergence: dict[str, int] = {}


class EvalReport(BaseModel):
    model: str
    n_problems: int
    settings: list[SettingReport]
    command: str = ""
    machine: str = ""
    context: int | None = None  # the working-memory limit C the runs had (max_seq_len)

    def table(self) -> str:
        groups = [g for g in self.settings[0].groups] if self.settings else []
        head = (
            ["setting", "acc"]
            + [f"acc {g}" for g in groups]
            + [
                "peak WM",
                "KV pruned",
                f"pruned {groups[-1] if groups else ''}",
                "tools/prob",
                "invalid",
                "unfinished",
                "ctx limit",
                "tok/s",
            ]
        )
        deep = _deepest_arith(groups)
        rows = []
        for s in self.settings:
            o = s.overall
            rows.append(
                [s.label, f"{o.accuracy:.1%}"]
                + [f"{s.groups[g].accuracy:.1%}" for g in groups]
                + [
                    f"{o.peak_working_tokens:.0f}",
                    f"{o.pruned_share:.0%}",
                    f"{s.groups[deep].pruned_share:.0%}" if deep else "-",
                    f"{o.tool_calls:.1f}",
                    str(o.invalid),
                    str(o.unfinished),
                    str(o.context_limit),
                    f"{s.tokens_per_s:.0f}",
                ]
            )
        head[len(groups) + 4] = f"KV pruned {deep}" if deep else "KV pruned (deepest)"
        return _markdown(head, rows)

    def depth_table(self) -> str:
        """Accuracy (n) by expression depth, one row per setting; empty when no problem has a depth."""
        keys = sorted({k for s in self.settings for k in s.by_depth}, key=_depth_key)
        if not keys:
            return ""
        rows = [[s.label] + [_acc_n(s.by_depth.get(k)) for k in keys] for s in self.settings]
        return _markdown(["setting"] + keys, rows)

    def divergence_table(self) -> str:
        """Wrong arithmetic answers by the kind of their first divergence from the rewrite trace."""
        from timjax.eval.diagnose import KINDS

        rows = [[s.label] + [str(s.divergence.get(k, 0)) for k in KINDS] for s in self.settings]
        return _markdown(["setting", *KINDS], rows)


def _acc_n(g: GroupStats | None) -> str:
    return "-" if g is None or not g.n else f"{g.accuracy:.1%} ({g.n})"


def _depth_key(k: str) -> tuple[str, int]:
    kind, _, d = k.rpartition(" d")
    return kind, int(d) if d.isdigit() else 0


def _markdown(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _deepest_arith(groups: Sequence[str]) -> str | None:
    arith = sorted((g for g in groups if g.startswith("arith")), key=lambda g: int(g.split("-")[-1]))
    return arith[-1] if arith else (groups[-1] if groups else None)


def group_name(p: Problem) -> str:
    return f"{p.kind}-{p.depth}"


def depth_name(p: Problem) -> str:
    """``"<kind> d<depth>"``: the expression's nesting depth (notation and long problems keep it in
    ``data["tree_depth"]``; for the corpus's groups it is the group's depth)."""
    return f"{p.kind} d{p.data.get('tree_depth', p.depth)}"


# group kinds and their depth ranges: the corpus's, and eval's own families (notation-N = N terms,
# long-K = trees >= K x the context)
GROUP_RANGES = {**corpus.GROUP_RANGES, "notation": (3, 8), "long": (1, 4)}


def parse_groups(text: str | Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``"arith-3,notation-5"`` -> ``(("arith", 3), ("notation", 5))``: the corpus's groups and eval's."""
    return corpus.parse_groups(text, GROUP_RANGES)


def heldout_problems(
    n_per_group: int, *, spec: CorpusSpec | None = None, groups: Sequence[tuple[str, int]] = GROUPS
) -> list[Problem]:
    """``n_per_group`` held-out problems of each (kind, depth), from a stream independent of training's."""
    spec = spec or CorpusSpec()
    out: list[Problem] = []
    for kind, depth in groups:
        # one group per draw; a group outside the training mix (arith-4) is drawn the same way
        one = dataclasses.replace(spec, mix=((kind, depth, 1.0),))
        out += problems(one, "heldout", n_per_group, stream=1)
    return out


def doc_format(text: str) -> corpus.DocFormat:
    """``--format``, the format the model writes arithmetic in: ``restate`` (the shipped tiny TIM's),
    ``rewrite`` (``corpus.rewrite_task``) or ``chunked-K`` (rewrite K top-level terms at a time:
    ``corpus.chunked_task``)."""
    if text == "restate":
        return corpus.DocFormat(restate=True)
    if text == "rewrite":
        return corpus.DocFormat(rewrite=True)
    head, _, k = text.partition("-")
    if head == "chunked" and k.isdigit() and int(k) >= 2:
        return corpus.DocFormat(rewrite=True, chunk_terms=int(k))
    raise ValueError(f"--format: {text!r} is not 'restate', 'rewrite' or 'chunked-K' with K >= 2")


def family_problems(
    groups: Sequence[tuple[str, int]],
    n: int,
    *,
    tokenizer_dir: str,
    context: int,
    seed: int = 23,
    fmt: corpus.DocFormat | None = None,
) -> list[Problem]:
    """``n`` problems of each group: corpus held-out groups (arith, lookup), notation-N, long-K (its
    reference trees written in ``fmt``, default the restated format)."""
    from timjax.eval.long import long_problems
    from timjax.eval.notation import notation_problems

    out: list[Problem] = []
    for kind, d in groups:
        if kind == "notation":
            out += notation_problems(n, d, seed=seed)
        elif kind == "long":
            out += long_problems(n, d, context, tokenizer_dir, seed=seed, fmt=fmt or doc_format("restate"))
        else:
            out += heldout_problems(n, groups=((kind, d),))
    return out


def save_problems(probs: Sequence[Problem], path: str) -> None:
    """JSON lines that ``--problems`` reads back into the same groups and depths (``data`` kept: a
    notation problem's tree depth, a long problem's reference tree length)."""
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in probs:
            row = {**p.data, "question": p.question, "answer": p.answer, "kind": p.kind, "depth": p.depth}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _group_stats(items: list[tuple[Problem, Any, bool]]) -> GroupStats:
    n = len(items)
    if not n:
        return GroupStats(
            n=0,
            accuracy=0.0,
            peak_working_tokens=0.0,
            pruned_share=0.0,
            tool_calls=0.0,
            invalid=0,
            unfinished=0,
            generated_tokens=0.0,
        )
    mean = lambda xs: sum(xs) / n
    return GroupStats(
        n=n,
        accuracy=mean([ok for _, _, ok in items]),
        peak_working_tokens=mean([r.stats.peak_working_tokens or 0 for _, r, _ in items]),
        pruned_share=mean([r.stats.pruned_share for _, r, _ in items]),
        tool_calls=mean([r.stats.tool_calls for _, r, _ in items]),
        invalid=sum(
            r.finish_reason in ("grammar", "error") or (r.finish_reason == "stop" and r.response is None)
            for _, r, _ in items
        ),
        unfinished=sum(r.finish_reason == "length" for _, r, _ in items),
        generated_tokens=mean([r.stats.generated_tokens for _, r, _ in items]),
        context_limit=sum(hit_context(r) for _, r, _ in items),
    )


def hit_context(r) -> bool:
    """The run stopped because its working memory reached the context (not the token budget)."""
    return r.finish_reason == "length" and "max_seq_len" in (r.error or "")


def evaluate(
    model,
    probs: Sequence[Problem],
    settings: Sequence[Setting] = SETTINGS,
    *,
    tools: Any = None,
    max_new_tokens: int = 1024,
    max_batch: int = 16,
    page_size: int = 16,
    context: int | None = None,
    progress: bool = True,
    model_label: str = "",
    say=print,
    json_path: str | None = None,
    trace: corpus.DocFormat | None = None,
) -> EvalReport:
    """Run every problem under every setting (greedy) and collect the figures (see the module docstring).
    ``tools``: MCP servers for ``timjax.generate(tools=...)``; default: the corpus's calculator and lookup
    (a setting with ``tools`` set uses that calculator variant instead, ``timjax.eval.tool_variants``).
    ``context``: the working-memory limit C (``max_seq_len``; default the model's ``max_position_embeddings``):
    a run whose working memory reaches it ends with finish ``length`` (counted as ``context_limit``).
    ``json_path``: the report so far is written there after each setting (a long run keeps what it measured).
    ``trace``: a rewrite format the model writes; each wrong arithmetic answer then says where it first
    left that format's reference tree (``timjax.eval.diagnose``)."""
    from timjax.tools.runner import ToolRunner
    from timjax.train.tools_adapter import tool_servers

    context = context or model.config.max_position_embeddings
    runners: dict[str | None, Any] = {}
    reports: list[SettingReport] = []
    report = lambda: EvalReport(model=model_label, n_problems=len(probs), settings=reports, context=context)
    try:
        for s in settings:
            if s.tools not in runners:
                if s.tools is None:
                    servers = list(tools) if tools is not None else tool_servers()
                else:
                    from timjax.eval.tool_variants import variant_tools

                    servers = variant_tools(s.tools)
                runners[s.tools] = ToolRunner(servers)
            gen_kw = dict(max_new_tokens=max_new_tokens, max_batch=max_batch, page_size=page_size, progress=progress)
            rep = run_setting(model, probs, s, runners[s.tools], context=context, trace=trace, **gen_kw)
            reports.append(rep)
            say(f"{s.label}: accuracy {rep.overall.accuracy:.1%} ({len(probs)} problems, {rep.wall_s:.0f}s)")
            if json_path:
                write_report(report(), json_path)
    finally:
        for r in runners.values():
            r.close()
    return report()


def run_setting(
    model, probs: Sequence[Problem], s: Setting, runner, *, context: int, trace=None, **gen_kw
) -> SettingReport:
    """One setting over all problems: its figures by group and by depth, failures and per-problem samples."""
    import timjax
    from timjax.tim.schema import tim_schema

    t0 = time.perf_counter()
    results = timjax.generate(
        model,
        [p.question for p in probs],
        schema=tim_schema(),
        tools=runner,
        pruning_buffer=s.buffer,
        reposition=s.reposition,
        max_seq_len=context,
        **gen_kw,
    )
    wall = time.perf_counter() - t0
    by_group: dict[str, list] = defaultdict(list)
    by_depth: dict[str, list] = defaultdict(list)
    items = []
    for p, r in zip(probs, results):
        it = (p, r, solved(p, r))
        items.append(it)
        by_group[group_name(p)].append(it)
        by_depth[depth_name(p)].append(it)
    gen = sum(r.stats.generated_tokens for r in results)
    return SettingReport(
        label=s.label,
        buffer=s.buffer,
        reposition=s.reposition,
        tools=s.tools,
        overall=_group_stats(items),
        groups={g: _group_stats(v) for g, v in sorted(by_group.items())},
        by_depth={g: _group_stats(v) for g, v in sorted(by_depth.items())},
        tokens_per_s=gen / wall if wall else 0.0,
        wall_s=wall,
        failures=(failures := [_failure(p, r, trace) for p, r, ok in items if not ok]),
        samples=[_sample(p, r, ok) for p, r, ok in items],
        divergence=divergence_counts(failures),
    )


def _failure(p: Problem, r, trace: corpus.DocFormat | None = None) -> dict[str, Any]:
    out = {
        "question": p.question,
        "group": group_name(p),
        "expected": p.answer,
        "finish": r.finish_reason,
        "error": r.error,
        "answer": None if r.response is None else r.response.answer,
        "tool_calls": r.stats.tool_calls,
    }
    if trace is not None and trace.rewrite and p.kind in REWRITE_KINDS:  # where the tree left the one right trace
        out["rewrite_divergence"] = first_divergence(p.question, r.response, trace)
    return out


def divergence_counts(failures: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Failures by the kind of their first divergence from the rewrite trace (``timjax.eval.diagnose``)."""
    counts: dict[str, int] = defaultdict(int)
    for f in failures:
        d = f.get("rewrite_divergence")
        if d is not None:
            counts[d["kind"]] += 1
    return dict(sorted(counts.items()))


def _sample(p: Problem, r, ok: bool) -> dict[str, Any]:
    return {
        "question": p.question,
        "group": group_name(p),
        "depth": depth_name(p),
        "ok": ok,
        "finish": r.finish_reason,
        "tokens": r.stats.generated_tokens,
        "peak": r.stats.peak_working_tokens,
        "pruned": round(r.stats.pruned_share, 4),
        "tree_tokens": p.data.get("tree_tokens"),  # the reference tree's length, where the family knows it
    }


def write_report(report: EvalReport, path: str) -> None:
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # a new --json folder is made, not an error
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(report.model_dump_json(indent=2))
    os.replace(tmp, path)


def settings_from_labels(labels: Sequence[str], tool_variants: Sequence[str] = ()) -> list[Setting]:
    """The named settings; with ``tool_variants``, each setting once per variant (label ``buf2@<variant>``;
    the variant ``shipped`` is the package's own servers)."""
    from timjax.eval.tool_variants import VARIANTS

    known = {s.label: s for s in SETTINGS}
    bad = [l for l in labels if l not in known]
    if bad:
        raise ValueError(f"--settings: unknown setting(s) {bad}; choose from {list(known)}")
    bad = [v for v in tool_variants if v != "shipped" and v not in VARIANTS]
    if bad:
        raise ValueError(f"--tool-variants: unknown variant(s) {bad}; choose from {['shipped', *VARIANTS]}")
    base = [known[l] for l in labels]
    if not tool_variants:
        return base
    return [
        dataclasses.replace(s, label=f"{s.label}@{v}", tools=None if v == "shipped" else v)
        for v in tool_variants
        for s in base
    ]


def dumps_json(obj) -> str:
    return json.dumps(obj, indent=2)
