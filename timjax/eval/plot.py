"""Accuracy against reasoning-tree length in units of the context C, pruning on vs off, from ``timjax eval
--json`` reports (issue 23).

A problem's tree length is its reference tree's (``tree_tokens``, where the family knows it: ``long-K``),
else the most tokens the model wrote for it in any setting of that report (a run cut at the context
writes fewer than its tree, so the longest run is the best measure the report holds). Problems are
binned by length/C; each setting is one line.

    python -m timjax.eval.plot bench/eval_notation_cpu.json bench/eval_long_cpu.json --out bench/eval_tree_length.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

BINS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 1e9)


def tree_lengths(report: dict) -> list[float]:
    """Per problem (in the report's order), its tree length in units of the report's context."""
    c = report.get("context") or 1
    settings = report["settings"]
    out = []
    for i in range(len(settings[0]["samples"])):
        ref = settings[0]["samples"][i].get("tree_tokens")
        written = max(s["samples"][i]["tokens"] for s in settings)
        out.append((ref if ref else written) / c)
    return out


def accuracy_by_length(reports: list[dict]) -> dict[str, list[tuple[float, float, int]]]:
    """``"<family>: <setting>"`` (family: the group's kind, e.g. ``notation``) -> [(bin centre in C, accuracy,
    n)] over all reports; one line per family, since families of one length differ in difficulty."""
    acc: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for rep in reports:
        lengths = tree_lengths(rep)
        for s in rep["settings"]:
            for x, sample in zip(lengths, s["samples"]):
                b = next(i for i in range(len(BINS) - 1) if BINS[i] <= x < BINS[i + 1])
                family = sample.get("group", "").rpartition("-")[0]
                acc[f"{family}: {s['label']}" if family else s["label"]][b].append(bool(sample["ok"]))
    centre = lambda b: (BINS[b] + min(BINS[b + 1], BINS[b] + 1.0)) / 2
    return {
        label: [(centre(b), sum(v) / len(v), len(v)) for b, v in sorted(bins.items())] for label, bins in acc.items()
    }


def plot(reports: list[dict], out: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, pts in sorted(accuracy_by_length(reports).items()):
        xs, ys, ns = zip(*pts)
        style = "--" if label.rpartition(" ")[2].startswith("off") else "-"
        ax.plot(xs, [100 * y for y in ys], style, marker="o", label=label)
        for x, y, n in pts:
            ax.annotate(str(n), (x, 100 * y), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.text(1.02, 95, "tree = C", fontsize=8, color="grey")
    ax.set_xlabel("reasoning-tree length / context C (binned; n per point)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(title or "accuracy vs tree length, pruning off (dashed) vs on")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="timjax eval --json reports (with per-problem samples)")
    p.add_argument("--out", default="bench/eval_tree_length.png")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    reports = [json.load(open(r, encoding="utf-8")) for r in args.reports]
    for path, r in zip(args.reports, reports):
        if not r["settings"] or not r["settings"][0].get("samples"):
            raise SystemExit(f"{path}: no per-problem samples (written by an older timjax eval)")
    plot(reports, args.out, args.title)
    for label, pts in sorted(accuracy_by_length(reports).items()):
        print(label, " ".join(f"{x:.2f}C:{y:.0%}({n})" for x, y, n in pts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
