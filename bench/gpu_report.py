"""Append the tables of a ``bench/gpu.sh`` run to bench/RESULTS.md (one section: machine, commands, tables).

python bench/gpu_report.py --out bench/out/gpu-20261125-120000 --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ORDER = ["ragged_0.6b", "ragged_8b", "decode_0.6b", "decode_8b", "pruning_0.6b", "pruning_8b"]


def _sm90_table(rows: list[dict]) -> list[str]:
    lines = [
        "| configuration | kernel | warps | stages | registers | spills st/ld (B) | wgmma serialized | smem KiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['name']} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {'yes' if r['wgmma_serialized'] else 'no'} | "
            f"{r['smem'] / 1024:.1f} |"
        )
    return lines


def section(out: Path) -> str:
    smi = (out / "nvidia-smi.csv").read_text().strip() if (out / "nvidia-smi.csv").exists() else "(no nvidia-smi.csv)"
    cmds = (out / "commands.txt").read_text().strip() if (out / "commands.txt").exists() else ""
    lines = [
        f"## Issue 7: GPU run (`bench/gpu.sh`, {out.name})",
        "",
        "Machine (nvidia-smi):",
        "",
        "```",
        smi,
        "```",
        "",
        "Commands, in order:",
        "",
        "```",
        cmds,
        "```",
        "",
    ]
    first_env = None
    for name in ORDER:
        path = out / f"{name}.json"
        if not path.exists():
            lines += [f"### {name}: no result (see {name}.log in the run folder)", ""]
            continue
        payload = json.loads(path.read_text())
        first_env = first_env or payload.get("env")
        lines += [f"### {name}", ""]
        for text in (payload.get("tables") or {}).values():
            if text:
                lines += [text.rstrip(), ""]  # print_table already writes markdown
    if (out / "sm90.json").exists():
        lines += ["### sm_90a compile figures (tests/test_compile_h100.py)", ""]
        lines += _sm90_table(json.loads((out / "sm90.json").read_text())) + [""]
    if first_env:
        v = first_env.get("versions", {})
        lines += [
            f"Date {first_env.get('date')}, git {first_env.get('git')}, device {first_env.get('device_kind')}, "
            + ", ".join(f"{k} {x}" for k, x in v.items() if x),
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the run folder bench/gpu.sh wrote")
    ap.add_argument("--results", default="bench/RESULTS.md")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(f"gpu_report: --out {out}: no such folder", file=sys.stderr)
        return 2
    results = Path(args.results)
    text = results.read_text() if results.exists() else "# Results\n"
    tmp = results.with_suffix(".md.tmp")
    tmp.write_text(text.rstrip("\n") + "\n\n" + section(out) + "\n")
    tmp.replace(results)
    print(f"gpu_report: appended a section for {out} to {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
