"""Continuous batching of every family: N concurrent single-image requests through the Scheduler
against the same N images generated one after another (engine.generate, a batch of one each,
the same per-image generators). Images are checked equal to the serial ones before timing counts.

    python benchmarks/serve_families.py --out benchmarks/results/serve_families.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402
from engine.serving import Request, Scheduler  # noqa: E402
from stamp import machine_stamp  # noqa: E402

MODELS = ["digits-elm-ar", "digits-ctf", "digits-causal", "digits-elm-mlm", "digits"]


def measure(name: str, count: int, repeats: int) -> dict:
    model = engine.load(name)
    labels = [i % 10 for i in range(count)]

    def serial():
        return [engine.generate(model, [label], generator=[torch.Generator().manual_seed(i)], output_type="pt")
                for i, label in enumerate(labels)]

    def concurrent(sched):
        futures = [sched.submit(Request(label=label, seed=i)) for i, label in enumerate(labels)]
        return [f.result(600) for f in futures]

    with Scheduler(model, max_batch_images=count, admit_wait=0.005) as sched:
        want, got = serial(), concurrent(sched)          # warm-up, and the invariant
        for w, g in zip(want, got):
            assert (g.images("pt") - w).abs().max() <= 1e-4
        times = {"serial": [], "concurrent": []}
        for _ in range(repeats):   # alternating, so drift hits both
            start = time.perf_counter()
            serial()
            times["serial"].append(time.perf_counter() - start)
            start = time.perf_counter()
            concurrent(sched)
            times["concurrent"].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    return {"model": name, "family": model.family, "requests": count, "seconds": times, "best": best,
            "speedup": best["serial"] / best["concurrent"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for name in args.models:
        row = measure(name, args.count, args.repeats)
        print(f"{name:16s} {row['family']:8s} serial {row['best']['serial']:.3f} s  concurrent "
              f"{row['best']['concurrent']:.3f} s  {row['speedup']:.2f}x", flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"stamp": machine_stamp(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
