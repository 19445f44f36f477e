"""fast= modes measured: speed and quality per built-in model, and MAR-B-shaped speedups.

    python benchmarks/fast_modes.py [--quick] [--skip-mar-b] [--only NAME ...]

Writes benchmarks/results/fast_modes.json (stamped with commit, CPU, threads), the table
benchmarks/results/fast_modes.md and the plot docs/fast/fast_modes.png (docs/fast.md shows them).

Per built-in model and mode (each at the model's recorded settings):
  * time per image: engine.generate of 100 images (10 per class, one generator per image) and
    of 10 images one at a time (batch 1). Modes alternate within each repeat (exact, fast, exact,
    fast, ...); the median of the repeats is reported, as CPU time of this process on one thread
    (the machine is shared: wall time is recorded too, but CPU time is what the ratios use);
  * quality: `engine evaluate`'s digit-classifier accuracy and Fréchet distance
    (engine/builtin/evaluate.py, 100 samples per class, seed 0), and for digits-text the
    GenEval-style overall score (engine/builtin/geneval.py, 50 prompts per category).
MAR-B: the MAR-B-shaped random-weight model of benchmarks/bench_sample.py, 256 tokens, cfg 3.0,
num_iter 8 and 50 diffusion steps (reduced from the published 64 / 100 to fit a 2-core CPU), at
batch 1 and 16: time and the tokens' deviation from exact mode (random weights: no quality).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import engine  # noqa: E402
from stamp import machine_stamp  # noqa: E402

MODES = {
    "digits": ["exact", "disa", "lazy", "disa+lazy"],
    "digits-text": ["exact", "disa", "lazy", "disa+lazy"],
    "digits-causal": ["exact", "disa"],
    "digits-elm-ar": ["exact", "speculative"],
    "digits-ctf": ["exact", "speculative"],
}
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "fast" / "fast_modes.png"


def load(name):
    from engine.backends import available_backends

    backend = "native" if "native" in available_backends("cpu") else "auto"
    try:
        return engine.load(name, backend=backend)
    except Exception:
        return engine.load(name)


def conditions(model, n):
    if model.conditioning == "text":
        from engine.builtin.geneval import default_prompts
        prompts = default_prompts(n, 0)[:n]   # n per category: at least n in all
        assert len(prompts) == n
        return {"prompts": prompts}
    return {"labels": [i % 10 for i in range(n)]}


def one_call(model, mode, cond, seed0=0):
    n = len(next(iter(cond.values())))
    gens = [torch.Generator().manual_seed(seed0 + i) for i in range(n)]
    return engine.generate(model, generator=gens, output_type="pt", fast=mode, **cond)


def time_modes(model, modes, n, batch, reps):
    """{mode: {"cpu_s_per_image": median, "wall_s_per_image": median}} over `reps` alternating repeats."""
    cond = conditions(model, n)
    one_call(model, modes[-1], {k: v[:batch] for k, v in cond.items()})   # warm-up (retimed heads, caches)
    cpu = {m: [] for m in modes}
    wall = {m: [] for m in modes}
    for _ in range(reps):
        for mode in modes:
            c0, w0 = time.process_time(), time.perf_counter()
            for start in range(0, n, batch):
                one_call(model, mode, {k: v[start:start + batch] for k, v in cond.items()}, start)
            cpu[mode].append((time.process_time() - c0) / n)
            wall[mode].append((time.perf_counter() - w0) / n)
    return {m: {"cpu_s_per_image": statistics.median(cpu[m]), "wall_s_per_image": statistics.median(wall[m]),
                "cpu_repeats": cpu[m]} for m in modes}


def quality(name, model, mode, per_class, per_category):
    if model.conditioning == "text":
        from engine.builtin.geneval import run_report
        r = run_report(name, per_category=per_category, backends=[model.backend_name], log=None, fast=mode)
        return {"geneval_overall": r["results"][0]["overall"]}
    from engine.builtin.evaluate import run_sweep
    cfg = float(model.sampling_defaults.get("cfg", 1.0))
    r = run_sweep(name, samples_per_class=per_class, cfgs=[cfg], backends=[model.backend_name], log=None, fast=mode)
    res = r["results"][0]
    return {"accuracy": res["accuracy"], "fd": res["fd"]}


def mar_b_case(bsz, modes, num_iter=8, steps="50"):
    from bench_sample import mar_b
    from engine.families.mar import MARModel

    base = mar_b(steps)
    from engine.backends import available_backends
    model = MARModel(base.mar, backend="native" if "native" in available_backends("cpu") else "reference")
    labels = [(7 * i + 3) % 1000 for i in range(bsz)]
    out = {}
    exact_tokens = None
    for mode in modes:
        gens = [torch.Generator().manual_seed(i) for i in range(bsz)]
        c0, w0 = time.process_time(), time.perf_counter()
        tokens = model.sample_tokens(bsz, num_iter=num_iter, cfg=3.0, labels=labels, generator=gens, fast=mode)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        if exact_tokens is None:
            exact_tokens = tokens
        dev = float((tokens - exact_tokens).norm() / exact_tokens.norm())
        out[mode] = {"cpu_s": cpu, "wall_s": wall, "rel_dev_from_exact": dev}
        print(f"  MAR-B bsz {bsz} {mode:10s} cpu {cpu:7.1f}s  wall {wall:7.1f}s  tokens' deviation {dev:.3f}",
              flush=True)
    for mode in modes:
        out[mode]["speedup_cpu"] = out["exact"]["cpu_s"] / out[mode]["cpu_s"]
    return {"bsz": bsz, "num_iter": num_iter, "num_sampling_steps": steps, "cfg": 3.0, "modes": out}


def table(report) -> str:
    head = ["model", "fast", "ms / image (100)", "speedup", "ms / image (batch 1)", "speedup (batch 1)",
            "accuracy", "FD", "GenEval"]
    rows = []
    for name, r in report["models"].items():
        for mode, m in r["modes"].items():
            q = m.get("quality", {})
            rows.append([name, mode, f"{1000 * m['batch']['cpu_s_per_image']:.1f}", f"{m['speedup']:.2f}x",
                         f"{1000 * m['single']['cpu_s_per_image']:.1f}", f"{m['speedup_single']:.2f}x",
                         f"{q['accuracy']:.1%}" if "accuracy" in q else "",
                         f"{q['fd']:.2f}" if "fd" in q else "",
                         f"{q['geneval_overall']:.3f}" if "geneval_overall" in q else ""])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if report.get("mar_b"):
        lines += ["", "| MAR-B shapes (random weights) | fast | CPU s | speedup | tokens' relative deviation from exact |",
                  "|---|---|---|---|---|"]
        for case in report["mar_b"]:
            for mode, m in case["modes"].items():
                lines.append(f"| batch {case['bsz']}, num_iter {case['num_iter']}, {case['num_sampling_steps']} "
                             f"diffusion steps | {mode} | {m['cpu_s']:.1f} | {m['speedup_cpu']:.2f}x | "
                             f"{m['rel_dev_from_exact']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_fd) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in report["models"].items():
        pts = sorted(((m["speedup"], m.get("quality", {}), mode) for mode, m in r["modes"].items()), key=lambda t: t[0])
        if name == "digits-text":
            xs = [p[0] for p in pts]
            ys = [100 * p[1].get("geneval_overall", float("nan")) for p in pts]
            line, = ax_acc.plot(xs, ys, "s--", label=f"{name} (GenEval x100)")
        else:
            xs = [p[0] for p in pts]
            line, = ax_acc.plot(xs, [100 * p[1].get("accuracy", float("nan")) for p in pts], "o-", label=name)
            ax_fd.plot(xs, [p[1].get("fd", float("nan")) for p in pts], "o-", color=line.get_color(), label=name)
        for x, q, mode in pts:
            if mode != "exact":
                y = 100 * q.get("geneval_overall", q.get("accuracy", float("nan")))
                ax_acc.annotate(mode, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax_acc.set(xlabel="speedup over exact (CPU time per image, batch 100)", ylabel="accuracy (%)",
               title="Quality vs speed: accuracy")
    ax_fd.set(xlabel="speedup over exact", ylabel="Fréchet distance (lower is better)", title="Fréchet distance")
    for ax in (ax_acc, ax_fd):
        ax.axvline(1.0, color="0.8", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    s = report["stamp"]
    fig.suptitle(f"engine fast= modes on the built-in models — {s['commit'][:7]}, {s['cpu']}, "
                 f"{s['threads']} thread(s)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer images and repeats (a smoke run)")
    p.add_argument("--skip-mar-b", action="store_true")
    p.add_argument("--mar-b-only", action="store_true",
                   help="run the MAR-B cases only and add them to an existing results file (--out)")
    p.add_argument("--mar-b-threads", type=int, default=None, help="threads of the MAR-B cases (default --threads)")
    p.add_argument("--replot", action="store_true", help="only redraw the plot and table from --out")
    p.add_argument("--only", nargs="+", default=None, choices=sorted(MODES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "fast_modes.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.replot:
        report = json.loads(Path(args.out).read_text())
        plot(report, PLOT)
        Path(args.out).with_suffix(".md").write_text(table(report))
        print(table(report))
        return
    n, reps, single = (20, 1, 3) if args.quick else (100, 3, 10)
    per_class, per_category = (10, 10) if args.quick else (100, 50)
    report = {"stamp": machine_stamp(), "protocol": __doc__, "models": {}, "mar_b": []}
    if args.mar_b_only:
        report = json.loads(Path(args.out).read_text())
    for name in ([] if args.mar_b_only else args.only or MODES):
        model = load(name)
        modes = MODES[name]
        print(f"{name} ({model.family}, backend {model.backend_name}, settings {model.sampling_defaults})", flush=True)
        batch = time_modes(model, modes, n, n, reps)
        one = time_modes(model, modes, single, 1, reps)
        entry = {"family": model.family, "backend": model.backend_name, "settings": model.sampling_defaults,
                 "modes": {}}
        for mode in modes:
            q = quality(name, model, mode, per_class, per_category)
            entry["modes"][mode] = {"batch": batch[mode], "single": one[mode], "quality": q,
                                    "speedup": batch["exact"]["cpu_s_per_image"] / batch[mode]["cpu_s_per_image"],
                                    "speedup_single": one["exact"]["cpu_s_per_image"] / one[mode]["cpu_s_per_image"]}
            if hasattr(model, "last_passes"):
                entry["modes"][mode]["last_call_passes"] = model.last_passes
            print(f"  {mode:11s} {1000 * batch[mode]['cpu_s_per_image']:7.1f} ms/image "
                  f"({entry['modes'][mode]['speedup']:.2f}x; batch 1 {entry['modes'][mode]['speedup_single']:.2f}x) "
                  f"{q}", flush=True)
        report["models"][name] = entry
    if not args.skip_mar_b:
        torch.set_num_threads(args.mar_b_threads or args.threads)
        report["mar_b_stamp"] = machine_stamp()
        report["mar_b"] = [mar_b_case(bsz, ["exact", "disa", "lazy", "disa+lazy"]) for bsz in (1, 16)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    md = out.with_suffix(".md")
    md.write_text(table(report))
    try:
        plot(report, PLOT)
        print(f"wrote {PLOT}")
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(table(report))
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()
