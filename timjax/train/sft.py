"""Supervised fine-tuning of a TIM with optax over the runtime's own forward (``timjax.qwen3.model.forward``).

``train(config)`` (``timjax train CONFIG``) does, in ``config.out_dir``:

1. the tokenizer: the checkpoint's own when fine-tuning (``init_from``), else a byte-level BPE trained on
   the corpus (``tokenizer/``);
2. the data (``data.npz``, cached): corpus documents replayed as the runtime writes them, with pruned
   working-memory views, packed into rows (``timjax.train.data``);
3. the loop: cross-entropy on the tokens the model writes only, gradient accumulation
   (``optax.MultiSteps``), warmup + cosine learning rate, AdamW, global-norm clipping; orbax checkpoints
   every ``save_every`` steps (``checkpoints/``) and resume from the latest; a tqdm bar and a JSON-lines
   log (``log.jsonl``);
4. the result as a Hugging Face checkpoint (``hf/``: config.json, model.safetensors, tokenizer files)
   and the training curve (``curve.png``).

The batch order is a function of the seed and the step, so a resumed run continues exactly where the
interrupted one was (tested: resume gives the same parameters as an uninterrupted run).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from timjax.base.errors import TimjaxError
from timjax.train.corpus import CorpusSpec
from timjax.train.tools_adapter import training_schema


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 4096
    rope_theta: float = 10_000.0


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    n_problems: int = 20_000
    mix: list[tuple[str, int, float]] = [
        ("arith", 1, 1.0),
        ("arith", 2, 2.0),
        ("arith", 3, 3.0),
        ("lookup", 2, 1.5),
        ("lookup", 3, 1.5),
    ]
    breadth: int = 3
    max_literal: int = 20
    heldout_fraction: float = 0.05
    p_binary: float = Field(CorpusSpec.p_binary, ge=0.0, le=1.0)  # share of two-operand chains
    # a chain of 3+ operands with a compound one restates itself with the solved values before its
    # operator steps (corpus.arith_task); stages 1-5 of the shipped TIM were trained without it
    restate_operands: bool = False
    # arithmetic written as rewrites, one operation per subtask (corpus.rewrite_task; wins over
    # restate_operands); its pruned views keep at least one finished subtask (buffer 0, or none, is drawn as 1)
    rewrite_operations: bool = False
    # with rewrite_operations: an expression of more top-level terms is rewritten this many terms at a time
    # (corpus.chunked_task), so a long sum never has to be copied whole; 0: off
    chunk_terms: int = Field(0, ge=0)
    # notation options (issue 23; corpus.CorpusSpec): negative literals, larger values, questions typed
    # without spaces, literal digit counts uniform up to max_literal's; a mix entry ("flat", N, w) draws
    # flat sums of 3..N terms. The defaults reproduce the shipped stages' corpus exactly.
    p_negative_literal: float = Field(CorpusSpec.p_negative_literal, ge=0.0, le=1.0)
    max_abs_value: int = Field(CorpusSpec.max_abs_value, ge=1)
    p_tight: float = Field(CorpusSpec.p_tight, ge=0.0, le=1.0)
    digits_uniform: bool = CorpusSpec.digits_uniform
    p_fraction: float = Field(CorpusSpec.p_fraction, ge=0.0, le=1.0)  # division giving fractions "p/q"
    p_tool_contract: float = Field(CorpusSpec.p_tool_contract, ge=0.0, le=1.0)  # other calculator contracts
    p_additive: float = Field(CorpusSpec.p_additive, ge=0.0, le=1.0)  # "2*3 + 4": spaces around + - only
    kb_seed: int = 0
    # each document also appears as the runtime shows it with one of these prune buffers (probabilities)
    buffers: list[tuple[int | None, float]] = [(0, 0.3), (1, 0.25), (2, 0.25)]
    seq_lens: list[int] = [320, 768]  # buckets (rows of each length; a sequence goes to the shortest that fits)
    vocab_size: int = 2048  # BPE size when the tokenizer is trained here
    tokenizer_dir: str | None = None  # reuse a tokenizer instead of training one
    # the knowledge base's names are spelled letter by letter by a tokenizer trained here (see
    # timjax.train.tokenizer: a tiny model copies letters far more readily than a token per name)
    spell_names: bool = True
    # processes that replay the corpus (the sequences do not depend on it); default: every core
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out_dir: str
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    init_from: str | None = None  # a converted (or HF) checkpoint to fine-tune; its tokenizer is kept...
    # ...unless retokenize: then the tokenizer is trained here (or data.tokenizer_dir) and every embedding
    # row whose token string the checkpoint's vocabulary also has is carried over (transfer_embeddings).
    # ``model`` must then match the checkpoint's shape, except that num_hidden_layers may be larger: the
    # new layers start as identities (timjax.train.grow)
    retokenize: bool = False
    data: DataSpec = Field(default_factory=DataSpec)
    tokens_per_batch: int = 6144  # per micro-batch: rows = tokens_per_batch // bucket length
    grad_accum: int = 1
    steps: int = 1000  # optimizer steps
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    time_limit_s: float | None = None  # stop (checkpointed) after this long
    export: bool = True

    @model_validator(mode="after")
    def _rows_fit_the_context(self) -> TrainConfig:
        # the context C is what the model is trained on: no training row may reach past it
        if max(self.data.seq_lens) > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_lens: a row of {max(self.data.seq_lens)} tokens exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings} (the context C)"
            )
        return self


def load_config(path: str | os.PathLike) -> TrainConfig:
    """A JSON or YAML training config; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise TimjaxError(f"{path}: training config not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line naming the file
        raise TimjaxError(f"{path}: cannot parse the config: {e}") from None
    try:
        return TrainConfig.model_validate(raw)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()
        raise TimjaxError(f"{path}: invalid training config: {' '.join(first[:3])}") from None


# ----------------------------------------------------------------------------------------- setup


def tim_tools(data: DataSpec):
    from timjax.train.tools_adapter import default_backend

    return default_backend(data.kb_seed)


def corpus_spec(data: DataSpec):
    from timjax.train.corpus import CorpusSpec

    return CorpusSpec(
        seed=data.seed,
        mix=tuple(tuple(m) for m in data.mix),
        breadth=data.breadth,
        max_literal=data.max_literal,
        heldout_fraction=data.heldout_fraction,
        p_binary=data.p_binary,
        p_negative_literal=data.p_negative_literal,
        max_abs_value=data.max_abs_value,
        p_tight=data.p_tight,
        digits_uniform=data.digits_uniform,
        p_fraction=data.p_fraction,
        p_tool_contract=data.p_tool_contract,
        p_additive=data.p_additive,
    )


def doc_format(data: DataSpec):
    from timjax.train.corpus import DocFormat

    return DocFormat(restate=data.restate_operands, rewrite=data.rewrite_operations, chunk_terms=data.chunk_terms)


def prepare_tokenizer(cfg: TrainConfig, probs, tools, say=print):
    from timjax.train.corpus import document_text
    from timjax.train.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    out = Path(cfg.out_dir)
    if cfg.init_from and not cfg.retokenize:
        from timjax.api import load_tokenizer as load_ckpt_tokenizer

        tok = load_ckpt_tokenizer(cfg.init_from)
        if tok is None:
            raise TimjaxError(f"{cfg.init_from}: the checkpoint has no tokenizer files")
        return tok, Path(cfg.init_from)
    if cfg.data.tokenizer_dir:
        return load_tokenizer(cfg.data.tokenizer_dir), Path(cfg.data.tokenizer_dir)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        from timjax.tim.prompt import tim_system_prompt

        fmt = doc_format(cfg.data)
        texts = [p.question for p in probs] + [document_text(p, tools, **asdict(fmt)) for p in probs]
        texts.append(tim_system_prompt(training_schema(tools)))
        spell = sorted(name_words(tools)) if cfg.data.spell_names else []
        say(f"training a {cfg.data.vocab_size}-token BPE on {len(texts)} texts ({len(spell)} name words spelled)")
        save_tokenizer(train_tokenizer(texts, cfg.data.vocab_size, spell=spell), tok_dir)
    return load_tokenizer(tok_dir), tok_dir


def name_words(tools) -> set[str]:
    """The words of the knowledge base's entity names (the words the tokenizer spells)."""
    return {w for e in tools.kb.entities() for w in e.split()}


def prepare_data(cfg: TrainConfig, say=print, progress: bool = True):
    """(tokenizer, tokenizer dir, packed rows); the rows are cached in ``out_dir/data.npz``."""
    from collections import Counter

    from timjax.train.corpus import problems
    from timjax.train.data import ReplaySetup, bucketed, build_segments, load_buckets, save_buckets

    out = Path(cfg.out_dir)
    tools = tim_tools(cfg.data)
    spec = corpus_spec(cfg.data)
    probs = problems(spec, "train", cfg.data.n_problems, tools=tools, progress=progress)
    tok, tok_dir = prepare_tokenizer(cfg, probs, tools, say)
    cache = out / "data.npz"
    if cache.is_file():
        return tok, tok_dir, load_buckets(str(cache))
    vocab = None
    if cfg.init_from and not cfg.retokenize:
        from timjax.convert import read_params

        vocab = read_params(cfg.init_from)[0].vocab_size
    setup = ReplaySetup(str(tok_dir), vocab, cfg.data.kb_seed)
    replayer, _ = setup.make()  # built as every worker builds its own
    buffers = [tuple(b) for b in cfg.data.buffers]
    segs = build_segments(
        probs,
        replayer,
        tools,
        buffers,
        cfg.data.seed,
        workers=cfg.data.workers,
        setup=setup,
        fmt=doc_format(cfg.data),
        progress=progress,
    )
    buckets = bucketed(segs, cfg.data.seq_lens, cfg.data.seed, pad_id=tok.pad_token_id or 0)
    rows = ", ".join(
        f"{b.n_rows} x {b.tokens.shape[1]} ({float((b.segments > 0).mean()) if b.n_rows else 0.0:.0%} filled)"
        for b in buckets
    )
    # a group whose distinct problems run out (a small KB has few lookups) stops drawing and the others
    # fill its share: the counts say what the mix really was
    per_group = Counter(f"{p.kind}-{p.depth}" for p in probs)
    groups = ", ".join(f"{g} {n}" for g, n in sorted(per_group.items()))
    say(
        f"{len(probs)} problems ({groups}) -> {len(segs)} sequences -> rows {rows}; "
        f"{int(sum(b.loss.sum() for b in buckets))} loss tokens; {buckets[-1].dropped} sequences longer than "
        f"{max(cfg.data.seq_lens)} left out"
    )
    save_buckets(buckets, str(cache))
    return tok, tok_dir, buckets


def model_config(cfg: TrainConfig, tok):
    from timjax.base.config import Qwen3Config
    from timjax.tim.grammar import tokenizer_size

    m = cfg.model
    n = tokenizer_size(tok)
    return Qwen3Config(
        vocab_size=int(math.ceil(n / 64) * 64),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )


def initial_params(cfg: TrainConfig, tok):
    import jax

    from timjax.qwen3.model import cast_params, init_params

    if cfg.init_from:
        from timjax.convert import read_params
        from timjax.train.grow import check_shape, grow_layers

        mcfg, params = read_params(cfg.init_from)
        params = cast_params(params, "float32")
        add = check_shape(mcfg, cfg.model, cfg.init_from)
        params = grow_layers(params, add, jax.random.key(cfg.seed))
        # the config's context C, not the checkpoint's (the shipped stages both say 4096)
        mcfg = mcfg.model_copy(
            update={
                "max_position_embeddings": cfg.model.max_position_embeddings,
                "num_hidden_layers": cfg.model.num_hidden_layers,
            }
        )
        if cfg.retokenize:
            from timjax.api import load_tokenizer as load_ckpt_tokenizer

            old_tok = load_ckpt_tokenizer(cfg.init_from)
            if old_tok is None:
                raise TimjaxError(f"{cfg.init_from}: retokenize needs the checkpoint's tokenizer files")
            new_cfg = mcfg.model_copy(
                update={"vocab_size": model_config(cfg, tok).vocab_size, "eos_token_id": tok.eos_token_id}
            )
            params = transfer_embeddings(params, old_tok, tok, new_cfg.vocab_size, jax.random.key(cfg.seed))
            return new_cfg, params
        return mcfg, params
    mcfg = model_config(cfg, tok)
    return mcfg, init_params(mcfg, "float32", jax.random.key(cfg.seed))


def transfer_embeddings(params, old_tok, new_tok, vocab_size: int, key):
    """``params`` with the embedding (and an untied ``lm_head``) re-indexed for ``new_tok``: a token whose
    string the old vocabulary has keeps its row; any other row is drawn like a fresh one (normal, the
    std of the old rows)."""
    import jax
    import jax.numpy as jnp

    old_vocab = old_tok.get_vocab()
    new_ids = new_tok.get_vocab()
    src = np.full(vocab_size, -1, np.int64)
    for token, i in new_ids.items():
        if i < vocab_size and token in old_vocab:
            src[i] = old_vocab[token]

    def remap(table, axis):
        t = np.moveaxis(np.asarray(table), axis, 0)
        fresh = np.asarray(jax.random.normal(key, (vocab_size,) + t.shape[1:], jnp.float32)) * float(t.std())
        out = np.where((src >= 0)[:, None], t[np.maximum(src, 0)], fresh).astype(t.dtype)
        return jnp.asarray(np.moveaxis(out, 0, axis))

    out = dict(params)
    out["embed"] = remap(params["embed"], 0)
    if "lm_head" in params:
        out["lm_head"] = remap(params["lm_head"], 1)
    return out


# ----------------------------------------------------------------------------------------- the step


def packed_attention(q, k, v, layer, cache, *, segments):
    """Dense causal attention inside each packed sequence (``segments`` [B, T]; 0 = padding)."""
    import jax
    import jax.numpy as jnp

    B, T, Hq, hd = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, hd)
    scores = jnp.einsum("bthgk,bshk->bhgts", qg, k, preferred_element_type=jnp.float32) * hd**-0.5
    same = segments[:, :, None] == segments[:, None, :]
    allowed = same & jnp.tril(jnp.ones((T, T), dtype=bool))[None]
    scores = jnp.where(allowed[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgts,bshk->bthgk", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, Hq, hd).astype(q.dtype), cache


def loss_fn(params, mcfg, batch):
    """Mean cross-entropy over the weighted positions (position j predicts token j + 1)."""
    import jax
    import jax.numpy as jnp

    from timjax.qwen3.model import forward

    tokens, positions, segments, weights = batch
    logits, _ = forward(params, mcfg, tokens, positions, partial(packed_attention, segments=segments))
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)


def make_optimizer(cfg: TrainConfig):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=max(1, cfg.warmup_steps),
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay)
    )
    return optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum), schedule


def _opt_key(cfg: TrainConfig) -> tuple:
    return (cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.weight_decay, cfg.clip_norm, cfg.grad_accum)


@lru_cache(maxsize=8)
def _optimizer_and_step(mcfg, key: tuple):
    """(optimizer, schedule, jitted step), cached so that runs in one process share compiled steps."""
    lr, warmup, steps, min_ratio, wd, clip, accum = key
    cfg = TrainConfig(
        out_dir="",
        lr=lr,
        warmup_steps=warmup,
        steps=steps,
        min_lr_ratio=min_ratio,
        weight_decay=wd,
        clip_norm=clip,
        grad_accum=accum,
    )
    opt, schedule = make_optimizer(cfg)
    return opt, schedule, make_train_step(mcfg, opt)


def make_train_step(mcfg, opt):
    import jax

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, mcfg, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        import optax

        params = optax.apply_updates(params, updates)
        return params, opt_state, loss

    return step


# ----------------------------------------------------------------------------------------- checkpoints


def _manager(out_dir: Path, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        out_dir.resolve() / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    )


def save_state(mgr, step: int, params, opt_state) -> None:
    import orbax.checkpoint as ocp

    mgr.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    mgr.wait_until_finished()


def restore_state(mgr, params, opt_state):
    import jax
    import orbax.checkpoint as ocp

    step = mgr.latest_step()
    if step is None:
        return 0, params, opt_state
    target = {"params": params, "opt_state": opt_state}
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) if hasattr(x, "shape") else x, target
    )
    got = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    return step, got["params"], got["opt_state"]


# ----------------------------------------------------------------------------------------- the loop


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    say=print,
    stop_after: int | None = None,
    until_step: int | None = None,
    data_only: bool = False,
) -> dict:
    """Run (or resume) a training run; returns a summary. ``until_step``: stop (checkpointed and exported)
    at that step, the learning-rate schedule still the one of ``cfg.steps``; ``data_only``: build the
    tokenizer and the data cache, then return. ``stop_after``: stop after that many optimizer
    steps in this call (tests use it to simulate an interruption)."""
    import jax
    from tqdm.auto import tqdm

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    from timjax.train.data import Batches

    tok, tok_dir, buckets = prepare_data(cfg, say, progress)
    if data_only:
        return {"step": 0, "tokenizer_dir": str(tok_dir), "data": str(out / "data.npz")}
    batches = Batches(buckets, cfg.tokens_per_batch, cfg.seed)
    mcfg, params = initial_params(cfg, tok)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    say(f"model: {n_params / 1e6:.2f}M parameters, vocabulary {mcfg.vocab_size}, {mcfg.num_hidden_layers} layers")
    opt, schedule, step_fn = _optimizer_and_step(mcfg, _opt_key(cfg))
    opt_state = opt.init(params)
    mgr = _manager(out, cfg.keep_checkpoints)
    start, params, opt_state = restore_state(mgr, params, opt_state)
    if start:
        say(f"resumed from step {start}")
    log_path = out / "log.jsonl"
    t0 = time.perf_counter()
    tokens_seen = 0
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    if until_step is not None:
        end = min(end, until_step)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress)
    losses: list[float] = []
    step = start
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            for step in range(start + 1, end + 1):
                for a in range(cfg.grad_accum):
                    batch = batches.get((step - 1) * cfg.grad_accum + a)
                    params, opt_state, loss = step_fn(params, opt_state, batch)
                    tokens_seen += int((batch[2] > 0).sum())
                    losses.append(loss)
                if step % cfg.log_every == 0 or step == end:
                    vals = [float(x) for x in losses]
                    losses = []
                    el = time.perf_counter() - t0
                    rec = {
                        "step": step,
                        "loss": float(np.mean(vals)),
                        "lr": float(schedule(step - 1)),
                        "tokens": tokens_seen,
                        "tokens_per_s": tokens_seen / el,
                        "elapsed_s": el,
                    }
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
                if step % cfg.save_every == 0 or step == end:
                    save_state(mgr, step, params, opt_state)
                if cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s:
                    save_state(mgr, step, params, opt_state)
                    say(f"time limit reached at step {step}")
                    break
    finally:
        bar.close()
        mgr.close()
    summary = {
        "step": step,
        "n_params": n_params,
        "tokens": tokens_seen,
        "elapsed_s": time.perf_counter() - t0,
        "params": params,
        "model_config": mcfg,
        "tokenizer_dir": str(tok_dir),
    }
    stopped = until_step is not None or (cfg.time_limit_s is not None and stop_after is None)
    if cfg.export and (step >= cfg.steps or stopped):
        summary["hf_dir"] = str(export_hf(mcfg, params, tok_dir, out / "hf"))
        plot_curve(log_path, out / "curve.png")
    return summary


def export_hf(mcfg, params, tok_dir, out_dir) -> Path:
    import jax

    from timjax.convert import export_timjax_to_hf

    host = jax.tree.map(np.asarray, params)
    return export_timjax_to_hf(
        (mcfg, host), out_dir, dtype="float32", overwrite=True, progress=False, tokenizer_dir=tok_dir
    )


def plot_curve(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    stages = sorted({r.get("stage", "") for r in rows})  # a log joined from staged runs carries "stage"
    for stage in stages:
        part = [r for r in rows if r.get("stage", "") == stage]
        ax.plot([r["step"] for r in part], [r["loss"] for r in part], label=stage or None)
    if len(stages) > 1:
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss on written tokens (nats)")
    ax.set_title("tiny TIM SFT")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
