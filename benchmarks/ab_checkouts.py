"""The same three workloads on two checkouts of the engine, in fresh alternating processes: a
before/after check for changes that should not move speed (MAR-B batch 1 on the native backend;
ELM's KV-cached generate_cfg over 256 positions; 16 concurrent single-image requests through the
Scheduler on the built-in digits model). APIs used are those both checkouts have.

    python benchmarks/ab_checkouts.py --before /path/to/old/checkout --after . --rounds 3 \\
        --out benchmarks/results/ab_refactor.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = ("mar_b_batch1", "elm_256", "scheduler_16")


def run_workload(name: str) -> float:
    """Seconds of one run of `name` (after a warm-up run), in this process."""
    import torch

    import engine
    torch.manual_seed(0)
    if name == "mar_b_batch1":
        from engine.models.mar import MAR
        config = engine.MARConfig.from_dict({**engine.PRESETS["mar_base"], "num_sampling_steps": "50"})
        module = MAR(config)
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
        model = engine.MARModel(module, backend="native")
        go = lambda: model.sample_tokens(1, num_iter=16, cfg=3.0, labels=[1], generator=torch.Generator().manual_seed(0))  # noqa: E731
    elif name == "elm_256":
        from engine.families.elm import ELMConfig, ELMModel
        from engine.models.elm import ELMTransformer
        config = ELMConfig(dim=384, n_layer=6, n_head=6, token_each=2, code_dim=10, num_classes=1000, block_size=256)
        module = ELMTransformer(config)
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.05)
        model = ELMModel(module)
        go = lambda: model.generate_cfg(None, torch.tensor([3]), 256, temperature=1.0, top_k=400, cfg_scale=2.0)  # noqa: E731
    else:
        from engine.serving import Request, Scheduler
        model = engine.load("digits")
        sched = Scheduler(model, max_batch_images=16)

        def go():
            futures = [sched.submit(Request(label=i % 10, seed=i)) for i in range(16)]
            [f.result(600) for f in futures]
    with torch.no_grad():
        go()
        start = time.perf_counter()
        go()
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--before")
    p.add_argument("--after")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_workload(args.one)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stamp import machine_stamp
    times = {w: {"before": [], "after": []} for w in args.workloads}
    for _ in range(args.rounds):
        for workload in args.workloads:
            for side in ("before", "after"):
                root = Path(getattr(args, side)).resolve()
                env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "2"}
                out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", workload], cwd=root,
                                     env=env, capture_output=True, text=True, timeout=1200)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                times[workload][side].append(float(out.stdout.strip().splitlines()[-1]))
                print(workload, side, times[workload][side][-1], flush=True)
    summary = {w: {"before_best": min(t["before"]), "after_best": min(t["after"]),
                   "after_over_before": min(t["after"]) / min(t["before"])} for w, t in times.items()}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"stamp": machine_stamp(), "before": str(args.before),
                                              "times": times, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
