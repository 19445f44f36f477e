"""Regenerate the README material for the built-in text-to-image model "digits-text":

    python docs/digits-text/make_docs.py [--per-category 50] [--threads 2]

writes, next to this file,
  samples.png   `python -m engine sample --checkpoint digits-text` with one prompt of every kind
                (seed 0, the model's recorded cfg / num_iter), each prompt above its images
  real.png      the same prompts drawn with real held-out digits (what a perfect model gives)
  geneval.md    the sweep of `python -m engine geneval` (cfg x num_iter on the native backend; the
                reference backend and bf16 at the model's defaults) as a table
  geneval.png   the same as a plot
  geneval.json  the raw report (with the machine stamp of benchmarks/stamp.py)
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROMPTS = ["a 3 to the left of a 7", "a seven to the right of a two", "a 5 and a 9", "two sixes",
           "a 4 on the left", "an eight on the right", "a zero", "two 1s"]


def make_samples(per_prompt: int) -> None:
    cmd = [sys.executable, "-m", "engine", "sample", "--checkpoint", "digits-text",
           "--per-class", str(per_prompt), "--out", str(HERE / "samples.png")]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    subprocess.run(cmd, check=True)


def make_real(per_prompt: int) -> None:
    import torch

    from engine.builtin import digits_text as dt
    from engine.images import captioned_grid

    sampler, rng = dt.CanvasSampler("heldout"), random.Random(0)
    canvases, captions = [], []
    for p in PROMPTS:
        for _ in range(per_prompt):
            left, right = dt.layout(dt.parse_prompt(p), rng)
            canvases.append(dt.compose(sampler.digit(left, rng), sampler.digit(right, rng)))
            captions.append(p)
    arr = ((torch.stack(canvases).permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    captioned_grid(arr, captions, scale=8).save(HERE / "real.png")
    print(f"wrote {HERE / 'real.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-category", type=int, default=50)
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 6.0])
    parser.add_argument("--num-iter", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-prompt", type=int, default=4)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    make_samples(args.per_prompt)
    make_real(args.per_prompt)
    from engine.builtin.geneval import format_table, plot_report, run_report

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from stamp import machine_stamp

    # The sweep on the fastest backend; the other backends (and bf16) at the recorded defaults.
    report = run_report("digits-text", args.per_category, args.cfg, args.num_iter, backends=["native"])
    for backend, precision in (("reference", "fp32"), ("native", "bf16")):
        extra = run_report("digits-text", args.per_category, backends=[backend], precision=precision)
        report["results"] += extra["results"]
    report["stamp"] = machine_stamp()
    report["command"] = (f"python docs/digits-text/make_docs.py --per-category {args.per_category} "
                         f"--cfg {' '.join(map(str, args.cfg))} --num-iter {' '.join(map(str, args.num_iter))}")
    (HERE / "geneval.json").write_text(json.dumps(report, indent=1) + "\n")
    d = report["sampling_defaults"]
    lines = ["# digits-text: GenEval-style scores", "",
             f"Generated with `{report['command']}` ({len(report['prompts'])} prompts, "
             f"{args.per_category} per category, one image each, generator seed {report['seed']}; "
             f"commit {report['stamp']['commit'][:10]}, {report['stamp']['tree']} tree). "
             f"Defaults recorded with the model: cfg {d.get('cfg')}, num_iter {d.get('num_iter')}. "
             f"A slot is empty below mean ink {report['empty_below_ink']:.3f} "
             f"(0.3 x the faintest real digit's, {report['faintest_real_ink']:.3f}).", "",
             format_table(report, markdown=True), ""]
    (HERE / "geneval.md").write_text("\n".join(lines))
    plot_report(report, HERE / "geneval.png")
    print(f"wrote {HERE / 'geneval.md'}, geneval.png, geneval.json")


if __name__ == "__main__":
    main()
