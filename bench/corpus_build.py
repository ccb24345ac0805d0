"""How much the corpus build gains from worker processes: ``build_segments`` with one process against
``--workers`` processes on the same problems (the stage-4 config's data spec), median of repeats, same run.

    python bench/corpus_build.py [--n 600] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/corpus_build.py` from the repo root

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start (no plugin traceback), no torch notice


def main(argv=None) -> None:
    from timjax.train.corpus import problems
    from timjax.train.data import ReplaySetup, build_segments
    from timjax.train.sft import corpus_spec, load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config", default="timjax/train/configs/tiny_tim_stage4.json")
    ap.add_argument("--tokenizer", default="timjax/tiny_tim")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    setup = ReplaySetup(args.tokenizer, None, cfg.data.kb_seed)
    replayer, tools = setup.make()
    probs = problems(corpus_spec(cfg.data), "train", args.n, tools=tools)
    buffers = [tuple(b) for b in cfg.data.buffers]
    times: dict[int, list[float]] = {1: [], args.workers: []}
    for _ in range(args.repeats):
        for w, ts in times.items():
            t = time.perf_counter()
            build_segments(probs, replayer, tools, buffers, cfg.data.seed, progress=False, workers=w, setup=setup)
            ts.append(time.perf_counter() - t)
    for w, ts in times.items():
        med = statistics.median(ts)
        print(f"{w} worker(s): median {med:.1f} s ({min(ts):.1f}-{max(ts):.1f}), {args.n / med:.0f} documents/s")
    print(f"speed-up: {statistics.median(times[1]) / statistics.median(times[args.workers]):.2f}x")


if __name__ == "__main__":
    main()
