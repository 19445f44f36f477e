"""Regenerate the quality report of the built-in continuous causal AR model "digits-causal":

    python docs/digits-causal/make_docs.py [--samples-per-class 100] [--threads 1]

writes, next to this file,
  quality.json  the report of `python -m engine evaluate --checkpoint digits-causal` over
                cfg 1 / 1.5 / 2 / 3 / 4 (its one num_iter: 16 = one step per token), with the
                time per image of digits-causal and of the MAR "digits" at their defaults, and
                ("mar") the MAR digits' report with the same classifier at 8 and 16 steps
  quality.md    the same as tables
  samples.png   a labelled grid of `python -m engine sample --checkpoint digits-causal --per-class 8`
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def time_per_image(name: str, batch: int, repeats: int) -> dict:
    """Best-of-`repeats` seconds per image of one batch of `batch` images at the model's defaults
    (native backend, one generator per image)."""
    import engine

    model = engine.load(name, backend="native")
    d = model.sampling_defaults
    labels = [i % 10 for i in range(batch)]
    best = float("inf")
    for r in range(repeats + 1):   # the first call builds the native plan: not timed
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        start = time.perf_counter()
        model.sample_tokens(batch, num_iter=d["num_iter"], cfg=d["cfg"], labels=labels,
                            temperature=d["temperature"], generator=gens)
        if r:
            best = min(best, time.perf_counter() - start)
    return {"model": name, "batch": batch, "num_iter": d["num_iter"], "cfg": d["cfg"],
            "seconds_per_image": best / batch, "threads": torch.get_num_threads()}


def main() -> int:
    from engine.builtin.evaluate import run_sweep

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples-per-class", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfgs = [1.0, 1.5, 2.0, 3.0, 4.0]
    report = run_sweep("digits-causal", args.samples_per_class, cfgs, backends=["native", "reference"])
    report["timing"] = [time_per_image(name, 100, args.repeats) for name in ("digits-causal", "digits")]
    report["mar"] = run_sweep("digits", args.samples_per_class, [1.0, 2.0, 3.0], num_iters=[8, 16],
                              backends=["native"])
    write_docs(report, args.samples_per_class, args.repeats, args.threads)
    from engine.images import labelled_grid

    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "samples.npz"
        subprocess.run([sys.executable, "-m", "engine", "sample", "--checkpoint", "digits-causal",
                        "--per-class", "8", "--out", str(npz)], check=True)
        data = np.load(npz)
        labelled_grid(data["images"], data["labels"], scale=8).save(HERE / "samples.png")
    print(f"wrote {HERE / 'samples.png'}")
    return 0


def write_docs(report: dict, samples_per_class: int, repeats: int, threads: int) -> None:
    from engine.builtin.evaluate import format_per_class, format_table

    cfgs = sorted({r["cfg"] for r in report["results"]})
    (HERE / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    d = report["sampling_defaults"]
    at = [r for r in report["results"] if r["cfg"] == d["cfg"]]
    lines = [
        "# digits-causal: sample quality", "",
        f"`python docs/digits-causal/make_docs.py --samples-per-class {samples_per_class}` "
        f"(the sweep of `python -m engine evaluate --checkpoint digits-causal --samples-per-class "
        f"{samples_per_class} --cfg {' '.join(f'{c:g}' for c in cfgs)} --backends native reference`; "
        f"generator seed 0, temperature {report['temperature']}, {report['num_sampling_steps']} diffusion "
        "steps per token, x0 clipped to [-1, 1]). Metrics as in docs/digits/quality.md.", "",
        f"Defaults recorded with the model: cfg {d['cfg']} ({d.get('cfg_schedule', 'linear')} schedule), "
        f"num_iter {d['num_iter']} (one token per step), temperature {d['temperature']}.", "",
        "At the defaults: " + "; ".join(f"{r['backend']}: accuracy **{r['accuracy']:.1%}**, FD **{r['fd']:.2f}**"
                                        for r in at)
        + f" (real-vs-real floor {report['real_vs_real_fd']:.2f}).", "",
        "## Sweep", "", format_table(report, markdown=True), "",
        "## Per-class accuracy", "", "```", format_per_class(report), "```", "",
        "## The MAR digits with the same classifier (AR vs MAR)", "",
        f"`run_sweep(\"digits\", {samples_per_class}, [1, 2, 3], num_iters=[8, 16], backends=[\"native\"])`: "
        "random-order MAR (bidirectional) at its default 8 steps and at 16 steps (one token per step, "
        "as the causal model).", "",
        format_table(report["mar"], markdown=True), "",
        "## Time per image (batch of 100, native backend, defaults, best of "
        f"{repeats}, {threads} thread(s), shared machine)", "",
        "| model | num_iter | cfg | ms / image |", "|---|---|---|---|",
        *[f"| {t['model']} | {t['num_iter']} | {t['cfg']} | {1000 * t['seconds_per_image']:.2f} |"
          for t in report["timing"]], ""]
    (HERE / "quality.md").write_text("\n".join(lines))
    print(f"wrote {HERE / 'quality.json'} and {HERE / 'quality.md'}")


if __name__ == "__main__":
    sys.exit(main())
