"""Turn saved pytest-benchmark JSON into a markdown table and a PNG plot.

    python benchmarks/report.py benchmarks/results/head.json benchmarks/results/sample.json \
        --out benchmarks/results/report

writes report.md (one table per benchmark file: every group, every backend, times and the speedup
over the reference backend of the same group) and report.png (speedups per group). Speedup =
reference time / backend time, from the minimum over rounds (the least disturbed measurement on a
shared machine) and, for comparison, from the medians. Head-loop times are also given per 100
diffusion steps (groups run with fewer steps are scaled linearly).
"""
from __future__ import annotations

import argparse
import json
import re
from collections import OrderedDict
from pathlib import Path

ORDER = ("reference", "native", "native-bf16", "triton")


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    groups: "OrderedDict[str, dict]" = OrderedDict()
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        backend = info.get("backend") or (bench.get("params") or {}).get("backend_name") \
            or (bench.get("params") or {}).get("backend") or bench["name"]
        groups.setdefault(bench.get("group") or bench["name"], {})[backend] = {
            "min": bench["stats"]["min"], "median": bench["stats"]["median"],
            "rounds": bench["stats"]["rounds"], "info": info,
        }
    machine = data.get("machine_info", {})
    return {"groups": groups, "machine": machine, "datetime": data.get("datetime", "")}


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def _backends(entries: dict) -> list[str]:
    return sorted(entries, key=lambda b: (ORDER.index(b) if b in ORDER else len(ORDER), b))


def table(report: dict, title: str) -> list[str]:
    lines = [f"### {title}", ""]
    m = report["machine"]
    cpu = (m.get("cpu") or {}).get("brand_raw") or m.get("processor") or "?"
    threads = None
    for entries in report["groups"].values():
        for e in entries.values():
            threads = e["info"].get("threads", threads)
    stamps = {(e["info"].get("commit", "?")[:10], e["info"].get("tree", "?"))
              for es in report["groups"].values() for e in es.values()}
    where = ", ".join(f"commit {c} ({t} tree)" for c, t in sorted(stamps))
    lines.append(f"Machine: {cpu}, {threads or '?'} torch threads; run {report['datetime']}; {where}.")
    lines.append("")
    split = any("head_loop_s" in e["info"] for es in report["groups"].values() for e in es.values())
    extra = " of which head loops |" if split else ""
    lines.append("| group | backend | rounds | min | median | min per 100 steps | speedup (min) | "
                 f"speedup (median) |{extra}")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if split else ""))
    for group, entries in report["groups"].items():
        ref = entries.get("reference")
        for backend in _backends(entries):
            e = entries[backend]
            steps = e["info"].get("steps")
            per100 = _fmt_time(e["min"] * 100 / steps) if steps and "head" in group else ""
            if ref is not None:
                s_min = f"{ref['min'] / e['min']:.2f}x"
                s_med = f"{ref['median'] / e['median']:.2f}x"
            else:
                s_min = s_med = ""
            cell = ""
            if split:
                head = e["info"].get("head_loop_s")
                cell = f" {_fmt_time(head)} |" if head is not None else " |"
            lines.append(f"| {group} | {backend} | {e['rounds']} | {_fmt_time(e['min'])} | "
                         f"{_fmt_time(e['median'])} | {per100} | {s_min} | {s_med} |{cell}")
    lines.append("")
    return lines


def short_label(group: str) -> str:
    g = re.sub(r"^head MAR-", "", group)
    g = re.sub(r" rows=(\d+) steps=\d+", r"/\1", g)
    g = re.sub(r"^sample_tokens MAR-B bsz=(\d+).*num_iter=(\d+) steps=(\d+)", r"sample b\1 it\2 s\3", g)
    return g


def plot(reports: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, r) for t, r in reports if any("reference" in e for e in r["groups"].values())]
    if not panels:
        return
    widths = [max(4, len(r["groups"]) * 0.55) for _, r in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 2, 4.5),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (title, report) in zip(axes[0], panels):
        groups = [g for g, e in report["groups"].items() if "reference" in e]
        backends = [b for b in ORDER[1:] if any(b in report["groups"][g] for g in groups)]
        width = 0.8 / max(1, len(backends))
        for k, backend in enumerate(backends):
            xs, ys = [], []
            for i, g in enumerate(groups):
                e = report["groups"][g]
                if backend in e:
                    xs.append(i + (k - (len(backends) - 1) / 2) * width)
                    ys.append(e["reference"]["min"] / e[backend]["min"])
            bars = ax.bar(xs, ys, width=width, label=backend)
            for x, y in zip(xs, ys):
                ax.text(x, y, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
            del bars
        ax.axhline(1.0, color="black", linewidth=0.8)
        if "head" in title.lower():
            ax.axhline(2.0, color="gray", linestyle="--", linewidth=0.8)
            ax.axhline(1.3, color="gray", linestyle=":", linewidth=0.8)
        else:
            ax.axhline(1.8, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([short_label(g) for g in groups], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("speedup over reference (x)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/report"),
                        help="output path without suffix (writes .md and .png)")
    args = parser.parse_args(argv)
    reports = []
    lines = ["# Benchmarks: reference vs native", ""]
    for path in args.json:
        report = load(path)
        title = "head loop (one MAR step's diffusion loop)" if "head" in path.stem else \
            "end-to-end sample_tokens" if "sample" in path.stem else path.stem
        reports.append((title, report))
        lines += table(report, f"{title} ({path.name})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md, png = args.out.with_suffix(".md"), args.out.with_suffix(".png")
    lines.append(f"![speedups]({png.name})")
    md.write_text("\n".join(lines) + "\n")
    plot(reports, png)
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    main()
