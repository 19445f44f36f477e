"""Device operations and host syncs per `sample_tokens` call (engine.core.counting), the published
samplers (counted by running them: tests/data/published/pub_counts.json,
tests/data/lightgen/pub_counts.json) against the engine's backends on the same checkpoints.

    TRITON_INTERPRET=1 python benchmarks/op_counts.py --out benchmarks/results/op_counts.json

MAR: the golden model (head 2 x 96, 50 diffusion steps), batch 1, 8 MAR steps, cfg 3 linear.
Fluid: LightGen config p1 (head 1 x 32, 10 diffusion steps), batch 1, 8 MAR steps, cfg 3 linear,
256 px. ELM (elm-ar): the golden configurations a (4 x 4 grid, 2 sub-tokens of 16 values) and
b (8 x 8 grid, 2 sub-tokens of 32 values), one image (block_size positions), the published
code's top-k and cfg schedule; engines "reference" (the torch statement of the draw) and "triton"
(the fused sampling kernel, one launch per position), against tests/data/elm/pub_counts.json.
For ELM "syncs_inside_ops" also counts the host syncs that happen inside ATen ops
(torch.profiler's aten::_local_scalar_dense / aten::nonzero at every depth): the published
loop's are all there (torch.multinomial's checks, the boolean-mask top-k assignment).
Triton runs in its interpreter here (same launches as on a GPU)."""
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
from engine.core.counting import count_ops  # noqa: E402

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
    "elm-ar a bsz1 16 positions cfg4 top-k5": dict(
        checkpoint=ROOT / "tests/data/elm/ck_a.pth", backends=("triton", "reference"),
        load=dict(family="elm-ar", n_head=4, block_size=16),
        published=(ROOT / "tests/data/elm/pub_counts.json", "a,bsz1,iter16,cfg4.0,linear,topk5"),
        call=lambda m: m.sample_tokens(1, labels=[0], cfg=4.0, cfg_schedule="linear", top_k=5)),
    "elm-ar b bsz1 64 positions cfg1.5 top-k10": dict(
        checkpoint=ROOT / "tests/data/elm/ck_b.pth", backends=("triton", "reference"),
        load=dict(family="elm-ar", n_head=2, n_kv_head=1, block_size=64, norm_eps=1e-6, rope_base=500.0),
        published=(ROOT / "tests/data/elm/pub_counts.json", "b,bsz1,iter64,cfg1.5,linear,topk10"),
        call=lambda m: m.sample_tokens(1, labels=[1], cfg=1.5, cfg_schedule="linear", top_k=10)),
}


def syncs_inside_ops(call, model) -> int:
    """Host syncs at every depth of the ATen calls (what the dispatch counter cannot see)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call(model)
    return sum(e.name in ("aten::_local_scalar_dense", "aten::nonzero") for e in prof.events())


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
        if "syncs_inside_ops" in published:
            rows[-1]["syncs_inside_ops"] = published["syncs_inside_ops"]
        print(rows[-1])
        load = case.get("load", dict(ema=True))
        for backend in case.get("backends") or available_backends("cpu", include_interpreted=True):
            model = engine.load(case["checkpoint"], backend=backend, **load)
            torch.manual_seed(0)
            np.random.seed(0)
            _, counter = count_ops(case["call"], model)
            fused = sum(n for op, n in counter.counts.items() if op.startswith("engine."))
            rows.append(dict(case=name, sampler=f"engine {backend}", operations=counter.total,
                             host_syncs=counter.host_syncs, fused_launches=fused))
            if "syncs_inside_ops" in published:
                rows[-1]["syncs_inside_ops"] = syncs_inside_ops(case["call"], model)
            print(rows[-1])
    Path(args.out).write_text(json.dumps({"stamp": machine_stamp(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
