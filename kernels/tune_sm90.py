"""Kernel configurations compiled for the H100 (sm_90a) without a GPU, and the tuning sweep.

``python -m timjax.kernels.tune_sm90`` compiles every (block_m, block_k, num_warps, num_stages) of the
ragged kernel for each shape class (head_dim, G, page_size) of the models we serve, records registers,
spills, wgmma serialisation and shared memory (``kernels/TUNING.md`` and ``kernels/tuning_sm90.json``)
and rewrites the ``TUNED`` table in ``ragged_paged_attention/v1/tuned_block_sizes.py`` by this rule:
among *clean* configurations (no spills, below 255 registers, wgmma pipelined, shared memory within
227 KiB) keep those with at least 2 resident blocks per SM, and pick the largest tile
``block_m * block_k`` (more K/V reuse per load), then fewer warps, then more stages. Without a GPU we
cannot time, so the rule only rules out configurations the compiler already tells us are slow.

``cases()`` lists the configurations tests/test_compile_h100.py compiles in CI: the legacy decode /
extend / compaction kernels and the ragged kernel's tuned entries.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

__all__ = ["SHAPE_CLASSES", "Case", "cases", "pick", "ragged_case", "sweep"]

# The shape classes we serve: Qwen3-0.6B (Hq 16, Hkv 8) and Qwen3-8B (Hq 32, Hkv 8), hd 128, page sizes
# 1 and 16; plus the tiny test models' hd 64 / G 2.
SHAPE_CLASSES = [(128, 2, 16), (128, 4, 16), (128, 2, 1), (128, 4, 1), (64, 2, 16)]
SWEEP = dict(block_m=(16, 32, 64, 128), block_k=(16, 32, 64), num_warps=(4, 8), num_stages=(1, 2))


class Case(NamedTuple):
    name: str
    fn: Callable
    args: tuple
    must_be_clean: bool = False  # tuned entries: no spills, no register cap, wgmma pipelined


def _sds(shape, dtype):
    import jax

    return jax.ShapeDtypeStruct(shape, dtype)


def ragged_case(
    hd: int,
    group: int,
    ps: int,
    *,
    hkv: int = 8,
    n_tokens: int = 256,
    rows: int = 16,
    dtype="bfloat16",
    tag: str = "",
    must_be_clean: bool = False,
    **tuning,
) -> Case:
    import jax.numpy as jnp

    from .ragged_paged_attention.v1 import ragged_paged_attention

    window = 1024 // ps  # 1024 slots per row
    pages = rows * window * 2  # the pool of several layers (page ids offset per layer)
    i32 = jnp.int32
    args = (
        _sds((n_tokens, hkv * group, hd), dtype),
        _sds((hkv, pages, ps, hd), dtype),
        _sds((hkv, pages, ps, hd), dtype),
        _sds((rows, window), i32),
        _sds((rows,), i32),
        _sds((rows,), i32),
        _sds((rows + 1,), i32),
    )
    knobs = ",".join(f"{k}={v}" for k, v in sorted(tuning.items()))
    name = f"ragged hd{hd} G{group} ps{ps} N{n_tokens} R{rows}{tag} [{knobs or 'tuned'}]"
    return Case(name, functools.partial(ragged_paged_attention, **tuning), args, must_be_clean)


def _knobs(kw: dict) -> str:
    return f" [{','.join(f'{k}={v}' for k, v in sorted(kw.items()))}]" if kw else ""


def _legacy_cases() -> list[Case]:
    import jax.numpy as jnp

    from . import compaction as C
    from . import paged_attention as PA

    bf, i32 = jnp.bfloat16, jnp.int32
    out = []
    for hq, hkv, ps, kw in [
        (16, 8, 16, {}),
        (32, 8, 16, {}),
        (32, 8, 1, {}),
        (32, 8, 16, dict(k_splits=4)),
        (40, 8, 1, {}),
    ]:
        window = 1024 // ps
        args = (
            _sds((16, hq, 128), bf),
            _sds((hkv, 512, ps, 128), bf),
            _sds((hkv, 512, ps, 128), bf),
            _sds((16,), i32),
            _sds((16, window), i32),
        )
        out.append(
            Case(f"decode hq{hq} hkv{hkv} ps{ps}{_knobs(kw)}", functools.partial(PA.paged_decode_attention, **kw), args)
        )
    for hq, t, kw in [
        (16, 64, {}),
        (32, 64, {}),
        (32, 64, dict(block_q=16, num_warps=4)),
        (32, 64, dict(block_q=16, num_warps=8)),
        (32, 8, dict(k_splits=2)),
    ]:
        args = (
            _sds((4, t, hq, 128), bf),
            _sds((8, 512, 16, 128), bf),
            _sds((8, 512, 16, 128), bf),
            _sds((4,), i32),
            _sds((4,), i32),
            _sds((4, 64), i32),
        )
        out.append(Case(f"extend hq{hq} T{t}{_knobs(kw)}", functools.partial(PA.paged_extend_attention, **kw), args))
    k = _sds((28, 8, 512, 16, 128), bf)
    pt, vec = _sds((16, 64), i32), _sds((16,), i32)
    out.append(Case("compact L28 ps16", functools.partial(C.compact_pages, rope_theta=1e6), (k, k, pt, vec, vec, vec)))
    out.append(Case("rotate L28 ps16", functools.partial(C.rotate_slots, rope_theta=1e6), (k, pt, vec, vec, vec)))
    return out


def cases() -> list[Case]:
    """What CI compiles: legacy kernels at their defaults, and the ragged kernel at its tuned entries
    (mixed and decode-only buckets, split-K, the fallback for a class not in the table)."""
    out = _legacy_cases()
    for hd, g, ps in SHAPE_CLASSES:
        out.append(ragged_case(hd, g, ps, must_be_clean=True))
    out.append(ragged_case(128, 4, 16, n_tokens=16, tag=" decode-only", must_be_clean=True))
    out.append(ragged_case(128, 2, 16, k_splits=4, n_tokens=16, tag=" decode-only"))
    out.append(ragged_case(128, 4, 16, n_tokens=1, rows=1, tag=" batch-1 decode (auto split-K)", must_be_clean=True))
    out.append(ragged_case(128, 8, 16, hkv=4, tag=" untuned class"))
    out.append(ragged_case(64, 2, 16, dtype="float32", tag=" f32", must_be_clean=True))
    out.append(ragged_case(128, 4, 16, dtype="float32", tag=" f32", must_be_clean=True))
    return out


def sweep(classes=SHAPE_CLASSES, grid=SWEEP, log=print) -> list[dict]:
    from . import sm90_compile as SC

    rows = []
    for (hd, g, ps), combo in itertools.product(classes, itertools.product(*grid.values())):
        tuning = dict(zip(grid, combo))
        if tuning["block_m"] < g:
            continue
        case = ragged_case(hd, g, ps, k_splits=1, **tuning)
        row = dict(head_dim=hd, group=g, page_size=ps, k_splits=1, **tuning)
        try:
            (call,) = SC.triton_calls(SC.export_cuda(case.fn, *case.args))
            res = SC.compile_sm90(call)
            row.update(res.row(), clean=res.clean, error=None)
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a result too
            row.update(error=str(e).splitlines()[0][:200], clean=False)
        log(json.dumps(row))
        rows.append(row)
    return rows


def compile_cases(log=print) -> list[dict]:
    """Figures of every configuration CI compiles (``cases()``)."""
    from . import sm90_compile as SC

    out = []
    for case in cases():
        for call in SC.triton_calls(SC.export_cuda(case.fn, *case.args)):
            row = dict(case=case.name, **SC.compile_sm90(call).row())
            log(json.dumps(row))
            out.append(row)
    return out


def pick(rows: list[dict]) -> dict[tuple[int, int, int], dict]:
    """The rule in the module docstring, per shape class."""
    best = {}
    for key, group in itertools.groupby(
        sorted(rows, key=lambda r: (r["head_dim"], r["group"], r["page_size"])),
        key=lambda r: (r["head_dim"], r["group"], r["page_size"]),
    ):
        ok = [r for r in group if r["clean"] and r["blocks_per_sm"] >= 2]
        if ok:
            best[key] = max(ok, key=lambda r: (r["block_m"] * r["block_k"], -r["num_warps"], r["num_stages"]))
    return best


def _cases_markdown(case_rows) -> list[str]:
    lines = [
        "## As CI compiles them (tests/test_compile_h100.py)",
        "",
        "Legacy padded kernels at their defaults (and the 64-row extend block for comparison), compaction, and",
        "the ragged kernel at its tuned entries (split-K chosen automatically unless given).",
        "",
        "| configuration | kernel | grid | warps | stages | regs | spill st/ld (B) | wgmma serialized | smem (KiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in case_rows:
        lines.append(
            f"| {r['case']} | {r['name']} | {'x'.join(map(str, r['grid']))} | {r['num_warps']} | "
            f"{r['num_stages']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
            f"{'yes' if r['wgmma_serialized'] else 'no'} | {r['smem'] / 1024:.1f} |"
        )
    return lines + [""]


def _markdown(rows, best, meta, case_rows=()) -> str:
    lines = [
        "# sm_90a compile figures for the Pallas kernels (no GPU)",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['versions']}). Registers, spills and",
        "wgmma serialisation from `ptxas -v --gpu-name=sm_90a`; shared memory from Triton's compile (per block,",
        "H100 limit 227 KiB); blocks/SM from registers (64K/SM), shared memory (228 KiB/SM) and 2048 threads.",
        "Rule for the tuned entry (**bold**): clean (no spills, < 255 registers, wgmma pipelined), >= 2",
        "blocks/SM, then the largest block_m x block_k, fewer warps, more stages. bf16, N 256, R 16, 1024-slot window.",
        "",
    ]
    if case_rows:
        lines += _cases_markdown(case_rows)
    lines += ["## Ragged paged attention v1: the sweep (k_splits 1)", ""]
    for key in sorted({(r["head_dim"], r["group"], r["page_size"]) for r in rows}):
        lines += [
            f"### head_dim {key[0]}, G {key[1]}, page_size {key[2]}",
            "",
            "| block_m | block_k | warps | stages | regs | spill st/ld (B) | wgmma serialized | smem (KiB) | blocks/SM |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if (r["head_dim"], r["group"], r["page_size"]) == key):
            if r.get("error"):
                lines.append(
                    f"| {r['block_m']} | {r['block_k']} | {r['num_warps']} | {r['num_stages']} | "
                    f"error: {r['error']} ||||| "
                )
                continue
            cells = [
                r["block_m"],
                r["block_k"],
                r["num_warps"],
                r["num_stages"],
                r["registers"],
                f"{r['spill_stores']}/{r['spill_loads']}",
                "yes" if r["wgmma_serialized"] else "no",
                f"{r['smem'] / 1024:.1f}",
                r["blocks_per_sm"],
            ]
            text = "| " + " | ".join(str(c) for c in cells) + " |"
            if best.get(key) is r:
                text = "| " + " | ".join(f"**{c}**" for c in cells) + " |"
            lines.append(text)
        lines.append("")
    return "\n".join(lines)


_BEGIN, _END = "# BEGIN TUNED (written by python -m timjax.kernels.tune_sm90)", "# END TUNED"


def _write_table(best, path: Path) -> None:
    body = ["TUNED: dict[tuple[int, int, int], Tuning] = {"]
    for key, r in sorted(best.items()):
        body.append(
            f"    {key}: Tuning(block_m={r['block_m']}, block_k={r['block_k']}, "
            f"num_warps={r['num_warps']}, num_stages={r['num_stages']}),"
        )
    body.append("}")
    text = path.read_text()
    new = re.sub(
        re.escape(_BEGIN) + r".*?" + re.escape(_END),
        _BEGIN + "\n" + "\n".join(body) + "\n" + _END,
        text,
        flags=re.DOTALL,
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(Path(__file__).parent), help="where TUNING.md and the JSON go")
    ap.add_argument("--write-table", action="store_true", help="rewrite TUNED in v1/tuned_block_sizes.py")
    ap.add_argument(
        "--cases-only",
        action="store_true",
        help="recompile only the CI cases; keep the sweep rows of the existing tuning_sm90.json",
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from . import sm90_compile as SC

    reason = SC.unavailable_reason()
    if reason:
        print(f"tune_sm90: {reason}", file=sys.stderr)
        return 2
    import jax
    import jaxlib

    t0 = time.time()
    out = Path(args.out_dir)

    def err(line: str) -> None:
        print(line, file=sys.stderr)

    sweep_command = None
    if args.cases_only:
        old = json.loads((out / "tuning_sm90.json").read_text())
        rows, sweep_command = old["rows"], old["meta"]["command"].split(";")[0]
    else:
        rows = sweep(log=err)
    case_rows = compile_cases(log=err)
    best = pick(rows)
    meta = dict(
        command="python -m timjax.kernels.tune_sm90 " + " ".join(sys.argv[1:] if argv is None else argv),
        date=time.strftime("%Y-%m-%d"),
        versions=f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, ptxas from nvidia-cuda-nvcc-cu12",
        seconds=round(time.time() - t0, 1),
    )
    if sweep_command:  # the sweep rows come from an earlier full run
        meta["command"] = f"{sweep_command}; CI cases recompiled by {meta['command']}"
    for name, text in (
        ("tuning_sm90.json", json.dumps(dict(meta=meta, rows=rows, cases=case_rows), indent=1)),
        ("TUNING.md", _markdown(rows, best, meta, case_rows)),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out / name)
    if args.write_table:
        _write_table(best, Path(__file__).parent / "ragged_paged_attention" / "v1" / "tuned_block_sizes.py")
    print(
        json.dumps(
            {f"{k}": {x: v[x] for x in ("block_m", "block_k", "num_warps", "num_stages")} for k, v in best.items()}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
