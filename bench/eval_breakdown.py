"""Where a TIM's arithmetic errors are: accuracy per held-out group, split by the widest operator chain.

Reads a ``timjax eval --json`` report of held-out corpus problems (it lists every wrong answer), draws the
same held-out problems again (the draw is deterministic: group and count are in the report) and splits
each arithmetic group by its widest chain (``3 + 4`` has two operands, ``3 + 4 - 5`` three). A chain of
three operands makes the model pick the next operand among literals and subtask values; that is where
the tiny TIM's depth-3 errors were (bench/RESULTS.md, issue 9, round 4). No model is run.

    python bench/eval_breakdown.py bench/eval_tiny_tim4_n40.json [--setting buf2]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/eval_breakdown.py` from the repo root

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start (no plugin traceback), no torch notice


def breakdown(report: dict, setting: str) -> list[tuple[str, int, int, int]]:
    """(group, widest chain, problems, wrong) rows for the arithmetic groups of one setting."""
    from timjax.eval.run import heldout_problems, parse_groups
    from timjax.train.corpus import parse_expression, widest_chain

    rep = next((s for s in report["settings"] if s["label"] == setting), None)
    if rep is None:
        raise SystemExit(f"the report has no setting {setting!r}: {[s['label'] for s in report['settings']]}")
    n_wrong = round(sum(g["n"] * (1 - g["accuracy"]) for g in rep["groups"].values()))
    if len(rep["failures"]) != n_wrong:  # reports written before every failure was listed kept five
        raise SystemExit(f"the report lists {len(rep['failures'])} of its {n_wrong} wrong answers: run the eval again")
    wrong_questions = {f["question"] for f in rep["failures"]}
    total, wrong = Counter(), Counter()
    for group, stats in rep["groups"].items():
        if not group.startswith("arith"):
            continue
        for p in heldout_problems(stats["n"], groups=parse_groups(group)):
            key = (group, widest_chain(parse_expression(p.data["expr"])))
            total[key] += 1
            wrong[key] += p.question in wrong_questions
    return [(g, w, total[(g, w)], wrong[(g, w)]) for g, w in sorted(total)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="a timjax eval --json report of held-out corpus problems")
    ap.add_argument("--setting", default=None, help="setting label (default: the report's first)")
    args = ap.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    setting = args.setting or report["settings"][0]["label"]
    print(f"{args.report}, setting {setting}")
    print("| group | widest chain | problems | wrong | accuracy |\n|---|---|---|---|---|")
    for g, w, n, bad in breakdown(report, setting):
        print(f"| {g} | {w} operands | {n} | {bad} | {1 - bad / n:.0%} |")


if __name__ == "__main__":
    main()
