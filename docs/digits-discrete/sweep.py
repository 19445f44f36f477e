"""The sampling-default sweep of a BAE-token digits model (digits-elm-ar): classifier accuracy and
Fréchet distance (engine.builtin.evaluate) for every (cfg, temperature, top_k), with generator seed 1 (the
reported evaluation, `python -m engine evaluate`, uses seed 0: the defaults are not chosen on it).

    python docs/digits-discrete/sweep.py --checkpoint digits-elm-ar --json docs/digits-discrete/elm_ar_sweep.json
"""
import argparse
import itertools
import json
import time
from pathlib import Path

import torch

import engine
from engine.builtin.evaluate import evaluate_samples, make_reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="digits-elm-ar")
    p.add_argument("--samples-per-class", type=int, default=20)
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0, 0.8, 0.6])
    p.add_argument("--top-k", type=int, nargs="+", default=[0, 16], help="0: no top-k")
    p.add_argument("--cfg-schedule", nargs="+", default=["constant"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = engine.load(args.checkpoint)
    ref = make_reference(16, args.samples_per_class, seed=0)
    labels = [c for c in range(10) for _ in range(args.samples_per_class)]
    rows = []
    for cfg, temperature, top_k, schedule in itertools.product(args.cfg, args.temperature, args.top_k,
                                                               args.cfg_schedule):
        start = time.time()
        images = engine.generate(model, labels, cfg=cfg, temperature=temperature, top_k=top_k or None,
                                 cfg_schedule=schedule, generator=torch.Generator().manual_seed(args.seed),
                                 output_type="pt")
        seconds = time.time() - start
        m = evaluate_samples(ref, images * 2 - 1, torch.tensor(labels))
        rows.append({"cfg": cfg, "temperature": temperature, "top_k": top_k or None, "cfg_schedule": schedule,
                     "accuracy": m["accuracy"], "fd": m["fd"], "seconds": round(seconds, 2)})
        print(f"cfg {cfg:4.1f}  {schedule:8s}  temperature {temperature:4.2f}  top_k {top_k or '-':>3}  "
              f"accuracy {m['accuracy']:6.1%}  FD {m['fd']:7.2f}  ({seconds:.1f}s)", flush=True)
    report = {"checkpoint": args.checkpoint, "samples_per_class": args.samples_per_class, "seed": args.seed,
              "real_vs_real_fd": ref.real_vs_real_fd, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
