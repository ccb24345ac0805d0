"""Group-relative policy optimisation (GRPO), first step: rollouts from timjax's own engine with subtask
pruning and MCP tools on, rewards from the verifier, group-normalised advantages.

One step: for each of ``problems_per_step`` training problems, ``group_size`` rollouts are sampled
(temperature ``temperature``) through ``timjax.generate`` with the schema, the tools and prune buffer
``pruning_buffer``; each gets reward 1 if its answer is right (``corpus.check_answer``), else 0; within a
group the advantage is ``(r - mean) / (std + eps)`` (a group where all rewards agree teaches nothing and
is skipped). The loss is the policy gradient ``-sum(A * log p(token)) / n`` over the tokens the model
sampled: forced keys and tool-result tokens are masked (``runtime_view.runtime_doc_from_tokens`` labels a
real generation's tokens), and each token's log-probability is taken in the working memory the model
saw when it sampled it (``pruned_segments``: the pruned, compacted view in reencode mode), with the same
forward and packed attention as SFT. One update per batch of rollouts (on-policy), so the PPO ratio is 1
and no clipping or reference-model KL is needed for this first step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from timjax.train.sft import DataSpec


class GRPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_dir: str  # an SFT'd checkpoint (HF or timjax dir) with its tokenizer
    out_dir: str
    steps: int = 4
    problems_per_step: int = 4
    group_size: int = 4
    temperature: float = 1.0
    pruning_buffer: int | None = 2
    reposition: str = "reencode"
    max_new_tokens: int = 768
    # Adam moves each weight by about lr per step whatever the gradient's size; on the tiny TIM, 1e-4 over
    # 48 steps of 64 rollouts wiped out the lookups and 1e-5 did not (bench/RESULTS.md, issue 9)
    lr: float = 1e-5
    clip_norm: float = 1.0
    seed: int = 0
    tokens_per_batch: int = 4096
    corpus_seed: int = 0
    # e.g. "arith-2,flat-8": draw problems only from these (default: the corpus mix); flat-N: flat sums of
    # 3..N terms
    groups: str | None = None
    # the corpus the problems come from, as a training config's "data" (notation, fractions, calculator
    # contracts: the options SFT trained on); None: the default corpus. Its seed is corpus_seed's.
    data: DataSpec | None = None


def problem_pool(cfg: GRPOConfig, n: int) -> list:
    """The first ``n`` training problems GRPO draws: ``cfg.data``'s corpus (default: the shipped one), its
    mix narrowed to ``cfg.groups``, from a stream SFT's corpus does not use."""
    from dataclasses import replace

    from timjax.train.corpus import GROUP_RANGES, CorpusSpec, parse_groups, problems
    from timjax.train.sft import corpus_spec

    spec = replace(corpus_spec(cfg.data), seed=cfg.corpus_seed) if cfg.data else CorpusSpec(seed=cfg.corpus_seed)
    if cfg.groups:  # the corpus's groups: eval's own families are not drawn
        spec = replace(
            spec, mix=tuple((k, d, 1.0) for k, d in parse_groups(cfg.groups, {**GROUP_RANGES, "flat": (3, 8)}))
        )
    return problems(spec, "train", n, stream=7)


def group_advantages(rewards: Sequence[float], group_size: int, eps: float = 1e-6) -> np.ndarray:
    """``(r - mean) / (std + eps)`` within consecutive groups of ``group_size``; 0 where a group agrees."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    std = r.std(axis=1, keepdims=True)
    adv = np.where(std > eps, (r - r.mean(axis=1, keepdims=True)) / (std + eps), 0.0)
    return adv.reshape(-1).astype(np.float32)


def verifier_reward(problem, result) -> float:
    from timjax.train.corpus import solved

    return 1.0 if solved(problem, result) else 0.0


def rollout_segments(replayer, prompt_ids: list[int], result, advantage: float, buffer: int | None):
    """The training sequences of one rollout, weighted by its advantage on the sampled tokens."""
    from timjax.train.runtime_view import pruned_segments, runtime_doc_from_tokens

    doc = runtime_doc_from_tokens(
        replayer, prompt_ids, result.tokens, [c.result_tokens for c in (result.tool_calls or [])]
    )
    segs = pruned_segments(doc, buffer)
    for s in segs:
        s.loss = s.loss * np.float32(advantage)
    return segs, doc


def pg_loss(params, mcfg, batch, n_tokens):
    """``-sum(w * log p(next token)) / n_tokens`` (``w`` = the advantage on sampled tokens, 0 elsewhere)."""
    from functools import partial

    import jax
    import jax.numpy as jnp

    from timjax.qwen3.model import forward
    from timjax.train.sft import packed_attention

    tokens, positions, segments, weights = batch
    logits, _ = forward(params, mcfg, tokens, positions, partial(packed_attention, segments=segments))
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -(lp * weights).sum() / n_tokens


def _pow2_rows(b):
    """A bucket's arrays with the row count padded to a power of two (padding rows: segment 0, weight 0),
    so that the jitted gradient compiles once per (rows, length) class instead of once per step."""
    rows = 1 << int(np.ceil(np.log2(max(b.n_rows, 1))))
    pad = ((0, rows - b.n_rows), (0, 0))
    return tuple(np.pad(a, pad) for a in (b.tokens, b.positions, b.segments, b.loss))


@lru_cache(maxsize=1)
def _pg_grad_fn():
    import jax

    return jax.jit(jax.value_and_grad(pg_loss), static_argnums=1)


def _pg_grad(params, mcfg, batch, n_tokens):
    return _pg_grad_fn()(params, mcfg, batch, n_tokens)


def grpo_step(
    model,
    params,
    opt,
    opt_state,
    probs,
    cfg: GRPOConfig,
    runner,
    replayer,
    *,
    step: int,
    reward_fn: Callable[[Any, Any], float] = verifier_reward,
) -> tuple[Any, Any, dict]:
    """Rollouts, rewards, advantages, one optimizer update. Returns (params, opt_state, stats)."""
    import jax

    import timjax
    from timjax.qwen3.model import Qwen3
    from timjax.tim.schema import tim_schema
    from timjax.train.data import bucketed

    policy = Qwen3(model.config, dtype="float32", params=params, tokenizer=model.tokenizer)
    questions = [p.question for p in probs for _ in range(cfg.group_size)]
    t0 = time.perf_counter()
    results = timjax.generate(
        policy,
        questions,
        schema=tim_schema(),
        tools=runner,
        pruning_buffer=cfg.pruning_buffer,
        reposition=cfg.reposition,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed * 100_003 + step * 1_009,
        max_batch=len(questions),
    )
    rollout_s = time.perf_counter() - t0
    group_probs = [p for p in probs for _ in range(cfg.group_size)]
    rewards = [reward_fn(p, r) for p, r in zip(group_probs, results)]
    adv = group_advantages(rewards, cfg.group_size)
    segs, n_sampled = [], 0
    for q, r, a in zip(questions, results, adv):
        if r.finish_reason == "error":  # nothing to learn from a failed request
            continue
        s, doc = rollout_segments(replayer, replayer.prompt_ids(q), r, float(a), cfg.pruning_buffer)
        n_sampled += sum(k == 0 for k in doc.kinds)
        if a != 0:
            segs += s
    stats = {
        "step": step,
        "reward": float(np.mean(rewards)),
        "rollouts": len(results),
        "groups_with_signal": int(sum(np.any(adv.reshape(-1, cfg.group_size) != 0, axis=1))),
        "tokens": int(sum(r.stats.generated_tokens for r in results)),
        "rollout_s": rollout_s,
        "loss": 0.0,
        "updated": False,
    }
    if not segs:
        return params, opt_state, stats
    seq_lens = sorted({max(64, 1 << int(np.ceil(np.log2(len(s.ids))))) for s in segs})
    buckets = bucketed(segs, seq_lens, cfg.seed + step, pad_id=model.tokenizer.pad_token_id or 0)
    total, grads = 0.0, None
    for b in buckets:
        if b.n_rows == 0:
            continue
        batch = _pow2_rows(b)
        loss, g = _pg_grad(params, model.config, batch, np.float32(max(n_sampled, 1)))
        total += float(loss)
        grads = g if grads is None else jax.tree.map(lambda x, y: x + y, grads, g)
    import optax

    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    stats.update(loss=total, updated=True)
    return params, opt_state, stats


def run_grpo(
    cfg: GRPOConfig, *, say=print, reward_fn: Callable[[Any, Any], float] = verifier_reward, tools: Any = None
) -> dict:
    """``cfg.steps`` GRPO steps from ``cfg.model_dir``; logs ``out_dir/grpo_log.jsonl`` and exports ``out_dir/hf``."""
    import jax
    import optax

    import timjax
    from timjax.qwen3.model import cast_params
    from timjax.tools.runner import ToolRunner
    from timjax.train.runtime_view import Replayer
    from timjax.train.sft import export_hf
    from timjax.train.tools_adapter import default_backend, tool_servers

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = timjax.load(cfg.model_dir, dtype="float32")
    params = cast_params(model.params(), "float32")
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.lr))
    opt_state = opt.init(params)
    replayer = Replayer(model.tokenizer, _schema(), model.config.vocab_size)
    pool = problem_pool(cfg, cfg.steps * cfg.problems_per_step)
    runner = ToolRunner(list(tools) if tools is not None else tool_servers(default_backend().kb_seed))
    history = []
    try:
        with open(out / "grpo_log.jsonl", "a", encoding="utf-8") as log:
            for step in range(cfg.steps):
                probs = pool[step * cfg.problems_per_step : (step + 1) * cfg.problems_per_step]
                params, opt_state, st = grpo_step(
                    model, params, opt, opt_state, probs, cfg, runner, replayer, step=step, reward_fn=reward_fn
                )
                history.append(st)
                log.write(json.dumps(st) + "\n")
                log.flush()
                say(
                    f"grpo step {step}: reward {st['reward']:.2f}, groups with signal {st['groups_with_signal']}, "
                    f"loss {st['loss']:.4f}, rollouts {st['rollout_s']:.0f}s"
                )
    finally:
        runner.close()
    hf = export_hf(model.config, jax.tree.map(np.asarray, params), cfg.model_dir, out / "hf")
    return {"history": history, "params": params, "hf_dir": str(hf)}


def _schema():
    from timjax.tim.schema import tim_schema
    from timjax.train.tools_adapter import default_backend

    return tim_schema(tools=default_backend().specs())


def main(argv=None) -> int:
    """``python -m timjax.train.grpo --model-dir DIR --out-dir DIR [--steps N ...]``."""
    import argparse

    ap = argparse.ArgumentParser(description="a few GRPO steps on a TIM checkpoint (rollouts with pruning and tools)")
    for name, field in GRPOConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.is_required():
            ap.add_argument(flag, required=True)
        else:
            ap.add_argument(flag, default=None)
    args = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    if "pruning_buffer" in args and args["pruning_buffer"] in ("none", "off", "-1"):
        args["pruning_buffer"] = None
    cfg = GRPOConfig.model_validate(args)
    out = run_grpo(cfg)
    print(json.dumps(out["history"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
