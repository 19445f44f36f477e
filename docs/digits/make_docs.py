"""Regenerate the README material for the built-in digits model:

    python docs/digits/make_docs.py [--samples-per-class 100] [--threads 2]

writes, next to this file,
  real.png      the same grid of real held-out digits, for comparison
  samples.png   a labelled grid of `python -m engine sample --per-class 8` (the CLI defaults:
                seed 0, the model's recorded cfg / num_iter / temperature)
  quality.md    the sweep table of `python -m engine evaluate` (accuracy and Fréchet distance vs
                cfg and num_iter, per backend, with the real-vs-real floor)
  quality.png   the same as a plot
  quality.json  the raw report, with bf16 at the model's defaults for every CPU backend and the
                machine stamp of benchmarks/stamp.py (commit, clean/dirty tree, CPU, threads)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_samples(per_class: int) -> None:
    from engine.images import labelled_grid

    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "samples.npz"
        subprocess.run([sys.executable, "-m", "engine", "sample", "--per-class", str(per_class),
                        "--out", str(npz)], check=True)
        data = np.load(npz)
        labelled_grid(data["images"], data["labels"], scale=8).save(HERE / "samples.png")
    print(f"wrote {HERE / 'samples.png'}")


def make_real(per_class: int) -> None:
    """The first held-out real digits of each class at the model's resolution, for comparison."""
    import engine
    from engine.builtin.digits import load_split
    from engine.images import labelled_grid

    images, labels = load_split("heldout", engine.load("digits", backend="reference").config.img_size)
    pick = [i for c in range(10) for i in np.flatnonzero(labels.numpy() == c)[:per_class]]
    arr = ((images[pick].permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    labelled_grid(arr, labels[pick].tolist(), scale=8).save(HERE / "real.png")
    print(f"wrote {HERE / 'real.png'}")


def markdown(report: dict, command: str) -> str:
    from engine.builtin.evaluate import format_per_class, format_table

    d = report["sampling_defaults"]
    clf = report["classifier"]
    default_rows = [r for r in report["results"]
                    if r["cfg"] == d.get("cfg") and r["num_iter"] == d.get("num_iter")]
    lines = [
        "# Digits model: sample quality",
        "",
        f"Generated with `{command}` ({report['samples_per_class']} samples per class, "
        f"generator seed {report['seed']}, temperature {report['temperature']}, "
        f"{report['num_sampling_steps']} diffusion steps per token, x0 clipped to [-1, 1]; "
        f"commit {report['stamp']['commit'][:10]}, {report['stamp']['tree']} tree, "
        f"{report['stamp'].get('cpu', '?')}, {report['stamp'].get('threads', '?')} threads).",
        "",
        f"* **Classifier**: {clf['arch']}, trained on the real train split "
        f"({report['image_size']}x{report['image_size']}); accuracy on the "
        f"{clf['heldout_count']} real held-out digits: **{clf['heldout_accuracy']:.1%}**.",
        f"* **Accuracy**: the fraction of generated digits the classifier assigns to the requested class.",
        f"* **FD**: Fréchet distance between the classifier's 64-d penultimate features of the "
        f"generated digits and of the {report['heldout_count']} held-out real digits (lower is better). "
        f"The floor is the same distance for {report['real_vs_real_count']} *real* train digits "
        f"(the same number per class): **{report['real_vs_real_fd']:.2f}**. The classifier was "
        f"trained on those train digits, so the floor is slightly optimistic about accuracy "
        f"({report['real_vs_real_accuracy']:.1%}).",
        f"* Defaults recorded with the model: cfg {d.get('cfg')}, num_iter {d.get('num_iter')}.",
        "",
    ]
    if default_rows:
        lines.append("At the defaults: " + "; ".join(
            f"{r['backend']}: accuracy **{r['accuracy']:.1%}**, FD **{r['fd']:.2f}**" for r in default_rows)
            + f" (real-vs-real floor {report['real_vs_real_fd']:.2f}).")
        lines.append("")
    lines += ["## Sweep", "", format_table(report, markdown=True), "",
              "## Per-class accuracy", "", format_per_class(report, markdown=True), "",
              "![accuracy and FD vs cfg](quality.png)", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples-per-class", type=int, default=100)
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--num-iter", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--grid-per-class", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-samples", action="store_true")
    args = parser.parse_args()

    import torch

    from engine.builtin.evaluate import plot_report, run_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_samples:
        make_samples(args.grid_per_class)
        make_real(args.grid_per_class)
    report = run_sweep("digits", args.samples_per_class, args.cfg, args.num_iter, args.backends)
    # bf16 at the recorded defaults (the README's bf16 quality numbers), every backend.
    bf16 = run_sweep("digits", args.samples_per_class, [report["sampling_defaults"]["cfg"]],
                     [report["sampling_defaults"]["num_iter"]], args.backends, precision="bf16")
    report["results"] += bf16["results"]
    sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
    from stamp import machine_stamp

    report["stamp"] = machine_stamp()
    (HERE / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_report(report, HERE / "quality.png")
    command = (f"python -m engine evaluate --samples-per-class {args.samples_per_class} --cfg "
               + " ".join(f"{c:g}" for c in args.cfg) + " --num-iter "
               + " ".join(str(n) for n in args.num_iter))
    (HERE / "quality.md").write_text(markdown(report, command))
    print(f"wrote {HERE / 'quality.md'}, quality.png, quality.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
