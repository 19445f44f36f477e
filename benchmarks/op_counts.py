"""Device operations and host syncs per `sample_tokens` call (engine.counting), the published
samplers (counted by running them: tests/data/published/pub_counts.json,
tests/data/lightgen/pub_counts.json) against the engine's backends on the same checkpoints.

    TRITON_INTERPRET=1 python benchmarks/op_counts.py --out benchmarks/results/op_counts.json

MAR: the golden model (head 2 x 96, 50 diffusion steps), batch 1, 8 MAR steps, cfg 3 linear.
Fluid: LightGen config p1 (head 1 x 32, 10 diffusion steps), batch 1, 8 MAR steps, cfg 3 linear,
256 px. Triton runs in its interpreter here (same launches as on a GPU)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

import engine  # noqa: E402
from engine.backends import available_backends  # noqa: E402
from engine.counting import count_ops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from stamp import machine_stamp  # noqa: E402

CASES = {
    "mar golden bsz1 iter8 cfg3": dict(
        checkpoint=ROOT.parent / "shared" / "golden" / "mar_small" / "checkpoint-last.pth",
        published=(ROOT / "tests/data/published/pub_counts.json", "1,8,3.0"),
        call=lambda m: m.sample_tokens(1, 8, 3.0, "linear", [0], 1.0)),
    "fluid p1 bsz1 iter8 cfg3": dict(
        checkpoint=ROOT / "tests/data/lightgen/ck_p1.pth",
        published=(ROOT / "tests/data/lightgen/pub_counts.json", "p1,bsz1,iter8,cfg3.0"),
        call=lambda m: m.sample_tokens(1, num_iter=8, cfg=3.0, height=256, width=256,
                                       texts=torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(5)))),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/op_counts.json"))
    args = parser.parse_args()
    rows = []
    for name, case in CASES.items():
        path, key = case["published"]
        published = json.loads(path.read_text())[key]
        rows.append(dict(case=name, sampler="published", operations=published["total"],
                         host_syncs=published["syncs"]))
        for backend in available_backends("cpu", include_interpreted=True):
            model = engine.load(case["checkpoint"], ema=True, backend=backend)
            torch.manual_seed(0)
            np.random.seed(0)
            _, counter = count_ops(case["call"], model)
            fused = sum(n for op, n in counter.counts.items() if op.startswith("engine."))
            rows.append(dict(case=name, sampler=f"engine {backend}", operations=counter.total,
                             host_syncs=counter.host_syncs, fused_launches=fused))
            print(rows[-1])
    Path(args.out).write_text(json.dumps({"stamp": machine_stamp(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
