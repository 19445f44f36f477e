"""LightGen's Fluid sampler and the engine's, timed in alternating rounds (A B A B ...), so that
a machine whose speed drifts (a shared VM) cannot favour either: the ratio of each adjacent pair
is recorded, and their median. Same model, seed and settings as bench_fluid.py.

    LIGHTGEN=/path/to/LightGen python benchmarks/fluid_interleaved.py --rounds 2 \
        --out benchmarks/results/fluid_interleaved.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_fluid  # noqa: E402  (the model, settings and LightGen import)
from stamp import machine_stamp  # noqa: E402

import engine  # noqa: E402
from engine.families.fluid import FluidModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", default="native")
    parser.add_argument("--num-iter", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fluid_interleaved.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    published = bench_fluid.lightgen_model()
    if published is None:
        raise SystemExit("set LIGHTGEN to a LightGen checkout")
    model = FluidModel(engine.accelerate(published).mar, backend=args.backend)
    s, c = bench_fluid.CONFIG["sample_tokens"], bench_fluid.CONFIG["constructor"]
    texts = torch.randn(1, c["max_length"], c["caption_channels"], generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_iter=args.num_iter, cfg=s["cfg"], cfg_schedule=s["cfg_schedule"], texts=texts,
                  temperature=s["temperature"], height=s["height"], width=s["width"])

    def timed(sample):
        torch.manual_seed(0)
        np.random.seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            out = sample(1, **kwargs)
        return time.perf_counter() - start, out

    rounds = []
    for _ in range(args.rounds):
        t_pub, ref = timed(published.sample_tokens)
        t_eng, out = timed(model.sample_tokens)
        err = float((out.double() - ref.double()).norm() / ref.double().norm())
        rounds.append(dict(lightgen_s=t_pub, engine_s=t_eng, speedup=t_pub / t_eng, rel_err=err))
        print(rounds[-1], flush=True)
    result = dict(stamp=machine_stamp(), backend=args.backend, num_iter=args.num_iter, rounds=rounds,
                  median_speedup=statistics.median(r["speedup"] for r in rounds))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"median speedup {result['median_speedup']:.2f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
